"""Swarm learning at the aggregator: it runs the job's lifecycle, the sites fold, and it never holds a weight it can
read (docs/swarm.md has the whole design; security/seal.py the sealing, relay.py the relay).

`SwarmAggregator` is the coordinator of core.py with the fold moved out to the sites. Its rules, on top of rounds.py's
(which still decide who trains, what counts, when a round closes or starts another attempt, and who sits out):

  * The *model* of round R is what its sites train on: the plain initial model (`--initial-model`, served by
    Download as in FedAvg; it is the job's own, not a site's), or a sealed transfer (its sender and recipients):
    the initial weights a site offered (OFFER_INITIAL, sealed for every site connected then), or the global model
    round R-1's aggregator folded. Only a recipient of the model can train on it; another site waits for the next
    round's model, which is sealed for every site alive at that close.
  * The round's *aggregator* is picked when the round first hands out a task, among the alive sites that can open
    the model (`swarm_aggregator`: `round_robin` in the sites' name order, `random` seeded by (seed, round), or
    `best_metric`: the site whose last update reported the best `swarm_metric`), and recorded (`SwarmRecord`).
    A new attempt keeps it: the updates counted so far are sealed for it.
  * A site given TRAIN gets a fresh update transfer id, expected at the relay from it, sealed for the aggregator
    alone (the aggregator's own update too: one path for every update). The relay's commit of that transfer counts
    the update (rounds.py `count`); a late one is refused with the RoundError a late upload gets.
  * When rounds.py closes the round, the aggregator's AGGREGATE task names the counted transfers in the sites'
    name order (the fold order is fixed: the same updates give the same bits) and a model transfer id sealed for
    every alive site; the relay's commit of that transfer is the round's end: round R+1 opens with it. The updates'
    transfers and the model before are deleted then. A partial update can never be folded: the aggregator site
    folds only committed transfers, whole, after the close.
  * Failover: the aggregator silent for `site_timeout` (collecting or folding) is replaced by a new pick among the
    others, and every counted update is owed again (rounds.py `refold`, with the dead aggregator as the culprit):
    its site gets RESEND with a new transfer sealed for the new aggregator, and sends the update it kept, as a
    refold's resend does; one it no longer holds is lost. Nothing the old aggregator folded survives.

What it does not do yet (docs/swarm.md, "Next"): direct site-to-site transfers, a restart of the aggregator in the
middle of a swarm job, evaluations between rounds, strategies other than FedAvg.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fl_plugins.aggregator import results
from fl_plugins.aggregator.core import Aggregator
from fl_plugins.aggregator.relay import RelayTransfer
from fl_plugins.aggregator.rounds import Counted, SiteState
from fl_plugins.aggregator.workflow import Sealed, Task, TaskKind
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import RoundError
from fl_plugins.records import SwarmRecord, UpdateRecord
from fl_plugins.wire import limits
from fl_plugins.wire.layout import Manifest

log = logging.getLogger(__name__)

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


class SwarmAggregator(Aggregator):
    def __init__(self, config: AggregatorConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        # a swarm's final model is sealed: each site scores the global models it receives (docs/swarm.md)
        self.certs: dict[str, str] = {}  # site -> its certificate (PEM), from its TLS handshake
        self.model: Model | None = None
        self.pick: Pick | None = None
        self.issued: dict[str, str] = {}  # site -> its update's transfer for the current pick
        self.aggregation: Aggregation | None = None
        self.relayed = 0  # sealed bytes of this round's transfers
        self.history: list[dict[str, Any]] = []  # the last closed round's update records (best_metric reads them)
        super().__init__(dataclasses.replace(config, evaluate_final=False), clock=clock)
        self.job.training = _Workflow(self)
        if self.global_manifest is not None:
            self.model = Model(self.rounds.round)

    # -- what changes against core.py ---------------------------------------------------------------------
    def hello(self, site: str, can_offer: bool, cert: bytes | None = None) -> dict[str, Any]:
        if cert:
            with self.lock:
                self.certs[site] = cert.decode()
        return {**super().hello(site, can_offer), "workflow": "swarm"}

    def global_source(self, round_: int, model: str = "", site: str | None = None) -> Any:
        with self.lock:
            if self.model is None or self.model.transfer:
                raise RoundError(
                    f"round {round_}'s global model is sealed for the sites: fetch it from the relay (its TRAIN task's "
                    "model_transfer), not with Download"
                )
        return super().global_source(round_, model, site)

    def _decide(self) -> Any:
        """Lock held. The aggregator site's health first (failover), then core.py's rules."""
        if not self.done and self.pick is not None:
            s = self.rounds.sites.get(self.pick.site)
            if s is not None and not self.rounds.alive(s, self.clock()) and self.pick.round == self.rounds.round:
                self._fail_over(self.pick.site, f"it was silent for {self.config.site_timeout:g} s")
        if self.aggregation is not None:
            self.presence.step(self.clock())
            return None  # the close is the aggregator site's: its model transfer's commit opens the next round
        return super()._decide()

    def _finalize(self) -> None:
        """The round closes (rounds.py): ask its aggregator to fold the counted updates, in the sites' name order."""
        with self.lock:
            if not self.rounds.settle():
                self.lock.notify_all()
                return
            assert self.pick is not None
            counted = sorted(self.rounds.counted.values(), key=lambda c: c.site)
            now = self.clock()
            alive = {n for n, s in self.rounds.sites.items() if self.rounds.alive(s, now) and n in self.certs}
            recipients = frozenset(alive | {self.pick.site})
            r = self.rounds.round
            transfer = self._issue(self.pick.site, recipients, MODEL, r + 1, self._model_committed)
            inputs = tuple((c.site, c.nonce) for c in counted)
            self.aggregation = Aggregation(r, self.pick.site, inputs, transfer, recipients)
            log.info("round %d closed: site %r folds %d updates (%s)", r, self.pick.site, len(inputs), self.pick.reason)
            self.lock.notify_all()

    def result(self, site: str, round_: int, task_id: str, envelope_json: str) -> dict[str, Any]:
        """An AGGREGATE task's failure (its site could not fold the round): another site folds it."""
        with self.lock:
            a = self.aggregation
            if a is None or a.transfer != task_id or a.site != site:
                return super().result(site, round_, task_id, envelope_json)
            why = str((limits.parse_envelope(f"site {site!r}", envelope_json).get("meta") or {}).get("error", ""))
            self._fail_over(site, f"it could not fold the round: {why}")
            return {"round": round_, "message": "another site folds the round"}

    # -- the aggregator site's lane ------------------------------------------------------------------------
    def aggregate_task(self, site: str, wait: float, gone: Callable[[], bool] | None = None) -> Task:
        """A swarm site's second long poll: AGGREGATE when it is to fold the round, END when the job is over."""
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        with self.lock:
            while True:
                self._touch(site)
                if self.error is not None:
                    raise RoundError(f"the aggregator stopped: {self.error}")
                if self.done:
                    return Task(TaskKind.END, self.rounds.round, message="the job is finished")
                a = self.aggregation
                if a is not None and a.site == site:
                    peers = {n: self.certs[n] for n in sorted(a.recipients)}
                    sealed = Sealed(a.transfer, peers, site, *self._model_fields(), inputs=a.inputs)
                    manifest = self.global_manifest if self.model is not None and not self.model.transfer else None
                    return Task(TaskKind.AGGREGATE, a.round, self.rounds.attempt, manifest=manifest, sealed=sealed)
                left = deadline - time.monotonic()
                if left <= 0 or (gone is not None and gone()):
                    return Task(TaskKind.WAIT, self.rounds.round)
                self.lock.wait(min(left, 1.0))

    # -- transfers -----------------------------------------------------------------------------------------
    def _issue(self, sender: str, recipients: frozenset[str], purpose: str, round_: int, on_commit: Any) -> str:
        """Lock held. A fresh transfer id, expected at the relay: bound to the job, the round, the attempt, the
        sender, the purpose and a nonce, so no sealed stream can be replayed into another."""
        nonce = secrets.token_hex(8)
        text = f"{self.job_id}|{purpose}|{round_}|{self.rounds.attempt}|{sender}|{nonce}"
        transfer_id = hashlib.sha256(text.encode()).hexdigest()[:32]
        self.relay.expect(transfer_id, sender, recipients, purpose, round_, self.rounds.attempt, on_commit)
        return transfer_id

    def _model_fields(self) -> tuple[str, str]:
        m = self.model
        return (m.transfer, m.sender) if m is not None else ("", "")

    def _update_committed(self, t: RelayTransfer, envelope: dict[str, Any]) -> str:
        """The relay holds a site's whole sealed update: it counts (rounds.py), as an upload's commit does."""
        with self.lock:
            s = self.rounds.sites.get(t.sender)
            current = self.pick is not None and self.issued.get(t.sender) == t.transfer_id
            if s is None or not current or t.round != self.rounds.round:
                raise RoundError(
                    f"site {t.sender!r}: the sealed update {t.transfer_id} is late: the round moved on or another "
                    "site folds it now; the site gets its next task"
                )
            owed = self.rounds.owed.get(s.name)
            if owed is not None:  # a failover's resend: the same update, sealed for the new aggregator
                owed.nonce = t.transfer_id
                self.rounds.counted_again(owed)
                self.lock.notify_all()
                return "update accepted (resent for the new aggregator)"
            self.rounds.check_current(s.name, t.round, t.attempt)
            self.rounds.may_update(s, t.round, t.attempt, self.clock())
            self.rounds.began_update(s, t.round, t.attempt)
            self._count(t, envelope)
            return "update accepted"

    def _count(self, t: RelayTransfer, envelope: dict[str, Any]) -> None:
        """Lock held. Count a sealed update: what the aggregator knows of it is its size and its plaintext metrics."""
        metrics = envelope.get("metrics") or {}
        weight = limits.finite_float((envelope.get("meta") or {}).get("NUM_STEPS_CURRENT_ROUND", 1)) or 1.0
        params_type = str(envelope.get("params_type", "FULL"))
        rec = UpdateRecord(
            round=t.round,
            attempt=t.attempt,
            site=t.sender,
            weight=weight,
            params_type=params_type,
            bytes=t.bytes_in,
            bytes_received=t.bytes_in,
            metrics=metrics,
        )
        header = hashlib.sha256(t.header or b"").digest()
        self.rounds.count(
            Counted(t.sender, t.attempt, t.transfer_id, header, weight, params_type, [], [], rec.to_json())
        )
        self.relayed += t.bytes_in
        self.record(rec)
        log.info("round %d: sealed update from %r counted (%d)", t.round, t.sender, len(self.rounds.counted))

    def _model_committed(self, t: RelayTransfer, envelope: dict[str, Any]) -> str:
        """The relay holds a whole sealed global model: the offered round 0, or the end of a round."""
        with self.lock:
            a = self.aggregation
            if t.round == 0 and self.model is None:
                self._open(Model(0, t.transfer_id, t.sender, t.recipients))
                return "model accepted: round 0 opens"
            if a is None or a.transfer != t.transfer_id:
                raise RoundError(
                    f"site {t.sender!r}: model transfer {t.transfer_id} is not the one this round waits for"
                )
            records = [c.record for c in sorted(self.rounds.counted.values(), key=lambda c: c.site)]
            self.relayed += t.bytes_in
            self._record_round(a, records)
            self.history = records
            stale = [*(c.nonce for c in self.rounds.counted.values()), self._model_fields()[0]]
            self.relay.drop([x for x in stale if x])
            self._open(Model(a.round + 1, t.transfer_id, t.sender, a.recipients))
            return "model accepted"

    def _record_round(self, a: Aggregation, records: list[dict]) -> None:
        """Lock held."""
        assert self.pick is not None
        p = self.pick
        policy = self.config.swarm_aggregator
        sites = tuple(site for site, _ in a.inputs)
        rec = SwarmRecord(round=a.round, attempt=p.attempt, site=p.site, policy=policy, reason=p.reason, updates=sites)
        self.record(dataclasses.replace(rec, bytes_relayed=self.relayed, bytes_direct=0))
        weight = sum(float(rec.get("weight") or 0) for rec in records)
        seconds = self.clock() - (self.rounds.began or self.clock())
        self.record(results.round_record(self.rounds, records, weight, limits.mean_metrics(records), 0.0, seconds))
        log.info("round %d done: site %r folded %s", a.round, a.site, ", ".join(sites))

    def _open(self, model: Model) -> None:
        """Lock held. Round `model.round` trains on `model` (sealed: the aggregator serves nothing itself)."""
        self.model, self.aggregation, self.pick, self.issued, self.relayed = model, None, None, {}, 0
        if model.transfer and self.global_manifest is None:
            self.global_manifest = Manifest([], self.config.chunk_bytes, {})  # (core.py's "a model is served")
        r = model.round
        self.rounds.open(r)
        self.uploads.new_epoch()
        last = r >= self.config.total_rounds
        self.job.opened(r, last, self.clock())
        if self.job.complete:
            self._complete()
        elif not last:
            log.info("round %d open (%d sites connected, %d needed)", r, self._alive(), self.config.min_sites)
        self.lock.notify_all()

    # -- the aggregator site -------------------------------------------------------------------------------
    def pick_for(self, now: float) -> Pick | None:
        """Lock held. This round's aggregator site (picked at its first task), or None: no site can open the model."""
        r = self.rounds.round
        if self.pick is not None and self.pick.round == r:
            return self.pick
        self.pick = self._choose(r, now, exclude=set())
        return self.pick

    def _choose(self, r: int, now: float, exclude: set[str]) -> Pick | None:
        m = self.model
        eligible = sorted(
            n
            for n, s in self.rounds.sites.items()
            if self.rounds.alive(s, now) and n in self.certs and n not in exclude
            if m is not None and (m.recipients is None or n in m.recipients)
        )
        if not eligible:
            return None
        policy = self.config.swarm_aggregator
        if policy == "random":
            site = random.Random(f"{self.config.seed}:{r}:{len(exclude)}").choice(eligible)
            reason = f"random (seed {self.config.seed})"
        elif policy == "best_metric" and (best := self._best(eligible)) is not None:
            site, reason = best
        else:
            site, reason = eligible[r % len(eligible)], f"round robin: {len(eligible)} sites, round {r}"
        log.info("round %d: site %r aggregates (%s)", r, site, reason)
        return Pick(r, site, reason, self.rounds.attempt)

    def _best(self, eligible: list[str]) -> tuple[str, str] | None:
        """The eligible site whose last counted update reported the best `swarm_metric` (None: none reported it)."""
        name = self.config.swarm_metric
        key, sign = (name[1:], -1.0) if name.startswith("-") else (name, 1.0)
        last: dict[str, float] = {}
        for rec in self.history:
            v = limits.finite_float((rec.get("metrics") or {}).get(key))
            if rec.get("site") in eligible and v is not None:
                last[rec["site"]] = v
        if not last:
            return None
        site = max(sorted(last), key=lambda n: sign * last[n])
        return site, f"best {name}: {last[site]:g}"

    def _fail_over(self, dead: str, why: str) -> None:
        """Lock held. The aggregator site went silent or failed: pick another; counted updates are owed to it."""
        now, r = self.clock(), self.rounds.round
        log.warning("round %d: aggregator site %r is replaced: %s", r, dead, why)
        stale = [c.nonce for c in self.rounds.counted.values()] + list(self.issued.values())
        if self.aggregation is not None:
            stale.append(self.aggregation.transfer)
        self.relay.drop(stale)
        self.aggregation, self.issued = None, {}
        self.pick = self._choose(r, now, exclude={dead})
        if self.rounds.counted:
            self.rounds.refold([dead], now)
        elif self.rounds.closing is not None:
            self.rounds.closing = None
        self.lock.notify_all()


