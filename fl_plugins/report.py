"""`fl-plugins report RUN_DIR`: what a run did, as a table and PNG plots.

Reads the run directory only (the aggregator's RUN_DIR/metrics.jsonl, the sites' RUN_DIR/logs.jsonl, and when
present `fl-plugins run`'s summary.json and a built-in task's baselines.json), prints the per-round table and
writes into RUN_DIR/report/:

    validation.png   the global model's validation loss and accuracy (every metric whose name holds "loss" or
                     "acc") by the rounds of training behind it: the metrics sent with round r's updates score
                     the model round r started from (the initial model, or the global model after round r-1);
                     the evaluation of the final model at every site is the last point; each site's own value
                     thin, each site's local-only baseline and the final model on the pooled validation set
                     (baselines.json) beside them
    train_loss.png   each site's training loss per step across rounds (logs.jsonl, from `flare.log` or the
                     trainers' forwarded logs), each site's round boundaries in its colour
    bytes.png        bytes of the updates uploaded per round, per site (every try; the table counts the same);
                     in a swarm job, beside it, the sealed bytes each round moved through the aggregator's relay
                     and directly between sites, with the site that aggregated the round

A swarm job's table (`--workflow swarm`: its metrics.jsonl holds "swarm" records) also says, per round, which site
aggregated it and the sealed bytes (the updates and the new global model) that moved through the relay and
directly; a FedAvg run's table has no such columns.

The plots are drawn by report_plots.py, the evaluations' table and the cross-site matrix by report_eval.py, the
table of where each round's seconds went (download, train, upload, fold wait, write) by report_timeline.py.
A run still going, stopped or crashed stops `fl-plugins report` with a ConfigError saying what is missing, unless
`--partial`: then it is reported as far as it got, with notes; a directory that is not a run directory is a
ConfigError naming what is missing. `fl-plugins run` writes the plots at its end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fl_plugins import records, report_eval, report_plots, report_timeline
from fl_plugins._text import baselines_table as _baselines_table
from fl_plugins._text import human_bytes, human_rate, metrics_table, scored_model
from fl_plugins.errors import ConfigError
from fl_plugins.record_files import RunMetrics, read_object, read_records
from fl_plugins.records import (
    Baselines,
    EvaluationRecord,
    LogRecord,
    RoundRecord,
    RunSummary,
    SwarmRecord,
    UpdateRecord,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

log = logging.getLogger(__name__)

PLOTS = ("validation.png", "train_loss.png", "bytes.png")
SWARM_COLUMNS = ("aggregated by", "relayed", "direct")  # the round table's columns for a swarm job


@dataclass
class RunData:
    """What a run directory holds, read once."""

    run_dir: Path
    name: str
    updates: list[UpdateRecord]  # in order
    rounds: dict[int, RoundRecord]  # round -> its latest "round" record
    logs: list[LogRecord]  # logs.jsonl (flare.log), in order
    summary: RunSummary | None = None  # summary.json (`fl-plugins run`), None when absent
    baselines: Baselines | None = None  # baselines.json (a built-in task with `baselines: true`)
    notes: list[str] = field(default_factory=list)  # why the report may be incomplete
    evaluations: list[EvaluationRecord] = field(default_factory=list)  # the global model's, during training
    swarm: dict[int, SwarmRecord] = field(default_factory=dict)  # a swarm job's: round -> its latest "swarm" record

    @property
    def finished(self) -> bool:
        return not self.notes

    @property
    def last_evaluation(self) -> EvaluationRecord | None:
        """The evaluation at every site of the model the last finished round made: in a finished run, the final
        global model's (the model the user takes home)."""
        after = max(self.rounds) + 1 if self.rounds else None
        return next((e for e in reversed(self.evaluations) if e.round == after), None)


T = TypeVar("T")


def _read_json(path: Path, notes: list[str], parse: Callable[[dict[str, Any]], T]) -> T | None:
    try:
        obj = read_object(path)
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} cannot be read ({e}); left out")
        return None
    return None if obj is None else parse(obj)


