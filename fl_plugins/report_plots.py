"""The report's plots (report.py `write_plots` saves them). Each is a function of the run's records that returns a
matplotlib Figure, or a string saying why there is nothing to draw. Every axis is labelled with what it counts and
its unit, and every legend sits outside the axes, so that it hides no data.

The x axis of validation.png counts the rounds of training behind the global model a metric scores: the metrics
sent with round r's updates score the model round r started from, drawn at r (0: the initial model); the
evaluation of the final model at every site is the last point, at the number of rounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fl_plugins._text import human_bytes, scored_model
from fl_plugins.errors import MissingDependencyError
from fl_plugins.records import Baselines, EvaluationRecord, RoundRecord, UpdateRecord
from fl_plugins.wire.limits import finite_float

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fl_plugins.report import RunData

_EVAL_WORDS = ("val", "eval", "test")  # a logged loss with one of these in its name is not a training loss
_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}  # right of the axes
_ROUNDS_AXIS = "rounds of training behind the global model (0: the initial model)"


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


def colors(sites: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sites)}


def _or_zero(v: float | None) -> float:
    return 0.0 if v is None else float(v)


# -- validation.png --------------------------------------------------------------------------------------------


def validation(run: RunData, colors: dict[str, Any]) -> Figure | str:
    """The global model's validation metrics (names holding "loss" or "acc") by the rounds behind it: the mean
    over the sites (black), each site's own (thin), the final model's evaluation, the baselines."""
    keys: list[str] = []
    recs: list[RoundRecord | UpdateRecord | EvaluationRecord] = [*(run.rounds[r] for r in sorted(run.rounds))]
    for rec in [*recs, *run.updates, *run.evaluations]:
        keys += [k for k in rec.metrics if k not in keys]
    base = run.baselines or Baselines()
    pooled = base.global_metrics or {}
    panels = []
    for title, word in (("validation loss", "loss"), ("validation accuracy", "acc")):
        ks = [k for k in keys if word in k.lower()]
        if ks or any(word in k.lower() for k in pooled):
            panels.append((title, ks, word))
    if not panels:
        return "no metric with 'loss' or 'acc' in its name in the rounds, and no baselines.json"
    fig = figure(figsize=(6.2 * len(panels), 5.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ks, word) in zip(axes, panels, strict=True):
        for k in ks:
            _global_line(ax, run, k, colors if len(ks) == 1 else {})
        _baselines(ax, run, base, colors, next((k for k in pooled if word in k.lower()), None))
        ax.set_title(title)
        ax.set_xlabel(_ROUNDS_AXIS)
        ax.set_ylabel(", ".join(ks) or word)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2)  # below: hides no line
    fig.suptitle(
        f"{run.name}: the global model after each round, as the sites scored it"
        + ("" if run.finished else " (unfinished run)")
    )
    return fig


def _global_line(ax: Axes, run: RunData, key: str, site_colors: dict[str, Any]) -> None:
    """`key` of the global model by the rounds behind it: the rounds' means, then the latest evaluation (the final
    model's, in a finished run) as the last point; the other evaluations as open squares; each site thin."""
    rs = [r for r in sorted(run.rounds) if finite_float(run.rounds[r].metrics.get(key)) is not None]
    pts = [(float(r), float(run.rounds[r].metrics[key])) for r in rs]
    last = run.last_evaluation
    end = finite_float(last.metrics.get(key)) if last is not None else None
    if last is not None and end is not None:
        pts.append((float(last.round), end))
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", lw=2.2, color="black", label=f"{key}: mean over the sites")
    if last is not None and end is not None:
        model = scored_model(last.round, final=run.finished)
        ax.plot([last.round], [end], marker="D", ms=9, ls="", color="black", label=f"{key}: {model}, every site")
        ax.annotate(
            "final" if run.finished else "latest",
            (last.round, end),
            xytext=(5, 6),
            textcoords="offset points",
            fontsize=8,
        )
    others = [e for e in run.evaluations if e is not last and finite_float(e.metrics.get(key)) is not None]
    if others:
        ax.plot(
            [e.round for e in others],
            [e.metrics[key] for e in others],
            marker="s",
            mfc="none",
            ls="",
            color="black",
            label=f"{key}: evaluated at every site",
        )
    for site, c in site_colors.items():
        per = _site_points(run, site, key, last)
        if per:
            ax.plot(*zip(*per, strict=True), lw=1, ls=":", marker=".", color=c, label=f"{key} at {site}")


