"""A site fetches the model folder its aggregator serves (aggregator/served.py), into a cache keyed by its digest.

Sites without internet access get their base model from the aggregator (a recipe's `task.model: {from_aggregator:
PATH}`). Hello told the site the folder's listing (wire/listing.py: names, sizes, digests, the folder digest);
`fetch_served_model` makes the folder whole in this site's cache and returns its path:

    $FL_CACHE_DIR (default ~/.cache/fl-plugins/models)/
        DIGEST/              the folder, complete and verified: used as is (no byte moves, no file is re-read)
            .fl-complete.json      the listing it was fetched by: the mark of a complete folder
            config.json, model-00001-of-00002.safetensors, ..., tokenizer.json
        DIGEST.partial/      the folder being fetched: each file lands as NAME.part, renamed to NAME once whole
                             and its digest checked; renamed to DIGEST once every file is there
        DIGEST.lock          held (flock) by the process fetching DIGEST

Each file streams in verified chunks (frames.py: a damaged chunk is refused and asked for again) with the same
retry rules as the global model's downloads (transfers.py `Transfers.resumable`, `IdleWatch`): a cut transfer
resumes from the last verified offset. A site restarted mid-file resumes from its NAME.part (the bytes it holds
are hashed again, then checked with the rest at the end; a file whose digest fails is fetched once more from the
start). Two processes fetching the same digest at once (two sites, or two jobs, on one machine) take turns on the
lock: the second finds the folder complete and uses it. Without flock (Windows) each process fetches into a
folder of its own and the first rename wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from fl_plugins.client.transfers import download_frames
from fl_plugins.errors import ConfigError, IntegrityError
from fl_plugins.wire import frames
from fl_plugins.wire.listing import PART, FileEntry, Listing
from fl_plugins.wire.proto import fl_pb2 as pb

if TYPE_CHECKING:
    from fl_plugins.client.site import SiteClient

log = logging.getLogger(__name__)

ENV_CACHE = "FL_CACHE_DIR"
COMPLETE = ".fl-complete.json"  # (a served name never starts with a dot: wire/listing.py `check_name`)
READ_BYTES = 16 << 20
LOCK_POLL = 0.2  # seconds between tries of a lock another process holds


def cache_root() -> Path:
    """Where served model folders are cached: $FL_CACHE_DIR, else ~/.cache/fl-plugins/models."""
    raw = os.environ.get(ENV_CACHE, "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "fl-plugins" / "models"


def served_listing(client: SiteClient) -> Listing:
    """The listing of the folder the client's aggregator serves, checked (ConfigError when it serves none)."""
    if not client.served_model:
        raise ConfigError(
            f"the recipe's `task.model` is {{from_aggregator: ...}}, but the aggregator at {client.address} serves "
            "no model folder: start it with the same recipe (`fl-plugins server RECIPE`) or with --serve-model PATH"
        )
    return Listing.from_json(client.served_model, f"the model folder listing from {client.address}")


def fetch_served_model(client: SiteClient | None, cache: str | os.PathLike | None = None) -> Path:
    """The folder the aggregator serves, complete and verified in `cache` (default `cache_root()`): fetched
    unless it is there already. `client`: connected (Hello told it the listing); None (a rank other than 0, which
    never talks to the aggregator) is a ConfigError."""
    if client is None:
        raise ConfigError(
            "only rank 0 talks to the aggregator, so only it can fetch the model folder the aggregator serves; "
            "fetch it on rank 0 before the other ranks build their model"
        )
    listing = served_listing(client)
    root = Path(cache).expanduser() if cache is not None else cache_root()
    folder = root / listing.digest
    if (folder / COMPLETE).is_file():
        log.info("site %r: model folder %s is cached in %s; nothing to fetch", client.site, listing.digest, folder)
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _turn(root / f"{listing.digest}.lock", client.site) as private:
        if (folder / COMPLETE).is_file():  # another process fetched it while this one waited
            return folder
        partial = root / (f"{listing.digest}.partial" + (f"-{os.getpid()}" if private else ""))
        partial.mkdir(exist_ok=True)
        t0 = time.monotonic()
        for entry in listing.files:
            _FileFetch(client, listing, entry, partial).run()
        _durable_write(partial / COMPLETE, listing.to_json().encode())
        _publish(partial, folder)
    log.info(
        "site %r: fetched model folder %s (%d files, %.1f MB) in %.1f s into %s",
        client.site,
        listing.digest,
        len(listing.files),
        listing.size / 1e6,
        time.monotonic() - t0,
        folder,
    )
    return folder


