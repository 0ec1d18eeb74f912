"""fl_plugins.lightning: a real Lightning Trainer on a tiny model against a real aggregator on loopback.

The site runs in the test's own thread (the aggregator serves from its gRPC threads); the flare module is
process-global, so every test ends with `flare.shutdown()`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from conftest import SiteThread, load_round  # noqa: E402

import fl_plugins.lightning as flare  # noqa: E402
from fl_plugins.errors import ModelMismatchError  # noqa: E402
from fl_plugins.integrations.driver import RoundBudget, check_params  # noqa: E402

BATCH, N = 16, 64  # 4 optimizer steps per epoch


class Tiny(L.LightningModule):
    """Regression with Adam, a per-step and a per-epoch LR schedule.

    Records each fit's first-batch loss (before that batch's step)."""

    def __init__(self, seed: int = 0, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.first_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if batch_idx == 0:
            self.first_losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.05)
        per_step = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda s: 0.95)
        per_epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [{"scheduler": per_step, "interval": "step"}, {"scheduler": per_epoch, "interval": "epoch"}]


def data(seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(N, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def trainer(**kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                     **kw)  # fmt: skip


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def federate(module, tr, val=None) -> tuple[list[int], list[bool]]:
    """The three-line FLARE loop; returns the rounds seen, and per round whether the global model was received
    straight into the module's own parameters."""
    rounds, in_place = [], []
    flare.patch(tr)
    while flare.is_running():
        input_model = flare.receive()
        rounds.append(input_model.current_round)
        in_place.append(input_model.params["net.0.weight"].data_ptr() == module.net[0].weight.data_ptr())
        if val is not None:
            tr.validate(module, dataloaders=val)
        tr.fit(module, train_dataloaders=data())
    return rounds, in_place


