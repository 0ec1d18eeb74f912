"""The round rules: who may train, what counts, when a round closes or starts another attempt, who sits out.

The promise: the global model written for round R+1 is the weighted average of the updates *counted* in round
R, and of nothing else, whatever closes the round and whenever a site fails. The rules that keep it:

Round R runs in attempts (A = 0, 1, ...); an attempt is a window in which each site may have one update counted.
  * Round R starts once `min_sites` sites are connected; every site that asks gets the TRAIN task (R, A) unless
    its update is counted already, it sits out the attempt, or it is not in the attempt's sample. Only a site
    that took round R's task may begin an upload for it (after an aggregator restart: once `min_sites` are
    connected again, for attempt 0, the sample drawn again then).
  * With `sample_sites` set, only an attempt's *sample* trains. It is drawn when the attempt starts: k of the n
    sites alive then, k = max(1, fraction x n rounded half up) or min(count, n), chosen among them (sorted by
    name) by `random.Random` seeded with "seed:R:A": the same seed and sites choose the same ones. Only sampled
    sites get the task and may send an update; the others, and a site that connects after the draw, wait for the
    next round. A sampled site that leaves is not replaced within the attempt (as without sampling, rule (b)
    may close the round with the updates it has). A new attempt keeps the last sample's sites that are counted
    or alive (they may still be training) and draws among the other alive sites up to k, n counting the alive
    and the counted sites; with fewer than `min_sites` alive, it waits for them to draw, as the round's start
    does. Each draw is a `SampleRecord`. Below, a *participant* is a sampled site, and *needed*
    is `min_sites` (at the deadline, `min_updates`) capped at the sample's size, at least 1; without
    `sample_sites` every site is sampled and nothing is capped. A cyclic job's sample is one site, its turn
    (sampling.py).
  * Each chunk of an update is verified, then folded into the accumulator at once (strategy.py). A commit checks
    every shard's digest; only then is the update *counted* (its weight added). A counted update is kept as a
    `Counted` record: its weight, its manifest's hash and its chunk digests (16 bytes per chunk), not its bytes.
  * An upload that ends without being counted after some of its chunks were folded (dropped for
    `idle_timeout`, its site gone for `site_timeout` or refused by its policy, replaced by a new send(), a wrong
    shard digest, content refused mid-stream, late at the round's close) leaves a *partial update* in the
    accumulator. Its site is the culprit: it sits out the rest of the attempt (later sends are refused, saying
    so), so one site cannot make the round refold again and again.
  * The round *closes* when (a) every participant still alive is counted and at least *needed* are, or
    (b) no participant is left to wait for and fewer than *needed* sites could still be counted in the attempt
    (sampled sites left or sit out): the round closes with the updates it has (at least one), or (c) the round
    deadline passed with at least *needed* (`min_updates`, capped) counted. Closing refuses uploads that are
    not counted yet (late).
  * At the close, with folds excluded (the fold gate), the aggregator checks the accumulator: if any upload that
    is not counted folded a byte in this accumulator's *epoch*, the accumulator is *refolded*: it is zeroed (a
    new epoch), every counted update becomes *owed*, and its site is asked (task RESEND) to send the same update
    again; each resent chunk must match the committed chunk digest *before* it is folded, and the commit must
    match the committed shard digests. A site that cannot resend (its process no longer holds the update, it
    left, or it did not begin within `site_timeout`) loses its update for the round. When nothing is owed, the
    check runs again; the round then closes if it still has what its reason needed, else it goes back to
    collecting. Refolds are bounded: each one has a culprit, who sits out.
  * A new attempt starts when the deadline passed with fewer than *needed* counted, or when no sampled site is
    left that could send an update and none is counted: counted updates stay counted, sit-outs end, the deadline
    starts again, the sample is drawn again (above), and every other sampled site gets the task (R, A+1). After
    `max_attempts` attempts the round closes with what it has (`on_attempts_exhausted="close"`, at least one
    update) or the job fails with an error that says why (`"fail"`, the default).
  * An update is refused, with an error that names what was wrong, when its manifest or envelope is malformed,
    its tensors or shard plan disagree with the global model, its chunk size is not the aggregator's, its weight
    is not in (0, MAX_WEIGHT], or (as its chunks arrive) a shard's header disagrees with the manifest, a shard
    holds more bytes than declared, or a value is NaN or infinite (`reject_nonfinite`).
A closed round is finalised on the background thread: the new global model is checked for NaN/Inf (unless
`reject_nonfinite` is off) and written to `global/round-R+1` (store.py), then round R+1 opens. Updates for a
closed round and duplicates are refused.

`RoundState` holds these rules and nothing else: no files, no threads, no bytes. Time is passed in (`now`), its
records go to the `emit` callback (RUN_DIR/metrics.jsonl in the service), and the caller holds the coordinator's
lock around every call. tests/test_round_state.py drives it as a hypothesis state machine against a model of the
rules; tests/test_rounds.py drives the whole aggregator, bytes included.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

from fl_plugins.aggregator import sampling
from fl_plugins.aggregator.participants import Counted, SiteState
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import ConfigError, RoundError
from fl_plugins.records import AttemptRecord, MetricsRecord, RefoldRecord, SampleRecord, UpdateLostRecord
from fl_plugins.wire.layout import short_repr

log = logging.getLogger(__name__)


RESERVED_NAMES = ("global", ".", "..")  # no site may be called so (evaluation.GLOBAL; path components)


class Close(enum.Enum):
    """Why a round closes."""

    ALL_IN = "every participant is counted"
    SITES_LEFT = "no other site can still send an update"
    DEADLINE = "the round deadline passed"
    EXHAUSTED = "the round used its attempts"


class Decision(enum.Enum):
    """What the coordinator does next (`RoundState.decide`)."""

    CLOSE = "close"  # the round is closing and nothing is owed: check the accumulator, then write or refold
    NEW_ATTEMPT = "new attempt"  # start attempt A+1 (`RoundState.new_attempt`)


class RoundState:
    """The round rules of this module's docstring. `stats` is the service's counter dictionary (shared)."""

    def __init__(
        self,
        rules: AggregatorConfig,
        stats: dict[str, Any],
        emit: Callable[[MetricsRecord], None],
        restarted_at: int | None = None,
    ) -> None:
        self.rules = rules
        self.stats = stats
        self.emit = emit
        self.sites: dict[str, SiteState] = {}
        self.round = 0
        self.attempt = 0
        self.closing: Close | None = None  # why the round is closing; None while it collects updates
        self.counted: dict[str, Counted] = {}  # site -> its update, counted in this round (this epoch)
        self.owed: dict[str, Counted] = {}  # site -> its counted update, zeroed by a refold, to be sent again
        self.started: float | None = None  # when this attempt's window opened (None: not started)
        self.began: float | None = None  # when the round's first attempt started
        self.sample: frozenset[str] | None = None  # the sites that may train this attempt (None: every site)
        self.refolds_before = 0
        # the round this process found checkpointed when it started (None: a new run): its sites may hold that
        # round's task from the process before, and may resume their uploads before asking again
        self.restarted_at = restarted_at

    # -- sites --------------------------------------------------------------------------------------------------
    def touch(self, name: str, now: float, can_offer: bool = False) -> SiteState:
        """The site, seen now (a new one is checked and added)."""
        s = self.sites.get(name)
        if s is None:
            if not isinstance(name, str) or not name or len(name) > 128 or any(c in name for c in "/\\\0"):
                raise ConfigError(f"site name {short_repr(name)} must be 1-128 characters without path separators")
            if name in RESERVED_NAMES:
                raise ConfigError(
                    f"site name {name!r} is reserved ({', '.join(map(repr, RESERVED_NAMES))}: the global model's name "
                    "in an evaluation, and folder names); name the site otherwise"
                )
            s = self.sites[name] = SiteState(name, now, can_offer)
            log.info("site %r connected (%d connected)", name, len(self.sites))
        s.last_seen = now
        s.can_offer = s.can_offer or can_offer
        return s

    def alive(self, s: SiteState, now: float) -> bool:
        return now - s.last_seen < self.rules.site_timeout

    def alive_count(self, now: float) -> int:
        return sum(1 for s in self.sites.values() if self.alive(s, now))

    def may_train(self, s: SiteState) -> bool:
        """The site may get (or has) this attempt's task: not counted, not owing, not sitting out, sampled."""
        return (
            s.name not in self.counted
            and s.name not in self.owed
            and s.sits_out != (self.round, self.attempt)
            and (self.sample is None or s.name in self.sample)
        )

    def participants(self) -> list[SiteState]:
        return [s for s in self.sites.values() if s.took is not None and s.took[0] == self.round]

    def sit_out(self, name: str) -> None:
        s = self.sites.get(name)
        if s is not None:
            s.sits_out = (self.round, self.attempt)

    # -- a round's life ---------------------------------------------------------------------------------------
    def open(self, r: int) -> None:
        """Round `r` collects updates from now on (not started until `min_sites` sites are connected)."""
        self.round, self.attempt = r, 0
        self.started = self.began = None
        self.sample = None
        self.closing = None
        self.counted, self.owed = {}, {}
        self.refolds_before = self.stats["refolds"]

    def offer_task(self, s: SiteState, now: float) -> bool:
        """The site asks for this attempt's task: True if it gets it (the attempt starts, and draws its sample,
        at the first ask once `min_sites` sites are connected)."""
        if self.closing is not None:
            return False
        self.start_if_ready(now)
        if self.started is None or not self.may_train(s):
            return False
        s.took = (self.round, self.attempt)
        return True

    def start_if_ready(self, now: float) -> None:
        """The attempt starts, and draws its sample, once `min_sites` sites are alive (at a site's ask, or when
        `fl-plugins run` vouches for its virtual sites: fl_plugins/backends)."""
        if self.closing is None and self.started is None and self.alive_count(now) >= self.rules.min_sites:
            self._start(now)
            log.info("round %d attempt %d started with %d sites", self.round, self.attempt, self.alive_count(now))

    def _start(self, now: float) -> None:
        self.started = now
        self.began = self.began or now
        self._draw(now)

    def _draw(self, now: float) -> None:
        """This attempt's sample, with `sample_sites` set or in a cyclic job (sampling.py; the rules above)."""
        if not self._draws():
            return
        alive = sorted(n for n, s in self.sites.items() if self.alive(s, now))
        kept = {n for n in self.sample or () if n in self.counted or n in alive} | set(self.counted)
        self.sample = sampling.draw(self.rules, self.round, self.attempt, alive, kept, self.sites)
        sites, seed = tuple(sorted(self.sample or ())), self.rules.seed
        self.emit(SampleRecord(round=self.round, attempt=self.attempt, sites=sites, alive=len(alive), seed=seed))
        log.info("round %d attempt %d: sites sampled: %s (of %d alive)", self.round, self.attempt, sites, len(alive))

    def _draws(self) -> bool:
        return self.rules.sample_sites is not None or self.rules.workflow.startswith("cyclic")

    def _why_sample(self) -> str:
        cyclic = self.rules.workflow.startswith("cyclic")
        return "the cyclic workflow's turn" if cyclic else f"sample_sites={self.rules.sample_sites:g}"

    def check_current(self, site: str, round_: int, attempt: int) -> None:
        """An upload must name this round and an attempt no later than this one (a RoundError: it is late)."""
        if round_ != self.round or attempt > self.attempt:
            raise self._refused(
                f"site {site!r}: the update for round {round_} (attempt {attempt}) is late: the aggregator is on "
                f"round {self.round} attempt {self.attempt}"
            )

    def may_update(self, s: SiteState, round_: int, attempt: int, now: float) -> None:
        """The rules a new update passes before its first byte (after `check_current` and the resend check), in
        the order a site can act on; a RoundError that says why otherwise."""
        site = s.name
        if s.sits_out == (self.round, self.attempt):
            raise self._refused(
                f"site {site!r}: an update of this site for round {round_} was dropped after part of it was folded; "
                f"the site sits attempt {self.attempt} of the round out and gets the next round's (or attempt's) task"
            )
        if self.closing is not None:
            raise self._refused(
                f"site {site!r}: the update for round {round_} is late: the round is closing ({self.closing.value})"
            )
        if site in self.counted or site in self.owed:
            raise self._refused(f"site {site!r} already sent its update for round {round_}: duplicate refused")
        if s.took is None or s.took[0] != round_:
            if not self._resumes(attempt, now):
                raise self._refused(
                    f"site {site!r} was not given round {round_}'s task: only a site that received the round's "
                    "TRAIN task may send an update for it (ask for a task first; the round starts once "
                    f"{self.rules.min_sites} sites are connected)"
                )
            log.info("round %d attempt %d resumed by site %r's update", self.round, self.attempt, site)
        if self.sample is not None and site not in self.sample:
            raise self._refused(
                f"site {site!r} is not in the sample of round {round_} attempt {self.attempt} ({self._why_sample()}: "
                f"{', '.join(sorted(self.sample))}): it waits for the next round's task"
            )

    def _resumes(self, attempt: int, now: float) -> bool:
        """A site holding this round's task from before an aggregator restart: the round is under way."""
        if not (self.started is None and attempt == 0 == self.attempt and self.round == self.restarted_at):
            return False
        if self.alive_count(now) < self.rules.min_sites:
            return False
        self._start(now)
        return True

    def _refused(self, message: str) -> RoundError:
        self.stats["updates_refused"] += 1
        return RoundError(message)

    def began_update(self, s: SiteState, round_: int, attempt: int) -> None:
        """An update from `s` was accepted to begin: the site took the round (perhaps resumed) and is waited for."""
        s.took = (round_, s.took[1] if s.took else attempt)
        s.not_waited = None

    def invalid(self, name: str, round_: int) -> None:
        """The site's update was refused before it began: the round does not wait for another one from it."""
        s = self.sites.get(name)
        if s is not None and round_ == self.round:
            s.not_waited = round_

    def refused_midstream(self, name: str, round_: int) -> None:
        """The site's update was refused for its content: it sits out the rest of the attempt."""
        s = self.sites.get(name)
        if s is not None and round_ == self.round:
            s.sits_out = (self.round, self.attempt)
            s.took = None

    # -- counting -----------------------------------------------------------------------------------------------
    def count(self, c: Counted) -> None:
        self.counted[c.site] = c
        self.stats["updates_accepted"] += 1

    def counted_again(self, c: Counted) -> bool:
        """An owed update was resent whole: counted again. False if it is no longer owed."""
        if self.owed.get(c.site) is not c:
            return False
        self.counted[c.site] = self.owed.pop(c.site)
        return True

    def lose(self, c: Counted, why: str) -> None:
        """An owed update is no longer counted: its site could not send it again."""
        if self.owed.get(c.site) is not c:
            return  # lost already
        del self.owed[c.site]
        self.stats["updates_lost"] += 1
        log.warning("round %d: site %r's update no longer counts: %s", self.round, c.site, why)
        self.emit(UpdateLostRecord(round=self.round, attempt=self.attempt, site=c.site, reason=why))

    def expire_owed(self, now: float, resending: Callable[[Counted], bool]) -> None:
        """Owed updates whose sites left, did not begin their resend within `site_timeout`, or took longer than
        the round deadline, are lost."""
        rules = self.rules
        for c in list(self.owed.values()):
            if not self.alive(self.sites[c.site], now):
                self.lose(c, f"the site was silent for {rules.site_timeout:.0f} s")
            elif now - c.asked > rules.site_timeout and not resending(c):
                self.lose(c, f"the site did not send it again within {rules.site_timeout:.0f} s")
            elif rules.round_deadline is not None and now - c.asked > rules.round_deadline:
                self.lose(c, f"its resend took longer than the round deadline ({rules.round_deadline:g} s)")

    # -- decisions ----------------------------------------------------------------------------------------------
    def decide(self, now: float) -> Decision | None:
        """What the round does next; the close rules set `closing` (the caller then drops the late uploads)."""
        if self.started is None:
            return None
        if self.closing is not None:
            return None if self.owed else Decision.CLOSE
        rules, r, a = self.rules, self.round, self.attempt
        counted, quorum, enough = len(self.counted), self.needed(Close.ALL_IN), self.needed(Close.DEADLINE)
        could = [s for s in self.sites.values() if self.alive(s, now) and self.may_train(s)]
        waiting = [s for s in could if s.took is not None and s.took[0] == r and s.not_waited != r]
        if not waiting and counted >= quorum:
            return self._close(Close.ALL_IN)
        if not waiting and counted and counted + len(could) < quorum:
            log.warning("round %d: sites left or sit out; closing with %d updates", r, counted)
            return self._close(Close.SITES_LEFT)
        if rules.round_deadline is not None and now - self.started >= rules.round_deadline:
            if counted >= enough:
                missing = sorted(s.name for s in waiting)
                log.warning("round %d: deadline passed; closing with %d updates (missing: %s)", r, counted, missing)
                return self._close(Close.DEADLINE)
            log.warning("round %d attempt %d: deadline passed with %d of %d updates", r, a, counted, enough)
            return Decision.NEW_ATTEMPT
        if not could and counted == 0 and any(self.alive(s, now) for s in self.sites.values()):
            log.warning("round %d attempt %d: every (sampled) site still connected sits out or left", r, a)
            return Decision.NEW_ATTEMPT
        return None

    def _close(self, reason: Close) -> Decision:
        self.closing = reason
        return Decision.CLOSE

    def needed(self, reason: Close) -> int:
        """Updates a close for `reason` needs: `min_sites` or `min_updates`, capped at the sample's size."""
        n = {Close.ALL_IN: self.rules.min_sites, Close.DEADLINE: self.rules.min_updates}.get(reason, 1)
        return n if self.sample is None else max(1, min(n, len(self.sample)))

    def new_attempt(self, now: float) -> bool:
        """Another window for the round: counted updates stay, sit-outs end, the deadline starts again, the sample
        is drawn again, and the other (sampled) sites get the task (R, A+1). True if it started (a sampled round
        may wait for `min_sites` sites to draw); False if the round closes instead (its attempts used,
        `on_attempts_exhausted="close"`); RoundError if the job fails."""
        rules = self.rules
        if self.attempt + 1 >= rules.max_attempts:
            if rules.on_attempts_exhausted == "close" and self.counted:
                log.warning(
                    "round %d used its %d attempts; closing with %d updates",
                    self.round,
                    rules.max_attempts,
                    len(self.counted),
                )
                self._close(Close.EXHAUSTED)
                return False
            raise RoundError(
                f"round {self.round} used its {rules.max_attempts} attempts with {len(self.counted)} updates counted "
                f"({self.needed(Close.DEADLINE)} needed at the deadline, {self.needed(Close.ALL_IN)} sites to close "
                "without one): sites left, were too slow or sent updates that were refused (the aggregator's log names "
                "them); raise --max-attempts or --round-deadline, lower --min-updates, or set "
                "on_attempts_exhausted: close to go on with the updates a round has"
            )
        self.attempt += 1
        self.stats["round_restarts"] += 1
        self.emit(AttemptRecord(round=self.round, attempt=self.attempt, counted=tuple(sorted(self.counted))))
        log.warning("round %d: attempt %d (%d updates kept)", self.round, self.attempt, len(self.counted))
        if self._draws() and self.alive_count(now) < rules.min_sites:
            self.started = None  # its draw waits for `min_sites` sites, as the round's start does
        else:
            self._start(now)  # the new window: deadline, timeouts and closes apply at once
        return True

    def refold(self, culprits: list[str], now: float) -> None:
        """The accumulator held partial updates of `culprits` (the caller zeroes it): they sit out, and every
        counted update is owed again."""
        for name in culprits:
            self.sit_out(name)
        for c in self.counted.values():
            c.asked = now
        self.owed, self.counted = self.counted, {}
        self.stats["refolds"] += 1
        log.warning(
            "round %d: partial updates of %s were folded; refolding from %d counted updates",
            self.round,
            culprits,
            len(self.owed),
        )
        owed = tuple(sorted(self.owed))
        self.emit(RefoldRecord(round=self.round, attempt=self.attempt, partial=tuple(culprits), owed=owed))

    def settle(self) -> bool:
        """After the close's check found no partial update: True if the round has what its close needed (write
        it); else it goes back to collecting updates."""
        reason = self.closing
        assert reason is not None
        if len(self.counted) >= self.needed(reason):
            return True
        log.warning(
            "round %d: %d updates after the refold, %d needed (%s); collecting again",
            self.round,
            len(self.counted),
            self.needed(reason),
            reason.value,
        )
        self.closing = None
        return False

    def refolds(self) -> int:
        """Refolds in this round."""
        return self.stats["refolds"] - self.refolds_before
