"""What `fl-plugins run` shows (runner.py): the live view of the sites, a line per finished round (and per
evaluation) without a terminal, and at the end summary.json's content and its table.

Every number says what it is. Rounds count from 0, and the metrics a site sends with round r's update score the
global model it received at round r's start: the initial model for round 0, else the global model after round r-1
(`_text.scored_model`); an "evaluation" record of round k scores the model after round k-1, the one after the
last round being the final model. Bytes are per round: the updates the sites uploaded in it (every try), as
bytes.png and summary.json count them; the network rate is what the aggregator moved, both ways, lately.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fl_plugins._text import human_bytes, human_rate, metrics_table, scored_model
from fl_plugins.record_files import JsonlTail, RunMetrics
from fl_plugins.records import METRICS, EvaluationRecord, RoundRecord, RunSummary, round_rows

if TYPE_CHECKING:
    from rich.table import Table

    from fl_plugins.recipe import Recipe

RATE_WINDOW = 0.4  # seconds: the network rate is measured over at least this long
_PHASES = {"submit": "the sites submit their local models", "cross-site": "cross-site evaluation"}


def _metrics_text(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def round_line(rec: RoundRecord, uploaded: float, total: int) -> str:
    """ "round 1 done (2 of 3): 3 updates in 1.2 s, 45.1 KB uploaded; the sites scored the global model after
    round 0: val_acc=0.52" (the metrics sent with round 1's updates score the model round 1 started from)."""
    line = (
        f"round {rec.round} done ({rec.round + 1} of {total}): {rec.updates or 0} updates in "
        f"{rec.seconds or 0.0:.1f} s, {human_bytes(uploaded)} uploaded"
    )
    ms = _metrics_text(rec.metrics)
    return f"{line}; the sites scored the {scored_model(rec.round)}: {ms}" if ms else line


def evaluation_line(rec: EvaluationRecord, total: int) -> str:
    """ "every site evaluated the global model after round 2 (final): val_acc=0.91 (mean over 3 sites)"."""
    model = scored_model(rec.round, final=rec.round >= total)
    answered = sum(1 for c in rec.sites.values() if "metrics" in c)
    return (
        f"every site evaluated the {model}: {_metrics_text(rec.metrics) or 'no metrics'} (mean over {answered} sites)"
    )


