"""Safetensors shard layouts and the manifest that lists them.

A *shard* is a valid safetensors file: 8-byte little-endian header length N, N bytes of JSON header (padded
with spaces to a multiple of 8), then the tensors' bytes back to back. We compute the header from tensor
metadata alone, so a sender never serialises a model in memory: it sends the header, then each tensor's own
bytes. Tensors are laid out by descending item size, so from an 8-aligned data start every tensor begins at
a multiple of its item size and every chunk boundary that is a multiple of 8 falls between elements: a
receiver can fold any verified chunk into a float32 accumulator at once, without staging the shard.

The *manifest* is JSON: the chunk size and hash algorithms, the shards (file name, size, digest, tensor
table) and the FLModel envelope (params_type, round, metrics, meta). Everything read from a peer goes
through `Manifest.from_json` / `parse_header`, which check types and bounds and raise ProtocolError.

A compressed transfer (config.py's `update_compression`, `model_compression`) sends a float tensor encoded
(wire/quantize.py) as a U8 tensor of `encoded_nbytes` bytes; the manifest's `encoded` table says what it stands for,
`{NAME: {"encoding": "int8", "dtype": "BF16", "shape": [64, 64]}}`; `Manifest.model_tensors()` the model's tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from fl_plugins.errors import ProtocolError
from fl_plugins.wire import quantize

MANIFEST_FORMAT = "fl-plugins/manifest"
MANIFEST_VERSION = 1
CHUNK_HASH = "xxh3_128"
SHARD_HASH = "xxh3_128/chunks"  # xxh3_128 over the shard's chunk digests and its size (see hashing.py)
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_SHARD_BYTES = 1 << 30
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_MANIFEST_BYTES = 64 << 20
MAX_NDIM = 64  # numpy's limit; also bounds the work of multiplying a shape out
# SCAFFOLD (--strategy scaffold): the control variate of a floating-point tensor NAME travels beside it, in the global
# model and in every update, as the float32 tensor `scaffold.c.NAME` of the same shape (aggregator/scaffold.py)
CONTROL_VARIATE = "scaffold.c."


def _bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# safetensors dtype string -> item size in bytes
ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
INT_DTYPES = {"I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8"}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a safetensors dtype string (bfloat16 and float8 through ml_dtypes)."""
    simple = {
        "F64": "<f8",
        "F32": "<f4",
        "F16": "<f2",
        "I64": "<i8",
        "U64": "<u8",
        "I32": "<i4",
        "U32": "<u4",
        "I16": "<i2",
        "U16": "<u2",
        "I8": "i1",
        "U8": "u1",
        "BOOL": "?",
    }
    if dtype in simple:
        return np.dtype(simple[dtype])
    import ml_dtypes

    special = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if dtype in special:
        return np.dtype(special[dtype])
    raise ProtocolError(f"unknown safetensors dtype {dtype!r}; known: {sorted(ITEMSIZE)}")


