"""Experiment tracking: stream a run's records to MLflow, TensorBoard and Weights & Biases.

The aggregator writes two files into the run directory, and this module only reads them (it never touches the
aggregator, so it works the same for `fl-plugins run` and a standalone `fl-plugins server`):

    RUN_DIR/metrics.jsonl   "update" records (site, round, bytes, seconds, the global model's metrics at the site)
                            and "round" records (round time, the weighted metrics of the round)
    RUN_DIR/logs.jsonl      what the sites send with `flare.log(key, value, "SCALAR", step=global_step)`, including
                            the trainers' own logs that the Lightning and HF integrations forward

`Tracking` tails both files in a background thread (whole lines only, from where it stopped), turns each record
into `Point`s and hands them to every tracker of the recipe's `tracking:` key. Names (TensorBoard tags, W&B keys;
in MLflow the part after `SITE/` is the metric key of that site's nested run):

    global/<metric>                 the round's weighted metrics of the global model      step = round
    aggregator/round_seconds        round time; also checkpoint_seconds, sites (updates    step = round
    aggregator/bytes, gbps, ...     in the round), bytes uploaded, GB/s, peak_rss_mb
    SITE/global_model/<metric>      the global model evaluated at SITE (its update's metrics)  step = round
    SITE/update/bytes, seconds,     SITE's upload: bytes, seconds, GB/s (bytes / seconds)  step = round
      gbps, weight
    SITE/<key>                      SITE's `flare.log` records, e.g. SITE/train_loss        step = the record's
                                                                                            `step` (global step),
                                                                                            else the round
    SITE/round                      the round SITE was in at that global step              step = global step

- MLflow: one parent run for the job (global/ and aggregator/ figures, the job's parameters) and one nested run
  per site (tag `site`). Default store: `sqlite:///RUN_DIR/mlruns/mlflow.db`, artifacts in RUN_DIR/mlruns/artifacts
  (MLflow's plain-file store is deprecated: MLflow 3 refuses it unless MLFLOW_ALLOW_FILE_STORE is set); no server.
  `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlruns/mlflow.db` shows it. MLflow's usage telemetry is turned
  off (MLFLOW_DISABLE_TELEMETRY, unless the environment sets it).
- TensorBoard: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`), plain scalars
  written with tensorboard's own event writer (tensorboardX when tensorboard is not installed): no torch or
  TensorFlow in the aggregator.
- Weights & Biases: always offline, in RUN_DIR/wandb (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later);
  nothing is sent over the network.

A tracker that fails while the run goes on is logged and dropped; the federation never fails for it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

# tracker -> its options (all optional) and what each means
TRACKERS: dict[str, dict[str, str]] = {
    "mlflow": {"tracking_uri": "where MLflow stores runs (default: sqlite in RUN_DIR/mlruns)",
               "experiment": "the MLflow experiment (default: the job's name)",
               "run_name": "the parent run's name (default: the job's name)"},
    "tensorboard": {"log_dir": "where the event files go (default: RUN_DIR/tensorboard; relative to RUN_DIR)"},
    "wandb": {"project": "the W&B project (default: the job's name)", "entity": "the W&B entity (team or user)",
              "name": "the W&B run's name (default: the run directory's name)", "group": "the W&B run group",
              "tags": "a list of W&B tags"},
}  # fmt: skip
_MODULE = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
POLL = 1.0  # seconds between reads of the run directory's files
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch
_MLFLOW_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


@dataclass(frozen=True)
class TrackerSpec:
    """One tracker of the recipe's `tracking:` key: its name and options (see TRACKERS)."""

    name: str  # "mlflow", "tensorboard" or "wandb"
    options: dict[str, Any] = field(default_factory=dict)