class View:
    """The live view (rich) or, without a terminal, one plain line per finished round and per evaluation.
    `sites`: objects with a `name` and an exit code `rc` (None while running); `metrics`: the run's records as
    read so far (its evaluations the view reads itself, from the same metrics.jsonl)."""

    def __init__(self, recipe: Recipe, server: Any, sites: Sequence[Any], metrics: RunMetrics, t0: float) -> None:
        self.recipe, self.server, self.sites, self.metrics, self.t0 = recipe, server, sites, metrics, t0
        self._printed: set[tuple[str, int]] = set()
        self._last = (time.monotonic(), 0)
        self.rate = 0.0  # bytes per second the aggregator moved (received and sent) over the last RATE_WINDOW
        self._tail = JsonlTail(server.aggregator.config.run_dir / METRICS)
        self.evaluations: dict[int, EvaluationRecord] = {}  # round -> its latest evaluation

    def uploaded(self, round_: int) -> int:
        """Bytes of the updates accepted in round `round_`, every try (bytes.png's bar, summary.json's figure)."""
        return sum(int(u.bytes or 0) for u in self.metrics.updates if u.round == round_)

    def site_states(self, st: dict[str, Any]) -> dict[str, str]:
        rnd, attempt = st["round"], st["attempt"]
        committed = {u.site for u in self.metrics.updates if (u.round, u.attempt) == (rnd, attempt)}
        uploading: dict[str, int] = {}
        for u in st["uploads"].values():
            site = u["site"]
            if not u["initial"] and (u["round"], u["attempt"]) == (rnd, attempt) and site not in committed:
                uploading[site] = uploading.get(site, 0) + u["bytes_received"]
        connected = set(st["sites"])
        out = {}
        for s in self.sites:
            if s.rc is not None:
                out[s.name] = "done" if s.rc == 0 else f"crashed (exit {s.rc})"
            elif st["done"]:
                out[s.name] = "done"
            elif getattr(s, "run", True) is None:  # a virtual site between its turns (backends/virtual.py)
                out[s.name] = "waiting for its turn"
            elif s.name not in connected:
                out[s.name] = "starting"
            elif st.get("phase") in ("evaluate", "final evaluation"):
                out[s.name] = "evaluating"
            elif s.name in uploading:
                out[s.name] = f"uploading ({human_bytes(uploading[s.name])})"
            elif s.name in committed or len(connected) < self.recipe.federation.min_sites:
                out[s.name] = "waiting"
            else:
                out[s.name] = "training"
        return out

    def _measure(self, st: dict[str, Any]) -> None:
        """Update the network rate from the aggregator's byte counters and read new evaluation records."""
        moved = st["bytes_received"] + st["bytes_sent"]
        now = time.monotonic()
        t, b = self._last
        if now - t >= RATE_WINDOW:
            self.rate = max(0, moved - b) / (now - t)
            self._last = (now, moved)
        for rec in self._tail.read():
            if isinstance(rec, EvaluationRecord):
                self.evaluations[rec.round] = rec

    def headline(self, st: dict[str, Any]) -> str:
        """ "quickstart  1 of 3 rounds done  round 1 running: 45.1 KB uploaded  network 1.2 MB/s  12 s"."""
        total, rnd, phase = st["total_rounds"], st["round"], st.get("phase")
        parts = [f"[bold]{self.recipe.name}[/]", f"{min(rnd, total)} of {total} rounds done"]
        if st["done"]:
            parts.append("finished")
        elif phase in ("evaluate", "final evaluation"):
            parts.append(f"every site evaluates the {scored_model(rnd, final=rnd >= total)}")
        elif phase in _PHASES:
            parts.append(_PHASES[phase])
        elif rnd < total:
            again = f" (try {st['attempt'] + 1})" if st["attempt"] else ""
            parts.append(f"round {rnd} running{again}: {human_bytes(self.uploaded(rnd))} uploaded")
        parts += [f"network {human_rate(self.rate)}", f"{time.monotonic() - self.t0:.0f} s"]
        return "  ".join(parts)

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        st = self.server.aggregator.status()
        self._measure(st)
        t = Table(show_header=True, header_style="bold", box=None)
        t.add_column("site")
        t.add_column("state")
        for name, state in self.site_states(st).items():
            t.add_row(name, state)
        parts: list[Any] = [self.headline(st), t]
        if self.metrics.rounds:
            last = self.metrics.rounds[max(self.metrics.rounds)]
            parts.append(round_line(last, self.uploaded(last.round), st["total_rounds"]))
        if self.evaluations:
            parts.append(evaluation_line(self.evaluations[max(self.evaluations)], st["total_rounds"]))
        return Group(*parts)

    def print_progress(self) -> None:
        st = self.server.aggregator.status()
        self._measure(st)
        total = st["total_rounds"]
        lines = [(("round", r), round_line(rec, self.uploaded(r), total)) for r, rec in self.metrics.rounds.items()]
        lines += [(("evaluation", r), evaluation_line(rec, total)) for r, rec in self.evaluations.items()]
        for key, line in sorted(lines, key=lambda x: (x[0][1], x[0][0] == "evaluation")):
            if key not in self._printed:
                self._printed.add(key)
                print(line, flush=True)


def summarize(
    recipe: Recipe,
    metrics: RunMetrics,
    sites: Sequence[Any],
    code: int,
    seconds: float,
    baselines: dict[str, Any] | None = None,
    base: RunSummary | None = None,
) -> RunSummary:
    """summary.json: the run's outcome, each finished round (its bytes: every update the sites uploaded in it,
    all attempts; each site also downloaded the global model once) and each site's exit code and log. `base`: the
    summary the aggregator wrote when its job completed (aggregator/ending.py): its job id, its planned rounds (a
    cyclic job's visits), the final model's folder and evaluation are kept."""
    return RunSummary(
        name=recipe.name,
        recipe=str(recipe.source),
        exit_code=code,
        seconds=round(seconds, 3),
        rounds_planned=base.rounds_planned if base is not None else recipe.federation.rounds,
        rounds=round_rows(metrics.updates, metrics.rounds),
        sites={s.name: {"exit_code": s.rc, "log": str(s.log_path)} for s in sites},
        baselines=baselines,
        job_id=base.job_id if base is not None else None,
        final_model=base.final_model if base is not None else None,
        final_evaluation=base.final_evaluation if base is not None else None,
    )


def summary_table(summary: RunSummary, final: EvaluationRecord | None = None) -> Table:
    """summary.json's rounds, each with the model its metrics score; `final` (the job's evaluation of the final
    global model at every site, when it has one) as the last row."""
    rows = [
        (
            (str(r.round), str(r.updates), f"{r.seconds or 0.0:.2f}", human_bytes(r.uploaded_bytes or 0)),
            scored_model(r.round),
            r.metrics,
        )
        for r in summary.rounds
    ]
    if final is not None:
        rows.append((("final", "", "", ""), scored_model(final.round, final=True), final.metrics))
    return metrics_table(
        f"{summary.name}: per-round metrics (each scores the model named beside it, as the sites scored it)",
        ("round", "updates", "seconds", "uploaded", "metrics of"),
        [((*cells, model), ms) for cells, model, ms in rows],
    )
