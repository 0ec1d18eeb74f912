"""`fl-plugins report RUN_DIR`: what a run did, as a table and PNG plots.

Reads the run directory only (the aggregator's RUN_DIR/metrics.jsonl, the sites' RUN_DIR/logs.jsonl, and when
present `fl-plugins run`'s summary.json and a built-in task's baselines.json), prints the per-round table and
writes into RUN_DIR/report/:

    validation.png   the global model's validation loss and accuracy per round (every metric whose name holds
                     "loss" or "acc"; weighted over the sites, each site's own value thin), beside each site's
                     local-only baseline and the final global model on the pooled validation set (baselines.json)
    train_loss.png   each site's training loss per step across rounds (logs.jsonl, from `flare.log` or the
                     trainers' forwarded logs), round boundaries marked
    bytes.png        bytes of the updates uploaded per round, per site

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

from fl_plugins import records, report_eval
from fl_plugins._text import baselines_table as _baselines_table
from fl_plugins._text import human_bytes, metrics_table
from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.record_files import RunMetrics, read_object, read_records
from fl_plugins.records import Baselines, EvaluationRecord, LogRecord, RoundRecord, RunSummary, UpdateRecord
from fl_plugins.wire.limits import finite_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.table import Table

log = logging.getLogger(__name__)

PLOTS = ("validation.png", "train_loss.png", "bytes.png")
_EVAL_WORDS = ("val", "eval", "test")  # a logged loss with one of these in its name is not a training loss


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

    @property
    def finished(self) -> bool:
        return not self.notes


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
    return RunData(run_dir, name, ours.updates, ours.rounds, logs, summary, baselines, notes, evals)


def _unfinished(summary: RunSummary | None, rounds: dict[int, RoundRecord]) -> list[str]:
    """Notes on what the run lacks, by summary.json."""
    if summary is None:
        done = f"finished rounds: {_ranges(sorted(rounds))}" if rounds else "no round has finished yet"
        return [
            f"no summary.json: the run is unfinished (still running, stopped or crashed) or was run by "
            f"`fl-plugins server`; {done}"
        ]
    notes = []
    if summary.rounds_planned is not None:
        missing = [r for r in range(summary.rounds_planned) if r not in rounds]
        if missing:
            notes.append(f"unfinished: rounds {_ranges(missing)} of 0..{summary.rounds_planned - 1} are missing")
    if summary.exit_code not in (0, None):
        code = summary.exit_code
        notes.append("the run was interrupted" if code == 130 else f"the run failed (exit code {code})")
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
    """One finished round of the table: its updates, seconds, the bytes of its updates (the attempt that closed
    it), their GB/s (None without upload time) and the round's metrics."""

    round: int
    updates: int
    seconds: float | None
    bytes: float
    gbps: float | None
    metrics: dict[str, Any]

    def cells(self) -> tuple[str, ...]:
        """round, updates, seconds, uploaded and upload GB/s, as the table shows them."""
        seconds = "" if self.seconds is None else f"{self.seconds:.2f}"
        gbps = "" if self.gbps is None else f"{self.gbps:.3g}"
        return str(self.round), str(self.updates), seconds, human_bytes(self.bytes), gbps


def round_rows(run: RunData) -> list[RoundRow]:
    """One row per finished round: updates, seconds, bytes uploaded, GB/s over the uploads, metrics."""
    rows = []
    for r, rec in sorted(run.rounds.items()):
        ups = [u for u in run.updates if u.round == r and u.attempt == rec.attempt]
        size = sum(_or_zero(u.bytes) for u in ups)
        secs = sum(_or_zero(u.seconds) for u in ups)
        seconds = None if rec.seconds is None else float(rec.seconds)
        updates = len(ups) if rec.updates is None else rec.updates
        rows.append(RoundRow(r, updates, seconds, size, size / secs / 1e9 if secs > 0 else None, rec.metrics))
    return rows


def round_table(run: RunData) -> Table:
    title = f"{run.name}: per-round metrics ({run.run_dir})"
    columns = ("round", "updates", "seconds", "uploaded", "upload GB/s")
    return metrics_table(title, columns, [(row.cells(), row.metrics) for row in round_rows(run)], min_width=len(title))