def dtype_of_numpy(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    for name in ITEMSIZE:
        try:
            if numpy_dtype(name) == dt:
                return name
        except ProtocolError:  # pragma: no cover
            continue
    raise ProtocolError(f"numpy dtype {dt} has no safetensors equivalent; cast it to float32 first")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets relative to the start of the shard's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardLayout:
    """One shard: its file name, its header prefix (length + JSON) and its tensors in data order."""

    name: str
    header: bytes  # the full prefix: 8-byte length + JSON; b"" until known (a manifest read from JSON)
    tensors: list[TensorInfo]
    digest: str = ""  # filled in once known (global model: always; upload: at commit)
    header_size: int = -1  # the prefix's length when `header` is not known yet (-1: len(header))

    @property
    def data_start(self) -> int:
        return len(self.header) if self.header or self.header_size < 0 else self.header_size

    @property
    def size(self) -> int:
        return self.data_start + (self.tensors[-1].end if self.tensors else 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "header_size": self.data_start,
            "digest": self.digest,
            "tensors": {
                t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
                for t in self.tensors
            },
        }


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def short_repr(x: Any, limit: int = 80) -> str:
    """repr of a value from a peer, cut short: a message must not echo megabytes back."""
    try:
        r = repr(x)
    except ValueError:  # an int too long to print (more than 4300 digits)
        return f"<{type(x).__name__} too long to show>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _json(text: str | bytes, what: str) -> Any:
    """json.loads for bytes from a peer: malformed text, nesting deeper than the parser's recursion limit and
    integers longer than Python converts (4300 digits) are all ProtocolErrors."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ProtocolError(f"{what} is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long to convert
        raise ProtocolError(f"{what} is not valid JSON ({short_repr(str(e), 200)})") from None


def _tensor_table(obj: Any, where: str) -> list[TensorInfo]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: tensor table must be an object, got {type(obj).__name__}")
    out = []
    for name, spec in obj.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict) or set(spec) - {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(
                f"{where}: tensor {short_repr(name)} must have dtype, shape and data_offsets, got {short_repr(spec)}"
            )
        dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise ProtocolError(
                f"{where}: tensor {short_repr(name)} has unknown dtype {short_repr(dtype)}; known: {sorted(ITEMSIZE)}"
            )
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
            raise ProtocolError(
                f"{where}: tensor {short_repr(name)} has a bad shape {short_repr(shape)} (at most "
                f"{MAX_NDIM} non-negative integers)"
            )
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise ProtocolError(f"{where}: tensor {short_repr(name)} has bad data_offsets {short_repr(offs)}")
        start, end = offs
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if not 0 <= start <= end or end - start != nbytes:
            raise ProtocolError(
                f"{where}: tensor {short_repr(name)} data_offsets {short_repr(offs)} do not hold "
                f"{dtype}{short_repr(shape)} ({nbytes if nbytes < 1 << 64 else 'over 2^64'} bytes)"
            )
        out.append(TensorInfo(name, dtype, tuple(shape), start, end))
    out.sort(key=lambda t: (t.start, t.end))
    pos = 0
    for t in out:
        if t.start != pos:
            raise ProtocolError(
                f"{where}: tensor {short_repr(t.name)} starts at {t.start}, expected {pos} (gap or overlap)"
            )
        pos = t.end
    return out


def build_header(tensors: Sequence[TensorInfo], metadata: dict[str, str] | None = None) -> bytes:
    table: dict[str, Any] = {}
    if metadata:
        table["__metadata__"] = metadata
    for t in tensors:
        table[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    body = json.dumps(table, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


def parse_header(prefix: bytes | memoryview, where: str) -> list[TensorInfo]:
    """Parse a full safetensors prefix (8-byte length + JSON header) into its tensor table."""
    if len(prefix) < 8:
        raise ProtocolError(f"{where}: safetensors header truncated ({len(prefix)} bytes)")
    (n,) = struct.unpack_from("<Q", prefix)
    if n > MAX_HEADER_BYTES or len(prefix) != 8 + n:
        raise ProtocolError(f"{where}: safetensors header length {n} does not match {len(prefix) - 8} bytes")
    obj = _json(bytes(prefix[8:]), f"{where}: safetensors header")
    return _tensor_table(obj, where)


def plan_shards(
    specs: Iterable[tuple[str, str, tuple[int, ...]]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    prefix: str = "model",
) -> list[ShardLayout]:
    """Lay out (name, dtype, shape) tensors into shards of at most `max_shard_bytes` (a bigger tensor is its
    own shard). Within a shard, tensors go by descending item size so each starts aligned to its item size."""
    items = list(specs)
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in items:
        nbytes = math.prod(spec[2]) * ITEMSIZE[spec[1]]
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    shards = []
    n = len(groups)
    for i, group in enumerate(groups):
        group = sorted(group, key=lambda s: -ITEMSIZE[s[1]])  # stable: keeps the caller's order otherwise
        tensors, pos = [], 0
        for name, dtype, shape in group:
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            tensors.append(TensorInfo(name, dtype, tuple(int(d) for d in shape), pos, pos + nbytes))
            pos += nbytes
        fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(ShardLayout(fname, build_header(tensors, {"format": "pt"}), tensors))
    return shards


def _plain_file_name(name: Any) -> TypeGuard[str]:
    """A shard's file name that stays inside the directory it is written to: `x.safetensors`, no separators
    or NUL, no leading dot (so no `..`), no control characters, at most 255 bytes (a file name's limit)."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and not name.startswith(".")
        and not any(c in name for c in "/\\")
        and name.isprintable()
        and len(name.encode("utf-8", "replace")) <= 255
    )


@dataclass(frozen=True)
class EncodedTensor:
    """What an encoded tensor of a manifest stands for: the tensor `dtype` x `shape`, encoded with `encoding`."""

    encoding: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "dtype": self.dtype, "shape": list(self.shape)}


