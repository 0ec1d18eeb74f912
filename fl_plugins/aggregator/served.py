"""The model folder the aggregator serves to its sites: sites without internet access fetch their base model here.

A recipe's `task.model: {from_aggregator: PATH}` (or `fl-plugins server --serve-model PATH`) names a Hugging Face
model folder on the aggregator's machine: config.json, the weights (one model.safetensors, or the shards
model-0000K-of-0000N.safetensors with their index), the tokenizer's files. The plan, end to end:

1. **list once, at start** (`ServedFolder.open`): every regular file under PATH, by its POSIX path inside it;
   symlinks (to files or folders) and hidden entries (a leading dot: .git, .cache, .gitattributes) are left out,
   so nothing outside the folder is ever served. Each file is read once: its size, the xxh3-128 of its bytes (the
   listing's digest) and of each `chunk_bytes` chunk (what its frames carry). The listing (wire/listing.py) and its
   folder digest are fixed from then on.
2. **tell the sites**: Hello's `served_model_json` carries the listing.
3. **stream a file** (`ServedFolder.frames`, for a `Download` that names `file`): only names in the listing are
   served, opened without following a symlink and checked to be still inside the folder and of the listed size;
   frames (wire/frames.py) carry the chunk digests computed at start, so bytes that changed on disk since fail the
   site's check instead of reaching its cache. A stream starts at any chunk boundary: a site resumes a cut
   transfer where its verified bytes end. A request naming another folder digest (the site saw the listing of
   an aggregator since restarted with another folder) is refused.
4. **at the site** (client/fetch.py): the folder is cached by its digest, each file landing as NAME.part and
   renamed once whole and verified; a folder marked complete is used as is, so a second job, a restarted site or
   a second site on the same machine fetches nothing.
5. **tasks**: ModelSpec source "aggregator" (tasks/spec.py); `federate` (tasks/run.py) connects, fetches, then
   builds the model from the cached folder; the baselines run on the aggregator's machine and read PATH directly.

Reading a 7B model's 14 GB at start costs what the disk reads (xxh3 hashes at ~30 GB/s); the listing is not kept
between restarts, so a restarted aggregator reads the folder again and serves the same digest if nothing changed.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from fl_plugins.errors import ConfigError, ProtocolError
from fl_plugins.wire import frames
from fl_plugins.wire.listing import FileEntry, Listing, check_name

log = logging.getLogger(__name__)

READ_BYTES = 16 << 20  # read at start in pieces of this size
WHERE = "the served model folder (--serve-model, or a recipe's `task.model: {from_aggregator: PATH}`)"


@dataclass(frozen=True)
class ServedFile:
    entry: FileEntry
    path: Path
    chunks: tuple[bytes, ...]  # xxh3-128 of each chunk_bytes chunk, in order


class ServedFolder:
    """One folder's listing and its files' chunk digests (`open`); serves their frames (`frames`)."""

    def __init__(self, root: Path, files: list[ServedFile], chunk_bytes: int) -> None:
        self.root = root
        self.files = {f.entry.name: f for f in files}
        self.listing = Listing.of([f.entry for f in files], chunk_bytes)
        self.listing_json = self.listing.to_json()
        self.bytes_sent = 0  # payload bytes sent to sites, all files together
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: str | os.PathLike, chunk_bytes: int) -> ServedFolder:
        """List and hash the folder at `root` (ConfigError when it is not a folder, holds no file, or holds a name
        a site would refuse)."""
        root = Path(root).resolve()
        if not root.is_dir():
            raise ConfigError(f"{WHERE}: {root} is not a folder; give a Hugging Face model folder")
        found = _regular_files(root)
        if not found:
            raise ConfigError(f"{WHERE}: {root} holds no regular file to serve (symlinks are not served)")
        files = []
        for name, path in found:
            try:
                check_name(name, f"{WHERE}: {root}")
            except ProtocolError as e:
                raise ConfigError(str(e)) from None
            files.append(_hashed(name, path, chunk_bytes))
        served = cls(root, files, chunk_bytes)
        log.info(
            "serving model folder %s to the sites: %d files, %.1f MB, digest %s",
            root,
            len(files),
            served.listing.size / 1e6,
            served.listing.digest,
        )
        return served

    def frames(self, name: str, offset: int, folder: str) -> Iterator[bytes]:
        """The frames of file `name` from `offset` (a chunk boundary). ProtocolError for a name not in the listing,
        a folder digest that is not this one's, or an offset that is not a chunk boundary of the file."""
        if folder and folder != self.listing.digest:
            raise ProtocolError(
                f"the site asked for model folder {folder}, but this aggregator serves {self.listing.digest} "
                f"({self.root}): it was restarted with another folder; the site must connect again"
            )
        f = self.files.get(name)
        if f is None:
            raise ProtocolError(f"{name!r} is not a file of the served model folder {self.listing.digest}")
        cb, size = self.listing.chunk_bytes, f.entry.size
        if offset % cb or not 0 <= offset <= size:
            raise ProtocolError(f"{name!r}: offset {offset} is not a chunk boundary of a {size}-byte file")
        fd = _open_inside(self.root, f)
        try:
            while offset < size:
                data = os.pread(fd, min(cb, size - offset), offset)
                if len(data) != min(cb, size - offset):
                    raise _changed(f)
                frame = frames.encode(offset, [data], f.chunks[offset // cb])
                with self._lock:
                    self.bytes_sent += len(data)
                yield frame
                offset += len(data)
        finally:
            os.close(fd)


def _regular_files(root: Path) -> list[tuple[str, Path]]:
    """(name, path) of every regular file under `root`, symlinks and hidden entries left out (logged)."""
    out: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root)
        for d in list(dirnames):
            if d.startswith(".") or (here / d).is_symlink():
                dirnames.remove(d)
                skipped.append((rel / d).as_posix() + "/")
        for fn in filenames:
            path = here / fn
            st = path.lstat()
            if fn.startswith(".") or not stat.S_ISREG(st.st_mode):
                skipped.append((rel / fn).as_posix())
                continue
            out.append(((rel / fn).as_posix(), path))
    if skipped:
        log.info("the served model folder %s: not served (hidden, symlinks, not regular): %s", root, skipped[:20])
    return sorted(out)


def _hashed(name: str, path: Path, chunk_bytes: int) -> ServedFile:
    """The file's size, its bytes' digest and its chunks' digests, in one read."""
    whole, chunk = xxhash.xxh3_128(), xxhash.xxh3_128()
    chunks: list[bytes] = []
    fill = size = 0
    buf = bytearray(READ_BYTES)
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)) > 0:
            mv = memoryview(buf)[:k]
            whole.update(mv)
            size += k
            while len(mv):
                take = min(len(mv), chunk_bytes - fill)
                chunk.update(mv[:take])
                fill, mv = fill + take, mv[take:]
                if fill == chunk_bytes:
                    chunks.append(chunk.digest())
                    chunk.reset()
                    fill = 0
    if fill:
        chunks.append(chunk.digest())
    return ServedFile(FileEntry(name, size, whole.hexdigest()), path, tuple(chunks))


def _open_inside(root: Path, f: ServedFile) -> int:
    """A read descriptor of `f`, refused (ProtocolError) when the path now leaves the folder through a symlink or
    the file's size changed since it was listed."""
    if not Path(os.path.realpath(f.path)).is_relative_to(root):
        raise ProtocolError(f"{f.entry.name!r} now leads outside the served folder {root} (a symlink); not served")
    try:
        fd = os.open(f.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ProtocolError(f"served file {f.entry.name!r} cannot be opened now: {e.strerror or e}") from None
    if os.fstat(fd).st_size != f.entry.size:
        os.close(fd)
        raise _changed(f)
    return fd


def _changed(f: ServedFile) -> ConfigError:
    """A served file whose size changed on disk: the site cannot get it until the aggregator lists it again (a
    ConfigError reaches the site as such, and it stops instead of retrying)."""
    return ConfigError(
        f"the aggregator's served file {f.path} changed since it started ({f.entry.size} bytes listed); restart the "
        "aggregator to serve the folder as it is now"
    )
