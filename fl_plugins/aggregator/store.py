"""The run directory: global-model checkpoints, round state, metrics.

    RUN_DIR/
      global/round-00000/manifest.json     round 0's global model (the initial model)
      global/round-00000/*.safetensors
      global/round-00000/*.safetensors.chunks   each shard's chunk digests (16 bytes each), served with the bytes
      global/round-00001/...               the model after round 0, i.e. round 1's global model
      metrics.jsonl                        one line per accepted update and per completed round
      logs.jsonl                           records sites sent with flare.log()

`global/round-R` holds the model *given to* round R; after the last round (R = total) it holds the final
model. A checkpoint is written into `round-R.tmp`, fsynced, then renamed: a directory named `round-R` is
always complete, so a restarted aggregator resumes from the highest one. Files are written through reused
buffers and read with pread, never mapped (mapped pages would count in the aggregator's RSS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fl_plugins.errors import ConfigError, IntegrityError, ProtocolError
from fl_plugins.wire.frames import ChunkHasher
from fl_plugins.wire.layout import (
    MAX_HEADER_BYTES,
    Manifest,
    ShardLayout,
    TensorInfo,
    build_header,
    numpy_dtype,
    parse_header,
)

_ROUND_DIR = re.compile(r"^round-(\d{5,})$")
COPY_BUFFER = 8 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.global_dir = self.root / "global"
        self.global_dir.mkdir(parents=True, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------------------
    def round_dir(self, r: int) -> Path:
        return self.global_dir / f"round-{r:05d}"

    def latest_round(self) -> int | None:
        rounds = [int(m.group(1)) for p in self.global_dir.iterdir() if (m := _ROUND_DIR.match(p.name))]
        rounds = [r for r in rounds if (self.round_dir(r) / "manifest.json").is_file()]
        return max(rounds) if rounds else None

    def load(self, r: int) -> Manifest:
        d = self.round_dir(r)
        manifest = Manifest.from_json((d / "manifest.json").read_bytes(), f"{d}/manifest.json")
        for i, shard in enumerate(manifest.shards):
            path = d / shard.name
            with open(path, "rb") as f:
                shard.header = f.read(shard.data_start)
            manifest.check_header(i, shard.header)
            if path.stat().st_size != shard.size:
                raise IntegrityError(f"{path}: {path.stat().st_size} bytes, the manifest says {shard.size}")
        return manifest

    def shard_paths(self, r: int, manifest: Manifest, directory: Path | None = None) -> list[Path]:
        return [(directory or self.round_dir(r)) / s.name for s in manifest.shards]

    def chunk_digests(self, manifest: Manifest, directory: Path) -> list[list[bytes] | None]:
        """Each shard's chunk digests as written with the checkpoint (None where missing or malformed: the
        chunks are then hashed as they are served)."""
        out: list[list[bytes] | None] = []
        for s in manifest.shards:
            p = directory / (s.name + ".chunks")
            n = -(-s.size // manifest.chunk_bytes)
            raw = p.read_bytes() if p.is_file() else b""
            out.append([raw[i : i + 16] for i in range(0, len(raw), 16)] if len(raw) == 16 * n else None)
        return out

    # -- writing -----------------------------------------------------------------------------------------
    def begin(self, r: int) -> Path:
        tmp = self.global_dir / f"round-{r:05d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, r: int, tmp: Path, manifest: Manifest) -> None:
        self.sync(tmp, manifest)
        self.publish(r, tmp)

    def sync(self, tmp: Path, manifest: Manifest) -> None:
        """Write the manifest and make everything in `tmp` durable (the slow part: the shards' fsync)."""
        (tmp / "manifest.json").write_text(manifest.to_json())
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)

    def publish(self, r: int, tmp: Path) -> None:
        """Rename a synced `round-R.tmp` to `round-R`: from here on a restart resumes from it."""
        final = self.round_dir(r)
        if final.exists():  # left by a run that died between rename and state; same round, replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.global_dir)

    def write_round(self, r: int, layout: Manifest, blocks_of, envelope: dict) -> tuple[Path, Manifest]:
        """Write round r's global model into `round-R.tmp` with `layout`'s shards (`blocks_of(tensor)` yields
        its data blocks); `commit` (or `sync` + `publish`) makes it round r's checkpoint."""
        tmp = self.begin(r)
        shards = []
        for s in layout.shards:
            hasher = ChunkHasher(layout.chunk_bytes)
            with open(tmp / s.name, "wb", buffering=0) as f:
                _write(f, hasher, s.header)
                for t in s.tensors:
                    for block in blocks_of(t):
                        _write(f, hasher, memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)))
            if hasher.size != s.size:
                raise IntegrityError(f"{s.name}: wrote {hasher.size} bytes, layout says {s.size}")
            shards.append(ShardLayout(s.name, s.header, s.tensors, hasher.hexdigest()))
            write_chunk_digests(tmp / s.name, hasher.shard.digests)
        return tmp, Manifest(shards, layout.chunk_bytes, envelope)

    def import_initial(self, source: str | os.PathLike, chunk_bytes: int) -> Manifest:
        """Copy an initial model into round 0: one .safetensors file, or a folder with a single
        model.safetensors or a Hugging Face sharded checkpoint (model.safetensors.index.json)."""
        src = Path(source)
        if src.is_dir():
            index = src / "model.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (KeyError, json.JSONDecodeError) as e:
                    raise ConfigError(f"{index}: not a valid safetensors index ({e!r})") from None
                files = [src / f for f in dict.fromkeys(weight_map.values())]
            elif (src / "model.safetensors").is_file():
                files = [src / "model.safetensors"]
            else:
                raise ConfigError(
                    f"--initial-model {src}: the folder has neither model.safetensors nor "
                    "model.safetensors.index.json; pass a .safetensors file or a Hugging Face model folder"
                )
        elif src.is_file() and src.suffix == ".safetensors":
            files = [src]
        else:
            raise ConfigError(f"--initial-model {src}: expected a .safetensors file or a model folder")
        tmp = self.begin(0)
        shards = []
        buf = bytearray(COPY_BUFFER)
        for path in files:
            if not path.is_file():
                raise ConfigError(f"--initial-model: shard {path} listed in the index does not exist")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    raise ProtocolError(f"{path}: safetensors header of {n} bytes is over the limit")
                raw = f.read(n)
                tensors = parse_header(struct.pack("<Q", n) + raw, str(path))
                meta = json.loads(raw).get("__metadata__")
                header = build_header(tensors, meta)  # re-padded to 8 bytes, our canonical form
                size = len(header) + (tensors[-1].end if tensors else 0)
                hasher = ChunkHasher(chunk_bytes)
                with open(tmp / path.name, "wb", buffering=0) as out:
                    _write(out, hasher, header)
                    mv = memoryview(buf)
                    while (k := f.readinto(mv)) > 0:
                        _write(out, hasher, mv[:k])
                if hasher.size != size:
                    raise IntegrityError(f"{path}: data section is {hasher.size - len(header)} bytes, header says "
                                         f"{size - len(header)}")  # fmt: skip
            shards.append(ShardLayout(path.name, header, tensors, hasher.hexdigest()))
            write_chunk_digests(tmp / path.name, hasher.shard.digests)
        manifest = Manifest(shards, chunk_bytes, {"current_round": 0})
        self.commit(0, tmp, manifest)
        return manifest

    # -- metrics -----------------------------------------------------------------------------------------
    def append(self, name: str, records: Iterable[dict]) -> None:
        with open(self.root / name, "a") as f:
            for rec in records:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def write_chunk_digests(shard_path: Path, digests: list[bytes]) -> None:
    shard_path.with_name(shard_path.name + ".chunks").write_bytes(b"".join(digests))


