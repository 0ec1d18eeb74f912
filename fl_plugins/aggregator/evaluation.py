"""Evaluation phases: every site evaluates every model (EVALUATE), or submits its local model (SUBMIT_MODEL).

A `Sweep` is one such phase: a grid of cells, one per (model, site). Each site in turn gets one task per cell of
its row (the cell's task id names the answer), answers it (metrics for EVALUATE, through `Aggregator.result`;
an upload of its local model for SUBMIT_MODEL, through intake.py), and the cell is filled. A cell is left empty
with the reason, never waited for forever, when the site leaves (`site_timeout`), its policy refuses, the task
takes longer than `evaluate_timeout`, or the answer is refused (no metrics, a wrong model). The sweep is over
once every participant's row is full and at least `needed` sites took part.

Participants are the sites alive when the sweep starts, and any that ask for a task before it is over. A site
that asks again while its cell is open (its process restarted) gets the same task, with the same id.

    sweep = Sweep(TaskKind.EVALUATE, ["global", "site-1"], needed=1, timeout=None, round_=3)
    task = sweep.next_task("site-2", now)          # EVALUATE of "global", task id "3:global:site-2:..."
    sweep.answer("site-2", task.task_id, {"metrics": {"accuracy": 0.9}})
    sweep.over(), sweep.table()                    # {"global": {"site-2": {"metrics": {...}}}, ...}

The caller (core.py) holds the coordinator's lock around every call. Pure: no files, no threads, time passed in.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from fl_plugins.errors import ProtocolError, RoundError
from fl_plugins.wire import limits
from fl_plugins.wire.layout import short_repr

log = logging.getLogger(__name__)

GLOBAL = "global"  # the name of the global model in an evaluation's table (no site may be called so)
MAX_SAMPLES = 1e12  # an evaluation's NUM_EVAL_SAMPLES, as an update's weight (fedavg.MAX_WEIGHT)


@dataclass
class Cell:
    """One site's answer for one model: metrics (EVALUATE), True (SUBMIT_MODEL), or why there is none."""

    task_id: str = ""
    given: float | None = None  # when its task was handed out
    result: dict[str, Any] | None = None
    error: str = ""

    @property
    def filled(self) -> bool:
        return self.result is not None or bool(self.error)

    def to_json(self) -> dict[str, Any]:
        return dict(self.result) if self.result is not None else {"error": self.error or "not evaluated"}


