"""Round R+1's global model served from memory while its checkpoint is written behind it (issue 16).

A checkpoint written into new files runs at about 0.5 GB/s on this VM (new page-cache pages are slow to get;
writing over cached pages runs at 2.7 GB/s), so writing the average before round R+1 opens put 0.6-3 s on every
round's path. Instead, the close (closing.py) runs the strategy's `finalize` into the accumulator's own memory:

    fill()       each finished block is copied over the sums it was computed from (a tensor's bytes at the start of
                 its accumulator array: an element of the model is never wider than its accumulator's, and
                 `finalize` reads block b's sums before it yields block b, so a block only overwrites sums already
                 read), hashed in shard order as it lands: the manifest, with every shard and chunk digest, is
                 known before a byte is written. BOOL tensors, which have no accumulator, get a buffer of their
                 own. The NaN/Inf check runs here, before anything is served, as before.
    source()     what Download serves meanwhile: chunks copied out of that memory under the lock; once the files
                 are written (`to_files`) the same source reads them with pread instead, checked against the same
                 chunk digests (a stream in progress switches at the next chunk and never sees a reset
                 accumulator).
    write(tmp)   on the checkpoint's thread: the shards into round-R+1.tmp and their .chunks files.
    to_files()   the switch; after it the close's thread resets the accumulator and releases the fold gate, which
                 it held from the close on, so round R+1's first folds wait for it (they start once a site has
                 downloaded the whole model, which is slower than the write).

Memory: nothing beyond the accumulator (and the BOOL tensors' bytes). Durability does not change: the files are
fsynced and renamed as before, a crash before the rename redoes the round, and the last round's checkpoint is
written and made durable before the job ends (closing.py keeps the old path for it, and for strategies that do
not fold into one accumulator array per tensor: flexlora).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.aggregator.files import private_opener
from fl_plugins.aggregator.store import write_chunk_digests
from fl_plugins.errors import IntegrityError, RoundError
from fl_plugins.wire.frames import ChunkHasher
from fl_plugins.wire.layout import Manifest, ShardLayout, TensorInfo
from fl_plugins.wire.stream import read_exactly

_SLICE = 64 << 20  # bytes per write() call


class Finished:
    def __init__(self, layout: Manifest, arrays: dict[str, np.ndarray], what: str) -> None:
        """`arrays`: the strategy's accumulator array of each tensor (an empty one for BOOL tensors)."""
        self.layout = layout
        self.what = what  # "round R's global model", for errors
        self.views: dict[str, np.ndarray] = {}
        for t in (t for s in layout.shards for t in s.tensors):
            raw = arrays[t.name].reshape(-1).view(np.uint8)
            self.views[t.name] = raw[: t.nbytes] if raw.nbytes >= t.nbytes else np.empty(t.nbytes, np.uint8)
        self.manifest: Manifest | None = None
        self.chunk_digests: list[list[bytes] | None] = []
        self.lock = threading.Lock()
        self.fds: list[int] | None = None  # set by to_files(): the written shards, shared by the sources
        self.failed: BaseException | None = None
        self.closed = False

    def fill(self, blocks_of: Callable[[TensorInfo], Iterable[Any]], envelope: dict) -> Manifest:
        """Run `blocks_of(tensor)` (the strategy's finalize, checked) into memory; the manifest of the result."""
        cb = self.layout.chunk_bytes
        shards = []
        for s in self.layout.shards:
            hasher = ChunkHasher(cb)
            hasher.update(s.header)
            for t in s.tensors:
                dst, pos = self.views[t.name], 0
                for block in blocks_of(t):
                    b = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
                    if pos + b.nbytes > t.nbytes:
                        raise IntegrityError(f"{t.name}: the strategy gave more than its {t.nbytes} bytes")
                    dst[pos : pos + b.nbytes] = b
                    hasher.update(dst[pos : pos + b.nbytes].data)
                    pos += b.nbytes
                if pos != t.nbytes:
                    raise IntegrityError(f"{t.name}: the strategy gave {pos} of its {t.nbytes} bytes")
            if hasher.size != s.size:
                raise IntegrityError(f"{s.name}: {hasher.size} bytes, its layout says {s.size}")
            shards.append(ShardLayout(s.name, s.header, s.tensors, hasher.hexdigest()))
            self.chunk_digests.append(list(hasher.shard.digests))
        self.manifest = Manifest(shards, cb, envelope)
        return self.manifest

    def _data(self, shard: ShardLayout) -> Iterable[memoryview]:
        yield memoryview(shard.header)
        for t in shard.tensors:
            yield self.views[t.name].data

    def write(self, tmp: Path) -> list[Path]:
        """The shards (and their .chunks files) into `tmp`, from memory; returns their paths."""
        assert self.manifest is not None
        paths = []
        for i, s in enumerate(self.manifest.shards):
            path = tmp / s.name
            with open(path, "wb", buffering=0, opener=private_opener) as f:
                for mv in self._data(s):
                    mv = mv.cast("B")
                    for k in range(0, len(mv), _SLICE):
                        part = mv[k : k + _SLICE]
                        while len(part):
                            part = part[f.write(part) :]
            if path.stat().st_size != s.size:
                raise IntegrityError(f"{path}: wrote {path.stat().st_size} bytes, the manifest says {s.size}")
            digests = self.chunk_digests[i]
            assert digests is not None
            write_chunk_digests(path, digests)
            paths.append(path)
        return paths

    def to_files(self, paths: list[Path]) -> None:
        """From now on the sources read `paths` (the shards `write` wrote): the memory may be reused."""
        fds = [os.open(p, os.O_RDONLY) for p in paths]
        with self.lock:
            self.fds = fds

    def fail(self, e: BaseException) -> None:
        """The checkpoint could not be written: the sources fail from now on (the aggregator stops with `e`)."""
        with self.lock:
            self.failed = e

    def close(self) -> None:
        """The round is over: the shared file descriptors go (a source that switched holds its own)."""
        with self.lock:
            self.closed = True
            fds, self.fds = self.fds or [], None
        for fd in fds:
            os.close(fd)

    def source(self) -> FinishedSource:
        return FinishedSource(self)


