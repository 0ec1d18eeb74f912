"""Compressed tensor encodings for what travels: `bf16`, `int8` and `nf4`, numpy only, decodable as chunks arrive.

An encoded tensor is a run of fixed-size *blocks*, each decodable on its own:

    bf16   2 bytes per element: the bfloat16 bits (round to nearest even) of each value, little-endian.
    int8   per block of BLOCK["int8"] elements: its float32 scale s = absmax / 127 (little-endian), then one
           signed byte per element, q = rint(x / s), so x is sent as q * s and |x - q * s| <= s / 2.
    nf4    per block of BLOCK["nf4"] elements: its float32 scale s = absmax, then one 4-bit index per element
           into the NormalFloat code book NF4 (QLoRA: the quantiles of a normal distribution, exact 0 and +-1),
           the nearest code to x / s, two to a byte (the even element in the low nibble).

Only the last block of a tensor may be shorter (the elements left over), so the encoded size is a pure function
of (encoding, element count), `encoded_nbytes`: a manifest can declare it before a byte is encoded. Blocks do not
depend on each other, so encoding a slice of a tensor that starts at a block boundary gives exactly that byte
range of the whole tensor's encoding (a sender can encode chunk by chunk), and `Decoder` turns bytes that arrive
in pieces cut at any offsets into float32 values, block by block, keeping at most one block's bytes between
pieces (the carry). Scales are computed at the sender from the values it sends and travel with them.

Why these block sizes and codes (measured in session 8 on 2^23 normal and Student-t(3) values, relative RMS
error): a block of 64 costs 4/64 byte of scale per element (int8: 1.06 bytes per element, 3.76x smaller than
float32, error 0.0059 normal / 0.011 heavy-tailed; nf4: 0.56 bytes, 7.1x, error 0.092 / 0.12). Blocks of 32 cut
the error by 10-22% for 6% more bytes and encode ~25% slower; 128 saves 3% of the bytes for 10-27% more error.
bitsandbytes uses 64 for nf4 too. At 4 bits, the NF4 code book beats uniform absmax codes (-7..7 times
absmax / 7: error 0.108 / 0.179), since values within a block are roughly normal.

Values a peer sends are checked before any of them is used (`Decoder.feed` raises ProtocolError): a scale that
is negative, not finite or so large that a code times it overflows float32, a bf16 NaN or infinity. What a
sender encodes must be finite (ValueError naming the tensor); only F32, F16 and BF16 tensors are encoded
(`SOURCE_DTYPES`): integer and bool tensors travel raw.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_plugins.errors import ProtocolError

ENCODINGS = ("bf16", "int8", "nf4")
SOURCE_DTYPES = frozenset({"F32", "F16", "BF16"})  # safetensors dtypes an encoding may replace
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
BLOCK = {"bf16": 1, "int8": 64, "nf4": 64}  # elements per block; changing one changes the encoding's bytes
BATCH = 1 << 16  # elements encoded or decoded per numpy pass: a 256 KiB float32 scratch stays in cache
SCALE_BYTES = 4
# A block whose absmax is below this is sent as zeros (scale 0): 1 / absmax would overflow float32 for the
# subnormal values below it, and values this small (~7.9e-31) are below any weight or update of a trained model.
ZERO_BELOW = 2.0**-100
# The NormalFloat4 code book of QLoRA (Dettmers et al. 2023; bitsandbytes' `create_normal_map`), as float32.
NF4 = np.array(
    "-1.0 -0.6961928009986877 -0.5250730514526367 -0.39491748809814453 -0.28444138169288635 -0.18477343022823334 "
    "-0.09105003625154495 0.0 0.07958029955625534 0.16093020141124725 0.24611230194568634 0.33791524171829224 "
    "0.44070982933044434 0.5626170039176941 0.7229568362236023 1.0".split(),
    np.float32,
)
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Encoding:
    """How one encoding lays out its blocks."""

    name: str
    block: int  # elements per (full) block
    bits: int  # bits per element's code
    scaled: bool  # a block starts with its float32 scale
    top: float  # the largest |code value| a block's bytes can hold, in units of its scale
    max_abs: float  # the largest |value| the encoder takes (a larger one would need a scale over float32's range)

    def block_nbytes(self, k: int) -> int:
        """Bytes of a block of `k` elements."""
        return (SCALE_BYTES if self.scaled else 0) + (k * self.bits + 7) // 8


_SPECS = {
    "bf16": Encoding("bf16", BLOCK["bf16"], 16, False, 1.0, _F32_MAX),
    # a peer may send the code -128, so a scale must stay under F32_MAX / 128 (we send -127..127)
    "int8": Encoding("int8", BLOCK["int8"], 8, True, 128.0, _F32_MAX / 128 * 127),
    "nf4": Encoding("nf4", BLOCK["nf4"], 4, True, 1.0, _F32_MAX),
}


def _record(code_bytes: int) -> np.dtype:
    """A block as a numpy record (viewed in place over the bytes; unaligned is fine)."""
    return np.dtype([("scale", "<f4"), ("codes", "u1", (code_bytes,))])


def encoding(enc: str) -> Encoding:
    """The layout of encoding `enc`; ValueError naming the known ones if there is no such encoding."""
    spec = _SPECS.get(enc)
    if spec is None:
        raise ValueError(f"unknown encoding {enc!r}; choose one of {', '.join(ENCODINGS)}")
    return spec


def encoded_nbytes(enc: str, n: int) -> int:
    """Bytes of `n` elements encoded with `enc`: full blocks, then one shorter block for what is left."""
    spec = encoding(enc)
    if n < 0:
        raise ValueError(f"a tensor has a non-negative element count, got {n}")
    full, rem = divmod(n, spec.block)
    return full * spec.block_nbytes(spec.block) + (spec.block_nbytes(rem) if rem else 0)


def worth_encoding(enc: str, dtype: str, n: int) -> bool:
    """Whether a tensor of safetensors `dtype` with `n` elements travels smaller encoded with `enc` than raw
    (bf16 does not shrink F16 or BF16 tensors; a tensor of a few elements gains nothing from a scale)."""
    return dtype in SOURCE_DTYPES and encoded_nbytes(enc, n) < n * ITEMSIZE[dtype]


def _what(name: str | None) -> str:
    return f"tensor {name!r}" if name else "the tensor"


def _as_float32(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """`x` (1-D) as float32: itself when it is, else converted into `scratch`."""
    if x.dtype == np.float32:
        return x
    out = scratch[: len(x)]
    np.copyto(out, x, casting="unsafe")
    return out


def _nonfinite(x: np.ndarray, e0: int, name: str | None) -> ValueError:
    i = int(np.flatnonzero(~np.isfinite(x.astype(np.float32)))[0])
    return ValueError(
        f"{_what(name)} holds {x[i]} at element {e0 + i} (flat index); only finite values can be encoded: check "
        "the training for divergence (a lower learning rate, gradient clipping) before sending"
    )


def _source(x: np.ndarray, name: str | None) -> np.ndarray:
    kind = x.dtype.name
    if kind not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"{_what(name)} is {kind}; only float32, float16 and bfloat16 tensors are encoded: send integer, "
            "bool and float64 tensors raw"
        )
    return np.ascontiguousarray(x).reshape(-1)


def encode(enc: str, x: np.ndarray, *, name: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """`x` (float32, float16 or bfloat16, any shape, read flat in C order) encoded with `enc`, as uint8.

    `out`: a uint8 array of `encoded_nbytes(enc, x.size)` bytes to write into (else a new one). `name` names the
    tensor in errors: ValueError for a NaN or an infinity or another dtype (what `out` holds then must not be sent)."""
    spec = encoding(enc)
    flat = _source(x, name)
    n = len(flat)
    size = encoded_nbytes(enc, n)
    if out is None:
        out = np.empty(size, np.uint8)
    elif out.dtype != np.uint8 or out.shape != (size,):
        raise ValueError(
            f"encode({enc!r}) of {_what(name)} ({n} elements) writes {size} bytes; `out` is {out.dtype} "
            f"{out.shape}: pass a uint8 array of shape ({size},)"
        )
    scratch = np.empty(BATCH if flat.dtype != np.float32 else 0, np.float32)
    step = BATCH // spec.block * spec.block
    bb = spec.block_nbytes(spec.block)
    for e0 in range(0, n, step):
        xf = _as_float32(flat[e0 : e0 + step], scratch)
        k = len(xf) // spec.block
        b0 = e0 // spec.block * bb
        if spec.name == "bf16":
            _encode_bf16(xf, out[b0 : b0 + 2 * len(xf)], e0, name)
            continue
        if k:
            _encode_blocks(spec, xf[: k * spec.block].reshape(k, spec.block), out[b0 : b0 + k * bb], e0, name)
        if len(xf) > k * spec.block:  # the short last block
            tail = xf[k * spec.block :]
            _encode_blocks(spec, tail.reshape(1, -1), out[b0 + k * bb :], e0 + k * spec.block, name)
    return out


def _encode_bf16(xf: np.ndarray, out: np.ndarray, e0: int, name: str | None) -> None:
    import ml_dtypes

    bits = out.view("<u2")
    np.copyto(bits, xf.astype(ml_dtypes.bfloat16).view(np.uint16))
    top = int(np.bitwise_and(bits, 0x7FFF).max()) if len(bits) else 0
    if top >= 0x7F80:  # a NaN or an infinity, or a float32 beyond bfloat16's range
        i = int(np.flatnonzero(np.bitwise_and(bits, 0x7F80) == 0x7F80)[0])
        if np.isfinite(xf[i]):
            raise ValueError(
                f"{_what(name)} holds {xf[i]} at element {e0 + i} (flat index), beyond bfloat16's range "
                "(+-3.39e38): send it as float32 (compression none) or scale it down"
            )
        raise _nonfinite(xf, e0, name)


def _encode_blocks(spec: Encoding, xb: np.ndarray, out: np.ndarray, e0: int, name: str | None) -> None:
    """Encode `xb` (k blocks of b elements, float32) into `out` (k * block_nbytes(b) bytes)."""
    k, b = xb.shape
    q = np.empty((k, b), np.float32)
    absmax = np.abs(xb, out=q).max(axis=1)  # NaN propagates
    if not (absmax <= spec.max_abs).all():
        if not np.isfinite(absmax).all():
            raise _nonfinite(xb.reshape(-1), e0, name)
        i = int(np.flatnonzero(absmax > spec.max_abs)[0])
        raise ValueError(
            f"{_what(name)} holds {absmax[i]:.4g} in elements {e0 + i * b} to {e0 + i * b + b - 1}, beyond what "
            f"{spec.name} carries ({spec.max_abs:.4g}): send it without compression or scale it down"
        )
    big = absmax >= ZERO_BELOW
    rec = out.view(_record(spec.block_nbytes(b) - SCALE_BYTES))
    if spec.name == "int8":
        rec["scale"] = np.where(big, absmax / np.float32(127), 0)
        inv = np.divide(np.float32(127), absmax, out=np.zeros_like(absmax), where=big)
        np.multiply(xb, inv[:, None], out=q)
        np.rint(q, out=q)
        np.copyto(rec["codes"].view(np.int8), q, casting="unsafe")
        return
    rec["scale"] = np.where(big, absmax, 0)
    inv = np.divide(np.float32(_HALF), absmax, out=np.zeros_like(absmax), where=big)
    np.multiply(xb, inv[:, None], out=q)  # x / absmax in [-1, 1], to grid units in [0.5, 254.5]
    q += np.float32(_HALF + 0.5)
    codes = np.take(_LUT, q.astype(np.uint8), mode="clip")  # the code at the cell's lower edge (or one below)
    codes += q > np.take(_MID_GRID, codes, mode="clip")  # past the midpoint above it: the next code, the nearest
    if b % 2:
        codes = np.concatenate([codes, np.zeros((k, 1), np.uint8)], axis=1)
    pairs = codes.view("<u2")  # two codes c0 | c1 << 8 (little-endian): the low byte of it | it >> 4 is
    rec["codes"] = np.bitwise_or(pairs, pairs >> 4).astype(np.uint8)  # c0 | c1 << 4, the byte sent


# nf4: the nearest code of y = x / absmax in [-1, 1], in two table look-ups. y is mapped to g = 127 y + 127.5 in
# [0.5, 254.5] (a uint8 cell index, never negative); a cell is narrower than the gap between any two midpoints of
# neighbouring codes, so at most one midpoint falls inside it: _LUT gives the code nearest the cell's lower edge,
# and one comparison with the midpoint above that code (in grid units, _MID_GRID) finds the nearest to g.
_HALF = 127
_MID: np.ndarray = np.append((NF4[1:] + NF4[:-1]) / 2, np.float32(np.inf))
_MID_GRID = (_MID * np.float32(_HALF) + np.float32(_HALF + 0.5)).astype(np.float32)
_LUT = np.searchsorted(_MID_GRID, np.arange(256, dtype=np.float32), side="left").astype(np.uint8)
# a byte of two codes -> their two values (low nibble first)
_NF4_PAIRS = np.stack([NF4[np.arange(256) & 15], NF4[np.arange(256) >> 4]], axis=1)


def _decode_blocks(spec: Encoding, raw: np.ndarray, b: int, out: np.ndarray) -> None:
    """Decode `raw` (whole blocks of `b` elements each, already checked) into `out` (float32)."""
    if spec.name == "bf16":
        wide = out.view(np.uint32)
        np.copyto(wide, raw.view("<u2"))
        np.left_shift(wide, 16, out=wide)
        return
    rec = raw.view(_record(spec.block_nbytes(b) - SCALE_BYTES))
    k = len(rec)
    grid = out.reshape(k, b)
    scale = rec["scale"].astype(np.float32)
    if spec.name == "int8":
        np.multiply(rec["codes"].view(np.int8), scale[:, None], out=grid)
        return
    if b % 2 == 0:
        np.take(_NF4_PAIRS, rec["codes"], axis=0, out=out.reshape(k, b // 2, 2), mode="clip")
    else:
        grid[:] = _NF4_PAIRS[rec["codes"]].reshape(k, -1)[:, :b]
    grid *= scale[:, None]


def _check_blocks(spec: Encoding, raw: np.ndarray, b: int, where: str, first: int) -> float:
    """Raise ProtocolError if `raw` (whole blocks of `b` elements, block index `first` onwards) holds what an
    encoder does not write; return the largest |value| its blocks can decode to."""
    if spec.name == "bf16":
        bits = np.bitwise_and(raw.view("<u2"), 0x7FFF)
        top = int(bits.max()) if len(bits) else 0
        if top >= 0x7F80:
            i = int(np.flatnonzero(bits >= 0x7F80)[0])
            raise ProtocolError(
                f"{where}: element {first + i} is a bfloat16 NaN or infinity; updates must be finite (check the "
                "site's training for divergence)"
            )
        return float(np.array([top << 16], np.uint32).view(np.float32)[0])
    scale = raw.view(_record(spec.block_nbytes(b) - SCALE_BYTES))["scale"]
    if not len(scale):
        return 0.0
    limit = _F32_MAX / spec.top
    ok = np.isfinite(scale) & (scale >= 0) & (scale <= limit)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise ProtocolError(
            f"{where}: block {first + i} has scale {float(scale[i]):.6g}, which no {spec.name} encoder writes (a "
            f"finite value from 0 to {limit:.3g}): the sender's bytes are not an encoding of finite values"
        )
    return float(scale.max()) * spec.top


@dataclass
class _Piece:
    """Whole blocks of one size, ready to decode: their bytes, the element offset of the first one."""

    raw: np.ndarray
    e0: int
    b: int  # elements per block


class Decoder:
    """Decodes one tensor's encoded bytes (`n` elements, encoding `enc`) as they arrive, in pieces cut anywhere.

    `feed(lo, payload)` takes bytes [lo, lo + len(payload)) of the encoding, checks them, keeps what does not yet
    make a whole block (at most one block's bytes) and returns an iterator of (element offset, float32 values) for
    the blocks it completes; iterate it to the end before the next feed. Pieces come in order: `lo` is where the
    previous one ended (a gap would leave elements undecoded, a rewind would decode some twice: both refused; a
    stream sent again from its start gets a new Decoder).
    `finish()` raises unless every byte arrived. `peak` bounds |values| of the blocks the last feed completed, for
    a receiver that must know a weighted sum cannot overflow before it adds anything."""

    def __init__(self, enc: str, n: int, *, name: str | None = None) -> None:
        self.spec = encoding(enc)
        self.n = n
        self.nbytes = encoded_nbytes(enc, n)
        self.where = f"{_what(name)} ({enc}, {n} elements, {self.nbytes} bytes)"
        self._bb = self.spec.block_nbytes(self.spec.block)
        self._full = n // self.spec.block * self._bb  # bytes of the full blocks; the short one follows
        self.pos = 0  # the next byte expected
        self._carry = np.empty(0, np.uint8)  # bytes [pos - len, pos): the start of a block not yet whole
        self._scratch: np.ndarray | None = None
        self.peak = 0.0

    @property
    def done(self) -> bool:
        return self.pos == self.nbytes

    def finish(self) -> None:
        """Raise ProtocolError unless every byte of the encoding arrived."""
        if not self.done:
            raise ProtocolError(
                f"{self.where}: the bytes end at {self.pos}, {self.nbytes - self.pos} short; the sender must send "
                "the whole encoding (was the upload cut short?)"
            )

    def _boundary_at_or_before(self, p: int) -> int:
        if p >= self.nbytes:
            return self.nbytes
        return self._full if p >= self._full else p - p % self._bb

    def _start(self, lo: int, size: int) -> None:
        """Check that bytes [lo, lo + size) come next: from where the previous piece ended, within the encoding."""
        if lo != self.pos:
            raise ProtocolError(
                f"{self.where}: bytes arrive from offset {lo}, but the next expected are at {self.pos}: pieces "
                "come in order, without gaps or rewinds"
            )
        if lo + size > self.nbytes:
            raise ProtocolError(
                f"{self.where}: bytes [{lo}, {lo + size}) run past its {self.nbytes} bytes; the sender's manifest "
                "and its bytes disagree"
            )

    def feed(
        self, lo: int, payload: bytes | bytearray | memoryview | np.ndarray, *, out: np.ndarray | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Take bytes [lo, lo + len(payload)) and return the values of the blocks they complete, as (element
        offset, float32 array) pairs. Each array is a view into `out` (a float32 buffer of at least one block;
        else the decoder's own), valid until the next pair is taken. Raises ProtocolError, before anything is
        decoded or kept, if the bytes do not follow on or hold what no encoder writes."""
        return self._feed(lo, payload, out, None)

    def _feed(
        self, lo: int, payload: bytes | bytearray | memoryview | np.ndarray, out: np.ndarray | None, into: Any
    ) -> Iterator[tuple[int, np.ndarray]]:
        if out is not None and not (out.dtype == np.float32 and out.ndim == 1 and len(out) >= self.spec.block):
            raise ValueError(
                f"`out` must be a 1-D float32 buffer of at least {self.spec.block} elements (one {self.spec.name} "
                f"block); got {out.dtype} {out.shape}"
            )
        buf = np.frombuffer(payload, np.uint8)
        self._start(lo, len(buf))
        end = lo + len(buf)
        begin = lo - len(self._carry)  # the block boundary the held bytes start at
        stop = self._boundary_at_or_before(end)
        if stop <= begin:  # no block completes: keep the bytes
            self._carry = np.concatenate([self._carry, buf])
            self.pos = end
            self.peak = 0.0
            return iter(())
        pieces: list[_Piece] = []
        body = lo
        if len(self._carry):
            body = begin + (self._bb if begin < self._full else self.nbytes - self._full)
            pieces += self._pieces(begin, np.concatenate([self._carry, buf[: body - lo]]))
        if stop > body:
            pieces += self._pieces(body, buf[body - lo : stop - lo])
        self.peak = max(_check_blocks(self.spec, p.raw, p.b, self.where, p.e0 // self.spec.block) for p in pieces)
        self._carry = buf[stop - lo :].copy()
        self.pos = end
        return self._decode(pieces, out, into)

    def _pieces(self, p: int, raw: np.ndarray) -> list[_Piece]:
        """Whole blocks `raw` starting at byte `p`, split where the full blocks end and the short one begins."""
        b = self.spec.block
        cut = min(len(raw), max(0, self._full - p))
        out = [_Piece(raw[:cut], p // self._bb * b, b)] if cut else []
        if len(raw) > cut:
            out.append(_Piece(raw[cut:], self._full // self._bb * b, self.n % b))
        return out

    def _decode(self, pieces: list[_Piece], out: Any, into: Any) -> Iterator[tuple[int, np.ndarray]]:
        """Decode `pieces` in batches into `into` (all `n` values, in place) or else through `out` / a scratch."""
        if out is None and into is None:
            if self._scratch is None:
                self._scratch = np.empty(max(BATCH, self.spec.block), np.float32)
            out = self._scratch
        for p in pieces:
            per = max(1, (BATCH if out is None else len(out)) // p.b)  # blocks per batch
            step = per * self.spec.block_nbytes(p.b)
            for s in range(0, len(p.raw), step):
                raw = p.raw[s : s + step]
                e0 = p.e0 + s // step * per * p.b
                m = len(raw) // self.spec.block_nbytes(p.b) * p.b
                dst = into[e0 : e0 + m] if into is not None else out[:m]
                _decode_blocks(self.spec, raw, p.b, dst)
                yield e0, dst
        if self.done:
            self._scratch = None


def decode(
    enc: str, buf: bytes | bytearray | memoryview | np.ndarray, n: int, *, name: str | None = None
) -> np.ndarray:
    """The `n` float32 values (flat) that `buf`, their whole encoding with `enc`, holds. Raises ProtocolError if
    `buf` is not `encoded_nbytes(enc, n)` bytes long or holds what no encoder writes."""
    dec = Decoder(enc, n, name=name)
    size = buf.nbytes if isinstance(buf, np.ndarray) else memoryview(buf).nbytes
    if size != dec.nbytes:
        raise ProtocolError(
            f"{dec.where}: got {size} bytes; {enc} holds {n} elements in exactly {dec.nbytes} (is `n` the "
            "tensor's element count, and the encoding the one it was sent with?)"
        )
    result = np.empty(n, np.float32)
    for _ in dec._feed(0, buf, None, result):
        pass
    return result
