"""aggregator/rounds.py's RoundState alone, as a hypothesis state machine against a model of its rules.

No files, no bytes, no threads: the state machine asks for tasks, begins, commits, drops (partial updates),
lets sites go silent and time pass, and plays the coordinator's part (decide, close, refold, new attempt). A
small model kept by the test (who is counted, owed, sitting out, which attempt) must agree with RoundState
after every step, and the rules' promises hold: a close has what its reason needs, nothing owed is closed
over, a site sitting out gets no task and no update in, attempts stay bounded. SampledRules runs the same machine
with `sample_sites` set: each draw is checked against the rule's sizes and keeps, and only sampled sites train.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fl_plugins.aggregator.rounds import Close, Counted, Decision, RoundState
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import RoundError
from fl_plugins.records import SampleRecord

SITES = ["a", "b", "c", "d"]
SITE_TIMEOUT = 30.0
SEED = 11


def counted(site: str, attempt: int) -> Counted:
    return Counted(site, attempt, f"n-{site}", b"sha", 1.0, "FULL", ["d"], [[b"c"]], {"site": site})


class Rules(RuleBasedStateMachine):
    @initialize(
        min_sites=st.integers(1, 3),
        min_updates=st.integers(1, 2),
        deadline=st.sampled_from([None, 10.0]),
        max_attempts=st.integers(1, 3),
        on_exhausted=st.sampled_from(["fail", "close"]),
    )
    def start(self, min_sites, min_updates, deadline, max_attempts, on_exhausted, sample=None):
        self.cfg = AggregatorConfig(
            run_dir="unused",
            rounds=5,
            min_sites=min_sites,
            min_updates=min_updates,
            round_deadline=deadline,
            site_timeout=SITE_TIMEOUT,
            max_attempts=max_attempts,
            on_attempts_exhausted=on_exhausted,
            sample_sites=sample,
            seed=SEED,
        )
        self.records: list[dict] = []
        self.now = 1000.0
        self.rs = RoundState(
            self.cfg,
            dict.fromkeys(("refolds", "updates_refused", "updates_accepted", "updates_lost", "round_restarts"), 0),
            self.records.append,
        )
        self.rs.open(0)
        self.failed = False
        # the model
        self.counted: set[str] = set()
        self.owed: set[str] = set()
        self.sitting: set[str] = set()
        self.folding: set[str] = set()  # began an update in this attempt and may fold partial bytes
        self.partial: set[str] = set()  # left partial bytes in this epoch
        self.silent: set[str] = set()
        self.sample: frozenset[str] | None = None  # the attempt's sample, once drawn (sampling only)
        self.seen = 0  # records looked at

    def alive(self, site: str) -> bool:
        s = self.rs.sites.get(site)
        return s is not None and self.now - s.last_seen < SITE_TIMEOUT

    # -- sites ------------------------------------------------------------------------------------------------
    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES))
    def ask(self, site):
        if site in self.silent:
            return
        s = self.rs.touch(site, self.now)
        started = self.rs.started
        got = self.rs.offer_task(s, self.now)
        self._saw_draw(started is None and self.rs.started is not None)
        if site in self.sitting or site in self.counted or site in self.owed or self.rs.closing is not None:
            assert not got, "a site that sits out, is counted or owes, or a closing round, gets no task"
        if self.sample is not None and site not in self.sample:
            assert not got, "a site outside the sample gets no task"
        if got:
            assert s.took == (self.rs.round, self.rs.attempt)

    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES))
    def begin(self, site):
        s = self.rs.sites.get(site)
        if s is None or site in self.silent:
            return
        try:
            self.rs.check_current(site, self.rs.round, self.rs.attempt)
            self.rs.may_update(s, self.rs.round, self.rs.attempt, self.now)
        except RoundError:
            return
        assert site not in self.sitting and site not in self.counted and site not in self.owed
        assert self.rs.closing is None
        assert self.sample is None or site in self.sample, "only a sampled site's update begins"
        self.rs.began_update(s, self.rs.round, self.rs.attempt)
        self.folding.add(site)

    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES))
    def commit(self, site):
        if site not in self.folding or self.rs.closing is not None:
            return
        self.folding.discard(site)
        self.rs.count(counted(site, self.rs.attempt))
        self.counted.add(site)

    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES))
    def drop_partial(self, site):
        """The site's upload folded some bytes and is dropped (idle, refused, replaced): it sits out."""
        if site not in self.folding:
            return
        self.folding.discard(site)
        self.partial.add(site)
        self.rs.sit_out(site)
        self.sitting.add(site)

    @rule(site=st.sampled_from(SITES))
    def go_silent(self, site):
        self.silent.add(site)

    @rule(dt=st.sampled_from([1.0, 11.0, 31.0]))
    def advance(self, dt):
        self.now += dt
        for name, s in self.rs.sites.items():
            if name not in self.silent:
                s.last_seen = self.now

    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES), holds=st.booleans())
    def resend(self, site, holds):
        """A site owing a resend sends it again whole (or no longer holds it and loses it)."""
        c = self.rs.owed.get(site)
        if c is None or site in self.silent:
            return
        if holds:
            assert self.rs.counted_again(c)
            self.counted.add(site)
        else:
            self.rs.lose(c, "gone")
        self.owed.discard(site)

    @precondition(lambda self: not self.failed)
    @rule(k=st.integers(1, 4))
    def sites_train(self, k):
        """The usual round in one step: the first k sites that are not silent ask, send and are counted, the
        coordinator steps, and the sites owing a refold's resend send it."""
        live = [s for s in SITES if s not in self.silent][:k]
        for site in live:
            self.ask(site)
        for site in live:
            self.ask(site)
            self.begin(site)
            self.commit(site)
        self.step()
        self.resend_all(True)

    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES), k=st.integers(1, 4))
    def partial_then_train(self, site, k):
        """A hostile or unlucky site folds part of an update and is dropped while the others train."""
        self.ask(site)
        self.begin(site)
        self.drop_partial(site)
        self.sites_train(k)

    @precondition(lambda self: not self.failed)
    @rule(holds=st.booleans())
    def resend_all(self, holds):
        for site in sorted(self.rs.owed):
            self.resend(site, holds)

    # -- the coordinator ----------------------------------------------------------------------------------------
    @precondition(lambda self: not self.failed)
    @rule()
    def step(self):
        closing_before = self.rs.closing
        self.rs.expire_owed(self.now, lambda c: False)
        self.owed &= set(self.rs.owed)
        started, counted = self.rs.started, len(self.counted)
        d = self.rs.decide(self.now)
        if closing_before is None and started is not None:  # the round does not wait longer than its rules say
            if self.sample is not None and self.counted == self.sample:  # (a sample is never empty)
                assert self.rs.closing is Close.ALL_IN, "the whole sample is counted: it is all in"
            if self.cfg.round_deadline is not None and self.now - started >= self.cfg.round_deadline:
                assert (d is Decision.CLOSE) == (counted >= self._needed(self.cfg.min_updates)) or (
                    self.rs.closing in (Close.ALL_IN, Close.SITES_LEFT)
                ), "past the deadline: close with what it needs, else a new attempt"
        if self.rs.closing is not None and closing_before is None:
            self._check_close(self.rs.closing)
            self.folding.clear()  # late uploads are dropped: one that folded bytes leaves them behind
        if d is Decision.CLOSE:
            assert not self.rs.owed, "a round never closes over owed updates"
            self.close()
        elif d is Decision.NEW_ATTEMPT:
            self.new_attempt()

    def _needed(self, n: int) -> int:
        """`min_sites` or `min_updates`, capped at the sample's size (at least one)."""
        return n if self.sample is None else max(1, min(n, len(self.sample)))

    def _saw_draw(self, expected: bool) -> None:
        """A draw is a SampleRecord exactly when an attempt starts (with sampling): sized by the rule, keeping the
        last sample's counted or alive sites, the others drawn among the alive ones."""
        draws = [r for r in self.records[self.seen :] if isinstance(r, SampleRecord)]
        self.seen = len(self.records)
        assert len(draws) == (1 if expected and self.cfg.sample_sites is not None else 0), draws
        if not draws:
            return
        rec, size = draws[0], self.cfg.sample_sites
        alive = {x for x in SITES if self.alive(x)}
        kept = {x for x in self.sample or () if x in self.counted or x in alive} | self.counted
        n = len(alive | kept)
        k = max(1, math.floor(size * n + 0.5)) if size < 1 else min(int(size), n)  # half up (exact for our sizes)
        assert (rec.round, rec.attempt, rec.alive, rec.seed) == (self.rs.round, self.rs.attempt, len(alive), SEED)
        assert rec.sites and kept <= set(rec.sites) <= alive | kept and list(rec.sites) == sorted(rec.sites)
        assert len(rec.sites) == len(kept) + min(max(0, k - len(kept)), len(alive - kept)), (rec, k, kept)
        self.sample = frozenset(rec.sites)

    def _check_close(self, reason: Close):
        n = len(self.rs.counted)
        if reason is Close.ALL_IN:
            assert n >= self._needed(self.cfg.min_sites)
        elif reason is Close.DEADLINE:
            needed = self._needed(self.cfg.min_updates)
            assert n >= needed and self.now - self.rs.started >= self.cfg.round_deadline
        else:
            assert n >= 1

    def close(self):
        if self.partial:
            attempt = self.rs.attempt
            self.rs.refold(sorted(self.partial), self.now)
            assert all(self.rs.sites[p].sits_out == (self.rs.round, attempt) for p in self.partial)
            self.owed, self.counted = set(self.counted), set()
            self.sitting |= self.partial
            self.partial = set()
            return
        if self.rs.settle():
            self.rs.open(self.rs.round + 1)
            self.counted, self.owed, self.sitting, self.folding = set(), set(), set(), set()
            self.sample = None
        # else: back to collecting

    def new_attempt(self):
        attempt = self.rs.attempt
        try:
            started = self.rs.new_attempt(self.now)
        except RoundError:
            assert attempt + 1 >= self.cfg.max_attempts and (
                self.cfg.on_attempts_exhausted == "fail" or not self.counted
            )
            self.failed = True
            return
        self._saw_draw(started and self.rs.started is not None)  # (sampled: it may wait for min_sites to draw)
        if started:
            assert self.rs.attempt == attempt + 1 < self.cfg.max_attempts
            self.sitting = set()
            self.folding = set()
        else:
            assert self.rs.closing is Close.EXHAUSTED and self.counted
            self.folding.clear()

    # -- the model and the rules agree ------------------------------------------------------------------------
    @invariant()
    def agrees_with_the_model(self):
        if not hasattr(self, "rs"):
            return
        assert set(self.rs.counted) == self.counted
        assert set(self.rs.owed) == self.owed
        assert not (self.counted & self.owed)
        assert self.rs.attempt < self.cfg.max_attempts
        for name in self.sitting:
            assert self.rs.sites[name].sits_out == (self.rs.round, self.rs.attempt)
        if self.rs.owed:
            assert self.rs.closing is not None, "owed updates exist only while a round closes after a refold"
        assert self.rs.sample == self.sample
        if self.sample is not None:
            assert self.counted | self.owed <= self.sample, "only sampled sites' updates count"


