"""The round driver (fl_plugins/integrations/driver.py) without a trainer and without a socket: a real aggregator
in this process, reached over the in-memory transport, and a model target of numpy arrays."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from _inmemory import InMemoryFederation, forbid_sockets
from conftest import load_round

import fl_plugins.client as flare
from fl_plugins.client import session
from fl_plugins.client.session import ClientSession
from fl_plugins.errors import ConfigError, ModelMismatchError
from fl_plugins.integrations.driver import PrefixedTarget, RoundBudget, RoundDriver, check_params, matching


class ArrayTarget:
    """A model target over numpy arrays: `state()` is the arrays themselves, `load()` copies into them."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = arrays
        self.loads: list[bool] = []  # strict flag of each load

    def state(self) -> dict[str, np.ndarray]:
        return self.arrays

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        self.loads.append(strict)
        for k, v in params.items():
            np.copyto(self.arrays[k], v)

    def train(self, delta: float) -> None:
        for a in self.arrays.values():
            a += delta


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch):
    forbid_sockets(monkeypatch)


@pytest.fixture
def federation(tmp_path):
    feds: list[InMemoryFederation] = []

    def make(site: str = "site-1", **kw) -> InMemoryFederation:
        feds.append(InMemoryFederation(tmp_path, **kw))
        feds[-1].activate(site)
        return feds[-1]

    yield make
    flare.shutdown()
    for f in feds:
        f.close()


def test_without_an_initial_model_the_driver_offers_the_targets_weights(federation):
    """Round 0's FLModel comes first with params None; when the first fit starts the target's weights become
    round 0's global model, are received back into the target, and that same FLModel gets its params."""
    fed = federation(rounds=2)
    target = ArrayTarget(w=np.arange(4, dtype=np.float32), b=np.ones(2, np.float32))
    drv = RoundDriver()
    drv.start()
    assert drv.is_running()
    model = drv.receive()
    assert (model.current_round, model.params) == (0, None)
    assert drv.round_info() == {"round": None, "total_rounds": None}  # nothing loaded yet
    assert drv.begin(target)
    assert model.params is not None and drv.receive() is model
    assert model.params["w"] is target.arrays["w"]  # received straight into the target's tensors
    np.testing.assert_array_equal(load_round(fed.run_dir, 0)["w"], np.arange(4, dtype=np.float32))
    assert drv.round_info() == {"round": 0, "total_rounds": 2}
    target.train(1.0)
    drv.finish_round(steps=5)
    assert drv.after_fit_info() == {"running": True, "round": 1, "total_rounds": 2}
    assert drv.begin(target)
    target.train(1.0)
    drv.finish_round(steps=5)
    assert drv.after_fit_info() == {"running": False, "round": None, "total_rounds": None}
    assert not drv.is_running() and not drv.begin(target) and drv.receive() is None
    fed.wait()
    np.testing.assert_array_equal(load_round(fed.run_dir, 2)["w"], np.arange(4, dtype=np.float32) + 2)
    assert [u["weight"] for u in fed.events("update")] == [5, 5]


def test_each_round_loads_the_global_model_and_sends_the_targets_state(federation):
    initial = {"w": np.full(3, 10, np.float32)}
    fed = federation(rounds=3, initial=initial)
    target = ArrayTarget(w=np.zeros(3, np.float32))
    drv = RoundDriver()
    drv.start()
    rounds = []
    while drv.is_running():
        assert drv.begin(target)  # receives the round itself
        rounds.append(drv.model.current_round)
        np.testing.assert_array_equal(target.arrays["w"], np.full(3, 10 + len(rounds) - 1, np.float32))
        drv.record_metrics({"val_loss": 0.5 / len(rounds)})
        target.train(1.0)
        drv.finish_round(steps=2)
    assert rounds == [0, 1, 2] and target.loads == [True] * 3
    fed.wait()
    np.testing.assert_array_equal(load_round(fed.run_dir, 3)["w"], np.full(3, 13, np.float32))
    assert [u["metrics"]["val_loss"] for u in fed.events("update")] == [0.5, 0.25, 0.5 / 3]


def test_a_round_without_an_optimizer_step_is_sent_with_weight_one(federation, caplog):
    fed = federation(rounds=1, initial={"w": np.zeros(2, np.float32)})
    drv = RoundDriver()
    drv.start()
    assert drv.begin(ArrayTarget(w=np.zeros(2, np.float32)))
    with caplog.at_level(logging.WARNING):
        drv.finish_round(steps=0)
    assert "no optimizer step" in caplog.text
    assert not drv.is_running()
    assert [u["weight"] for u in fed.events("update")] == [1]


def test_finish_round_sends_nothing_before_a_round_is_loaded(federation):
    fed = federation(rounds=1, initial={"w": np.zeros(2, np.float32)})
    drv = RoundDriver()
    drv.start()
    drv.finish_round(steps=3)  # no begin(): nothing to send
    drv.record_metrics({"acc": 1.0})  # nor metrics to keep
    assert drv.receive().current_round == 0 and drv.metrics == {}
    assert fed.events("update") == []