def parse_tracking(value: Any, *, where: str = "", key: str = "tracking") -> tuple[TrackerSpec, ...]:
    """Validate a `tracking:` value: a name or comma-separated names (`mlflow,tensorboard`), a list of names
    (`[mlflow, tensorboard]`) or a mapping of name to options (`{mlflow: {}, wandb: {project: x}}`); None or []
    means no tracking. `where` prefixes each error (e.g. "recipes/x.yaml: "), `key` is the key path shown in it."""
    names = sorted(TRACKERS)
    if value is None:
        return ()
    items: list[tuple[str, Any, str]] = []
    if isinstance(value, str):  # "mlflow" or "mlflow,tensorboard" (the CLI's --tracking)
        items = [(v.strip(), None, key) for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise ConfigError(f"{where}`{key}[{i}]` must be a tracker name, one of {', '.join(names)} (got {v!r}); "
                                  f"options go in a mapping: `{key}: {{wandb: {{project: x}}}}`")  # fmt: skip
            items.append((v, None, f"{key}[{i}]"))
    elif isinstance(value, dict):
        items = [(k, v, f"{key}.{k}") for k, v in value.items()]
    else:
        raise ConfigError(f"{where}`{key}` must be a tracker name, a list of them or a mapping of name to options, "
                          f"e.g. `{key}: [mlflow, tensorboard]` (got {value!r})")  # fmt: skip
    out: list[TrackerSpec] = []
    for name, opts, path in items:
        name_s = str(name).strip().lower()
        if name_s not in TRACKERS:
            close = difflib.get_close_matches(name_s, names, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"{where}`{path}` must be one of {', '.join(names)} (got {name!r}){hint}")
        if any(s.name == name_s for s in out):
            raise ConfigError(f"{where}`{key}` names {name_s} twice")
        out.append(TrackerSpec(name_s, _options(name_s, opts, where, f"{key}.{name_s}")))
    return tuple(out)


def _options(name: str, opts: Any, where: str, path: str) -> dict[str, Any]:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise ConfigError(f"{where}`{path}` must be a mapping of options ({', '.join(TRACKERS[name])}) or empty "
                          f"(got {opts!r})")  # fmt: skip
    known = list(TRACKERS[name])
    out: dict[str, Any] = {}
    for k, v in opts.items():
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)
            hint = f"; did you mean `{path}.{close[0]}`?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{where}unknown key `{path}.{k}`{hint}")
        if k == "tags":
            if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
                raise ConfigError(f"{where}`{path}.tags` must be a list of strings (got {v!r})")
            out[k] = tuple(v)
        elif v is not None:
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{where}`{path}.{k}` must be a non-empty string (got {v!r})")
            out[k] = v.strip()
    return out


def check_installed(specs: Iterable[TrackerSpec]) -> None:
    """Raise MissingDependencyError naming the install command for the first tracker whose library is missing."""
    import importlib.util

    for s in specs:
        mod = _MODULE[s.name]
        if importlib.util.find_spec(mod) is None and not (s.name == "tensorboard" and _has("tensorboardX")):
            raise MissingDependencyError(
                f"tracking with {s.name} needs the {mod!r} package, which is not installed; install it with: "
                f"pip install 'fl-plugins[tracking]' (or: pip install {mod})")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- records to points -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One value of one series. `site` None: the job's own series (global model, aggregator)."""

    key: str  # e.g. "global/val_acc", "aggregator/round_seconds"; for a site: "train_loss", "global_model/val_acc"
    value: float
    step: int
    site: str | None = None
    axis: str = "round"  # "round": step is the round; "step": step is the site's global training step
    time: float | None = None  # wall-clock seconds since the epoch (the record's time)

    @property
    def name(self) -> str:
        """The flat name (TensorBoard tag, W&B key): `SITE/key` for a site's series."""
        return self.key if self.site is None else f"{self.site}/{self.key}"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _numbers(key: str, v: Any) -> Iterator[tuple[str, float]]:
    """A record's value: a number, or a mapping of numbers (SCALARS / METRICS) as key/name."""
    f = _number(v)
    if f is not None:
        yield key, f
    elif isinstance(v, dict):
        for k, sub in v.items():
            f = _number(sub)
            if f is not None:
                yield f"{key}/{k}", f


