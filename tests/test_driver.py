"""The round driver (fl_plugins/integrations/driver.py) without a trainer and without a socket: a real aggregator
in this process, reached over the in-memory transport, and a model target of numpy arrays (torch tensors for
FedProx). What the trainer integrations used to decide themselves is pinned here: the round budget of both (one
fit per round, every round in one fit), round boundaries, the send, FedProx's term and its pull."""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from _inmemory import InMemoryFederation
from conftest import load_round

import fl_plugins.client as flare
from fl_plugins.client import session
from fl_plugins.client.session import ClientSession
from fl_plugins.errors import ConfigError, ModelMismatchError
from fl_plugins.integrations.budget import RoundProgress
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


pytestmark = pytest.mark.usefixtures("no_sockets")


@pytest.fixture
def federation(in_memory):
    """make(site, params_format, **config): a federation whose `site` is the current client session."""

    def make(site: str = "site-1", params_format: str = "numpy", **kw) -> InMemoryFederation:
        fed = in_memory(**kw)
        fed.activate(site, params_format=params_format)
        return fed

    return make


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
    fed = federation(rounds=3, initial=initial, evaluate_final=False)  # (a loop of TRAIN tasks only)
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


# -- rounds as the trainers see them: open, progress, boundary, send ---------------------------------------------
def test_one_fit_for_every_round_ends_each_round_where_its_step_budget_is_spent(federation):
    """The HF callback's form: a boundary after `steps` optimizer steps sends the update (weighted by those steps)
    and opens the next round, until the job is over. `fresh` (an evaluation now scores the global model) holds
    from a round's opening until its first step begins; `step_round` is the round a step was trained in."""
    fed = federation(rounds=2, initial={"w": np.zeros(2, np.float32)})
    target = ArrayTarget(w=np.zeros(2, np.float32))
    drv = RoundDriver()
    drv.start()
    drv.plan(RoundBudget(epochs=None, steps=3), whole_run=True)
    assert drv.open_round(target) and drv.in_round and drv.fresh
    assert drv.progress == RoundProgress(open=True, fresh=True)
    boundaries, step_rounds = [], []
    for step in range(1, 10):
        drv.step_began()
        assert not drv.fresh
        step_rounds.append(drv.step_round)
        target.train(1.0)
        assert not drv.epoch_ended()  # a step budget: epochs never end a round
        if drv.step_ended():
            boundaries.append(step)
            if not drv.next_round(target):
                break
            assert drv.fresh and drv.progress.steps == 0
    assert boundaries == [3, 6] and step_rounds == [0, 0, 0, 1, 1, 1]
    assert not drv.in_round and not drv.is_running()
    fed.wait()
    assert [u["weight"] for u in fed.events("update")] == [3, 3]
    np.testing.assert_array_equal(load_round(fed.run_dir, 2)["w"], np.full(2, 6, np.float32))


def test_an_epoch_budget_ends_rounds_at_epoch_ends_only(federation):
    fed = federation(rounds=2, initial={"w": np.zeros(2, np.float32)})
    target = ArrayTarget(w=np.zeros(2, np.float32))
    drv = RoundDriver()
    drv.start()
    drv.plan(RoundBudget(epochs=2.0, steps=None), whole_run=True)
    assert drv.open_round(target)
    ends = []
    for epoch in range(1, 9):
        for _ in range(3):  # 3 optimizer steps an epoch
            drv.step_began()
            target.train(1.0)
            assert not drv.step_ended()
        if drv.epoch_ended():
            ends.append(epoch)
            if not drv.next_round(target):
                break
    assert ends == [2, 4]
    fed.wait()
    assert [u["weight"] for u in fed.events("update")] == [6, 6]


def test_one_fit_per_round_sends_the_steps_since_the_round_opened(federation):
    """Lightning's form (and HF's patch() loop): each fit is one round, its budget only sets the fit's limits, so
    no step ends a round; the update's weight is the trainer's global step at the end minus the one at the start."""
    fed = federation(rounds=2, initial={"w": np.zeros(2, np.float32)})
    target = ArrayTarget(w=np.zeros(2, np.float32))
    drv = RoundDriver()
    drv.start()
    drv.plan(RoundBudget(epochs=1, steps=-1))
    drv.end_round(step=3)  # no round open: nothing to send
    global_step = 10  # a trainer resumed from a checkpoint
    while drv.is_running():
        assert drv.open_round(target, step=global_step)
        for _ in range(4):
            global_step += 1
            assert not drv.step_ended()
        target.train(1.0)
        drv.end_round(step=global_step)
        drv.end_round(step=global_step)  # Lightning's on_fit_end after on_train_end: sent once
    fed.wait()
    assert [u["weight"] for u in fed.events("update")] == [4, 4]


