"""Virtual sites' turns (fl_plugins/backends/virtual.py) as a hypothesis state machine, against a real aggregator
reached over the in-memory transport: each turn is a site's session on a thread (FL_TURN's one answer), and
hypothesis picks how each turn ends (it answers, fails before sending, fails after its update counted, ends
without answering) and when the runner ticks.

Invariants at every tick: never more than `slots` turns at once, never two of one site, at most one turn a site per
(round, attempt, refold), and a running turn's site is in its attempt's sample or counted. Liveness at the end: once
every turn answers, the job finishes (or fails with the aggregator's error after `max_attempts`): nothing waits
forever for a site that no longer has a turn."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fl_plugins.backends.virtual import Turns, VirtualSite
from fl_plugins.client.model import FLModel
from fl_plugins.client.session import ClientSession
from tests._inmemory import InMemoryFederation

MODES = ("ok", "before", "after", "silent")


class _Turn:
    """One turn: a site's session on a thread (a process with FL_TURN=1), ending as `mode` says."""

    def __init__(self, fed: InMemoryFederation, name: str, mode: str, log: Path) -> None:
        self.name, self.mode, self.log_path = name, mode, log
        self.rc: int | None = None
        self.client = fed.client(name)
        self.killed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"turn-{name}")
        self.thread.start()

    def _run(self) -> None:
        rc = 0
        try:
            sess = ClientSession(self.client, params_format="numpy")
            sess.one_turn = True
            while not self.killed.is_set() and sess.is_running():
                model = sess.receive()
                if self.killed.is_set() or model is None:
                    break
                if self.mode == "before":
                    rc = 3
                    break
                if self.mode == "silent":
                    break  # a script that ends without answering, exit code 0
                params = {k: v + 1.0 for k, v in model.params.items()}
                sess.send(FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
                if self.mode == "after":
                    rc = 3
                    break
        except Exception:  # noqa: BLE001 - a closed transport (terminated) or an error: a failed process
            rc = 1
        if self.rc is None:
            self.rc = -15 if self.killed.is_set() else rc

    def poll(self) -> int | None:
        return self.rc

    def terminate(self) -> None:
        self.killed.set()
        self.client.close()  # (its calls end as a killed process's do)
        self.rc = -15 if self.rc is None else self.rc

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def kill(self) -> None:
        self.terminate()


@settings(max_examples=12, stateful_step_count=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
class VirtualTurns(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fed: InMemoryFederation | None = None
        self.next_mode = "ok"
        self.launched: dict[tuple[str, int, int, int], int] = {}

    @initialize(
        n=st.integers(3, 5), slots=st.integers(1, 3), sample=st.sampled_from([None, 2]), rounds=st.integers(1, 3)
    )
    def start(self, n: int, slots: int, sample: int | None, rounds: int) -> None:
        self.tmp = Path(TMP.mktemp("turns"))
        names = [f"site-{i}" for i in range(1, n + 1)]
        self.fed = InMemoryFederation(self.tmp, rounds=rounds, initial={"w": np.zeros(8, np.float32)},
                                      min_sites=n, sample_sites=sample, max_attempts=3,
                                      on_attempts_exhausted="close", site_timeout=5.0)  # fmt: skip
        self.agg = self.fed.aggregator
        self.sites = [VirtualSite(name, self.tmp / f"{name}.log") for name in names]
        self.slots = slots
        self.turns = Turns(self.agg, self.sites, slots, self._launch, lambda text: None)

    def _launch(self, name: str) -> _Turn:
        with self.agg.lock:
            r = self.agg.rounds
            key = (name, r.round, r.attempt, r.refolds())
        self.launched[key] = self.launched.get(key, 0) + 1
        return _Turn(self.fed, name, self.next_mode, self.tmp / f"{name}.log")  # type: ignore[arg-type]

    @rule(mode=st.sampled_from(MODES))
    def next_turns_end_as(self, mode: str) -> None:
        self.next_mode = mode

    @rule()
    def tick(self) -> None:
        self.turns.tick()

    @rule(ms=st.integers(1, 60))
    def time_passes(self, ms: int) -> None:
        time.sleep(ms / 1000)

    @precondition(lambda self: self.fed is not None)
    @invariant()
    def turns_obey_their_bounds(self) -> None:
        running = [s for s in self.sites if s.run is not None]
        assert len(running) <= self.slots
        assert all(n == 1 for n in self.launched.values()), self.launched
        with self.agg.lock:
            r = self.agg.rounds
            sample, counted, started = r.sample, set(r.counted), r.started is not None
        if started and sample is not None:
            for s in running:
                if not s.stopping:
                    assert s.name in sample or s.name in counted or s.turn_of[:2] != (r.round, r.attempt), s.name

    def teardown(self) -> None:
        if self.fed is None:
            return
        try:
            self.next_mode = "ok"
            deadline = time.monotonic() + 20
            while not (self.agg.job.trained or self.agg.error is not None or self.agg.done):
                assert time.monotonic() < deadline, self._stuck()
                self.turns.tick()
                time.sleep(0.02)
        finally:
            for s in self.sites:
                s.kill()
            self.fed.close()

    def _stuck(self) -> str:
        with self.agg.lock:
            r = self.agg.rounds
            sites = {n: (s.took, s.sits_out, r.alive(s, self.agg.clock())) for n, s in r.sites.items()}
            return (f"the job is stuck: round {r.round} attempt {r.attempt} started={r.started is not None} "
                    f"sample={r.sample} counted={sorted(r.counted)} owed={sorted(r.owed)} sites={sites} "
                    f"turns={[(s.name, s.turn_of, s.run is not None) for s in self.sites]}")  # fmt: skip


TMP: pytest.TempPathFactory


@pytest.mark.slow
def test_virtual_turns(tmp_path_factory):
    global TMP
    TMP = tmp_path_factory
    VirtualTurns.TestCase().runTest()
