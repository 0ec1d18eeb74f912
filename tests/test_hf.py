"""The Hugging Face Trainer integration against a real aggregator on 127.0.0.1: the callback form (one train() for
every round) tracks plain training exactly, the global model is really loaded each round, PEFT exchanges only
the adapter, and the patch() form (FLARE's loop) keeps one optimizer and one LR schedule across rounds."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import SiteThread, load_round  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

import fl_plugins.hf as flare  # noqa: E402
from fl_plugins.errors import ConfigError  # noqa: E402

N, BATCH = 64, 16  # 4 optimizer steps per epoch


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(cfg)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = N, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def args(tmp_path, **kw) -> TrainingArguments:
    kw.setdefault("num_train_epochs", 1)
    return TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, learning_rate=5e-3,
                             lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no",
                             report_to=[], seed=0, use_cpu=True, disable_tqdm=True, **kw)  # fmt: skip


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def state_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.integration
def test_callback_rounds_track_plain_training(server_factory, site, tmp_path):
    """One site, 3 rounds x 1 epoch in one train() == 3 epochs of plain Trainer training: the same loss curve
    and the same final weights (FedAvg of one site is that site's model), one LR schedule over 12 steps."""
    plain = Trainer(model=tiny_bert(), args=args(tmp_path, num_train_epochs=3), train_dataset=Rows())
    plain.train()

    srv = server_factory(rounds=3, initial=None)  # the site offers round 0's model
    site(srv)
    model = tiny_bert()
    tr = Trainer(model=model, args=args(tmp_path), train_dataset=Rows(), callbacks=[flare.FLTrainerCallback()])
    assert tr.args.num_train_epochs == 3  # the budget became rounds x one round's
    tr.train()
    assert srv.wait() == 0
    assert losses(tr) == pytest.approx(losses(plain), abs=1e-5)
    assert tr.state.global_step == plain.state.global_step == 12
    assert tr.lr_scheduler.get_last_lr() == pytest.approx(plain.lr_scheduler.get_last_lr())
    final = load_round(srv.aggregator.config.run_dir, 3)
    want = state_np(plain.model)
    for k, v in final.items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=1e-5, err_msg=k)
    updates = [json.loads(x) for x in (srv.aggregator.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [u["weight"] for u in updates if u["event"] == "update"] == [N // BATCH] * 3
    # the trainer's own logs reach the aggregator, with the global step and the round
    logs = [json.loads(x) for x in (srv.aggregator.config.run_dir / "logs.jsonl").read_text().splitlines()]
    loss = [(r["step"], r["round"]) for r in logs if r["key"] == "loss"]
    assert loss == [(s, (s - 1) // 4) for s in range(1, 13)]
    assert [r["value"] for r in logs if r["key"] == "loss"] == pytest.approx(losses(tr))


@pytest.mark.integration
def test_a_fixed_global_model_makes_every_round_start_from_the_same_loss(server_factory, site, tmp_path):
    """An anchor site sends the global model back with an overwhelming weight: the aggregate stays the initial
    model, so the first logged loss of every round (local_steps=4, logging every step) is the same. The data are
    one row repeated, so the shuffle order cannot make the rounds' first batches differ."""
    start = tiny_bert(seed=0)
    srv = server_factory(rounds=3, min_sites=2, initial=state_np(start))
    anchor = SiteThread(srv.address, "anchor", lambda r, p: (p, "FULL", 1e11))
    anchor.start()
    site(srv, "hf")
    model = tiny_bert(seed=1)  # other weights: only loading the global model makes round 0 start from it
    one_row = torch.utils.data.Subset(Rows(), [0] * N)
    tr = Trainer(model=model, args=args(tmp_path, max_steps=4), train_dataset=one_row,
                 callbacks=[flare.FLTrainerCallback(local_steps=4)])  # fmt: skip
    tr.train()
    anchor.join(60)
    assert not anchor.is_alive() and anchor.error is None
    curve = losses(tr)
    assert len(curve) == 12
    firsts = curve[0::4]
    assert firsts == pytest.approx([firsts[0]] * 3, abs=1e-4), curve
    assert curve[3] < firsts[0]  # training does move within a round
    # a step's log record carries the round it was trained in, also the round's last step (logged after the
    # boundary has moved on)
    logs = [json.loads(x) for x in (srv.aggregator.config.run_dir / "logs.jsonl").read_text().splitlines()]
    assert [(r["step"], r["round"]) for r in logs if r["key"] == "loss"] == [(s, (s - 1) // 4) for s in range(1, 13)]


@pytest.mark.integration
def test_lora_exchanges_only_the_adapter_and_keeps_the_base_frozen(server_factory, site, tmp_path):
    base = tiny_bert(seed=0)
    frozen_before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(base, cfg)
    exchanged = flare.exchanged_state(model)
    assert exchanged and all("lora_" in k or "classifier" in k for k in exchanged), list(exchanged)
    srv = server_factory(rounds=2, initial=None)
    site(srv)
    tr = Trainer(model=model, args=args(tmp_path), train_dataset=Rows(), callbacks=[flare.FLTrainerCallback()])
    tr.train()
    assert srv.wait() == 0
    final = load_round(srv.aggregator.config.run_dir, 2)
    assert set(final) == set(exchanged)  # only the adapter (and the new classifier head) travelled
    now = flare.exchanged_state(model)
    for k, v in final.items():  # the site's adapter is the one it sent last = the aggregate of one site
        np.testing.assert_allclose(now[k].numpy(), v, rtol=0, atol=1e-6, err_msg=k)
    merged = model.get_base_model().state_dict()
    for k, before in frozen_before.items():
        if "classifier" in k:
            continue
        key = k if k in merged else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(merged[key], before), f"frozen base weight {k} changed"


@pytest.mark.integration
def test_patch_form_keeps_one_optimizer_and_schedule_and_sends_evaluate_metrics(server_factory, site, tmp_path):
    srv = server_factory(rounds=3, initial=None, evaluate_final=False)  # (the rounds trained are the point)
    site(srv)
    model = tiny_bert()
    tr = Trainer(model=model, args=args(tmp_path, max_steps=4, eval_strategy="no"), train_dataset=Rows(),
                 eval_dataset=Rows(32, seed=9))  # fmt: skip
    flare.patch(tr)
    seen, lrs, optimizers = [], [], []
    while flare.is_running():
        input_model = flare.receive()
        seen.append(input_model.current_round)
        tr.evaluate()
        tr.train()
        lrs.append(tr.lr_scheduler.get_last_lr()[0])
        optimizers.append(tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer)
    assert srv.wait() == 0
    assert seen == [0, 1, 2]
    assert all(o is optimizers[0] for o in optimizers)  # the same optimizer (and its Adam moments) every round
    # one linear schedule over 3 rounds x 4 steps with 2 warmup steps: lr after step s is 5e-3 * (12 - s) / 10
    assert lrs == pytest.approx([5e-3 * (12 - s) / 10 for s in (4, 8, 12)])
    rounds = [json.loads(x) for x in (srv.aggregator.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [u for u in rounds if u["event"] == "update"]
    assert len(updates) == 3 and all("eval_loss" in u["metrics"] for u in updates)
    assert all(math.isfinite(u["metrics"]["eval_loss"]) for u in updates)


def finished(srv, timeout: float = 30.0) -> bool:
    """Whether the aggregator's job ends (every round checkpointed) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not srv.aggregator.finished() and time.monotonic() < deadline:
        time.sleep(0.05)
    return srv.aggregator.finished() and srv.aggregator.error is None


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer


@pytest.mark.integration
def test_a_callback_added_after_the_trainer_is_built_still_runs_every_round(server_factory, site, tmp_path):
    """trainer.add_callback(FLTrainerCallback(local_steps=4)) never sees on_init_end: the round budget is planned
    when train() begins, so the trainer's 12 steps are 3 rounds of 4."""
    srv = server_factory(rounds=3, initial=None)
    site(srv)
    tr = Trainer(model=tiny_bert(), args=args(tmp_path, max_steps=12), train_dataset=Rows())
    tr.add_callback(flare.FLTrainerCallback(local_steps=4))
    tr.train()
    assert tr.state.global_step == 12
    assert finished(srv)
    updates = [json.loads(x) for x in (srv.aggregator.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(u["round"], u["weight"]) for u in updates if u["event"] == "update"] == [(0, 4), (1, 4), (2, 4)]


@pytest.mark.integration
def test_patch_with_model_init_schedules_each_new_optimizer(server_factory, site, tmp_path):
    """Trainer(model_init=...) builds a new model and optimizer in every train(): the scheduler of a round must
    drive that round's optimizer (a kept one would step round 0's: the real learning rate would stay flat)."""
    srv = server_factory(rounds=3, initial=state_np(tiny_bert()))
    site(srv)
    tr = Trainer(model_init=lambda: tiny_bert(), args=args(tmp_path, max_steps=4), train_dataset=Rows())
    flare.patch(tr)
    optimizers, lrs = [], []
    while flare.is_running():
        flare.receive()
        tr.train()
        optimizers.append(inner(tr.optimizer))
        assert inner(tr.lr_scheduler.optimizer) is optimizers[-1]
        lrs.append(optimizers[-1].param_groups[0]["lr"])
    assert finished(srv)
    assert len({id(o) for o in optimizers}) == 3
    # each new optimizer gets a new schedule over 3 rounds x 4 steps, 2 of warmup: 5e-3 * (12 - 4) / 10 after 4
    assert lrs == pytest.approx([4e-3] * 3)


@pytest.mark.integration
def test_patch_keeps_a_scheduler_assigned_between_rounds(server_factory, site, tmp_path):
    srv = server_factory(rounds=3, initial=None)
    site(srv)
    tr = Trainer(model=tiny_bert(), args=args(tmp_path, max_steps=4), train_dataset=Rows())
    flare.patch(tr)
    mine, lrs = None, []
    while flare.is_running():
        flare.receive()
        tr.train()
        lrs.append(inner(tr.optimizer).param_groups[0]["lr"])
        if mine is None:  # after round 0: a constant tenth of the base learning rate from now on
            mine = tr.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda step: 0.1)
        else:
            assert tr.lr_scheduler is mine
    assert finished(srv)
    assert lrs == pytest.approx([4e-3, 5e-4, 5e-4])


@pytest.mark.integration
def test_fedprox_with_lr_times_mu_one_pins_the_site_to_the_global_model(server_factory, site, tmp_path):
    """proximal_mu pulls each step's weights toward the round's global model by lr * mu * (w - w_global): with
    lr * mu = 1 every step lands back on the global model, so every loss is the global model's and the update
    sent is the global model itself (without the pull, training moves it: the other tests)."""
    start = tiny_bert(seed=0)
    srv = server_factory(rounds=2, initial=state_np(start))
    site(srv)
    a = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, learning_rate=5e-3,
                          lr_scheduler_type="constant", max_steps=4, logging_steps=1, save_strategy="no",
                          report_to=[], seed=0, use_cpu=True, disable_tqdm=True)  # fmt: skip
    one_row = torch.utils.data.Subset(Rows(), [0] * N)
    tr = Trainer(model=tiny_bert(seed=1), args=a, train_dataset=one_row,
                 callbacks=[flare.FLTrainerCallback(proximal_mu=200.0)])  # fmt: skip
    tr.train()
    assert srv.wait() == 0
    curve = losses(tr)
    assert len(curve) == 8 and curve == pytest.approx([curve[0]] * 8, abs=1e-5), curve
    final, initial = load_round(srv.aggregator.config.run_dir, 2), state_np(start)
    for k, v in final.items():
        np.testing.assert_allclose(v, initial[k], rtol=0, atol=1e-6, err_msg=k)


def test_callback_arguments_are_checked():
    with pytest.raises(ConfigError, match="proximal_mu must be >= 0"):
        flare.FLTrainerCallback(proximal_mu=-1.0)
    with pytest.raises(ConfigError, match="local_steps or local_epochs, not both"):
        flare.FLTrainerCallback(local_steps=3, local_epochs=1)
    with pytest.raises(ConfigError, match="local_steps must be > 0"):
        flare.FLTrainerCallback(local_steps=0)