def _metrics(rec: dict) -> Iterator[tuple[str, float]]:
    metrics = rec.get("metrics")
    for name, val in (metrics if isinstance(metrics, dict) else {}).items():
        yield from _numbers(str(name), val)


class Converter:
    """Turns metrics.jsonl and logs.jsonl records into Points. Keeps what it needs across records: the updates of
    each round (for the round's bytes and sites) and the round each site was last seen in."""

    def __init__(self) -> None:
        self._updates: dict[tuple[int, int], list[dict]] = {}
        self._site_round: dict[str, int] = {}

    def metrics_record(self, rec: dict, *, peak_rss: float | None = None) -> list[Point]:
        ev, t = rec.get("event"), _number(rec.get("time"))
        rnd = rec.get("round")
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            return []
        if ev == "update" and isinstance(rec.get("site"), str):
            site = rec["site"]
            self._updates.setdefault((rnd, int(rec.get("attempt") or 0)), []).append(rec)
            pts = [Point(f"global_model/{k}", v, rnd, site, time=t) for k, v in _metrics(rec)]
            size, secs, weight = _number(rec.get("bytes")), _number(rec.get("seconds")), _number(rec.get("weight"))
            if size is not None:
                pts.append(Point("update/bytes", size, rnd, site, time=t))
            if secs is not None:
                pts.append(Point("update/seconds", secs, rnd, site, time=t))
                if size is not None and secs > 0:
                    pts.append(Point("update/gbps", size / secs / 1e9, rnd, site, time=t))
            if weight is not None:
                pts.append(Point("update/weight", weight, rnd, site, time=t))
            return pts
        if ev == "round":
            pts = [Point(f"global/{k}", v, rnd, time=t) for k, v in _metrics(rec)]
            updates = self._updates.pop((rnd, int(rec.get("attempt") or 0)), [])
            secs = _number(rec.get("seconds"))
            if secs is not None:
                pts.append(Point("aggregator/round_seconds", secs, rnd, time=t))
            ck = _number(rec.get("checkpoint_seconds"))
            if ck is not None:
                pts.append(Point("aggregator/checkpoint_seconds", ck, rnd, time=t))
            n = len({u["site"] for u in updates}) if updates else _number(rec.get("updates"))
            if n is not None:
                pts.append(Point("aggregator/sites", float(n), rnd, time=t))
            if updates:
                total = float(sum(_number(u.get("bytes")) or 0.0 for u in updates))
                pts.append(Point("aggregator/bytes", total, rnd, time=t))
                if secs:
                    pts.append(Point("aggregator/gbps", total / secs / 1e9, rnd, time=t))
            if peak_rss is not None:
                pts.append(Point("aggregator/peak_rss_mb", peak_rss / 2**20, rnd, time=t))
            return pts
        return []

    def log_record(self, rec: dict) -> list[Point]:
        site, rnd, key = rec.get("site"), rec.get("round"), rec.get("key")
        if not isinstance(site, str) or not isinstance(key, str) or not key:
            return []
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            rnd = self._site_round.get(site, 0)
        t = _number(rec.get("time"))
        step = rec.get("step", rec.get("global_step"))
        pts: list[Point] = []
        if isinstance(step, int) and not isinstance(step, bool):
            if self._site_round.get(site) != rnd:
                pts.append(Point("round", float(rnd), step, site, "step", t))
            axis = "step"
        else:
            step, axis = rnd, "round"
        self._site_round[site] = rnd
        pts += [Point(k, v, step, site, axis, t) for k, v in _numbers(key, rec.get("value"))]
        return pts


# -- trackers --------------------------------------------------------------------------------------------------


