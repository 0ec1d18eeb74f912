"""A swarm job's state records and its aggregator-site policies (aggregator/swarm.py uses them; pure: no lock, no
clock, no files)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from fl_plugins.wire import limits


@dataclass(frozen=True)
class Model:
    """What round `round` trains on: `transfer` "" is the plain initial model (Download); else a sealed transfer."""

    round: int
    transfer: str = ""
    sender: str = ""
    recipients: frozenset[str] | None = None  # None: every site (the plain model)


@dataclass
class Pick:
    """The site that folds round `round`, and why it was picked (the `swarm` record's `reason`)."""

    round: int
    site: str
    reason: str
    attempt: int = 0


@dataclass
class Aggregation:
    """The close's AGGREGATE task: the aggregator folds `inputs` and sends the next model as `transfer`."""

    round: int
    site: str
    inputs: tuple[tuple[str, str], ...]
    transfer: str
    recipients: frozenset[str]


def choose(
    policy: str, seed: int, metric: str, r: int, eligible: list[str], history: list[dict[str, Any]]
) -> tuple[str, str] | None:
    """(site, reason) among `eligible` (sorted) for round `r`, by `policy`: "round_robin" (the r-th in name order),
    "random" (seeded by `seed`, `r` and how many are eligible), or "best_metric" (the site whose update in `history`,
    the last closed round's update records, reported the best `metric`; round robin when none did). None: nobody is
    eligible."""
    if not eligible:
        return None
    if policy == "random":
        return random.Random(f"{seed}:{r}:{len(eligible)}").choice(eligible), f"random (seed {seed})"
    if policy == "best_metric" and (best := best_by(metric, eligible, history)) is not None:
        return best
    return eligible[r % len(eligible)], f"round robin: {len(eligible)} sites, round {r}"


def best_by(metric: str, eligible: list[str], history: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The eligible site whose update record reported the best `metric` ("-NAME": the lowest), with the reason;
    None when none of them reported it."""
    key, sign = (metric[1:], -1.0) if metric.startswith("-") else (metric, 1.0)
    last: dict[str, float] = {}
    for rec in history:
        v = limits.finite_float((rec.get("metrics") or {}).get(key))
        if rec.get("site") in eligible and v is not None:
            last[rec["site"]] = v
    if not last:
        return None
    site = max(sorted(last), key=lambda n: sign * last[n])
    return site, f"best {metric}: {last[site]:g}"