def _encoded_table(obj: Any, tensors: dict[str, TensorInfo], where: str) -> dict[str, EncodedTensor]:
    """The manifest's `encoded` table, checked: each entry names a U8 tensor of the shards whose size is the
    encoding of its declared float tensor (quantize.encoded_nbytes)."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: `encoded` must be an object (got {short_repr(obj)})")
    out = {}
    for name, spec in obj.items():
        w = f"{where}: encoded tensor {short_repr(name)}"
        if not isinstance(spec, dict) or set(spec) != {"encoding", "dtype", "shape"}:
            raise ProtocolError(f"{w} must have exactly encoding, dtype and shape (got {short_repr(spec)})")
        enc, dtype, shape = spec["encoding"], spec["dtype"], spec["shape"]
        if enc not in quantize.ENCODINGS or dtype not in quantize.SOURCE_DTYPES:
            raise ProtocolError(
                f"{w}: encoding {short_repr(enc)} of dtype {short_repr(dtype)}; an encoding is one of "
                f"{list(quantize.ENCODINGS)} of a tensor of {sorted(quantize.SOURCE_DTYPES)}"
            )
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
            raise ProtocolError(f"{w} has a bad shape {short_repr(shape)} (at most {MAX_NDIM} non-negative integers)")
        t = tensors.get(name)
        size = quantize.encoded_nbytes(enc, math.prod(shape))
        if t is None or t.dtype != "U8" or t.shape != (size,):
            got = "no such tensor" if t is None else f"{t.dtype}{list(t.shape)}"
            raise ProtocolError(f"{w}: {enc} of {dtype}{shape} travels as U8[{size}]; the shards hold {got}")
        out[name] = EncodedTensor(enc, dtype, tuple(shape))
    return out


_ENVELOPE_KEYS = {"params_type", "current_round", "total_rounds", "start_round", "metrics", "meta", "attempt"}


@dataclass
class Manifest:
    """A global model or an update: shards plus the FLModel envelope."""

    shards: list[ShardLayout]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    envelope: dict[str, Any] = field(default_factory=dict)
    encoded: dict[str, EncodedTensor] = field(default_factory=dict)  # tensors that travel encoded (quantize.py)

    def tensor_index(self) -> dict[str, tuple[int, TensorInfo]]:
        return {t.name: (i, t) for i, s in enumerate(self.shards) for t in s.tensors}

    def model_tensors(self) -> dict[str, TensorInfo]:
        """The tensors as the model has them: an encoded one with its declared dtype and shape (its offsets are
        those of its own bytes alone), the others as they travel."""
        out = {}
        for s in self.shards:
            for t in s.tensors:
                e = self.encoded.get(t.name)
                size = math.prod(e.shape) * ITEMSIZE[e.dtype] if e is not None else 0
                out[t.name] = t if e is None else TensorInfo(t.name, e.dtype, e.shape, 0, size)
        return out

    @property
    def encoding(self) -> str:
        """The encoding its encoded tensors travel in ("" when none does)."""
        return next(iter(self.encoded.values())).encoding if self.encoded else ""

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def to_json(self) -> str:
        obj = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "chunk_bytes": self.chunk_bytes,
            "chunk_hash": CHUNK_HASH,
            "shard_hash": SHARD_HASH,
            "shards": [s.to_json() for s in self.shards],
            "envelope": self.envelope,
        }
        if self.encoded:  # (absent when nothing is: an uncompressed manifest reads as before)
            obj["encoded"] = {name: e.to_json() for name, e in self.encoded.items()}
        return json.dumps(obj)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise ProtocolError(f"{where}: {len(text)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
        obj = _json(text, where)
        if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
            raise ProtocolError(f"{where}: `format` must be {MANIFEST_FORMAT!r}")
        if obj.get("version") != MANIFEST_VERSION:
            raise ProtocolError(f"{where}: `version` must be {MANIFEST_VERSION} (got {short_repr(obj.get('version'))})")
        if obj.get("chunk_hash") != CHUNK_HASH or obj.get("shard_hash") != SHARD_HASH:
            raise ProtocolError(
                f"{where}: hashes must be chunk {CHUNK_HASH!r} / shard {SHARD_HASH!r} "
                f"(got {short_repr(obj.get('chunk_hash'))} / {short_repr(obj.get('shard_hash'))})"
            )
        cb = obj.get("chunk_bytes")
        if not isinstance(cb, int) or cb <= 0 or cb % 8 or cb > 64 << 20:
            raise ProtocolError(
                f"{where}: `chunk_bytes` must be a positive multiple of 8 up to 64 MiB (got {short_repr(cb)})"
            )
        env = obj.get("envelope", {})
        if not isinstance(env, dict) or set(env) - _ENVELOPE_KEYS:
            raise ProtocolError(f"{where}: `envelope` keys must be among {sorted(_ENVELOPE_KEYS)}")
        raw_shards = obj.get("shards")
        if not isinstance(raw_shards, list) or not raw_shards:
            raise ProtocolError(f"{where}: `shards` must be a non-empty list")
        shards, names, seen = [], set(), set()
        for i, s in enumerate(raw_shards):
            w = f"{where}: shards[{i}]"
            if not isinstance(s, dict):
                raise ProtocolError(f"{w} must be an object")
            name, size, hsize, digest = s.get("name"), s.get("size"), s.get("header_size"), s.get("digest", "")
            if not _plain_file_name(name) or name in names:
                raise ProtocolError(
                    f"{w}: `name` {short_repr(name)} must be a unique plain file name ending .safetensors "
                    "(no path separators, no leading dot, no control characters)"
                )
            names.add(name)
            if not isinstance(hsize, int) or not 8 <= hsize <= MAX_HEADER_BYTES + 8 or hsize % 8:
                raise ProtocolError(
                    f"{w}: `header_size` {short_repr(hsize)} must be a multiple of 8 between 8 and 100 MiB"
                )
            if not isinstance(digest, str):
                raise ProtocolError(f"{w}: `digest` must be a string")
            tensors = _tensor_table(s.get("tensors"), w)
            for t in tensors:
                if t.name in seen:
                    raise ProtocolError(f"{w}: tensor {t.name!r} appears in more than one shard")
                seen.add(t.name)
            # the header bytes arrive with the data: nothing of the declared size is allocated here
            layout = ShardLayout(name, b"", tensors, digest, header_size=hsize)
            if size != layout.size:
                raise ProtocolError(f"{w}: `size` {short_repr(size)} disagrees with its tensors ({layout.size} bytes)")
            shards.append(layout)
        encoded = _encoded_table(obj.get("encoded", {}), {t.name: t for s in shards for t in s.tensors}, where)
        if len({e.encoding for e in encoded.values()}) > 1:
            raise ProtocolError(f"{where}: its tensors are encoded in one encoding, not several")
        return cls(shards, cb, env, encoded)

    def check_header(self, shard: int, prefix: bytes | memoryview) -> None:
        """Check a received header against this manifest's tensor table for `shard`."""
        layout = self.shards[shard]
        got = parse_header(prefix, f"shard {layout.name!r}")
        if got != layout.tensors:
            want = {t.name: (t.dtype, t.shape, t.start) for t in layout.tensors}
            have = {t.name: (t.dtype, t.shape, t.start) for t in got}
            diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            raise ProtocolError(f"shard {layout.name!r}: header disagrees with the manifest for {diff[:10]}")
