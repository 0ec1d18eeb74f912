"""What `fl-plugins run` shows (runner.py): the live view of the sites, a line per finished round without a
terminal, and at the end summary.json's content and its table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fl_plugins._text import human_bytes, metrics_table
from fl_plugins.record_files import RunMetrics
from fl_plugins.records import RoundSummary, RunSummary

if TYPE_CHECKING:
    from rich.table import Table

    from fl_plugins.recipe import Recipe


class View:
    """The live view (rich) or, without a terminal, one plain line per finished round. `sites`: objects with a
    `name` and an exit code `rc` (None while running); `metrics`: the run's records as read so far."""

    def __init__(self, recipe: Recipe, server: Any, sites: Sequence[Any], metrics: RunMetrics, t0: float) -> None:
        self.recipe, self.server, self.sites, self.metrics, self.t0 = recipe, server, sites, metrics, t0
        self._printed: set[int] = set()
        self._last = (time.monotonic(), 0)
        self.rate = 0.0

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
            elif s.name not in connected:
                out[s.name] = "starting"
            elif s.name in uploading:
                out[s.name] = f"uploading ({human_bytes(uploading[s.name])})"
            elif s.name in committed or len(connected) < self.recipe.federation.min_sites:
                out[s.name] = "waiting"
            else:
                out[s.name] = "training"
        return out

    def _bytes(self, st: dict[str, Any]) -> int:
        moved = st["bytes_received"] + st["bytes_sent"]
        now = time.monotonic()
        t, b = self._last
        if now - t >= 0.4:
            self.rate = (moved - b) / (now - t)
            self._last = (now, moved)
        return moved

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        st = self.server.aggregator.status()
        moved = self._bytes(st)
        total = st["total_rounds"]
        head = (
            f"[bold]{self.recipe.name}[/]  round {min(st['round'], total - 1)} of 0..{total - 1}"
            f"{' (done)' if st['done'] else ''}  attempt {st['attempt']}  "
            f"moved {human_bytes(moved)} ({self.rate / 1e9:.3f} GB/s)  "
            f"{time.monotonic() - self.t0:.0f} s"
        )
        t = Table(show_header=True, header_style="bold", box=None)
        t.add_column("site")
        t.add_column("state")
        for name, state in self.site_states(st).items():
            t.add_row(name, state)
        parts: list[Any] = [head, t]
        if self.metrics.rounds:
            last = self.metrics.rounds[max(self.metrics.rounds)]
            ms = "  ".join(f"{k}={v:.4g}" for k, v in last.metrics.items())
            parts.append(f"last round {last.round}: {last.updates} updates, {last.seconds or 0.0:.1f} s  {ms}")
        return Group(*parts)

    def print_progress(self) -> None:
        for r in sorted(self.metrics.rounds):
            if r in self._printed:
                continue
            self._printed.add(r)
            rec = self.metrics.rounds[r]
            ms = " ".join(f"{k}={v:.4g}" for k, v in rec.metrics.items())
            st = self.server.aggregator.status()
            line = (
                f"round {r} (of 0..{st['total_rounds'] - 1}) done: {rec.updates} updates in "
                f"{rec.seconds or 0.0:.1f} s, moved {human_bytes(self._bytes(st))} {ms}"
            )
            print(line.rstrip(), flush=True)


def summarize(
    recipe: Recipe,
    metrics: RunMetrics,
    sites: Sequence[Any],
    code: int,
    seconds: float,
    baselines: dict[str, Any] | None = None,
) -> RunSummary:
    """summary.json: the run's outcome, each finished round (its bytes: every update the sites uploaded in it,
    all attempts; each site also downloaded the global model once) and each site's exit code and log."""
    sent: dict[int, int] = {}
    for u in metrics.updates:
        sent[u.round] = sent.get(u.round, 0) + int(u.bytes or 0)
    rounds = [
        RoundSummary(
            round=r,
            updates=rec.updates,
            attempt=rec.attempt,
            seconds=rec.seconds,
            uploaded_bytes=sent.get(r, 0),
            metrics=rec.metrics,
        )
        for r, rec in sorted(metrics.rounds.items())
    ]
    return RunSummary(
        name=recipe.name,
        recipe=str(recipe.source),
        exit_code=code,
        seconds=round(seconds, 3),
        rounds_planned=recipe.federation.rounds,
        rounds=tuple(rounds),
        sites={s.name: {"exit_code": s.rc, "log": str(s.log_path)} for s in sites},
        baselines=baselines,
    )


def summary_table(summary: RunSummary) -> Table:
    rows = [
        ((str(r.round), str(r.updates), f"{r.seconds or 0.0:.2f}", human_bytes(r.uploaded_bytes or 0)), r.metrics)
        for r in summary.rounds
    ]
    return metrics_table(f"{summary.name}: per-round metrics", ("round", "updates", "seconds", "uploaded"), rows)