class _Tracker:
    name = ""

    def write(self, points: list[Point]) -> None:
        raise NotImplementedError

    def close(self, code: int) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Keep the trackers' INFO chatter (database migrations) off the console."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved, strict=True):
            lg.setLevel(lvl)


class _MLflow(_Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, options: dict[str, Any], job: str, params: dict[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network unless the user asks for a server
        with _quiet("mlflow", "alembic"):
            from mlflow import MlflowClient

            uri = options.get("tracking_uri")
            artifacts = None
            if uri is None:
                store = (run_dir / "mlruns").resolve()
                store.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the run directory is
                uri = f"sqlite:///{store / 'mlflow.db'}"
                artifacts = (store / "artifacts").as_uri()
            self.uri = uri
            self.client = MlflowClient(tracking_uri=uri)
            name = options.get("experiment") or job
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                name, artifact_location=artifacts)  # fmt: skip
        self.experiment_id = exp_id
        tags = {"fl.job": job, "fl.run_dir": str(run_dir.resolve())}
        self.parent = self.client.create_run(exp_id, run_name=options.get("run_name") or job, tags=tags).info.run_id
        self.runs: dict[str | None, str] = {None: self.parent}
        self._tags = tags
        if params:
            from mlflow.entities import Param

            self.client.log_batch(self.parent, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def _run(self, site: str | None) -> str:
        if site not in self.runs:
            tags = {**self._tags, "site": str(site), "mlflow.parentRunId": self.parent}
            self.runs[site] = self.client.create_run(self.experiment_id, run_name=site, tags=tags).info.run_id
        return self.runs[site]

    def write(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        by_run: dict[str, list] = {}
        now = int(time.time() * 1000)
        for p in points:
            key = _MLFLOW_KEY_BAD.sub("_", p.key)
            ts = int(p.time * 1000) if p.time is not None else now
            by_run.setdefault(self._run(p.site), []).append(Metric(key, p.value, ts, p.step))
        for run_id, metrics in by_run.items():
            for i in range(0, len(metrics), _MLFLOW_BATCH):
                self.client.log_batch(run_id, metrics=metrics[i : i + _MLFLOW_BATCH])

    def close(self, code: int) -> None:
        status = "FINISHED" if code == 0 else "KILLED" if code == 130 else "FAILED"
        for run_id in self.runs.values():
            self.client.set_terminated(run_id, status)


class _TensorBoard(_Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir = log_dir
        if _has("tensorboard"):  # tensorboard's own event writer: protobuf only, no torch, no TensorFlow
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            w = EventFileWriter(str(log_dir))

            def add(p: Point) -> None:  # a plain scalar (simple_value), as torch's and Keras' writers store them
                value = Summary.Value(tag=p.name, simple_value=p.value)
                w.add_event(Event(wall_time=p.time or time.time(), step=p.step, summary=Summary(value=[value])))
        else:
            from tensorboardX import SummaryWriter

            w = SummaryWriter(str(log_dir))

            def add(p: Point) -> None:
                w.add_scalar(p.name, p.value, p.step, walltime=p.time)

        self._add = add
        self.writer = w

    def write(self, points: list[Point]) -> None:
        for p in points:
            self._add(p)
        self.writer.flush()

    def close(self, code: int) -> None:
        self.writer.close()


class _Wandb(_Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, options: dict[str, Any], job: str, params: dict[str, Any]) -> None:
        import wandb

        wanted = {"silent": True, "console": "off", "x_disable_stats": True, "x_disable_update_check": True,
                  "save_code": False}  # fmt: skip
        settings = wandb.Settings(**{k: v for k, v in wanted.items() if k in wandb.Settings.model_fields})
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run = wandb.init(project=options.get("project") or job, entity=options.get("entity"),
                              name=options.get("name") or run_dir.resolve().name, group=options.get("group"),
                              tags=list(options.get("tags") or ()), config=params, dir=str(run_dir), mode="offline",
                              reinit="create_new", settings=settings)  # fmt: skip
        self.run.define_metric("round", hidden=True)
        self._defined: set[str] = set()

    def write(self, points: list[Point]) -> None:
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for p in points:
            step_key = "round" if p.axis == "round" else f"{p.site}/step"
            if p.name not in self._defined:
                if step_key not in self._defined and step_key != "round":
                    self.run.define_metric(step_key, hidden=True)
                    self._defined.add(step_key)
                self.run.define_metric(p.name, step_metric=step_key)
                self._defined.add(p.name)
            rows.setdefault((step_key, p.step), {})[p.name] = p.value
        for (step_key, step), row in rows.items():
            self.run.log({**row, step_key: step})

    def close(self, code: int) -> None:
        self.run.finish(exit_code=code)


# -- the tailer ------------------------------------------------------------------------------------------------


@dataclass
class JsonlTail:
    """Incremental reader of a JSON-lines file: only whole lines, from where the last read stopped."""

    path: Path
    offset: int = 0

    def read(self) -> list[tuple[int, dict]]:
        """New records, each with the file offset where its line ends."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        out = []
        pos = self.offset
        for line in data[:end].split(b"\n")[:-1]:
            pos += len(line) + 1
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append((pos, rec))
        self.offset += end
        return out


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

    def __init__(self, run_dir: str | Path, specs: Iterable[TrackerSpec], *, name: str | None = None,
                 params: dict[str, Any] | None = None, interval: float = POLL) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.specs = tuple(specs)
        self.name = name or self.run_dir.resolve().name
        self.params = dict(params or {})
        self.interval = interval
        self.trackers: list[_Tracker] = []
        self._metrics = JsonlTail(self.run_dir / "metrics.jsonl")
        self._logs = JsonlTail(self.run_dir / "logs.jsonl")
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
                self.trackers.append(self._open(s))
        except BaseException:
            self._close_trackers(1)
            raise
        if self.trackers:
            log.info("tracking to %s", self.describe())
            self._thread = threading.Thread(target=self._loop, name="fl-tracking", daemon=True)
            self._thread.start()
        return self

    def _open(self, s: TrackerSpec) -> _Tracker:
        if s.name == "mlflow":
            return _MLflow(self.run_dir, s.options, self.name, self.params)
        if s.name == "tensorboard":
            d = Path(s.options.get("log_dir") or "tensorboard").expanduser()
            return _TensorBoard(d if d.is_absolute() else self.run_dir / d)
        return _Wandb(self.run_dir, s.options, self.name, self.params)

    def describe(self) -> str:
        """Where each open tracker writes, e.g. "mlflow (sqlite:///...), tensorboard (RUN_DIR/tensorboard)"."""
        return ", ".join(self._where(t) for t in self.trackers)

    @staticmethod
    def _where(t: _Tracker) -> str:
        if isinstance(t, _MLflow):
            return f"mlflow ({t.uri})"
        if isinstance(t, _TensorBoard):
            return f"tensorboard ({t.log_dir})"
        return f"wandb (offline, {Path(t.run.dir).parent})"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> int:
        """Read the new records and send them to the trackers; the number of records read."""
        with self._lock:
            points: list[Point] = []
            recs = self._metrics.read()
            for end, rec in recs:
                live = end > self._live_from and rec.get("event") == "round"
                points += self._conv.metrics_record(rec, peak_rss=peak_rss() if live else None)
            logs = self._logs.read()
            for _, rec in logs:
                points += self._conv.log_record(rec)
            if points:
                for t in list(self.trackers):
                    try:
                        t.write(points)
                    except Exception as e:  # noqa: BLE001 - a tracker must never fail the federation
                        log.warning("tracking: %s failed (%s: %s); it gets no more records of this run", t.name,
                                    type(e).__name__, e, exc_info=True)  # fmt: skip
                        self.trackers.remove(t)
            return len(recs) + len(logs)

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

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(0 if exc_type is None else 130 if issubclass(exc_type, KeyboardInterrupt) else 1)
