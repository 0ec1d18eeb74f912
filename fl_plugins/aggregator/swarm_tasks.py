"""A swarm job's training tasks (aggregator/swarm.py's rules): TRAIN with the transfer to send the update as and
the round's model to train on, RESEND after a failover, OFFER_INITIAL sealed for every site the round needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fl_plugins.aggregator.rounds import Counted, SiteState
from fl_plugins.aggregator.swarm_state import MODEL, UPDATE
from fl_plugins.aggregator.workflow import Sealed, Task, TaskKind
from fl_plugins.wire.layout import Manifest

if TYPE_CHECKING:
    from fl_plugins.aggregator.swarm import SwarmAggregator


class SwarmTasks:
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
            rounds.sit_out(s.name)  # the round does not wait for it (it cannot train on a model it cannot open)
            return None  # it joins at the next round's model, sealed for it too
        owed = rounds.owed.get(s.name)
        if owed is not None:
            return self._resend(s, owed, holds)
        if rounds.started is None and not rounds.offer_task(s, now):
            return None  # (picked once the round starts: every site it needs is connected, so the pick is the policy's)
        pick = agg.pick_for(now)  # (never None once `s` may train: it is eligible itself)
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
            transfer = agg.issue(site, frozenset([aggregator]), UPDATE, agg.rounds.round, agg.update_committed)
            agg.issued[site] = transfer
        direct = {aggregator: agg.inbound[aggregator]} if aggregator in agg.inbound else {}
        return Sealed(transfer, {aggregator: agg.certs[aggregator]}, aggregator, *agg.model_fields(), direct=direct)

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
        alive = {n for n, x in agg.rounds.sites.items() if agg.rounds.alive(x, now) and n in agg.certs}
        recipients = frozenset(alive | {s.name})
        if agg.global_manifest is not None or len(recipients) < agg.config.min_sites:
            return None  # sealed for the sites connected when it is asked: round 0 needs `min_sites` of them
        if not agg.offer.asks(s, agg.rounds, now):
            return None
        transfer = agg.issue(s.name, recipients, MODEL, 0, agg.model_committed)
        peers = {n: agg.certs[n] for n in sorted(recipients)}
        return Task(TaskKind.OFFER_INITIAL, 0, sealed=Sealed(transfer, peers))