def test_a_strict_driver_refuses_a_global_model_that_does_not_fit(federation):
    federation(rounds=1, initial={"w": np.zeros(3, np.float32), "extra": np.zeros(1, np.float32)})
    drv = RoundDriver(strict=True)
    drv.start()
    with pytest.raises(ModelMismatchError, match=r"unexpected \['extra'\].*mis-shaped \[w: \(3,\) vs local \(4,\)\]"):
        drv.begin(ArrayTarget(w=np.zeros(4, np.float32)))


def test_a_lenient_driver_loads_the_tensors_that_fit(federation, caplog):
    federation(rounds=1, initial={"w": np.ones(3, np.float32), "extra": np.ones(1, np.float32)})
    drv = RoundDriver(strict=False)
    drv.start()
    target = ArrayTarget(w=np.zeros(3, np.float32), mine=np.zeros(2, np.float32))
    with caplog.at_level(logging.WARNING):
        assert drv.begin(target)
    assert "loading 1 of 2" in caplog.text and target.loads == [False]
    np.testing.assert_array_equal(target.arrays["w"], np.ones(3, np.float32))


def test_a_prefixed_target_travels_under_the_servers_names(federation):
    fed = federation(rounds=1, initial={"model.w": np.full(2, 4, np.float32)})
    inner = ArrayTarget(w=np.zeros(2, np.float32))
    drv = RoundDriver()
    drv.start()
    assert drv.begin(PrefixedTarget(inner, "model."))
    np.testing.assert_array_equal(inner.arrays["w"], np.full(2, 4, np.float32))
    assert PrefixedTarget(inner, "model.").loads is inner.loads  # the inner target's other attributes
    drv.finish_round(steps=1)
    fed.wait()
    assert list(load_round(fed.run_dir, 1)) == ["model.w"]


def test_log_scalars_and_total_rounds_reach_the_aggregator(federation):
    fed = federation(rounds=2, initial={"w": np.zeros(2, np.float32)})
    drv = RoundDriver()
    drv.start()
    assert drv.total_rounds() == 2
    assert drv.begin(ArrayTarget(w=np.zeros(2, np.float32)))
    drv.log_scalars({"loss": np.float32(0.5), "lr": 0.1}, step=3)
    drv.log_scalars({"loss": 0.25}, step=4, round_=7)
    drv.log_scalars({}, step=5)  # nothing to send
    got = [(r["key"], r["value"], r["step"], r["round"]) for r in fed.logs()]
    assert got == [("loss", 0.5, 3, 0), ("lr", 0.1, 3, 0), ("loss", 0.25, 4, 7)]


# -- ranks other than 0 follow rank 0 without talking to the aggregator -----------------------------------------
@pytest.fixture
def rank_one():
    session.activate(ClientSession(None, rank=1))
    yield
    flare.shutdown()


def test_other_ranks_follow_what_rank_zero_broadcast(rank_one):
    drv = RoundDriver()
    drv.start(rank=1)
    assert drv.is_running()  # True before rank 0 has said anything
    target = ArrayTarget(w=np.full(2, 3, np.float32))
    assert not drv.begin(target)  # the weights reach this rank through the trainer's broadcast
    drv.follow({"round": 1, "total_rounds": 3}, target)
    peer = drv.receive()
    assert (peer.current_round, peer.total_rounds, peer.meta["rank"]) == (1, 3, 1)
    np.testing.assert_array_equal(peer.params["w"], np.full(2, 3, np.float32))
    drv.finish_round(steps=4)  # a no-op: only rank 0 sends
    drv.follow({"running": False, "round": None, "total_rounds": None})
    assert not drv.is_running() and drv.receive() is None


def test_a_rank_connected_as_rank_zero_cannot_drive_another_rank(federation):
    federation(rounds=1, initial={"w": np.zeros(2, np.float32)})
    with pytest.raises(ConfigError, match="global rank 1"):
        RoundDriver().start(rank=1)


# -- pure helpers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "done", "want"),
    [
        (RoundBudget(epochs=2, steps=None), (0, 0), (2, None)),
        (RoundBudget(epochs=2, steps=None), (4, 120), (6, None)),
        (RoundBudget(epochs=None, steps=50), (1, 100), (None, 150)),
        (RoundBudget(epochs=-1, steps=-1), (3, 30), (-1, -1)),  # -1: no limit, kept as the trainer's
        (RoundBudget(epochs=1, steps=10), (2, 20), (3, 30)),
    ],
)
def test_a_round_budget_moves_the_trainers_limits_forward(budget, done, want):
    assert budget.limits(*done) == want


def test_check_params_and_matching_name_what_differs():
    local = {"a": np.zeros(2), "b": np.zeros(3)}
    check_params({"a": np.ones(2), "b": np.ones(3)}, local)
    with pytest.raises(ModelMismatchError, match=r"missing \['b'\], unexpected \['c'\]"):
        check_params({"a": np.ones(2), "c": np.ones(1)}, local)
    assert list(matching({"a": np.ones(2), "b": np.ones(4)}, local)) == ["a"]