def baselines_table(run: RunData) -> Table:
    return _baselines_table(run.name, run.baselines or Baselines())


# -- the plots -------------------------------------------------------------------------------------------------


def figure(**kw: Any) -> Any:
    # a matplotlib Figure, typed Any: its stubs' Locator.set_params takes no keywords, but the plots set
    # `integer=True` on the axes' default (MaxNLocator) locator
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend; savefig uses Agg
    except ImportError as e:
        raise MissingDependencyError(
            "the report's plots need matplotlib, which is not installed; install it with: "
            "pip install 'fl-plugins[tracking]' (or: pip install matplotlib)"
        ) from e
    return Figure(layout="constrained", **kw)


def _colors(sites: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sites)}


def _sites(run: RunData) -> list[str]:
    names = {u.site for u in run.updates} | {r.site for r in run.logs}
    names |= set(run.baselines.local_only if run.baselines else {})
    return sorted(names)


def write_plots(run: RunData, out_dir: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """Write the PNGs into `out_dir` (default RUN_DIR/report); the paths written and a note for each plot left out
    (no data for it)."""
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    colors = _colors(_sites(run))
    written: list[Path] = []
    skipped: list[str] = []
    for name, plot in (("validation.png", _validation), ("train_loss.png", _train_loss), ("bytes.png", _bytes)):
        fig = plot(run, colors)
        if isinstance(fig, str):
            skipped.append(f"{name}: {fig}")
            (out / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
            continue
        fig.savefig(out / name, dpi=110)
        written.append(out / name)
    return written, skipped


def _validation(run: RunData, colors: dict[str, Any]) -> Figure | str:
    keys: list[str] = []
    recs: list[RoundRecord | UpdateRecord] = [*(run.rounds[r] for r in sorted(run.rounds)), *run.updates]
    for rec in recs:
        keys += [k for k in rec.metrics if k not in keys]
    base = run.baselines or Baselines()
    final = base.global_metrics or {}
    panels = []
    for title, word in (("validation loss", "loss"), ("validation accuracy", "acc")):
        ks = [k for k in keys if word in k.lower()]
        if ks or any(word in k.lower() for k in final):
            panels.append((title, ks, word))
    if not panels:
        return "no metric with 'loss' or 'acc' in its name in the rounds, and no baselines.json"
    fig = figure(figsize=(6.2 * len(panels), 5.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    # each site's latest update per round (a round run again after a failure counts once)
    latest: dict[tuple[str, int], UpdateRecord] = {}
    for u in run.updates:
        latest[(u.site, u.round)] = u
    for ax, (title, ks, word) in zip(axes, panels, strict=True):
        for k in ks:
            rs = [r for r in sorted(run.rounds) if finite_float(run.rounds[r].metrics.get(k)) is not None]
            ax.plot(
                rs,
                [run.rounds[r].metrics[k] for r in rs],
                marker="o",
                lw=2.2,
                color="black",
                label=f"global model, {k} (weighted over the sites)",
            )
            if len(ks) == 1:
                for site, c in colors.items():
                    pts = sorted((r, finite_float(u.metrics.get(k))) for (s, r), u in latest.items() if s == site)
                    pts = [(r, v) for r, v in pts if v is not None]
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True), lw=1, ls=":", marker=".", color=c, label=f"global model at {site}"
                        )
        gkey = next((k for k in final if word in k.lower()), None)
        if gkey is not None:
            for site, m in base.local_only.items():
                v = finite_float(m.get(gkey))
                if v is not None:
                    ax.axhline(v, ls="--", lw=1.3, color=colors.get(site, "grey"), label=f"{site} alone (pooled val.)")
            v = finite_float(final.get(gkey))
            if v is not None:
                x = base.round if base.round is not None else max(run.rounds, default=0) + 1
                ax.plot([x], [v], marker="*", ms=14, ls="", color="black", label="final global model (pooled val.)")
        ax.set_title(title)
        ax.set_xlabel("round (the global model it starts from)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)  # below: hides no line
    fig.suptitle(f"{run.name}: the global model per round" + ("" if run.finished else " (unfinished run)"))
    return fig


def _is_train_loss(key: str) -> bool:
    k = key.lower()
    return "loss" in k and not any(w in k for w in _EVAL_WORDS)


def _train_loss(run: RunData, colors: dict[str, Any]) -> Figure | str:
    series: dict[str, dict[str, list[tuple[float, float, int]]]] = {}  # key -> site -> [(step, value, round)]
    count: dict[tuple[str, str], int] = {}
    for rec in run.logs:
        key, site, v = rec.key, rec.site, finite_float(rec.value)
        if v is None or not _is_train_loss(key):
            continue
        step = finite_float(rec.step)
        n = count[(key, site)] = count.get((key, site), 0) + 1
        rnd = rec.round if rec.round is not None else 0
        series.setdefault(key, {}).setdefault(site, []).append((step if step is not None else n, v, rnd))
    if not series:
        return (
            'no training loss in logs.jsonl (a site sends it with flare.log("train_loss", loss, '
            "step=global_step); the Lightning and HF integrations forward the trainer's)"
        )
    # the most-logged first (HF's per-step "loss"); a key logged once per site (HF's end-of-training "train_loss"
    # summary) is no curve: left out when there is one
    keys = sorted(series, key=lambda k: (-sum(len(v) for v in series[k].values()), k))
    keys = ([k for k in keys if any(len(v) > 1 for v in series[k].values())] or keys)[:2]
    fig = figure(figsize=(9.5, 3.8 * len(keys)))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        first: dict[int, float] = {}  # round -> its first and last step over the sites
        last: dict[int, float] = {}
        for site, pts in sorted(series[key].items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                lw=1.2,
                color=colors.get(site),
                label=site,
                marker="." if len(pts) <= 40 else None,
            )
            for s, _, r in pts:
                first[r] = min(first.get(r, s), s)
                last[r] = max(last.get(r, s), s)
        lo, hi = ax.get_ylim()
        every = max(1, len(first) // 20)
        for i, r in enumerate(sorted(first)):
            if r == min(first):
                continue
            before = max((last[q] for q in last if q < r), default=first[r] - 1)
            x = (before + first[r]) / 2 if before < first[r] else first[r] - 0.5
            ax.axvline(x, color="grey", lw=0.8, ls="--", alpha=0.7)
            if i % every == 0:
                ax.text(x, hi, f" round {r}", fontsize=7, va="top", ha="left", color="dimgrey")
        ax.set_ylabel(key)
        ax.set_xlabel("step (each site's global training step)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{run.name}: training loss per step, round boundaries dashed" + ("" if run.finished else " (unfinished run)")
    )
    return fig


def _bytes(run: RunData, colors: dict[str, Any]) -> Figure | str:
    per: dict[int, dict[str, float]] = {}
    for u in run.updates:
        per.setdefault(u.round, {})
        per[u.round][u.site] = per[u.round].get(u.site, 0.0) + _or_zero(u.bytes)
    if not per:
        return "no update has arrived yet"
    rounds = sorted(per)
    peak = max(sum(v.values()) for v in per.values())
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if peak >= s), ("B", 1.0))
    fig = figure(figsize=(max(6.0, 0.45 * len(rounds) + 3), 4.0))
    ax = fig.subplots()
    bottom = [0.0] * len(rounds)
    for site, c in colors.items():
        vals = [per[r].get(site, 0.0) / scale for r in rounds]
        if any(vals):
            ax.bar(rounds, vals, bottom=bottom, color=c, label=site)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel(f"uploaded ({unit})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    total = sum(sum(v.values()) for v in per.values())
    fig.suptitle(
        f"{run.name}: bytes uploaded per round ({human_bytes(total)} in all)\n"
        "(the updates; each site also downloads the global model every round)",
        fontsize=10,
    )
    return fig


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
    if run.baselines is not None and run.baselines.global_metrics is not None:
        console.print(baselines_table(run))
    if run.evaluations:
        console.print(report_eval.evaluation_table(run.evaluations))
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