class FinishedSource:
    """stream.py's Source over a `Finished` model: memory until the files are written, then the files."""

    def __init__(self, finished: Finished) -> None:
        self.finished = finished
        self._fds: list[int] | None = None

    def pieces(self, shard: int, offset: int, n: int) -> list[memoryview | bytes]:
        out = memoryview(bytearray(n))
        self.read_into(shard, offset, out)
        return [out]

    def read_into(self, shard: int, offset: int, out: memoryview) -> int:
        """Bytes [offset, offset + len(out)) of shard `shard` into `out` (stream.py's ShardSender fills a message)."""
        if self._fds is None:
            f = self.finished
            with f.lock:
                if f.failed is not None:
                    raise RoundError(f"{f.what} could not be checkpointed ({f.failed}); it is not served")
                if f.fds is None:
                    if f.closed:
                        raise RoundError(f"{f.what} is no longer served")
                    self._copy(shard, offset, out)
                    return len(out)
                self._fds = [os.dup(fd) for fd in f.fds]
        return read_exactly(self._fds[shard], offset, out, f"shard file {shard}")

    def _copy(self, shard: int, offset: int, out: memoryview) -> None:
        """Lock held: bytes [offset, offset + len(out)) of shard `shard`, from memory, into `out`."""
        layout = self.finished.layout.shards[shard]
        end, pos, done = offset + len(out), 0, 0
        for mv in self.finished._data(layout):
            lo, hi = max(offset, pos), min(end, pos + mv.nbytes)
            if lo < hi:
                out[done : done + hi - lo] = mv.cast("B")[lo - pos : hi - pos]
                done += hi - lo
            pos += mv.nbytes
            if pos >= end:
                break
        if done != len(out):
            raise IntegrityError(f"shard {shard} ended early at offset {offset + done}")

    def close(self) -> None:
        for fd in self._fds or []:
            os.close(fd)
        self._fds = None