Rules.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
test_round_state_rules = pytest.mark.timeout(300)(Rules.TestCase)


class SampledRules(Rules):
    """The same rules with `sample_sites`: fractions (half up: 0.625 of 4 is 3) and counts, some above the sites;
    sites that go silent come back, perhaps after a new attempt drew another site in their place."""

    @initialize(
        min_sites=st.integers(1, 3),
        min_updates=st.integers(1, 3),
        deadline=st.sampled_from([None, 10.0]),
        max_attempts=st.integers(1, 3),
        on_exhausted=st.sampled_from(["fail", "close"]),
        sample=st.sampled_from([0.5, 0.625, 0.75, 1.0, 2.0, 3.0, 5.0]),
    )
    def start(self, min_sites, min_updates, deadline, max_attempts, on_exhausted, sample=None):
        super().start(min_sites, min_updates, deadline, max_attempts, on_exhausted, sample)

    @precondition(lambda self: not self.failed)
    @rule()
    def step(self):
        for site in sorted(self.folding):  # uploads.drop_gone: the upload of a site gone silent is dropped
            if not self.alive(site):
                self.drop_partial(site)
        super().step()

    @rule(site=st.sampled_from(SITES))
    def come_back(self, site):
        """A silent site is heard again: a new attempt may have drawn another site in its place meanwhile."""
        if site in self.silent:
            self.silent.discard(site)
            self.rs.touch(site, self.now)

    @precondition(lambda self: not self.failed)
    @rule(site=st.sampled_from(SITES))
    def leave_and_come_back(self, site):
        """A site takes its task and is silent past `site_timeout` while the coordinator steps; back, it sends."""
        self.ask(site)
        self.go_silent(site)
        self.advance(31.0)
        self.step()
        self.come_back(site)
        self.begin(site)


SampledRules.TestCase.settings = settings(Rules.TestCase.settings, max_examples=100, stateful_step_count=50)
test_round_state_rules_with_sampling = pytest.mark.timeout(300)(SampledRules.TestCase)


def test_the_model_is_no_tautology():
    """A scripted run reaches a refold, resends and a written round: the machine's paths are reachable."""
    m = Rules()
    m.start(min_sites=2, min_updates=1, deadline=None, max_attempts=3, on_exhausted="fail")
    for s in "abc":
        m.ask(s)  # a gets no task yet: the round starts with b, the second site
    for s in "abc":
        m.ask(s)
        m.begin(s)
    m.drop_partial("c")
    m.commit("a")
    m.commit("b")
    m.step()  # every participant still able is counted: close, and c's bytes make it refold
    assert sorted(m.rs.owed) == ["a", "b"] and m.records[-1].to_json()["event"] == "refold"
    m.resend("a", True)
    m.resend("b", True)
    m.step()  # close again: settled
    assert m.rs.round == 1 and m.rs.refolds() == 0