def _site_points(run: RunData, site: str, key: str, last: EvaluationRecord | None) -> list[tuple[float, float]]:
    latest: dict[int, UpdateRecord] = {}  # the site's latest update per round (a round run again counts once)
    for u in run.updates:
        if u.site == site:
            latest[u.round] = u
    pts = [(float(r), finite_float(u.metrics.get(key))) for r, u in sorted(latest.items())]
    if last is not None:
        pts.append((float(last.round), finite_float((last.sites.get(site) or {}).get("metrics", {}).get(key))))
    return [(x, v) for x, v in pts if v is not None]


def _baselines(ax: Axes, run: RunData, base: Baselines, colors: dict[str, Any], key: str | None) -> None:
    """baselines.json: each site's local-only model (dashed) and the final global model, on the pooled set."""
    if key is None:
        return
    for site, m in base.local_only.items():
        v = finite_float(m.get(key))
        if v is not None:
            ax.axhline(v, ls="--", lw=1.3, color=colors.get(site, "grey"), label=f"{site} alone (pooled val.)")
    v = finite_float((base.global_metrics or {}).get(key))
    if v is not None:
        x = base.round if base.round is not None else max(run.rounds, default=-1) + 1
        ax.plot([x], [v], marker="*", ms=14, ls="", color="black", label="final global model (pooled val.)")


# -- train_loss.png --------------------------------------------------------------------------------------------


def is_train_loss(key: str) -> bool:
    k = key.lower()
    return "loss" in k and not any(w in k for w in _EVAL_WORDS)


