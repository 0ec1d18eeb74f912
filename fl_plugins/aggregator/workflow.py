"""Which task a site gets next: typed tasks, and the workflow that hands them out.

A `Workflow` answers one question for the coordinator (core.py), under its lock: what should this site do now?
`FedAvgWorkflow` is today's only one: a site owing a refold's resend gets RESEND (or loses the update if its
process no longer holds it), a site asking before any global model exists may be asked to OFFER_INITIAL its
weights, and a site that may train gets TRAIN once the round has started; anyone else waits. The job-level
answers (END once the job is done, an error once it failed) are the coordinator's. service.py turns a `Task`
into its protobuf message with one table (`TaskKind` -> `Task.Kind`). Evaluation and cross-site workflows
(issue 12) add their kinds here and in fl.proto, and a Workflow of their own, without touching uploads or
storage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from fl_plugins.aggregator.offer import Offer
from fl_plugins.aggregator.rounds import RoundState, SiteState
from fl_plugins.aggregator.uploads import Uploads
from fl_plugins.wire.layout import Manifest

TASK_NAME = "train"


class TaskKind(enum.Enum):
    WAIT = "wait"  # nothing yet: ask again
    TRAIN = "train"  # train on the global model and send an update
    END = "end"  # the job is over
    OFFER_INITIAL = "offer_initial"  # send your weights: they become round 0's global model
    RESEND = "resend"  # send the update committed with `nonce` again, unchanged (a refold)
    EVALUATE = "evaluate"  # evaluate the model (`model`: whose) and send its metrics, no weights
    SUBMIT_MODEL = "submit_model"  # send your local model's FULL params (cross-site evaluation)
    AGGREGATE = "aggregate"  # swarm: fold the round's sealed updates, seal the new global model (swarm.py)


# FLARE's task names, which flare.get_task_name() returns and is_train / is_evaluate / is_submit_model test
TASK_NAMES = {TaskKind.EVALUATE: "validate", TaskKind.SUBMIT_MODEL: "submit_model"}


@dataclass(frozen=True)
class Task:
    kind: TaskKind
    round: int
    attempt: int = 0
    manifest: Manifest | None = None  # the global model to train on (TRAIN)
    nonce: str = ""  # the committed update to send again (RESEND)
    message: str = ""
    name: str = TASK_NAME  # FLARE's task name
    task_id: str = ""  # EVALUATE, SUBMIT_MODEL: what the answer names
    model: str = ""  # EVALUATE: whose model (evaluation.GLOBAL: the round's global model)
    sealed: Sealed | None = None  # swarm: where the weights travel, sealed (swarm.py)


@dataclass(frozen=True)
class Sealed:
    """A swarm task's sealed transfers (fl.proto's Task fields of the same names; docs/swarm.md)."""

    transfer_id: str  # the transfer to send this task's answer as
    peers: dict[str, str]  # site -> certificate PEM: whom to seal the answer for
    aggregator: str = ""  # TRAIN, RESEND: the site that folds the round
    model_transfer: str = ""  # TRAIN: the sealed transfer of the round's global model ("": Download it)
    model_sender: str = ""
    inputs: tuple[tuple[str, str], ...] = ()  # AGGREGATE: (site, transfer) to fold, in this order
    direct: dict[str, str] = field(default_factory=dict)  # peers that take the answer at their inbound HOST:PORT


class Workflow(Protocol):
    def next_task(self, s: SiteState, now: float, holds: str, global_model: Manifest | None) -> Task | None:
        """The task for site `s` now, or None: it waits (the coordinator asks again when something changes).
        `holds`: the nonce of the committed update the site's process still holds."""
        ...


class FedAvgWorkflow:
    """Rounds of training: every site trains on the global model each round (rounds.py's rules decide who)."""

    def __init__(self, rounds: RoundState, offer: Offer, uploads: Uploads) -> None:
        self.rounds, self.offer, self.uploads = rounds, offer, uploads

    def next_task(self, s: SiteState, now: float, holds: str, global_model: Manifest | None) -> Task | None:
        rounds = self.rounds
        owed = rounds.owed.get(s.name)
        if owed is not None and not self.uploads.resending(owed):
            if holds and holds == owed.nonce:
                message = "send the same update again: the round is refolded without another site's partial update"
                return Task(TaskKind.RESEND, rounds.round, owed.attempt, nonce=owed.nonce, message=message)
            rounds.lose(owed, "its process no longer holds the update (it restarted or sent another one)")
        if global_model is None:
            return Task(TaskKind.OFFER_INITIAL, 0) if self.offer.asks(s, rounds, now) else None
        if rounds.offer_task(s, now):
            return Task(TaskKind.TRAIN, rounds.round, rounds.attempt, manifest=global_model)
        return None
