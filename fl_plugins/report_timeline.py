"""The report's timeline (report.py prints it): where each round's seconds went, from the "timeline" objects the
aggregator writes into metrics.jsonl (aggregator/timeline.py). Per round: until every site had the global model
(downloads), the sites' median download, local work (train) and upload, the last update's commit from the round's
start, the wait from it to the close (fold wait), and the new global model's write."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from fl_plugins.records import RoundRecord, UpdateRecord

if TYPE_CHECKING:
    from rich.table import Table

COLUMNS = ("round", "downloads", "download", "train", "upload", "last update", "fold wait", "write", "round s")


def timeline_rows(rounds: dict[int, RoundRecord], updates: list[UpdateRecord]) -> list[tuple[str, ...]]:
    """One row per round whose record has a timeline (runs written before it have none): seconds, as COLUMNS."""
    rows = []
    for r, rec in sorted(rounds.items()):
        if not rec.timeline:
            continue
        ups = [u.timeline for u in updates if u.round == r and u.timeline]

        def median(key: str, ups: list[dict] = ups) -> float | None:
            values = [float(u[key]) for u in ups if isinstance(u.get(key), int | float)]  # damaged: left out
            return statistics.median(values) if values else None

        line = rec.timeline
        sites = [median("download"), median("train"), median("upload")]
        cells = [line.get("downloads"), *sites, line.get("last_update"), line.get("fold_wait"), line.get("write")]
        cells.append(rec.seconds)
        rows.append((str(r), *(_s(v) for v in cells)))
    return rows


def timeline_table(rounds: dict[int, RoundRecord], updates: list[UpdateRecord]) -> Table | None:
    """The timeline as a table (None when no round has one)."""
    from rich.table import Table

    rows = timeline_rows(rounds, updates)
    if not rows:
        return None
    t = Table(title="where each round went, seconds (the aggregator's clock; sites: median)")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def _s(v: object) -> str:
    return f"{float(v):.2f}" if isinstance(v, int | float) else ""