def load_run(run_dir: str | Path) -> RunData:
    """Read RUN_DIR; ConfigError when it is not a run directory (no metrics.jsonl, or one without fl-plugins
    records)."""
    run_dir = Path(run_dir)
    hint = "give the run directory of `fl-plugins run` (its --run-dir) or of `fl-plugins server --run-dir`"
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run directory; {hint}")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; {hint}")
    metrics = run_dir / records.METRICS
    if not metrics.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory: it has no metrics.jsonl (the aggregator writes it "
            f"as updates arrive); {hint}"
        )
    recs = read_records(metrics)
    ours = RunMetrics()
    ours.add(recs)
    if recs and all(isinstance(r, records.OtherRecord) for r in recs):  # (a "sample" alone: a run that began)
        raise ConfigError(
            f'{metrics} holds no fl-plugins records ("update", "round", "sample" events): {run_dir} is '
            f"not a run directory; {hint}"
        )
    logs = [r for r in read_records(run_dir / records.LOGS, records.parse_log) if isinstance(r, LogRecord)]
    notes: list[str] = []
    summary = _read_json(run_dir / records.SUMMARY, notes, RunSummary.from_json)
    baselines = _read_json(run_dir / records.BASELINES, notes, Baselines.from_json)
    status = _unfinished(summary, ours.rounds)  # first when there is no summary.json, else after what was unreadable
    notes = status + notes if summary is None else notes + status
    name = (summary.name if summary else None) or run_dir.resolve().name
    evals = [r for r in recs if isinstance(r, EvaluationRecord)]
    swarm = {r.round: r for r in recs if isinstance(r, SwarmRecord)}  # (a later attempt's record replaces)
    return RunData(run_dir, name, ours.updates, ours.rounds, logs, summary, baselines, notes, evals, swarm)