class _FileFetch:
    """One file of the listing into `partial`/NAME.part, resumed where verified bytes end, renamed when whole."""

    def __init__(self, client: SiteClient, listing: Listing, entry: FileEntry, partial: Path) -> None:
        self.client, self.listing, self.entry = client, listing, entry
        self.final = partial / entry.name
        self.part = partial / (entry.name + PART)
        self.offset = 0
        self.hasher = xxhash.xxh3_128()
        self.fd = -1

    def run(self) -> None:
        e = self.entry
        if self.final.is_file() and self.final.stat().st_size == e.size:
            return  # checked before it was renamed (a fetch cut short after this file)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            self._resume()
            try:
                self.client.transfers.resumable(self._stream, f"fetch {e.name}", progress=self._progress)
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
            if self.hasher.hexdigest() == e.digest:
                os.replace(self.part, self.final)
                _fsync_dir(self.final.parent)
                return
            log.warning("%s: its bytes do not match the listed digest %s; fetching it again", self.part, e.digest)
            self.part.unlink()
        raise IntegrityError(
            f"served file {e.name!r} failed its digest {e.digest} twice; the aggregator's copy may have changed "
            "since it started: restart the aggregator"
        )

    def _progress(self) -> int:
        return self.offset

    def _resume(self) -> None:
        """Open NAME.part and take up the whole chunks it holds (hashed again), or start it."""
        cb = self.listing.chunk_bytes
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
        held = os.fstat(self.fd).st_size
        self.offset = min(held, self.entry.size) // cb * cb
        os.ftruncate(self.fd, self.offset)
        self.hasher.reset()
        pos = 0
        while pos < self.offset:
            data = os.pread(self.fd, min(READ_BYTES, self.offset - pos), pos)
            self.hasher.update(data)
            pos += len(data)
        if self.offset:
            log.info("%s: resuming at offset %d of %d", self.part, self.offset, self.entry.size)

    def _stream(self) -> None:
        """One Download call from the verified offset to the end of the file (transfers.py's rules)."""
        if self.offset >= self.entry.size:
            return
        c = self.client
        req = pb.DownloadRequest(site=c.site, offset=self.offset)
        req.file, req.folder = self.entry.name, self.listing.digest
        download_frames(c, req, self._accept)

    def _accept(self, frame: bytes) -> int:
        """Verify a frame (its digest; its offset and length: the chunk expected next) and write it; its bytes."""
        offset, payload, _ = frames.decode(frame)
        want = min(self.listing.chunk_bytes, self.entry.size - self.offset)
        if offset != self.offset or len(payload) != want:
            raise IntegrityError(
                f"{self.entry.name}: got {len(payload)} bytes at offset {offset}, expected {want} at {self.offset}"
            )
        os.pwrite(self.fd, payload, offset)
        self.hasher.update(payload)
        self.offset += len(payload)
        return len(payload)


@contextlib.contextmanager
def _turn(path: Path, site: str) -> Iterator[bool]:
    """Hold the lock at `path` (flock: released by the kernel if this process dies), waiting for another process
    that holds it. Yields False, or True where flock is missing (Windows): then the caller fetches privately."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    log.info("site %r: another process is fetching %s; waiting for it", site, path.stem)
                    told = True
                time.sleep(LOCK_POLL)
        yield False
    finally:
        os.close(fd)  # (releases the lock)


def _publish(partial: Path, folder: Path) -> None:
    """Rename the whole `partial` folder to `folder`: the one step that makes it visible, and durable."""
    _fsync_dir(partial)
    if folder.exists():
        if (folder / COMPLETE).is_file():  # another process (no flock) was first: its copy is as good
            shutil.rmtree(partial, ignore_errors=True)
            return
        shutil.rmtree(folder)  # an incomplete folder under the final name (not ours): replaced
    os.rename(partial, folder)
    _fsync_dir(folder.parent)


def _durable_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