@pytest.mark.integration
@pytest.mark.slow
def test_rounds_of_one_epoch_equal_plain_training(server_factory, site):
    plain = Tiny(seed=0)
    initial = numpy_state(plain)
    trainer(max_epochs=3).fit(plain, train_dataloaders=data())

    srv = server_factory(rounds=3, initial=initial)
    site(srv)
    module = Tiny(seed=1)  # other weights: only the global model loaded at fit start makes the runs agree
    assert federate(module, trainer(max_epochs=1)) == ([0, 1, 2], [False, True, True])
    assert srv.wait() == 0
    final = load_round(srv.aggregator.config.run_dir, 3)
    want = numpy_state(plain)
    for k, v in want.items():
        np.testing.assert_allclose(final[k], v, rtol=0, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(module.state_dict()[k].numpy(), v, rtol=0, atol=1e-5, err_msg=k)
    assert module.first_losses == pytest.approx(plain.first_losses, abs=1e-5)
    updates = [json.loads(x) for x in (srv.aggregator.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [u["weight"] for u in updates if u["event"] == "update"] == [N // BATCH] * 3  # NUM_STEPS_CURRENT_ROUND


class Sgd(Tiny):
    """Tiny with plain SGD at a constant rate: lr * mu = 1 makes FedProx's pull land exactly on the global model."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.125)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("mu", [0.0, 8.0])
def test_fedprox_pulls_a_lightning_site_to_the_global_model(server_factory, site, mu):
    """patch(trainer, proximal_mu=mu): after each optimizer step the weights move by lr * mu toward the round's
    global model. With lr * mu = 1 every step lands on it, so the site sends the global model back unchanged;
    without FedProx (mu = 0) the same training moves it."""
    initial = numpy_state(Sgd(seed=0))
    srv = server_factory(rounds=2, initial=initial)
    site(srv)
    module, tr = Sgd(seed=1), trainer(max_epochs=1)
    flare.patch(tr, proximal_mu=mu)
    while flare.is_running():
        flare.receive()
        tr.fit(module, train_dataloaders=data())
    assert srv.wait() == 0
    final = load_round(srv.aggregator.config.run_dir, 2)
    same = [np.array_equal(final[k], v) for k, v in initial.items()]
    assert all(same) if mu else not any(same)


@pytest.mark.integration
@pytest.mark.slow
def test_every_round_starts_from_the_global_model(server_factory, site):
    """An anchor site returns the global model with an overwhelming weight, so the aggregate stays the initial
    model (to float32 precision): every round's first training loss is the initial model's, although the
    Lightning site's own weights and optimizer moved on in each round."""
    start = Tiny(seed=0)
    srv = server_factory(rounds=3, min_sites=2, initial=numpy_state(start))
    anchor = SiteThread(srv.address, "anchor", lambda r, p: (p, "FULL", 1e11))
    anchor.start()
    site(srv, "lightning")
    module = Tiny(seed=1)
    assert federate(module, trainer(max_epochs=1))[0] == [0, 1, 2]
    anchor.join(30)
    assert not anchor.is_alive() and anchor.error is None
    x, y = next(iter(data()))
    with torch.no_grad():
        loss0 = torch.nn.functional.mse_loss(start.net(x), y).item()
    assert module.first_losses == pytest.approx([loss0] * 3, abs=1e-6)
    assert anchor.received[0].keys() == anchor.received[2].keys()


@pytest.mark.integration
@pytest.mark.slow
def test_without_initial_model_the_module_offers_round_zero_and_validate_metrics_travel(server_factory, site):
    srv = server_factory(rounds=1, evaluate_final=False)  # (one round: then the job is over)
    site(srv)
    module = Tiny(seed=7)
    initial = numpy_state(module)
    tr = trainer(max_epochs=1)
    flare.patch(tr)
    assert flare.is_running()
    input_model = flare.receive()
    assert input_model is not None and input_model.current_round == 0 and input_model.params is None
    val_loss = tr.validate(module, dataloaders=data(seed=5))[0]["val_loss"]
    assert sorted(input_model.params) == sorted(initial)  # filled in once offered and received back
    tr.fit(module, train_dataloaders=data())
    assert not flare.is_running() and flare.receive() is None
    assert srv.wait() == 0
    run = srv.aggregator.config.run_dir
    got = load_round(run, 0)
    assert sorted(got) == sorted(initial)
    for k, v in initial.items():
        np.testing.assert_array_equal(got[k], v)
    updates = [u for u in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if u["event"] == "update"]
    assert len(updates) == 1 and updates[0]["metrics"]["val_loss"] == pytest.approx(val_loss)
    assert updates[0]["weight"] == N // BATCH


@pytest.mark.integration
def test_a_mismatched_module_names_missing_unexpected_and_misshaped_keys(server_factory, site):
    shapes = {"net.0.weight": (5, 4), "net.0.bias": (8,), "net.2.weight": (1, 8), "head.weight": (3,)}
    srv = server_factory(rounds=1, initial={k: np.zeros(s, np.float32) for k, s in shapes.items()})
    site(srv)
    tr = trainer()
    flare.patch(tr)
    assert flare.is_running() and flare.receive().current_round == 0
    with pytest.raises(ModelMismatchError, match=r"missing \['net.2.bias'\].*unexpected \['head.weight'\]"
                                                 r".*net.0.weight: \(5, 4\) vs local \(8, 4\)"):  # fmt: skip
        tr.fit(Tiny(), train_dataloaders=data())


def test_check_params_and_round_budget_without_a_trainer():
    local = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    check_params({"a": np.ones((2, 3)), "b": np.ones(4)}, local)
    with pytest.raises(ModelMismatchError, match=r"missing \['b'\], unexpected \['c'\], mis-shaped \[a: \(3,\)"):
        check_params({"a": np.ones(3), "c": np.ones(1)}, local)
    assert RoundBudget(1, -1).limits(2, 8) == (3, -1)
    assert RoundBudget(None, 5).limits(2, 8) == (None, 13)


def test_patch_refuses_what_is_not_a_lightning_trainer():
    with pytest.raises(ValueError, match="Lightning Trainer"):
        flare.patch(object())


@pytest.mark.integration
def test_pytorch_lightning_trainers_work_too(server_factory, site):
    """`pytorch_lightning` (the older package name) has its own Trainer and Callback classes; patch() picks them."""
    pl = pytest.importorskip("pytorch_lightning")

    class PLTiny(pl.LightningModule):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def pl_trainer(epochs):
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                          enable_checkpointing=False, enable_model_summary=False)  # fmt: skip

    plain = PLTiny(seed=0)
    initial = numpy_state(plain)
    pl_trainer(2).fit(plain, train_dataloaders=data())
    srv = server_factory(rounds=2, initial=initial)
    site(srv)
    module, tr = PLTiny(seed=1), pl_trainer(1)
    flare.patch(tr)
    assert any(type(cb).__module__.startswith("fl_plugins") and isinstance(cb, pl.Callback) for cb in tr.callbacks)
    while flare.is_running():
        flare.receive()
        tr.fit(module, train_dataloaders=data())
    assert srv.wait() == 0
    final = load_round(srv.aggregator.config.run_dir, 2)
    for k, v in numpy_state(plain).items():
        np.testing.assert_allclose(final[k], v, rtol=0, atol=1e-6, err_msg=k)
