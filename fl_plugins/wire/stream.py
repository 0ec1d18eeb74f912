"""Sending and receiving one shard as a stream of verified chunks, resumable at any chunk boundary.

`ShardReceiver` is the receiving state machine: it accepts only the chunk at the offset it expects, checks
its digest (frames.decode), buffers the few header bytes until the safetensors header is complete and checks
it against the manifest, then hands each data range to a *sink* as (tensor, byte offset in tensor, bytes).
Sinks decide where bytes go: new tensors on a site, the float32 accumulator on the aggregator, a file.
Nothing is staged: a verified chunk is used at once and dropped.

`ShardSender` produces frames from a *source* (tensor memory or a shard file) from any chunk-aligned offset.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from fl_plugins.errors import IntegrityError, ProtocolError
from fl_plugins.wire import frames
from fl_plugins.wire.layout import Manifest, ShardLayout, TensorInfo


class Sink(Protocol):
    def header(self, shard: int, prefix: bytes) -> None: ...
    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None: ...


class ShardReceiver:
    def __init__(self, manifest: Manifest, shard: int, sink: Sink) -> None:
        self.manifest = manifest
        self.index = shard
        self.layout: ShardLayout = manifest.shards[shard]
        self.sink = sink
        self.offset = 0
        self.digest = frames.ShardDigest()
        self._hdr = bytearray()
        self._starts = [t.start for t in self.layout.tensors]

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def complete(self) -> bool:
        return self.offset == self.size

    def accept(self, frame: bytes) -> int:
        """Verify and use one frame; returns the payload length (0 for a repeat of a chunk already used).
        Raises ProtocolError/IntegrityError."""
        chunk = self.verify(frame)
        return 0 if chunk is None else self.use(*chunk)

    def verify(self, frame: bytes) -> tuple[int, memoryview, bytes] | None:
        """(offset, payload, digest) of a frame that is intact and the chunk expected next; uses nothing. None
        for an exact repeat of a chunk already used (same offset, same digest): a resend after a cut can race the
        stream it replaces, and the bytes are the same, so it is skipped rather than failing the transfer.
        What fails here is the transport's doing (a damaged or misplaced chunk): the chunk is refused, and the
        stream may go on from the offset this receiver has."""
        offset, payload, digest = frames.decode(frame)
        if offset != self.offset:
            chunk = self.manifest.chunk_bytes
            done = self.digest.digests
            if offset < self.offset and offset % chunk == 0 and done[offset // chunk] == digest:
                return None
            raise ProtocolError(
                f"shard {self.layout.name!r}: chunk at offset {offset} out of order (expected {self.offset})"
            )
        return offset, payload, digest

    def use(self, offset: int, payload: memoryview, digest: bytes) -> int:
        """Use a chunk `verify` returned: check its length against the manifest and the safetensors header
        against the manifest's tensor table, then hand its data to the sink; returns the payload length. What
        fails here (ProtocolError, or the sink's own error) is the sender's content: it disagrees with what it
        declared."""
        want = min(self.manifest.chunk_bytes, self.size - offset)
        if len(payload) != want:
            more = offset + len(payload) > self.size
            raise ProtocolError(
                f"shard {self.layout.name!r}: chunk at offset {offset} has {len(payload)} bytes, expected {want}"
                + (f" (shard larger than declared: the manifest says {self.size} bytes)" if more else "")
            )
        hsize = self.layout.data_start
        pos, mv = offset, payload
        if pos < hsize:
            take = min(hsize - pos, len(mv))
            self._hdr += mv[:take]
            pos, mv = pos + take, mv[take:]
            if pos == hsize:
                prefix = bytes(self._hdr)
                self._hdr = bytearray()  # checked: not kept for the rest of the upload
                self.manifest.check_header(self.index, prefix)
                self.sink.header(self.index, prefix)
        if len(mv):
            self._scatter(pos - hsize, mv)
        self.digest.add(digest)
        self.offset += len(payload)
        return len(payload)

    def _scatter(self, pos: int, mv: memoryview) -> None:
        tensors = self.layout.tensors
        i = bisect.bisect_right(self._starts, pos) - 1
        while len(mv):
            while tensors[i].end <= pos:  # skips empty tensors too
                i += 1
            t = tensors[i]
            take = min(t.end - pos, len(mv))
            self.sink.data(self.index, t, pos - t.start, mv[:take])
            pos, mv = pos + take, mv[take:]

    def finish(self, expected: str) -> None:
        if not self.complete:
            raise IntegrityError(f"shard {self.layout.name!r} truncated: {self.offset} of {self.size} bytes")
        got = self.digest.hexdigest(self.size)
        if got != expected:
            raise IntegrityError(f"shard {self.layout.name!r}: digest {got} does not match the manifest's {expected}")


class Source(Protocol):
    def pieces(self, shard: int, offset: int, n: int) -> list[memoryview | bytes]: ...


class OpenSource(Source, Protocol):
    """A source that holds files open (FileSource, the aggregator's in-memory model): its user closes it."""

    def close(self) -> None: ...


class TensorSource:
    """Shard bytes straight from tensor memory: `get_bytes(name)` returns a tensor's bytes as a memoryview."""

    def __init__(self, manifest: Manifest, get_bytes: Callable[[str], memoryview]) -> None:
        self.manifest = manifest
        self.get_bytes = get_bytes
        self._starts = [[t.start for t in s.tensors] for s in manifest.shards]

    def pieces(self, shard: int, offset: int, n: int) -> list[memoryview | bytes]:
        layout = self.manifest.shards[shard]
        out: list[memoryview | bytes] = []
        hsize = layout.data_start
        end = offset + n
        if offset < hsize:
            out.append(memoryview(layout.header)[offset : min(end, hsize)])
            offset = min(end, hsize)
        pos, stop = offset - hsize, end - hsize
        tensors = layout.tensors
        i = max(bisect.bisect_right(self._starts[shard], pos) - 1, 0)
        while pos < stop:
            t = tensors[i]
            if t.end <= pos:
                i += 1
                continue
            take = min(t.end, stop) - pos
            mv = self.get_bytes(t.name)
            if len(mv) != t.nbytes:
                raise ProtocolError(f"tensor {t.name!r} has {len(mv)} bytes, its layout says {t.nbytes}")
            out.append(mv[pos - t.start : pos - t.start + take])
            pos += take
        return out


class FileSource:
    """Shard bytes read from files with pread (no mmap: mapped pages would count in the server's RSS)."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self._fds = [os.open(p, os.O_RDONLY) for p in paths]

    def pieces(self, shard: int, offset: int, n: int) -> list[memoryview | bytes]:
        data = os.pread(self._fds[shard], n, offset)
        if len(data) != n:
            raise IntegrityError(f"shard file {shard} ended early at offset {offset + len(data)}")
        return [data]

    def read_into(self, shard: int, offset: int, out: memoryview) -> int:
        """Fill `out` with the shard's bytes from `offset`; returns len(out) (ShardSender checks it)."""
        return read_exactly(self._fds[shard], offset, out, f"shard file {shard}")

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def read_exactly(fd: int, offset: int, out: memoryview, what: str) -> int:
    """Fill `out` with the file's bytes from `offset` (IntegrityError if it ends first); returns len(out)."""
    got = os.preadv(fd, [out], offset)
    if got != len(out):
        raise IntegrityError(f"{what} ended early at offset {offset + got}")
    return got


class ShardSender:
    """Frames of one shard from a chunk-aligned offset, remembering chunk digests for the shard digest."""

    def __init__(self, manifest: Manifest, shard: int, source: Source, digests: list[bytes] | None = None) -> None:
        """`digests`: the shard's chunk digests if already known (a checkpoint's, computed when it was written):
        frames then carry them instead of a fresh hash, so bytes that changed on disk fail the site's check."""
        self.manifest = manifest
        self.index = shard
        self.source = source
        self.size = manifest.shards[shard].size
        self._digests: dict[int, bytes] = dict(enumerate(digests)) if digests else {}

    def frames(self, offset: int = 0) -> Iterator[bytes]:
        cb = self.manifest.chunk_bytes
        if offset % cb or not 0 <= offset <= self.size:
            raise ProtocolError(f"resume offset {offset} is not a chunk boundary of a {self.size}-byte shard")
        while offset < self.size:
            n = min(cb, self.size - offset)
            digest = self._digests.get(offset // cb)
            frame = frames.build(offset, n, functools.partial(self._fill, offset), digest)
            if digest is None:
                self._digests[offset // cb] = frame[frames.HEADER_SIZE - 16 : frames.HEADER_SIZE]
            yield frame
            offset += n

    def _fill(self, offset: int, out: memoryview) -> None:
        """Bytes [offset, offset + len(out)) of the shard into `out`: the source's own `read_into` (a pread into
        the message), else its pieces copied in (the one copy `encode`'s join would make)."""
        read_into = getattr(self.source, "read_into", None)
        if read_into is not None:
            got = read_into(self.index, offset, out)
            if got != len(out):  # never send what the message held before (another transfer's bytes)
                raise IntegrityError(f"shard {self.index}: the source gave {got} of {len(out)} bytes at {offset}")
            return
        pos = 0
        for piece in self.source.pieces(self.index, offset, len(out)):
            mv = memoryview(piece).cast("B")
            if pos + len(mv) > len(out):
                raise ProtocolError(f"shard {self.index}: the source gave more than {len(out)} bytes at {offset}")
            out[pos : pos + len(mv)] = mv
            pos += len(mv)
        if pos != len(out):
            raise IntegrityError(f"shard {self.index}: the source gave {pos} of {len(out)} bytes at {offset}")

    def shard_digest(self) -> str:
        cb = self.manifest.chunk_bytes
        d = frames.ShardDigest()
        for k in range((self.size + cb - 1) // cb):
            if k not in self._digests:  # never sent by this process (another one sent it): hash from source
                n = min(cb, self.size - k * cb)
                self._digests[k] = frames.chunk_digest(self.source.pieces(self.index, k * cb, n))
            d.add(self._digests[k])
        return d.hexdigest(self.size)