@dataclass
class Sweep:
    """One evaluation phase (see the module docstring). `kind`: workflow.TaskKind's EVALUATE or SUBMIT_MODEL
    (kept as its value, so this module needs no import of workflow.py)."""

    kind: str
    models: list[str]
    needed: int
    timeout: float | None
    round: int
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)  # site -> model -> cell
    since: dict[str, float] = field(default_factory=dict)  # site -> when its row last moved (joined, a cell filled)
    by_task: dict[str, tuple[str, str]] = field(default_factory=dict)  # task id -> (site, model)

    # -- who takes part -----------------------------------------------------------------------------------------
    def join(self, site: str, now: float) -> dict[str, Cell]:
        row = self.cells.get(site)
        if row is None:
            row = self.cells[site] = {m: Cell() for m in self.models}
            self.since[site] = now
        return row

    # -- tasks and answers --------------------------------------------------------------------------------------
    def next_task(self, site: str, now: float) -> tuple[str, str] | None:
        """(model, task id) for `site` now: its open task again, else its next empty cell; None: its row is full."""
        row = self.join(site, now)
        for model, cell in row.items():
            if cell.filled:
                continue
            if not cell.task_id:
                cell.task_id = f"{self.round}:{self.kind}:{secrets.token_hex(6)}"
                self.by_task[cell.task_id] = (site, model)
            if cell.given is None:
                cell.given = now
            return model, cell.task_id
        return None

    def cell(self, site: str, task_id: str, *, again: bool = False) -> tuple[str, Cell]:
        """The open cell `task_id` names for `site`: RoundError if there is none (late, unknown, another site's).
        `again`: a cell this task already filled with a result is returned too (a retried answer)."""
        owner = self.by_task.get(task_id)
        if not isinstance(task_id, str) or owner is None or owner[0] != site:
            raise RoundError(
                f"site {site!r}: task {short_repr(task_id)} is not one of its open {self.kind} tasks (the "
                "evaluation ended, or the task was another's); the answer is not counted"
            )
        model = owner[1]
        c = self.cells[site][model]
        if c.filled and not (again and c.result is not None):
            why = f"its cell closed: {c.error}" if c.error else "it was answered already"
            raise RoundError(f"site {site!r}: task {task_id!r} is not open ({why}); the answer is not counted")
        return model, c

    def answer(self, site: str, task_id: str, envelope: dict[str, Any], now: float) -> str:
        """An EVALUATE task's metrics (envelope `metrics`, checked against limits.py's bounds); returns the model.
        ProtocolError for an answer without metrics (the cell then says so). An answer sent again after it counted
        (a retry whose first reply was lost) is accepted again, changing nothing."""
        model, c = self.cell(site, task_id, again=True)
        if c.result is not None:
            return model
        self.since[site] = now
        metrics = envelope.get("metrics")
        meta = envelope.get("meta") or {}
        try:
            for key, d in (("metrics", metrics), ("meta", meta)):
                if d is not None and not isinstance(d, dict):
                    raise ProtocolError(f"site {site!r}: the result's `{key}` must be an object")
                limits.check_envelope_dict(f"site {site!r}", key, d or {})
            if not metrics:
                raise ProtocolError(
                    f"site {site!r} sent no metrics for the evaluation of model {model!r}: send "
                    "FLModel(metrics={...}) for an EVALUATE task"
                )
            n = limits.finite_float(meta.get("NUM_EVAL_SAMPLES"))
            if n is not None and not 0 < n <= MAX_SAMPLES:
                raise ProtocolError(f"site {site!r}: NUM_EVAL_SAMPLES must be in (0, {MAX_SAMPLES:g}] (got {n:g})")
        except ProtocolError as e:
            c.error = str(e)
            raise
        c.result = {"metrics": metrics}
        if n is not None:
            c.result["num_samples"] = n
        return model

    def submitted(self, site: str, task_id: str, now: float) -> None:
        _, c = self.cell(site, task_id)
        c.result = {"submitted": True}
        self.since[site] = now

    def fail(self, site: str, task_id: str, why: str) -> None:
        owner = self.by_task.get(task_id)
        if owner is not None and owner[0] == site and not self.cells[site][owner[1]].filled:
            self.cells[site][owner[1]].error = why

    def refuse(self, site: str, why: str) -> None:
        """`site` will answer none of its open cells (its policy refused): each says `why`."""
        for c in self.cells.get(site, {}).values():
            if not c.filled:
                c.error = why

    # -- the clock ----------------------------------------------------------------------------------------------
    def expire(self, now: float, alive: dict[str, bool]) -> None:
        """Fill the cells nobody will answer: every open cell of a site that left (`alive` False); a site's next
        open cell once `timeout` passed since it was handed out, or since the row last moved if the site has not
        asked for it (a site stuck in an evaluation has each of its cells closed in turn, one timeout apart)."""
        for site, row in self.cells.items():
            gone = not alive.get(site, False)
            for model, c in row.items():
                if c.filled:
                    continue
                start = c.given if c.given is not None else self.since[site]
                if gone:
                    c.error = "the site left before it answered"
                elif self.timeout is not None and now - max(start, self.since[site]) > self.timeout:
                    c.error = f"no answer within evaluate_timeout ({self.timeout:g} s)"
                    self.since[site] = now
                else:
                    break  # the row's clock runs on its first open cell only
                log.warning("%s of model %r at site %r: %s", self.kind, model, site, c.error)
                if not gone:
                    break

    def over(self) -> bool:
        rows = self.cells.values()
        return len(self.cells) >= self.needed and all(c.filled for row in rows for c in row.values())

    # -- results ------------------------------------------------------------------------------------------------
    def table(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{model: {site: {"metrics": {...}} or {"error": why}}}: model owner x evaluating site."""
        return {m: {site: row[m].to_json() for site, row in sorted(self.cells.items())} for m in self.models}

    def ok_sites(self) -> list[str]:
        """The sites whose cells all hold a result (SUBMIT_MODEL: the sites that submitted)."""
        return sorted(s for s, row in self.cells.items() if all(c.result is not None for c in row.values()))

    def mean(self, model: str) -> dict[str, float]:
        """`model`'s metrics averaged over the sites that sent them: weighted by NUM_EVAL_SAMPLES when every site
        gave one, else plainly; a metric that is not a number is left out."""
        results = [r for row in self.cells.values() if (r := row[model].result) is not None]
        weighted = bool(results) and all("num_samples" in r for r in results)
        records = [{"metrics": r["metrics"], "weight": r["num_samples"] if weighted else 1.0} for r in results]
        return limits.mean_metrics(records)
