"""Tracking: tails the run directory's records from a background thread and hands them, as Points, to every
tracker of the recipe."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fl_plugins import record_files, records
from fl_plugins.tracking._mlflow import MLflowTracker
from fl_plugins.tracking._points import Converter, Point, Tracker
from fl_plugins.tracking._spec import TrackerSpec, check_installed
from fl_plugins.tracking._tensorboard import TensorBoardTracker
from fl_plugins.tracking._wandb import WandbTracker

log = logging.getLogger("fl_plugins.tracking")

POLL = 1.0  # seconds between reads of the run directory's files
BACKENDS: dict[str, Callable[..., Tracker]] = {
    "mlflow": MLflowTracker,
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
}


def peak_rss() -> float | None:
    """This process's peak resident memory in bytes (getrusage; psutil's current RSS where that is missing)."""
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(maxrss if sys.platform == "darwin" else maxrss * 1024)
    except (ImportError, OSError):
        pass
    try:
        import psutil

        mem = psutil.Process().memory_info()
        return float(getattr(mem, "peak_wset", mem.rss))
    except Exception:  # noqa: BLE001 - a figure, not worth failing for
        return None


class Tracking:
    """Streams RUN_DIR's records to the given trackers from a background thread.

        with Tracking(run_dir, specs, name="quickstart", params={"rounds": 3}):
            ...  # the aggregator runs; its records reach MLflow / TensorBoard / W&B within POLL seconds

    `start()` opens every tracker (MissingDependencyError with the install command when a library is missing)
    and starts the thread; `close(code)` reads what is left, then flushes and closes the trackers (code 0: the
    run finished; 130: interrupted; else failed). Records already in the files when it starts (a resumed run) are
    sent too, so each tracker holds the whole run; the aggregator's peak memory is only reported for rounds that
    close while it watches.
    """

    def __init__(
        self,
        run_dir: str | Path,
        specs: Iterable[TrackerSpec],
        *,
        name: str | None = None,
        params: dict[str, Any] | None = None,
        interval: float = POLL,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.specs = tuple(specs)
        self.name = name or self.run_dir.resolve().name
        self.params = dict(params or {})
        self.interval = interval
        self.trackers: list[Tracker] = []
        self._metrics = record_files.JsonlTail(self.run_dir / records.METRICS)
        self._logs = record_files.JsonlTail(self.run_dir / records.LOGS, records.parse_log)
        self._conv = Converter()
        self._live_from = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Tracking:
        check_installed(self.specs)
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self._live_from = self._metrics.path.stat().st_size
        try:
            for s in self.specs:
                self.trackers.append(BACKENDS[s.name](self.run_dir, s.options, self.name, self.params))
        except BaseException:
            self._close_trackers(1)
            raise
        if self.trackers:
            log.info("tracking to %s", self.describe())
            self._thread = threading.Thread(target=self._loop, name="fl-tracking", daemon=True)
            self._thread.start()
        return self

    def describe(self) -> str:
        """Where each open tracker writes, e.g. "mlflow (sqlite:///...), tensorboard (RUN_DIR/tensorboard)"."""
        return ", ".join(t.where() for t in self.trackers)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> int:
        """Read the new records and send them to the trackers; the number of records read."""
        with self._lock:
            points: list[Point] = []
            recs = self._metrics.read_ends()
            for end, rec in recs:
                live = end > self._live_from and isinstance(rec, records.RoundRecord)
                points += self._conv.metrics_record(rec, peak_rss=peak_rss() if live else None)
            logs = self._logs.read()
            for log_rec in logs:
                points += self._conv.log_record(log_rec)
            if points:
                self._write(points)
            return len(recs) + len(logs)

    def _write(self, points: list[Point]) -> None:
        for t in list(self.trackers):
            try:
                t.write(points)
            except Exception as e:  # noqa: BLE001 - a tracker must never fail the federation
                log.warning(
                    "tracking: %s failed (%s: %s); it gets no more records of this run",
                    t.name,
                    type(e).__name__,
                    e,
                    exc_info=True,
                )
                self.trackers.remove(t)

    def close(self, code: int = 0) -> None:
        """Stop the thread, send what is left, close the trackers. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.trackers:
            self.poll()
        self._close_trackers(code)

    def _close_trackers(self, code: int) -> None:
        for t in self.trackers:
            try:
                t.close(code)
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: closing %s failed: %s: %s", t.name, type(e).__name__, e)
        self.trackers = []

    def __enter__(self) -> Tracking:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(0 if exc_type is None else 130 if issubclass(exc_type, KeyboardInterrupt) else 1)