class _Workflow:
    """The training tasks of a swarm job (job.py asks it as it asks FedAvgWorkflow)."""

    def __init__(self, agg: SwarmAggregator) -> None:
        self.agg = agg

    def next_task(self, s: SiteState, now: float, holds: str, global_model: Manifest | None) -> Task | None:
        agg, rounds = self.agg, self.agg.rounds
        if s.name not in agg.certs:
            return None  # (a site without a certificate cannot take part: the server runs mTLS, so never here)
        if agg.model is None:
            return self._offer(s, now)
        if agg.model.recipients is not None and s.name not in agg.model.recipients:
            return None  # it cannot open this round's model: it joins at the next round's, sealed for it too
        owed = rounds.owed.get(s.name)
        if owed is not None:
            return self._resend(s, owed, holds)
        pick = agg.pick_for(now)
        if pick is None or not rounds.offer_task(s, now):
            return None
        sealed = self._sealed_update(s.name, pick.site)
        return Task(TaskKind.TRAIN, rounds.round, rounds.attempt, manifest=self._plain(), sealed=sealed)

    def _plain(self) -> Manifest | None:
        m = self.agg.model
        return self.agg.global_manifest if m is not None and not m.transfer else None

    def _sealed_update(self, site: str, aggregator: str) -> Sealed:
        agg = self.agg
        transfer = agg.issued.get(site)
        if transfer is None or agg.relay.transfer(transfer) is None:
            transfer = agg._issue(site, frozenset([aggregator]), UPDATE, agg.rounds.round, agg._update_committed)
            agg.issued[site] = transfer
        return Sealed(transfer, {aggregator: agg.certs[aggregator]}, aggregator, *agg._model_fields())

    def _resend(self, s: SiteState, owed: Counted, holds: str) -> Task | None:
        agg = self.agg
        if holds != owed.nonce:
            agg.rounds.lose(owed, "its process no longer holds the update (it restarted or sent another one)")
            return None
        if agg.pick is None:
            return None
        sealed = self._sealed_update(s.name, agg.pick.site)
        message = "send the same update again, sealed for the new aggregator site"
        return Task(TaskKind.RESEND, agg.rounds.round, owed.attempt, nonce=holds, message=message, sealed=sealed)

    def _offer(self, s: SiteState, now: float) -> Task | None:
        agg = self.agg
        if agg.global_manifest is not None or not agg.offer.asks(s, agg.rounds, now):
            return None
        alive = {n for n, x in agg.rounds.sites.items() if agg.rounds.alive(x, now) and n in agg.certs}
        recipients = frozenset(alive | {s.name})
        transfer = agg._issue(s.name, recipients, MODEL, 0, agg._model_committed)
        peers = {n: agg.certs[n] for n in sorted(recipients)}
        return Task(TaskKind.OFFER_INITIAL, 0, sealed=Sealed(transfer, peers))
