"""MLflow: one parent run for the job (global/ and aggregator/ figures, the job's parameters) and one nested run
per site (tag `site`); by default a SQLite store in RUN_DIR/mlruns, no server."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl_plugins.tracking._points import Point

BATCH = 1000  # MLflow's limit of metrics per log_batch
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


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


class MLflowTracker:
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
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                exp_id = self.client.create_experiment(name, artifact_location=artifacts)
        self.experiment_id = exp_id
        tags = {"fl.job": job, "fl.run_dir": str(run_dir.resolve())}
        self.parent = self.client.create_run(exp_id, run_name=options.get("run_name") or job, tags=tags).info.run_id
        self.runs: dict[str | None, str] = {None: self.parent}
        self._tags = tags
        if params:
            from mlflow.entities import Param

            self.client.log_batch(self.parent, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def where(self) -> str:
        return f"mlflow ({self.uri})"

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
            key = _KEY_BAD.sub("_", p.key)
            ts = int(p.time * 1000) if p.time is not None else now
            by_run.setdefault(self._run(p.site), []).append(Metric(key, p.value, ts, p.step))
        for run_id, metrics in by_run.items():
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(run_id, metrics=metrics[i : i + BATCH])

    def close(self, code: int) -> None:
        status = "FINISHED" if code == 0 else "KILLED" if code == 130 else "FAILED"
        for run_id in self.runs.values():
            self.client.set_terminated(run_id, status)
