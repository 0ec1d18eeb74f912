"""Sharded sites (FSDP): every rank holds a shard of each weight; rank 0 gathers the whole state where it is read
and scatters the global model to every rank's shards (fl_plugins/integrations/sharded.py).

- Lightning's ModelParallelStrategy (FSDP2's fully_shard in configure_model) runs on CPU with gloo: 2 ranks, a
  real aggregator on loopback, the FLARE loop, as test_lightning_ddp.py runs DDP.
- The HF target's scopes (a PEFT adapter, trainable parameters, the whole model) over a fully_shard-ed model, in 2
  gloo processes: the gathered state is what the unsharded model exchanges, and a load reaches every shard.
- The HF Trainer's FSDP (accelerate) and Lightning's FSDPStrategy need a GPU here: tests marked `gpu`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from conftest import free_port, launcher_env, load_round  # noqa: E402

LIGHTNING_SITE = r"""
import json, os, sys
import torch
import lightning.pytorch as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
import fl_plugins.lightning as flare

OUT, STRATEGY = sys.argv[1], sys.argv[2]


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def configure_model(self):
        if STRATEGY == "fsdp2" and not isinstance(self.net, FSDPModule):  # called by every fit and validate
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


if STRATEGY == "fsdp2":
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    accelerator = "cpu"
else:  # Lightning's FSDPStrategy (FSDP1): CUDA only
    from lightning.pytorch.strategies import FSDPStrategy
    strategy, accelerator = FSDPStrategy(), "gpu"