def _write(f, hasher: ChunkHasher, data) -> None:
    mv = memoryview(data)
    hasher.update(mv)
    while len(mv):
        k = f.write(mv)
        mv = mv[k:]


class GlobalReader:
    """Elements of the current global model's tensors, read with pread into a reused buffer."""

    def __init__(self, paths: list[Path], manifest: Manifest) -> None:
        self._fds = [os.open(p, os.O_RDONLY) for p in paths]
        self._index = manifest.tensor_index()
        self._data_start = [s.data_start for s in manifest.shards]
        self._buf = bytearray()

    def reader(self, name: str):
        shard, t = self._index[name]
        dtype = numpy_dtype(t.dtype)

        def read(e0: int, n: int) -> np.ndarray:
            nbytes = n * dtype.itemsize
            if len(self._buf) < nbytes:
                self._buf = bytearray(nbytes)
            mv = memoryview(self._buf)[:nbytes]
            got = os.preadv(self._fds[shard], [mv], self._data_start[shard] + t.start + e0 * dtype.itemsize)
            if got != nbytes:
                raise IntegrityError(f"global shard for {name!r} ended early")
            return np.frombuffer(mv, dtype)

        return read

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def same_tensors(expected: dict[str, TensorInfo], got: dict[str, TensorInfo], what: str) -> None:
    """Raise ModelMismatchError listing missing, unexpected and mis-shaped/typed tensors."""
    from fl_plugins.errors import ModelMismatchError

    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    bad = sorted(
        f"{k}: {got[k].dtype}{list(got[k].shape)} (global model: {expected[k].dtype}{list(expected[k].shape)})"
        for k in expected.keys() & got.keys()
        if (got[k].dtype, got[k].shape) != (expected[k].dtype, expected[k].shape)
    )
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        if bad:
            parts.append(f"mismatched {bad[:10]}")
        raise ModelMismatchError(f"{what} does not match the global model: " + "; ".join(parts))