def _unfinished(summary: RunSummary | None, rounds: dict[int, RoundRecord]) -> list[str]:
    """Notes on what the run lacks, by summary.json."""
    if summary is None:
        done = f"finished rounds: {_ranges(sorted(rounds))}" if rounds else "no round has finished yet"
        return [
            f"no summary.json: the run is unfinished (still running, or stopped before its aggregator wrote one: "
            f"killed, crashed); {done}"
        ]
    notes = []
    if summary.rounds_planned is not None:
        missing = [r for r in range(summary.rounds_planned) if r not in rounds]
        if missing:
            notes.append(f"unfinished: rounds {_ranges(missing)} of 0..{summary.rounds_planned - 1} are missing")
    if summary.exit_code not in (0, None):
        code = summary.exit_code
        stopped = {130: "the run was interrupted (Ctrl-C)", 143: "the run was stopped (SIGTERM)"}
        notes.append(stopped.get(code, f"the run failed (exit code {code})"))
    return notes


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}..{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _or_zero(v: float | None) -> float:
    return 0.0 if v is None else float(v)


# -- the table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRow:
    """One finished round of the table: its updates, seconds, the bytes of the updates uploaded in it (every
    try, as bytes.png counts them), their upload rate in bytes/s (None without upload time), the model its
    metrics score ("initial model", "global model after round r-1") and those metrics; in a swarm job, its
    "swarm" record (the site that aggregated it, the sealed bytes relayed and sent directly)."""

    round: int
    updates: int
    seconds: float | None
    bytes: float
    rate: float | None
    model: str
    metrics: dict[str, Any]
    swarm: SwarmRecord | None = None

    def cells(self, swarm: bool = False) -> tuple[str, ...]:
        """round, updates, seconds, uploaded, upload rate, with `swarm` the SWARM_COLUMNS (blank where the round
        has no swarm record), and the scored model, as the table shows them."""
        seconds = "" if self.seconds is None else f"{self.seconds:.2f}"
        rate = "" if self.rate is None else human_rate(self.rate)
        cells: tuple[str, ...] = (str(self.round), str(self.updates), seconds, human_bytes(self.bytes), rate)
        if swarm:
            s = self.swarm
            cells += ("", "", "") if s is None else (s.site, _bytes(s.bytes_relayed), _bytes(s.bytes_direct))
        return (*cells, self.model)


def _bytes(n: float | None) -> str:
    return "" if n is None else human_bytes(n)


def round_rows(run: RunData) -> list[RoundRow]:
    """One row per finished round: updates, seconds, bytes uploaded, upload rate, the model scored, metrics."""
    rows = []
    for r, rec in sorted(run.rounds.items()):
        ups = [u for u in run.updates if u.round == r]
        size = sum(_or_zero(u.bytes) for u in ups)
        secs = sum(_or_zero(u.seconds) for u in ups)
        seconds = None if rec.seconds is None else float(rec.seconds)
        updates = len(ups) if rec.updates is None else rec.updates
        rate = size / secs if secs > 0 else None
        rows.append(RoundRow(r, updates, seconds, size, rate, scored_model(r), rec.metrics, run.swarm.get(r)))
    return rows


def round_table(run: RunData) -> Table:
    """The rounds, then the evaluation of the model the last round made at every site (the final model's). A swarm
    job's also say which site aggregated each round and the sealed bytes relayed and sent directly."""
    title = f"{run.name}: per-round metrics, each of the model named beside it, as the sites scored it ({run.run_dir})"
    swarm = bool(run.swarm)
    columns = ("round", "updates", "seconds", "uploaded", "upload rate", *(SWARM_COLUMNS if swarm else ()))
    columns += ("metrics of",)
    rows = [(row.cells(swarm), row.metrics) for row in round_rows(run)]
    last = run.last_evaluation
    if last is not None:
        first = "final" if run.finished else "eval"
        blank = ("",) * (len(columns) - 2)
        rows.append(((first, *blank, scored_model(last.round, final=run.finished)), last.metrics))
    return metrics_table(title, columns, rows, min_width=min(len(title), 160))


def baselines_table(run: RunData) -> Table:
    return _baselines_table(run.name, run.baselines or Baselines())


# -- the plots (report_plots.py) -------------------------------------------------------------------------------


def _sites(run: RunData) -> list[str]:
    names = {u.site for u in run.updates} | {r.site for r in run.logs}
    names |= set(run.baselines.local_only if run.baselines else {})
    for e in run.evaluations:
        names |= set(e.sites)
    return sorted(names)


def write_plots(run: RunData, out_dir: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """Write the PNGs into `out_dir` (default RUN_DIR/report); the paths written and a note for each plot left out
    (no data for it)."""
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    colors = report_plots.colors(_sites(run))
    written: list[Path] = []
    skipped: list[str] = []
    plots = (report_plots.validation, report_plots.train_loss, report_plots.bytes_plot)
    for name, plot in zip(PLOTS, plots, strict=True):
        fig = plot(run, colors)
        if isinstance(fig, str):
            skipped.append(f"{name}: {fig}")
            (out / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
            continue
        fig.savefig(out / name, dpi=110)
        written.append(out / name)
    return written, skipped


# -- the command -----------------------------------------------------------------------------------------------


@dataclass
class Report:
    run: RunData
    plots: list[Path]  # the PNGs written
    skipped: list[str]  # plots left out, and why


def report(run_dir: str | Path, *, console: Console | None = None, plots: bool = True, partial: bool = False) -> Report:
    """`fl-plugins report RUN_DIR`: print the per-round table (and the baselines), write the plots, say what is
    missing. ConfigError for a directory that is not a run directory, and for an unfinished run unless
    `partial` (then it is reported as far as it got, with notes saying what is missing)."""
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    run = load_run(run_dir)
    if not partial and not run.finished:
        raise ConfigError(
            f"{run.run_dir}: the run is not finished ({'; '.join(run.notes)}); wait for it to end, "
            "or pass --partial to report what is there"
        )
    if run.rounds:
        console.print(round_table(run))
        timeline = report_timeline.timeline_table(run.rounds, run.updates)
        if timeline is not None:
            console.print(timeline)
    if run.baselines is not None and run.baselines.global_metrics is not None:
        console.print(baselines_table(run))
    if run.evaluations:
        final = run.last_evaluation.round if run.finished and run.last_evaluation is not None else None
        console.print(report_eval.evaluation_table(run.evaluations, final_round=final))
    matrix = report_eval.load_matrix(run.run_dir)
    if matrix is not None:
        console.print(report_eval.matrix_table(matrix))
    written: list[Path] = []
    skipped: list[str] = []
    if plots:
        written, skipped = write_plots(run)
    if plots and matrix is not None:
        drawn = report_eval.heatmap(matrix, run.run_dir / "report")
        if isinstance(drawn, Path):
            written.append(drawn)
        else:
            skipped.append(f"{report_eval.HEATMAP}: {drawn}")
    for note in run.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for s in skipped:
        console.print(f"[yellow]plot left out:[/] {s}", highlight=False)
    if written:
        console.print(f"plots: {', '.join(p.name for p in written)} in {written[0].parent}", highlight=False)
    return Report(run, written, skipped)
