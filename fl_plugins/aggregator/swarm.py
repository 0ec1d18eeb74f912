"""Swarm learning at the aggregator: it runs the job's lifecycle, the sites fold, and it never holds a weight it can
read (docs/swarm.md has the whole design; security/seal.py the sealing, relay.py the relay).

`SwarmAggregator` is the coordinator of core.py with the fold moved out to the sites. Its rules, on top of rounds.py's
(which still decide who trains, what counts, when a round closes or starts another attempt, and who sits out):

  * The *model* of round R is what its sites train on: the plain initial model (`--initial-model`, served by
    Download as in FedAvg; it is the job's own, not a site's), or a sealed transfer (its sender and recipients):
    the initial weights a site offered (OFFER_INITIAL, asked once `min_sites` sites are connected, sealed for
    every site connected then: an offer sealed for fewer could never start round 0), or the global model
    round R-1's aggregator folded. Only a recipient of the model can train on it; another site sits the round out
    (it is not waited for) until the next round's model, which is sealed for every site alive at that close.
  * The round's *aggregator* is picked once the round starts (every site it needs is connected), among the alive
    sites that can open the model (`swarm_aggregator`: `round_robin` in the sites' name order, `random` seeded by
    (seed, round), or `best_metric`: the site whose last update reported the best `swarm_metric`), and recorded
    (`SwarmRecord`).
    A new attempt keeps it: the updates counted so far are sealed for it.
  * A site given TRAIN gets a fresh update transfer id, expected at the relay from it, sealed for the aggregator
    alone (the aggregator's own update too: one path for every update). The relay's commit of that transfer counts
    the update (rounds.py `count`); a late one is refused with the RoundError a late upload gets.
  * When rounds.py closes the round, the aggregator's AGGREGATE task names the counted transfers in the sites'
    name order (the fold order is fixed: the same updates give the same bits) and a model transfer id sealed for
    every alive site; the relay's commit of that transfer is the round's end: round R+1 opens with it. The updates'
    transfers and the model before are deleted then. A partial update can never be folded: the aggregator site
    folds only committed transfers, whole, after the close; its commit names the ones the model holds (it leaves
    out one that fails its checks: tampered, forged, replayed), and the round's records name those.
  * Failover: the aggregator silent for `site_timeout` (collecting or folding) is replaced by a new pick among the
    others, and every counted update is owed again (rounds.py `refold`, with the dead aggregator as the culprit):
    its site gets RESEND with a new transfer sealed for the new aggregator, and sends the update it kept, as a
    refold's resend does; one it no longer holds is lost. Nothing the old aggregator folded survives. So too when
    the aggregator site says it could not fold, does not send the model within the round deadline, or a site says
    it will not seal its update for it and the aggregator's own check of that certificate agrees (if the
    certificate is sound, the site that said so sits the round out instead). A site that failed is not picked again
    in the round; when every site that could fold it has failed, the job stops with an error naming each failure.
  * A transfer may declare at most twice the round's model (`_bound`). A site with an inbound port takes its updates
    directly (swarm/peer.py): the sender commits here with the byte count, and nothing passes the relay.
  * Restart: RUN_DIR/swarm.json names the last committed global model (written before the one before is dropped);
    a new process adopts its spool files and opens its round.

What it does not do (docs/swarm.md, "What is not done"): evaluations between rounds, strategies other than FedAvg,
sampling, the final model sealed for the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from fl_plugins.aggregator import results, swarm_state
from fl_plugins.aggregator.core import Aggregator
from fl_plugins.aggregator.relay import RelayTransfer
from fl_plugins.aggregator.rounds import Counted
from fl_plugins.aggregator.swarm_state import MODEL, Aggregation, Model, Pick, choose, folded
from fl_plugins.aggregator.swarm_tasks import SwarmTasks
from fl_plugins.aggregator.workflow import Sealed, Task, TaskKind
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import FLError, ProtocolError, RoundError
from fl_plugins.records import SwarmRecord, UpdateRecord
from fl_plugins.wire import limits
from fl_plugins.wire.layout import Manifest

log = logging.getLogger(__name__)


class SwarmAggregator(Aggregator):
    def __init__(self, config: AggregatorConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        # a swarm's final model is sealed: each site scores the global models it receives (docs/swarm.md)
        self.certs: dict[str, str] = {}  # site -> its certificate (PEM), from its TLS handshake
        self.model: Model | None = None
        self.pick: Pick | None = None
        self.issued: dict[str, str] = {}  # site -> its update's transfer for the current pick
        self.failed: dict[str, str] = {}  # site -> why it could not fold this round (it is not picked again)
        self.replaced: set[str] = set()  # update transfers issued for this round's earlier picks
        self.aggregation: Aggregation | None = None
        self.relayed = self.direct = 0  # sealed bytes of this round's transfers, through the relay and direct
        self.inbound: dict[str, str] = {}  # site -> HOST:PORT where it takes sealed updates directly
        self.kept_final: set[str] = set()  # sites that kept the final model (finished() waits for them)
        self.history: list[dict[str, Any]] = []  # the last closed round's update records (best_metric reads them)
        super().__init__(dataclasses.replace(config, evaluate_final=False), clock=clock)
        self.job.training = SwarmTasks(self)
        self.uploads.resending = self._resending  # type: ignore[method-assign]  # (core.py's expire_owed asks it)
        if self.global_manifest is not None:
            self.model = Model(self.rounds.round)
        self._resume_swarm()

    def _resume_swarm(self) -> None:
        """A restart of a swarm job: its last global model is the sealed transfer RUN_DIR/swarm.json names, still
        in the relay's spool; the job goes on from that round (the sites reconnect, and train it again if their
        update was under way)."""
        got = swarm_state.load(self.config.run_dir, self.job_id)
        if got is None:
            return
        model, certs = got
        if not self.relay.adopt(model.transfer, model.sender, model.recipients or (), MODEL, model.round):
            return
        log.info("resuming the swarm at round %d: its global model is transfer %s", model.round, model.transfer)
        with self.lock:
            self.certs.update(certs)
            self._open(model)

    # -- what changes against core.py ---------------------------------------------------------------------
    def hello(self, site: str, can_offer: bool, cert: bytes | None = None, inbound: str = "") -> dict[str, Any]:
        with self.lock:
            if cert:
                self.certs[site] = cert.decode()
            if inbound and len(inbound) <= 256 and ":" in inbound:  # it takes its updates directly (swarm/peer.py)
                self.inbound[site] = inbound
            else:
                self.inbound.pop(site, None)
        return {**super().hello(site, can_offer), "workflow": "swarm", "best_metric": self.config.swarm_metric}

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
        a, limit = self.aggregation, self.config.round_deadline
        if a is not None and limit is not None and self.clock() - a.started > limit and not self.done:
            self._fail_over(a.site, f"it did not send the round's model within the round deadline ({limit:g} s)")
        if self.aggregation is not None:
            self.presence.step(self.clock())
            return None  # the close is the aggregator site's: its model transfer's commit opens the next round
        decision = super()._decide()
        if decision is not None and self.rounds.owed:  # a failover's resends are on their way (or lost in time):
            return None  # no new attempt for want of updates; a close (rounds.py set it) waits for them
        return decision

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
            transfer = self.issue(self.pick.site, recipients, MODEL, r + 1, self.model_committed)
            inputs = tuple((c.site, c.nonce) for c in counted)
            self.aggregation = Aggregation(r, self.pick.site, inputs, transfer, recipients, started=now)
            log.info("round %d closed: site %r folds %d updates (%s)", r, self.pick.site, len(inputs), self.pick.reason)
            self.lock.notify_all()

    def get_task(
        self, site: str, wait: float, can_offer: bool = False, holds: str = "", gone: Callable[[], bool] | None = None
    ) -> Task:
        """core.py's, but END names the final model's sealed transfer: every site keeps it (swarm/models.py)."""
        task = super().get_task(site, wait, can_offer, holds, gone)
        m = self.model
        if task.kind is TaskKind.END and m is not None and m.transfer and m.recipients and site in m.recipients:
            return dataclasses.replace(task, round=m.round, sealed=Sealed("", {}, "", m.transfer, m.sender))
        return task

    def finished(self) -> bool:
        """core.py's, and every recipient of the final model still connected has kept it (or `site_timeout`
        passed since the end): the relay serves it until then."""
        if not super().finished():
            return False
        with self.lock:
            m, now = self.model, self.clock()
            if self.error is not None or m is None or not m.transfer or m.recipients is None:
                return True
            alive = {n for n in m.recipients if n in self.rounds.sites and self.rounds.alive(self.rounds.sites[n], now)}
            late = time.monotonic() - (self.done_at or 0) > self.config.site_timeout
            return late or alive <= self.kept_final

    def result(self, site: str, round_: int, task_id: str, envelope_json: str) -> dict[str, Any]:
        """An AGGREGATE task's failure (its site could not fold the round), or a site's word that it will not seal
        its update for the round's aggregator site (its certificate fails the site's checks): another site folds."""
        with self.lock:
            a, p = self.aggregation, self.pick
            if self.done and self.model is not None and task_id and task_id == self.model.transfer:
                self.kept_final.add(site)  # a site kept the final model
                return {"round": round_, "message": "final model kept"}
            if a is not None and a.transfer == task_id and a.site == site:
                dead, what = site, "it could not fold the round"
            elif a is None and p is not None and task_id and self.issued.get(site) == task_id:
                if self._sound(p.site):  # the site's claim is false: it sits the round out, nobody fails over
                    self.rounds.sit_out(site)
                    return {"round": round_, "message": f"site {p.site!r}'s certificate is sound: sit this round out"}
                dead, what = p.site, f"site {site!r} will not seal its update for it"
            elif task_id in self.replaced:  # another site said so first
                return {"round": round_, "message": "another site folds the round already"}
            else:
                return super().result(site, round_, task_id, envelope_json)
            why = str((limits.parse_envelope(f"site {site!r}", envelope_json).get("meta") or {}).get("error", ""))
            self._fail_over(dead, f"{what}: {why}")
            return {"round": round_, "message": "another site folds the round"}

    def _sound(self, site: str) -> bool:
        """Lock held. Whether `site`'s certificate passes the checks a sealing site makes (the project's CA,
        revocations, a site's): then a site that says it will not seal for it is wrong, or lies."""
        try:
            assert self.relay.certs is not None
            self.relay.certs.check(self.certs[site].encode(), site, "recipient")
        except (FLError, AssertionError, KeyError):
            return False
        return True

    def _resending(self, c: Counted) -> bool:
        """Lock held. A failover's resend under way: the transfer issued for it is open at the relay."""
        t = self.relay.transfer(self.issued.get(c.site, ""))
        return t is not None and t.header is not None and not t.committed

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
                    sealed = Sealed(a.transfer, peers, site, *self.model_fields(), inputs=a.inputs)
                    manifest = self.global_manifest if self.model is not None and not self.model.transfer else None
                    return Task(TaskKind.AGGREGATE, a.round, self.rounds.attempt, manifest=manifest, sealed=sealed)
                left = deadline - time.monotonic()
                if left <= 0 or (gone is not None and gone()):
                    return Task(TaskKind.WAIT, self.rounds.round)
                self.lock.wait(min(left, 1.0))

    # -- transfers -----------------------------------------------------------------------------------------
    def issue(self, sender: str, recipients: frozenset[str], purpose: str, round_: int, on_commit: Any) -> str:
        """Lock held. A fresh transfer id, expected at the relay: bound to the job, the round, the attempt, the
        sender, the purpose and a nonce, so no sealed stream can be replayed into another."""
        nonce = secrets.token_hex(8)
        text = f"{self.job_id}|{purpose}|{round_}|{self.rounds.attempt}|{sender}|{nonce}"
        transfer_id = hashlib.sha256(text.encode()).hexdigest()[:32]
        self.relay.expect(
            transfer_id, sender, recipients, purpose, round_, self.rounds.attempt, on_commit, self._bound()
        )
        return transfer_id

    def _bound(self) -> int | None:
        """Lock held. The most sealed bytes a transfer of this round may declare: twice the round's model (an update
        holds its tensors; a site must not make the aggregator spool more), None before there is a model."""
        m = self.model
        t = self.relay.transfer(m.transfer) if m is not None and m.transfer else None
        size = t.bytes_in if t is not None else self.global_manifest.total_bytes if self.global_manifest else 0
        return 2 * size + (16 << 20) if size else None

    def model_fields(self) -> tuple[str, str]:
        m = self.model
        return (m.transfer, m.sender) if m is not None else ("", "")

    def update_committed(self, t: RelayTransfer, envelope: dict[str, Any]) -> str:
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
        for key in ("metrics", "meta"):  # (what _best and the records read: objects, bounded)
            if envelope.get(key) is not None and not isinstance(envelope[key], dict):
                raise ProtocolError(f"site {t.sender!r}: the update's `{key}` must be an object")
            limits.check_envelope_dict(f"site {t.sender!r}", key, envelope.get(key) or {})
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
        if t.direct:
            self.direct += t.bytes_in
        else:
            self.relayed += t.bytes_in
        self.record(rec)
        log.info("round %d: sealed update from %r counted (%d)", t.round, t.sender, len(self.rounds.counted))

    def model_committed(self, t: RelayTransfer, envelope: dict[str, Any]) -> str:
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
            holds = folded(a, envelope)
            records = [c.record for c in sorted(self.rounds.counted.values(), key=lambda c: c.site) if c.site in holds]
            self.relayed += t.bytes_in
            self._record_round(a, records, holds)
            self.history = records
            stale = [*(c.nonce for c in self.rounds.counted.values()), self.model_fields()[0]]
            self._open(Model(a.round + 1, t.transfer_id, t.sender, a.recipients))  # (swarm.json names it first)
            self.relay.drop([x for x in stale if x])
            return "model accepted"

    def _record_round(self, a: Aggregation, records: list[dict], sites: tuple[str, ...]) -> None:
        """Lock held. `sites`: the updates the round's model holds (the aggregator site left the others out)."""
        assert self.pick is not None
        p = self.pick
        policy = self.config.swarm_aggregator
        rec = SwarmRecord(round=a.round, attempt=p.attempt, site=p.site, policy=policy, reason=p.reason, updates=sites)
        self.record(dataclasses.replace(rec, bytes_relayed=self.relayed, bytes_direct=self.direct))
        weight = sum(float(rec.get("weight") or 0) for rec in records)
        seconds = self.clock() - (self.rounds.began or self.clock())
        self.record(results.round_record(self.rounds, records, weight, limits.mean_metrics(records), 0.0, seconds))
        log.info("round %d done: site %r folded %s", a.round, a.site, ", ".join(sites))

    def _open(self, model: Model) -> None:
        """Lock held. Round `model.round` trains on `model` (sealed: the aggregator serves nothing itself)."""
        self.relay.drop([*self.issued.values(), *self.replaced])  # updates never counted, earlier picks' (spool files)
        self.model, self.aggregation, self.pick, self.issued, self.relayed, self.direct = model, None, None, {}, 0, 0
        self.replaced = set()
        self.failed, self.replaced = {}, set()
        if model.transfer and self.global_manifest is None:
            self.global_manifest = Manifest([], self.config.chunk_bytes, {})  # (core.py's "a model is served")
        if model.transfer:  # what a restart resumes from
            swarm_state.save(self.config.run_dir, self.job_id, model, self.certs)
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
        self.pick = self._choose(r, now, exclude=set(self.failed))
        return self.pick

    def _eligible(self, now: float, exclude: set[str]) -> list[str]:
        """Lock held. The sites that may fold this round: alive, known by certificate, able to open its model."""
        m = self.model
        return sorted(
            n
            for n, s in self.rounds.sites.items()
            if self.rounds.alive(s, now) and n in self.certs and n not in exclude
            if m is not None and (m.recipients is None or n in m.recipients)
        )

    def _choose(self, r: int, now: float, exclude: set[str]) -> Pick | None:
        cfg = self.config
        got = choose(cfg.swarm_aggregator, cfg.seed, cfg.swarm_metric, r, self._eligible(now, exclude), self.history)
        if got is None:
            return None
        site, reason = got
        log.info("round %d: site %r aggregates (%s)", r, site, reason)
        return Pick(r, site, reason, self.rounds.attempt)

    def _fail_over(self, dead: str, why: str) -> None:
        """Lock held. The aggregator site went silent or failed: pick another; counted updates are owed to it."""
        now, r = self.clock(), self.rounds.round
        log.warning("round %d: aggregator site %r is replaced: %s", r, dead, why)
        stale = [c.nonce for c in self.rounds.counted.values()] + list(self.issued.values())
        if self.aggregation is not None:
            stale.append(self.aggregation.transfer)
        self.relay.drop(stale)
        self.replaced.update(self.issued.values())
        self.aggregation, self.issued = None, {}
        self.failed[dead] = why
        self.pick = self._choose(r, now, exclude=set(self.failed))
        if self.pick is None and self._eligible(now, set()):
            self._give_up(r)
        if self.rounds.counted:
            self.rounds.refold([dead], now)
        elif self.rounds.closing is not None and not self.rounds.owed:  # (owed: an earlier failover's resends)
            self.rounds.closing = None
        self.lock.notify_all()

    def _give_up(self, r: int) -> None:
        """Lock held. Every site that could fold round `r` failed to: the job stops, saying why each failed."""
        whys = "; ".join(f"site {site!r}: {why}" for site, why in self.failed.items())
        self.error = RoundError(f"round {r}: no site could fold it ({whys}); the job stops: mend these, start it again")
        log.error("%s", self.error)
