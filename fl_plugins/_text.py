"""What the commands print about a run: byte sizes, metric values and the tables of results (runner.py at the end
of `fl-plugins run`, report.py for `fl-plugins report`). A value is a metric when it is a finite number
(`wire.limits.finite_float`, the one check the aggregator and the readers share)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fl_plugins.wire.limits import finite_float

if TYPE_CHECKING:
    from rich.table import Table

    from fl_plugins.records import Baselines


def human_bytes(n: float) -> str:
    """1084 -> "1.1 KB" (powers of 1000, up to GB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_rate(bytes_per_second: float) -> str:
    """12_345_678 -> "12.3 MB/s": B/s up to GB/s (powers of 1000), three significant digits (no exponent)."""
    n = max(0.0, bytes_per_second)
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if n < 999.5 or unit == "GB/s":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if n >= 99.95 or unit == "B/s" else f"{n:.3g} {unit}"


def scored_model(rounds_done: int, *, final: bool = False) -> str:
    """Which global model a metric scores, by the rounds of training behind it: 0 -> "initial model", 3 -> "global
    model after round 2" (rounds count from 0). The metrics a site sends with round r's update score the model it
    received at round r's start: `scored_model(r)`."""
    if rounds_done <= 0:
        return "initial model"
    return f"global model after round {rounds_done - 1}" + (" (final)" if final else "")


def metric(v: Any) -> str:
    """A metric to 4 significant digits; blank when `v` is not a finite number."""
    f = finite_float(v)
    return "" if f is None else f"{f:.4g}"


def metrics_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
    *,
    keys: Sequence[str] | None = None,
    min_width: int | None = None,
) -> Table:
    """A rich table with every column right-aligned: `columns`, then one per metric in `keys` (default: every
    metric name of the rows, in the order first seen). `rows`: each row's cells for `columns` and its metrics
    (shown by `metric`)."""
    from rich.table import Table

    if keys is None:
        keys = []
        for _, metrics in rows:
            keys += [k for k in metrics if k not in keys]
    t = Table(title=title, min_width=min_width)
    for col in (*columns, *keys):
        t.add_column(col, justify="right")
    for cells, metrics in rows:
        t.add_row(*cells, *(metric(metrics.get(k)) for k in keys))
    return t


def baselines_table(name: str, b: Baselines) -> Table:
    """baselines.json as a table: the final global model, then each site's local-only model, on the pooled
    validation set (a column per metric of the global model)."""
    n = "?" if b.pooled_validation_rows is None else b.pooled_validation_rows
    title = f"{name}: on the pooled validation set ({n} rows)"
    final = b.global_metrics or {}
    rows = [(("global model" if b.round is None else scored_model(b.round, final=True),), final)]
    rows += [((f"{site} alone",), m) for site, m in b.local_only.items()]
    return metrics_table(title, ("model",), rows, keys=list(final), min_width=len(title))