model = Tiny()
trainer = L.Trainer(accelerator=accelerator, devices=2 if STRATEGY == "fsdp2" else 1, strategy=strategy,
                    max_epochs=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
flare.patch(trainer)
seen = []
while flare.is_running():
    input_model = flare.receive()
    assert input_model is not None
    trainer.validate(model, dataloaders=data())  # the round's global model is in every rank's shards from here
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    name = f"loaded-{input_model.current_round}-{trainer.global_rank}.pt"
    torch.save({k: v.detach().cpu() for k, v in full.items()}, os.path.join(OUT, name))
    seen.append({"round": input_model.current_round, "total": input_model.total_rounds})
    trainer.fit(model, train_dataloaders=data())
rank = trainer.global_rank
assert flare.receive() is None
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
torch.save({k: v.detach().cpu() for k, v in full.items()}, os.path.join(OUT, f"final-{rank}.pt"))
with open(os.path.join(OUT, f"rank-{rank}.json"), "w") as f:
    json.dump({"rank": rank, "seen": seen, "steps": trainer.global_step}, f)
flare.shutdown()
"""


def _env(srv, site: str) -> dict[str, str]:
    return launcher_env(FL_SERVER=srv.address, FL_SITE=site)


INITIAL = {  # the aggregator's initial model: not what the site's module starts from
    "net.0.weight": np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4),
    "net.0.bias": np.linspace(0.5, -0.5, 8, dtype=np.float32),
    "net.2.weight": np.linspace(-0.3, 0.3, 8, dtype=np.float32).reshape(1, 8),
    "net.2.bias": np.array([0.25], dtype=np.float32),
}


def _run_lightning(server_factory, tmp_path: Path, strategy: str, initial: bool = False) -> tuple:
    pytest.importorskip("lightning.pytorch")
    srv = server_factory(rounds=2, initial=INITIAL if initial else None)  # None: rank 0 offers the gathered module
    script = tmp_path / "site.py"
    script.write_text(LIGHTNING_SITE)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(out), strategy], env=_env(srv, "site-fsdp"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert srv.wait() == 0
    return srv.aggregator.config.run_dir, out


@pytest.mark.integration
@pytest.mark.slow
def test_lightning_fsdp2_two_cpu_ranks_gather_on_rank_0_and_scatter_the_global_model(server_factory, tmp_path):
    run, out = _run_lightning(server_factory, tmp_path, "fsdp2", initial=True)
    ranks = {r: json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)}
    for r in (0, 1):
        assert [s["round"] for s in ranks[r]["seen"]] == [0, 1, 2], ranks[r]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (64 // 8 // 2)

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    updates = [u for u in records if u["event"] == "update"]
    assert [(u["round"], u["site"]) for u in updates] == [(0, "site-fsdp"), (1, "site-fsdp")]
    assert all("val_loss" in u["metrics"] for u in updates)
    for rnd in (0, 1, 2):  # each round's global model reached both ranks' shards (round 0's: the initial model)
        want = INITIAL if rnd == 0 else load_round(run, rnd)
        for r in (0, 1):
            loaded = torch.load(out / f"loaded-{rnd}-{r}.pt")
            assert sorted(loaded) == sorted(want)
            for k, v in loaded.items():
                np.testing.assert_allclose(v.numpy(), want[k], rtol=0, atol=1e-6, err_msg=f"round {rnd} rank {r} {k}")
    got = load_round(run, 2)  # one site: the global model is what the ranks trained, gathered on rank 0 and sent
    assert any(not np.allclose(got[k], load_round(run, 1)[k]) for k in got)  # round 1 trained
    final0, final1 = (torch.load(out / f"final-{r}.pt") for r in (0, 1))  # the final evaluation put them back
    for k, v in final0.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=0, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(final1[k].numpy(), v.numpy(), err_msg=k)


@pytest.mark.integration
@pytest.mark.slow
def test_lightning_fsdp2_without_initial_model_offers_the_gathered_module(server_factory, tmp_path):
    run, out = _run_lightning(server_factory, tmp_path, "fsdp2")
    initial = load_round(run, 0)  # the module (seed 0 on both ranks), gathered whole from the two shards
    torch.manual_seed(0)
    seed0 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    assert sorted(initial) == sorted(f"net.{k}" for k in seed0.state_dict())
    for k, v in seed0.state_dict().items():
        np.testing.assert_array_equal(initial[f"net.{k}"], v.detach().numpy(), err_msg=k)


@pytest.mark.gpu
@pytest.mark.integration
def test_lightning_fsdp_strategy_on_a_gpu(server_factory, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("Lightning's FSDPStrategy needs a CUDA device")
    run, out = _run_lightning(server_factory, tmp_path, "fsdp1")
    got, final0 = load_round(run, 2), torch.load(out / "final-0.pt")
    for k, v in final0.items():
        np.testing.assert_allclose(got[k], v.float().numpy(), rtol=0, atol=1e-6, err_msg=k)


HF_TARGETS = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
from fl_plugins.integrations.hf import FLTrainerCallback
from fl_plugins.integrations.hf_model import HFTarget
from fl_plugins.integrations.sharded import ShardedTarget
from fl_plugins.client.model import FLModel, ParamsType
from fl_plugins.integrations.driver import RoundDriver
from fl_plugins.integrations.targets import gather, spread

OUT, SCOPE = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=64))
if SCOPE == "peft":
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():  # lora_B starts at zero: give the adapter values worth comparing
        if "lora_B" in n:
            torch.nn.init.normal_(p)
elif SCOPE == "trainable":
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1." in n)
cb = FLTrainerCallback(params_scope="model" if SCOPE == "model" else "trainable")
kind = "model" if SCOPE == "model" else "trainable"
plain = {k: v.detach().clone() for k, v in HFTarget(model, kind).state().items()}
layers = model.base_model.model.model.layers if SCOPE == "peft" else model.model.layers
for layer in layers:
    fully_shard(layer)
fully_shard(model)
target = cb.target(model)
assert isinstance(target, ShardedTarget), type(target)
gather(target)
got = target.state()
report = {"rank": rank, "kind": target.kind, "n": len(got)}
if rank == 0:  # the gathered state is what the unsharded model exchanges: names, shapes, values
    report["names_equal"] = sorted(got) == sorted(plain)
    report["values_equal"] = all(torch.equal(got[k], plain[k]) for k in plain)
    target.load({k: torch.full_like(v, 0.25) for k, v in got.items()}, strict=True)
spread(target, None)
after = HFTarget(model, kind)  # this rank's shards, by the same names
local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in after.state().items()}
report["shards_loaded"] = all(bool((v == 0.25).all()) for k, v in local.items() if k in plain)
report["untouched_frozen"] = SCOPE == "model" or all(
    bool((v.to_local() if hasattr(v, "to_local") else v).ne(0.25).any())
    for n, v in model.state_dict().items() if v.numel() > 8 and "lora" not in n and "layers.1." not in n)


def shards(value):
    mine = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in HFTarget(model, kind).state().items()}
    return all(bool((v == value).all()) for k, v in mine.items() if k in plain)


# an EVALUATE task through the round driver, as the callbacks run it: each hook builds its own target
d = RoundDriver()
d.rank = rank
other = {k: torch.full_like(v, -1.0) for k, v in plain.items()}
d.model = FLModel(params_type=ParamsType.FULL, params=other, current_round=3, meta={}) if rank == 0 else None
d.begin_evaluation(cb.target(model))
report["evaluating_other"] = shards(-1.0)
d.abort_evaluation(cb.target(model))
report["own_back"] = shards(0.25)
with open(os.path.join(OUT, f"{SCOPE}-{rank}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["peft", "trainable", "model"])
def test_hf_target_over_a_fully_sharded_model_gathers_what_an_unsharded_one_exchanges(tmp_path, scope):
    """FLTrainerCallback's target for a model sharded by FSDP2 (as the Trainer's FSDP does on a GPU), in 2 gloo
    processes: rank 0 gathers exactly what the unsharded model exchanges (a PEFT adapter under peft's names, the
    trainable parameters, the whole state), and what rank 0 loads reaches every rank's shards and nothing else."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    script = tmp_path / "targets.py"
    script.write_text(HF_TARGETS)
    env = launcher_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(script), str(tmp_path), scope]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"{scope}-{r}.json").read_text()) for r in (0, 1))
    assert r0["kind"] == r1["kind"] == scope
    assert r0["n"] > 0 and r1["n"] == 0  # the whole state on rank 0 only
    assert r0["names_equal"] and r0["values_equal"], r0
    assert r0["shards_loaded"] and r1["shards_loaded"], (r0, r1)
    assert r0["untouched_frozen"] and r1["untouched_frozen"], (r0, r1)
    assert r0["evaluating_other"] and r1["evaluating_other"], (r0, r1)  # the task's model in every shard
    assert r0["own_back"] and r1["own_back"], (r0, r1)  # and the site's own weights back after it


