"""A swarm job's state (aggregator/swarm.py): its records, the aggregator-site policies (pure), and RUN_DIR/swarm.json,
what a restarted aggregator resumes from: the last global model's sealed transfer (its files stay in the relay's
spool), its recipients, and the sites' certificates (public; the sites do not say Hello again after a restart)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_plugins.aggregator.files import write_atomic
from fl_plugins.wire import limits

log = logging.getLogger(__name__)

STATE = "swarm.json"
UPDATE, MODEL = "update", "model"  # a transfer's purpose


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
    started: float = 0.0  # (the clock's) a fold that takes longer than the round deadline is handed to another site


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


def folded(a: Aggregation, envelope: dict[str, Any]) -> tuple[str, ...]:
    """The inputs the aggregator site says the model holds (its commit's `folded`; it leaves out an update that
    fails its checks), in the fold's order; all of them when it does not say."""
    said = envelope.get("folded")
    inputs = tuple(site for site, _ in a.inputs)
    return tuple(s for s in inputs if s in said) if isinstance(said, list) else inputs


def save(run_dir: Path, job_id: str, model: Model, certs: dict[str, str]) -> None:
    """Record `model` (a sealed transfer whose spool files the relay keeps) as the one a restart resumes from."""
    state = {"job_id": job_id, "round": model.round, "transfer": model.transfer, "sender": model.sender}
    state.update(recipients=sorted(model.recipients or ()), certs=certs)
    write_atomic(run_dir / STATE, json.dumps(state, indent=1) + "\n")


def load(run_dir: Path, job_id: str) -> tuple[Model, dict[str, str]] | None:
    """The model and certificates `save` recorded for job `job_id`; None for a new job (or a record that is not
    this job's, or is damaged: said in the log, and the job starts from its initial model)."""
    path = run_dir / STATE
    try:
        state = json.loads(path.read_text())
        if state["job_id"] != job_id:
            raise ValueError(f"it is job {state['job_id']!r}'s")
        model = Model(int(state["round"]), str(state["transfer"]), str(state["sender"]), frozenset(state["recipients"]))
        certs = {str(k): str(v) for k, v in dict(state["certs"]).items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s cannot be resumed from (%s); the swarm starts from its initial model", path, e)
        return None
    return model, certs