def test_attach_makes_receive_write_into_the_targets_tensors(federation):
    federation(rounds=1, initial={"w": np.full(3, 2, np.float32)})
    target = ArrayTarget(w=np.zeros(3, np.float32))
    drv = RoundDriver()
    drv.start()
    drv.attach(target)
    model = drv.receive()
    assert model.params["w"] is target.arrays["w"]
    np.testing.assert_array_equal(target.arrays["w"], np.full(3, 2, np.float32))


def test_bind_remembers_the_federated_trainer_while_it_lives():
    class Trainer:
        pass

    drv, trainer = RoundDriver(), Trainer()
    assert drv.bound() is None
    drv.bind(trainer)
    assert drv.bound() is trainer
    del trainer
    gc.collect()
    assert drv.bound() is None


# -- multi-process training through a Collective ------------------------------------------------------------------
class Scripted:
    """A Collective for one rank: records what this rank broadcast and which tensors; returns the next scripted
    value (what rank 0 sent), or this rank's own value when the script is empty (rank 0's side)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.sent: list[Any] = []
        self.tensors: list[list[Any]] = []

    def broadcast(self, value: Any) -> Any:
        self.sent.append(value)
        return self.script.pop(0) if self.script else value

    def broadcast_tensors(self, tensors) -> None:
        self.tensors.append(list(tensors))


def test_rank_zero_hands_its_round_its_weights_and_the_jobs_end_to_the_other_ranks(federation):
    federation(rounds=1, initial={"w": np.full(2, 5, np.float32)})
    target = ArrayTarget(w=np.zeros(2, np.float32))
    drv = RoundDriver()
    drv.start()
    coll = Scripted()
    assert drv.total_rounds(coll) == 1
    assert drv.open_round(target, collective=coll)
    assert coll.sent == [1, {"round": 0, "total_rounds": 1}]
    assert coll.tensors == [[target.arrays["w"]]]  # the global model, loaded
    np.testing.assert_array_equal(target.arrays["w"], np.full(2, 5, np.float32))
    drv.step_ended()
    drv.end_round()
    assert not drv.agree_running(coll)
    assert coll.sent[-1] == {"running": False, "round": None, "total_rounds": None}


def test_other_ranks_open_and_end_rounds_as_rank_zero_says(rank_one):
    drv = RoundDriver()
    drv.start(rank=1)
    target = ArrayTarget(w=np.full(2, 3, np.float32))
    coll = Scripted(
        3,
        {"round": 1, "total_rounds": 3},
        {"running": True, "round": 2, "total_rounds": 3},
        {"round": None, "total_rounds": None},
        {"running": False, "round": None, "total_rounds": None},
    )
    assert drv.total_rounds(coll) == 3
    assert drv.open_round(target, collective=coll) and drv.in_round
    peer = drv.receive()
    assert peer.current_round == 1 and peer.params["w"] is target.arrays["w"]
    drv.step_ended()
    drv.end_round()  # only rank 0 sends
    assert drv.agree_running(coll) and drv.is_running()
    assert not drv.open_round(target, collective=coll)  # rank 0 had no round to open
    assert not drv.agree_running(coll) and not drv.is_running() and drv.receive() is None
    assert coll.sent == [0, None, None, None, None] and len(coll.tensors) == 2


# -- FedProx --------------------------------------------------------------------------------------------------
def test_the_proximal_terms_gradient_is_mu_times_the_distance_to_the_global_model():
    torch = pytest.importorskip("torch")
    from fl_plugins.integrations.fedprox import Proximal

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    prox = Proximal(mu=0.5)
    prox.anchor(model.state_dict())  # the round's global model
    g = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # local training moved the weights
    term = prox.term(dict(model.named_parameters()))
    term.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.5 * (p.detach() - g[name]))
    want = 0.25 * sum(((p.detach() - g[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(term.detach(), want)
    assert float(prox.term({})) == 0.0  # no anchored name: no term
    with pytest.raises(ValueError, match="mu must be > 0"):
        Proximal(mu=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_pull_is_the_former_callbacks_step_bit_for_bit(dtype):
    """Before the driver owned FedProx, the HF callback anchored the floating-point tensors that travel and, after
    each optimizer step, ran torch._foreach_lerp_(live, anchor, lr * mu). The driver's pull gives the same weights,
    bit for bit, over several steps and learning rates: w - lr * mu * (w - w_global), the term's gradient step."""
    torch = pytest.importorskip("torch")
    from fl_plugins.integrations.fedprox import Proximal

    dt = getattr(torch, dtype)
    torch.manual_seed(1)
    new, old = torch.nn.Linear(4, 3).to(dt), torch.nn.Linear(4, 3).to(dt)
    old.load_state_dict(new.state_dict())
    mu = 2.0
    prox = Proximal(mu)
    prox.anchor(new.state_dict())
    live = [w for w in old.state_dict().values() if w.is_floating_point()]  # the former code
    anchor = [w.detach().clone() for w in live]
    g = {k: v.clone() for k, v in new.state_dict().items()}
    for lr in (0.1, 0.01, 0.25):
        with torch.no_grad():
            for a, b in zip(new.parameters(), old.parameters(), strict=True):
                step = torch.randn_like(a)
                a.add_(step)
                b.add_(step)
        before = {k: v.clone() for k, v in new.state_dict().items()}
        prox.pull(lr)
        with torch.no_grad():
            torch._foreach_lerp_(live, anchor, lr * mu)
        for (k, a), b in zip(new.state_dict().items(), old.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
            want = before[k].float() - lr * mu * (before[k].float() - g[k].float())
            torch.testing.assert_close(a.float(), want, atol=2e-2 if dtype == "bfloat16" else 1e-6, rtol=0)


def test_the_driver_anchors_fedprox_at_each_rounds_global_model(federation):
    torch = pytest.importorskip("torch")
    from fl_plugins.integrations._torch import ModuleTarget

    torch.manual_seed(0)
    initial = {k: v.numpy().copy() for k, v in torch.nn.Linear(2, 1).state_dict().items()}
    federation(rounds=1, initial=initial, params_format="torch")
    model = torch.nn.Linear(2, 1)  # other weights: the global model is loaded when the round opens
    drv = RoundDriver()
    drv.start()
    drv.use_fedprox(10.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    drv.step_ended(lr=0.05)  # no round open: no pull
    assert drv.open_round(ModuleTarget(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a training step moved every weight by 1
    drv.step_ended(lr=0.05)  # lr * mu = 0.5: half way back to the global model
    drv.step_ended(lr=None)  # no learning rate: no pull
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), initial[k] + 0.5, rtol=0, atol=1e-6, err_msg=k)
    drv.use_fedprox(0.0)
    assert drv.corrections.proximal is None


# -- one round's budget, for both integrations ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "rounds", "want"),
    [
        (RoundBudget(epochs=None, steps=4), 3, RoundBudget(epochs=None, steps=12)),
        (RoundBudget(epochs=1.0, steps=None), 3, RoundBudget(epochs=3.0, steps=None)),
        (RoundBudget(epochs=2.0, steps=None), 5, RoundBudget(epochs=10.0, steps=None)),
    ],
)
def test_one_fit_for_every_round_trains_rounds_times_one_rounds_budget(budget, rounds, want):
    assert budget.over(rounds) == want


def test_rounds_that_end_at_epoch_ends_need_whole_epochs():
    with pytest.raises(ConfigError, match=r"local_epochs must be a whole number of epochs \(got 1.5\)"):
        RoundBudget(epochs=1.5, steps=None).over(2)


def test_a_budget_is_spent_only_by_a_count_of_its_own_kind():
    steps, epochs, unlimited = RoundBudget(None, 3), RoundBudget(2.0, None), RoundBudget(-1, -1)
    assert steps.spent(steps=3) and steps.spent(steps=4) and not steps.spent(steps=2)
    assert not steps.spent(epochs=100)
    assert epochs.spent(epochs=2) and not epochs.spent(epochs=1) and not epochs.spent(steps=1000)
    assert not unlimited.spent(steps=10**6) and not unlimited.spent(epochs=10**6)
    assert (str(steps), str(epochs)) == ("3 steps", "2 epochs")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"steps": 3, "epochs": 1},
            r"x: give local_steps or local_epochs, not both \(got local_steps=3, local_epochs=1",
        ),
        ({"steps": 2.5}, r"local_steps must be a whole number of optimizer steps \(got 2.5\)"),
        ({"epochs": 0}, r"local_epochs must be > 0 and finite \(got 0\)"),
        ({"steps": float("inf")}, r"local_steps must be > 0 and finite \(got inf\)"),
        ({"steps": True}, r"local_steps must be > 0 and finite \(got True\)"),
    ],
)
def test_a_users_local_budget_is_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RoundBudget.checked("x", **kwargs)


def test_a_users_local_budget_becomes_a_round_budget():
    assert RoundBudget.checked("x") is None
    assert RoundBudget.checked("x", steps=2.0) == RoundBudget(epochs=None, steps=2)
    assert RoundBudget.checked("x", epochs=1) == RoundBudget(epochs=1.0, steps=None)