def train_loss(run: RunData, colors: dict[str, Any]) -> Figure | str:
    """Each site's training loss per step across rounds (logs.jsonl), with that site's round boundaries: sites
    take different numbers of steps per round, so each site's are drawn in its colour."""
    series: dict[str, dict[str, list[tuple[float, float, int]]]] = {}  # key -> site -> [(step, value, round)]
    count: dict[tuple[str, str], int] = {}
    for rec in run.logs:
        key, site, v = rec.key, rec.site, finite_float(rec.value)
        if v is None or not is_train_loss(key):
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
    fig = figure(figsize=(10.5, 3.9 * len(keys)))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        for site, pts in sorted(series[key].items()):
            _site_curve(ax, sorted(pts), colors.get(site), site)
        ax.plot(
            [], [], color="grey", lw=0.9, ls=":", label="round boundary,\nin the site's colour\n(r3: round 3 begins)"
        )
        ax.set_ylabel(f"{key} (training loss)")
        ax.set_xlabel("step (each site's own training steps, counted across rounds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, **_OUTSIDE)
    fig.suptitle(
        f"{run.name}: training loss per step; each site's round boundaries dotted in its colour"
        + ("" if run.finished else " (unfinished run)")
    )
    return fig


def _site_curve(ax: Axes, pts: list[tuple[float, float, int]], color: Any, site: str) -> None:
    """One site's (step, loss, round) points: the curve, a dotted line between its rounds, and "r3" on the curve
    where round 3 begins (at most about 15 labels a site)."""
    ax.plot(
        [p[0] for p in pts],
        [p[1] for p in pts],
        lw=1.2,
        color=color,
        label=site,
        marker="." if len(pts) <= 40 else None,
    )
    starts = [(b, a) for a, b in zip(pts, pts[1:], strict=False) if b[2] != a[2]]  # (first of round, last before)
    every = max(1, -(-len(starts) // 15))
    for i, ((s1, v1, r1), (s0, _, _)) in enumerate(starts):
        ax.axvline((s0 + s1) / 2, color=color, lw=0.9, ls=":", alpha=0.8)
        if i % every == 0:
            ax.annotate(f"r{r1}", (s1, v1), xytext=(2, 5), textcoords="offset points", fontsize=7, color=color)


# -- bytes.png -------------------------------------------------------------------------------------------------


def uploaded(run: RunData) -> dict[int, dict[str, float]]:
    """round -> site -> bytes of its updates accepted in that round (every try): what the sites uploaded."""
    per: dict[int, dict[str, float]] = {}
    for u in run.updates:
        per.setdefault(u.round, {})
        per[u.round][u.site] = per[u.round].get(u.site, 0.0) + _or_zero(u.bytes)
    return per


def _unit(peak: float) -> tuple[str, float]:
    return next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if peak >= s), ("B", 1.0))


def bytes_plot(run: RunData, colors: dict[str, Any]) -> Figure | str:
    """The updates uploaded per round, per site; in a swarm job, beside it, the sealed bytes each round moved
    through the relay and directly, each bar labelled with the site that aggregated the round."""
    per = uploaded(run)
    if not per:
        return "no update has arrived yet"
    rounds = sorted(per)
    swarm = bool(run.swarm)
    fig = figure(figsize=(max(6.5, 0.45 * len(rounds) + 4) * (1.9 if swarm else 1.0), 4.0))
    axes = fig.subplots(1, 2 if swarm else 1, squeeze=False)[0]
    ax = axes[0]
    peak = max(sum(v.values()) for v in per.values())
    unit, scale = _unit(peak)
    bottom = [0.0] * len(rounds)
    for site, c in colors.items():
        vals = [per[r].get(site, 0.0) / scale for r in rounds]
        if any(vals):
            ax.bar(rounds, vals, bottom=bottom, color=c, label=site)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel(f"updates uploaded in the round ({unit})")
    for a in axes:
        a.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, **_OUTSIDE)
    total = sum(sum(v.values()) for v in per.values())
    if swarm:
        _swarm_bytes(axes[1], run)
        ax.set_title("sealed updates put at the relay, per site", fontsize=9)
    fig.suptitle(
        f"{run.name}: bytes uploaded per round ({human_bytes(total)} in all)\n"
        "(the updates; each site also downloads the global model every round)",
        fontsize=10,
    )
    return fig


def _swarm_bytes(ax: Axes, run: RunData) -> None:
    """A swarm job's sealed bytes per round (updates and the new global model): through the aggregator's relay and
    directly between sites, stacked; the site that aggregated the round above its bar."""
    from matplotlib.patches import Patch

    rounds = sorted(run.swarm)
    relayed = [_or_zero(run.swarm[r].bytes_relayed) for r in rounds]
    direct = [_or_zero(run.swarm[r].bytes_direct) for r in rounds]
    both = [a + b for a, b in zip(relayed, direct, strict=True)]
    unit, scale = _unit(max(both, default=0.0))
    ax.bar(rounds, [v / scale for v in relayed], color="tab:gray")
    if any(direct):  # (zero-height bars would pin the axis' top to the relayed bars)
        ax.bar(rounds, [v / scale for v in direct], bottom=[v / scale for v in relayed], color="tab:cyan")
    for r, v in zip(rounds, both, strict=True):
        ax.annotate(
            run.swarm[r].site, (r, v / scale), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7
        )
    ax.set_xlabel("round (above each bar: the site that aggregated it)")
    ax.set_ylabel(f"sealed bytes moved in the round ({unit})")
    ax.set_title("swarm: sealed updates and global model, relayed vs direct", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(0, max(1.0, *both) / scale * 1.12)
    labels = ["through the relay", "direct" if any(direct) else "direct (none)"]
    ax.legend([Patch(color="tab:gray"), Patch(color="tab:cyan")], labels, fontsize=8, **_OUTSIDE)
