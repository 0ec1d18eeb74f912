"""The report's part for evaluations (report.py calls it): the cross-site matrix (RUN_DIR/cross_site_eval.json, written
by the aggregator's cross-site workflow) as a table and a heat-map, `report/cross_site_eval.png`, one panel per
metric (at most four): model owner (rows) x evaluating site (columns), an empty cell crossed out and its reason in
the table; and the global model's evaluations ("evaluation" records: during training with `evaluate_every`, and of
the final model) as rows of their own, each naming the model it scores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins._text import scored_model
from fl_plugins.records import EvaluationRecord

if TYPE_CHECKING:
    from rich.table import Table

CROSS_SITE = "cross_site_eval.json"
HEATMAP = "cross_site_eval.png"
MAX_PANELS = 4


def load_matrix(run_dir: Path) -> dict[str, Any] | None:
    """The cross-site matrix, or None when the run has none (or it cannot be read: a note says so elsewhere)."""
    try:
        m = json.loads((run_dir / CROSS_SITE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("results"), dict) and isinstance(m.get("models"), list)
    return m if ok else None


def metric_names(m: dict[str, Any]) -> list[str]:
    """The numeric metrics the matrix's cells hold, in the order first seen."""
    names: list[str] = []
    for row in m["results"].values():
        for cell in row.values():
            for k, v in (cell.get("metrics") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                    names.append(k)
    return names


def _cell(cell: dict[str, Any] | None, metric: str) -> float:
    v = ((cell or {}).get("metrics") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def matrix_table(m: dict[str, Any]) -> Table:
    """model owner x evaluating site, each cell's metrics (or why it is empty)."""
    from rich.table import Table

    sites = list(m.get("sites") or sorted({s for row in m["results"].values() for s in row}))
    t = Table(title=f"cross-site evaluation of round {m.get('round')}'s models (model owner x evaluating site)")
    t.add_column("model")
    for s in sites:
        t.add_column(s)
    for owner in m["models"]:
        row = m["results"].get(owner, {})
        t.add_row(owner, *[_shown(row.get(s) or {"error": "not evaluated"}) for s in sites])
    for site, cell in (m.get("submissions") or {}).items():
        t.add_row(site, *[f"[red]no model: {cell.get('error', '')}[/]"] + [""] * (len(sites) - 1))
    return t


def _shown(cell: dict[str, Any]) -> str:
    metrics = cell.get("metrics")
    if not metrics:
        return f"[red]{cell.get('error', '')}[/]"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def heatmap(m: dict[str, Any], out: Path) -> Path | str:
    """Write the heat-map; the path, or why there is none (no numeric metric)."""
    from fl_plugins.report_plots import figure

    metrics = metric_names(m)[:MAX_PANELS]
    if not metrics:
        return "the cross-site matrix holds no numeric metric"
    sites = list(m.get("sites") or [])
    owners = list(m["models"])
    fig = figure(figsize=(1.6 + 1.1 * len(sites) * len(metrics), 1.2 + 0.6 * len(owners)))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        grid = [[_cell(m["results"].get(o, {}).get(s), metric) for s in sites] for o in owners]
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.8)
        for r, row in enumerate(grid):
            for c, v in enumerate(row):  # dark text on the light end of the colour map, white on the dark end
                light = not math.isnan(v) and im.norm(v) > 0.6
                text = "x" if math.isnan(v) else f"{v:.3g}"
                ax.text(c, r, text, ha="center", va="center", color="k" if light else "w", fontsize=8)
        ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
        ax.set_yticks(range(len(owners)), owners if i == 0 else [""] * len(owners))
        ax.set_title(metric)
        ax.set_xlabel("evaluating site")
    fig.suptitle(f"cross-site evaluation, round {m.get('round')} (x: no result)", fontsize=9)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / HEATMAP, dpi=110)
    return out / HEATMAP


def evaluation_table(evals: list[EvaluationRecord], *, final_round: int | None = None) -> Table:
    """The global model's evaluations: per evaluated model, the mean and each site's metrics. An evaluation of
    round k scores the global model after round k-1 (k = 0: the initial model); `final_round`: the k of the final
    model's, when the run finished."""
    from rich.table import Table

    t = Table(title="evaluations of the global model (every site evaluates it: mean, then per site)")
    for col in ("model", "mean", "sites"):
        t.add_column(col)
    for e in evals:
        mean = ", ".join(f"{k}={v:.4g}" for k, v in e.metrics.items())
        per = "; ".join(
            f"{s}: " + (", ".join(f"{k}={v:.4g}" for k, v in c["metrics"].items()) if "metrics" in c else c["error"])
            for s, c in e.sites.items()
        )
        t.add_row(scored_model(e.round, final=e.round == final_round), mean, per)
    return t
