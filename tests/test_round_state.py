"""aggregator/rounds.py's RoundState alone, as a hypothesis state machine against a model of its rules.

No files, no bytes, no threads: the state machine asks for tasks, begins, commits, drops (partial updates),
lets sites go silent and time pass, and plays the coordinator's part (decide, close, refold, new attempt). A
small model kept by the test (who is counted, owed, sitting out, which attempt) must agree with RoundState
after every step, and the rules' promises hold: a close has what its reason needs, nothing owed is closed
over, a site sitting out gets no task and no update in, attempts stay bounded.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fl_plugins.aggregator.rounds import Close, Counted, Decision, RoundState
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import RoundError

SITES = ["a", "b", "c", "d"]
SITE_TIMEOUT = 30.0


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
    def start(self, min_sites, min_updates, deadline, max_attempts, on_exhausted):
        self.cfg = AggregatorConfig(
            run_dir="unused",
            rounds=5,
            min_sites=min_sites,
            min_updates=min_updates,
            round_deadline=deadline,
            site_timeout=SITE_TIMEOUT,
            max_attempts=max_attempts,
            on_attempts_exhausted=on_exhausted,
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
        got = self.rs.offer_task(s, self.now)
        if site in self.sitting or site in self.counted or site in self.owed or self.rs.closing is not None:
            assert not got, "a site that sits out, is counted or owes, or a closing round, gets no task"
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
        d = self.rs.decide(self.now)
        if self.rs.closing is not None and closing_before is None:
            self._check_close(self.rs.closing)
            self.folding.clear()  # late uploads are dropped: one that folded bytes leaves them behind
        if d is Decision.CLOSE:
            assert not self.rs.owed, "a round never closes over owed updates"
            self.close()
        elif d is Decision.NEW_ATTEMPT:
            self.new_attempt()

    def _check_close(self, reason: Close):
        n = len(self.rs.counted)
        if reason is Close.ALL_IN:
            assert n >= self.cfg.min_sites
        elif reason is Close.DEADLINE:
            assert n >= self.cfg.min_updates and self.now - self.rs.started >= self.cfg.round_deadline
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


Rules.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
test_round_state_rules = pytest.mark.timeout(300)(Rules.TestCase)


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