HF_TRAINER_FSDP = r"""
import os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from peft import LoraConfig, get_peft_model
from fl_plugins.hf import FLTrainerCallback

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=128))
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
g = torch.Generator().manual_seed(1)
rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (32, 16), generator=g).tolist()]
args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                         report_to=[], save_strategy="no", logging_steps=1, fsdp="full_shard",
                         fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[FLTrainerCallback()])
trainer.train()
"""


@pytest.mark.gpu
@pytest.mark.integration
def test_hf_trainer_fsdp_on_a_gpu_federates_the_adapter(server_factory, tmp_path):
    """The Trainer's FSDP (accelerate, FSDP2) with a LoRA adapter: only rank 0 talks, the adapter is gathered on
    it. accelerate runs FSDP on CUDA only, so this runs where a GPU is (test_hf_target_... covers the mechanism)."""
    if not torch.cuda.is_available():
        pytest.skip("the HF Trainer's FSDP needs a CUDA device")
    srv = server_factory(rounds=2)
    script = tmp_path / "site.py"
    script.write_text(HF_TRAINER_FSDP)
    nproc = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(script), str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(srv, "site-hf-fsdp"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert srv.wait() == 0
    run = srv.aggregator.config.run_dir
    got = load_round(run, 2)
    assert got and all("lora_" in k for k in got), sorted(got)[:4]
    assert any(not np.array_equal(got[k], load_round(run, 0)[k]) for k in got)  # it trained
