"""Run directories on object storage: `--run-dir s3://bucket/job` (any fsspec URL; issue 15).

The aggregator keeps working in a local *working copy* of the run directory (FL_CACHE_DIR/runs/NAME-HASH, or
~/.cache/fl-plugins/runs/...): checkpoints are written, fsynced and served from local files as before, which stays
the fast path (page-cached, read with pread into reused buffers, never staged whole in memory). The object store is
where the run lives:

    publish(r, folder)   once round r's checkpoint is durable locally (store.py `publish`): its files are uploaded
                         to URL/global/round-R/, then run.json and the records (metrics.jsonl, logs.jsonl: whole
                         objects up to their last complete line, as object stores have no append), manifest.json
                         last: a round is in the store exactly when its manifest is (the store's atomic publish),
                         and a round whose file went missing locally gets no manifest
    fetch()              at a start whose working copy lacks the store's latest round (another machine, a lost
                         disk): run.json, the records, summary.json, final/ and the latest round with a manifest are
                         downloaded into the working copy first (private, as the run directory's files are), and the
                         aggregator resumes from them as from a local run directory (or says the run is finished).
                         A working copy ahead of the store (killed before its uploads ended) uploads what the store
                         lacks: its newer rounds, and summary.json and final/ when it has them
    close()              at the end: the final model (after a finished job), summary.json and the records are
                         uploaded, and the uploads waited for (at most CLOSE_WAIT seconds); the first error is
                         returned

Uploads run in order on one background thread, so a round's upload never holds up the next round. An upload that
fails is tried 3 times, then the aggregator fails with the URL and the error (`on_error`). Credentials and the
endpoint come from the environment, as fsspec and the store's library read them (for S3: AWS_* variables, and
FSSPEC_S3_ENDPOINT_URL for an S3-compatible server).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError

log = logging.getLogger(__name__)

RECORDS = ("run.json", "metrics.jsonl", "logs.jsonl")
ENDING = ("summary.json",)
_ROUND = re.compile(r"round-(\d{5,})$")
TRIES = 3
CLOSE_WAIT = 600.0  # seconds the end waits for the uploads


def is_url(run_dir: Any) -> bool:
    return isinstance(run_dir, str) and "://" in run_dir and not run_dir.startswith("file://")


def working_copy(url: str) -> Path:
    """The local folder that mirrors `url` on this machine."""
    root = Path(os.environ.get("FL_CACHE_DIR") or Path.home() / ".cache" / "fl-plugins") / "runs"
    url = url.rstrip("/")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", url.split("://", 1)[1]).strip("-")[-60:]
    return root / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class RemoteRun:
    """The object-store side of a run directory (the module docstring)."""

    def __init__(self, url: str, local: Path, on_error: Callable[[BaseException], None] | None = None) -> None:
        try:
            import fsspec
        except ImportError:
            raise ConfigError(
                f"--run-dir {url} needs fsspec and the store's library: pip install 'fl-plugins[s3]'"
            ) from None
        try:
            self.fs, self.root = fsspec.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"--run-dir {url}: {e}") from None
        self.url, self.local = url.rstrip("/"), Path(local)
        self.on_error = on_error
        self.error: BaseException | None = None
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    # -- at start ----------------------------------------------------------------------------------------
    def latest_round(self) -> int | None:
        """The highest round whose manifest is in the store."""
        try:
            names = self.fs.ls(self._path("global"), detail=False)
        except FileNotFoundError:
            return None
        rounds = sorted(int(m.group(1)) for n in names if (m := _ROUND.search(n.rstrip("/"))))
        for r in reversed(rounds):
            if self.fs.exists(self._path(f"global/round-{r:05d}/manifest.json")):
                return r
        return None

    def fetch(self, *, catch_up: bool = True) -> int | None:
        """Bring the working copy up to the store's latest round (if it is behind); the working copy's latest
        round, or None. `catch_up`: queue the uploads of what a working copy ahead of the store has."""
        import shutil

        from fl_plugins.aggregator.files import private_dir
        from fl_plugins.aggregator.store import RunStore

        try:
            r = self.latest_round()
        except Exception as e:  # noqa: BLE001 - the store's library raises its own kinds
            raise ConfigError(
                f"--run-dir {self.url}: the store cannot be read ({type(e).__name__}: {e}); check its credentials "
                "and endpoint (for S3: the AWS_* variables, FSSPEC_S3_ENDPOINT_URL for an S3-compatible server)"
            ) from None
        private_dir(self.local)
        mine = RunStore(self.local).latest_round()
        if r is None or (mine is not None and mine >= r):
            if catch_up:
                self._catch_up(r, mine)  # the working copy has it, or more: the store gets what it lacks
            return mine
        log.info("fetching round %d of %s into %s", r, self.url, self.local)
        for rel in (*RECORDS, *ENDING):
            if self.fs.exists(self._path(rel)):
                self.fs.get(self._path(rel), str(self.local / rel))
        private_dir(self.local / "global")
        for rel in ("final", f"global/round-{r:05d}"):
            if not self.fs.exists(self._path(rel)):
                continue
            dest = self.local / rel
            tmp = dest.with_name(dest.name + ".fetch")
            shutil.rmtree(tmp, ignore_errors=True)  # (left by a fetch that was killed)
            self.fs.get(self._path(rel) + "/", str(tmp) + "/", recursive=True)
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)  # complete: the store had the round's manifest
        _private_tree(self.local)
        return r

    def _catch_up(self, theirs: int | None, mine: int | None) -> None:
        """The working copy is ahead of the store: queue what the store lacks."""
        if mine is None or (theirs is not None and mine <= theirs and not self._ending_missing()):
            return
        start = 0 if theirs is None else theirs + 1
        for r in range(start, mine + 1):
            folder = self.local / "global" / f"round-{r:05d}"
            if (folder / "manifest.json").is_file():
                log.info("uploading round %d of the working copy %s: %s does not have it", r, self.local, self.url)
                self.publish(r, folder)
        if (self.local / "summary.json").is_file():
            self._submit(self._upload_ending)

    def _ending_missing(self) -> bool:
        return (self.local / "summary.json").is_file() and not self.fs.exists(self._path("summary.json"))

    # -- as the run goes ---------------------------------------------------------------------------------
    def publish(self, r: int, folder: Path) -> None:
        """Round r's durable checkpoint `folder`: queued for upload, manifest.json last, then the records."""
        self._submit(lambda: self._upload_round(r, folder))

    def _upload_round(self, r: int, folder: Path) -> None:
        dest = f"global/round-{r:05d}"
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
        if not all(self._put(p, f"{dest}/{p.relative_to(folder).as_posix()}") for p in files):
            log.warning("round %d's folder %s changed while it was uploaded; the store does not get it", r, folder)
            return  # (no manifest: the store never shows a round without all its files)
        self._upload_records(RECORDS)
        self._put(folder / "manifest.json", f"{dest}/manifest.json")

    def _upload_records(self, names: tuple[str, ...]) -> None:
        for rel in names:
            if (self.local / rel).is_file():
                self._put(self.local / rel, rel, whole_lines=rel.endswith(".jsonl"))

    def _put(self, path: Path, rel: str, *, whole_lines: bool = False) -> bool:
        """Upload `path` as `rel` (a .jsonl file up to its last complete line: one may be being appended); False
        when the file is gone."""
        for attempt in range(1, TRIES + 1):
            if not path.is_file():
                return False
            try:
                if whole_lines:
                    data = path.read_bytes()
                    self.fs.pipe_file(self._path(rel), data[: data.rfind(b"\n") + 1])
                else:
                    self.fs.put_file(str(path), self._path(rel))
                return True
            except Exception as e:  # noqa: BLE001 - the store's library raises its own kinds (a missing bucket too)
                if attempt == TRIES:
                    raise RuntimeError(f"uploading {path} to {self.url}/{rel} failed {TRIES} times: {e}") from e
                time.sleep(0.5 * attempt)
        return False

    def _submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fl-object-store", daemon=True)
            self._thread.start()
        self._q.put(job)

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self.error is not None:
                continue
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - told to the aggregator, which stops with it
                self.error = e
                log.error("the run directory's object store: %s", e)
                if self.on_error is not None:
                    self.on_error(e)

    # -- at the end --------------------------------------------------------------------------------------
    def close(self, *, ending: bool = True) -> BaseException | None:
        """Upload what the end wrote (the records and summary.json; the final model when `ending`) and wait for the
        uploads, at most CLOSE_WAIT seconds; the first upload error (or the wait's), else None."""
        self._submit(self._upload_ending if ending else lambda: self._upload_records(RECORDS + ENDING))
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(CLOSE_WAIT)
            if self._thread.is_alive() and self.error is None:
                self.error = TimeoutError(f"the uploads to {self.url} did not end within {CLOSE_WAIT:.0f} s")
            self._thread = None
        return self.error

    def complete(self) -> BaseException | None:
        """A finished run's working copy (a start that finds the job done): upload what the store lacks of it (a
        run killed while its last uploads ran), and wait; the first error, else None."""
        self.fetch(catch_up=True)
        return self.close()

    def _upload_ending(self) -> None:
        final = self.local / "final"
        if final.is_dir():
            for p in sorted(x for x in final.rglob("*") if x.is_file()):
                rel = f"final/{p.relative_to(final).as_posix()}"
                if not self.fs.exists(self._path(rel)) or self.fs.size(self._path(rel)) != p.stat().st_size:
                    self._put(p, rel)
        self._upload_records(RECORDS + ENDING)


def open_remote(config: Any, on_error: Callable[[BaseException], None]) -> RemoteRun:
    """The object store of `config.store_url`, with the working copy `config.run_dir` brought up to it."""
    run = RemoteRun(config.store_url, config.run_dir, on_error)
    run.fetch()
    return run


def bind(flags: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Command-line settings whose `run_dir` is a URL: (the settings with `run_dir` its working copy, the fixed
    fields {"store_url": URL}); else (the settings, {})."""
    url = flags.get("run_dir")
    if not isinstance(url, str) or not is_url(url):
        return dict(flags), {}
    return {**flags, "run_dir": working_copy(url)}, {"store_url": url.rstrip("/")}


def _private_tree(folder: Path) -> None:
    """What a fetch brought down gets the run directory's modes (folders 0700, files 0600: files.py)."""
    from fl_plugins.aggregator.files import DIR_MODE, FILE_MODE

    for p in folder.rglob("*"):
        os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)
