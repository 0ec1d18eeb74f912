"""NVIDIA FLARE's own code run with the import swapped (issue 10): the patterns of three public FLARE files, written
here as tests of their own.

- `examples/advanced/multi-gpu/pt/client.py`: torchrun ranks where only rank 0 asks `is_running()` and the script
  broadcasts the answer itself; every rank calls `receive()`. The client API must issue no collective of its own.
- `FLModel.summary()`: per field that holds a value, a dict's length, an int's or a ParamsType's value, else the
  value's type (FLARE's `tests/unit_test/app_common/abstract/fl_model_test.py` cases, and more).
- `examples/advanced/llm_hf/client.py`: `fl_plugins.hf.patch(trainer, params_scope=..., server_key_prefix=...,
  local_epochs=...)` with FLARE's whole signature and meaning, and FLARE's refusals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, load_round

from fl_plugins.client.model import FLModel, ParamsType

# -- FLModel.summary() -----------------------------------------------------------------------------------------


def test_summary_counts_dicts_and_keeps_ints_and_the_params_type():
    """FLARE's own unit-test case: a dict field gives its length, an int or a ParamsType its value."""
    m = FLModel(params_type=ParamsType.FULL, params={"a": 100, "b": 200, "c": {"c1": 100}}, optimizer_params={},
                metrics={"loss": 100, "accuracy": 0.9}, start_round=1, current_round=100,
                total_rounds=12000)  # fmt: skip
    s = m.summary()
    assert s == {"params": 3, "metrics": 2, "params_type": ParamsType.FULL, "start_round": 1, "current_round": 100,
                 "total_rounds": 12000}  # fmt: skip
    assert s["params_type"] == "FULL"  # a str enum, as FLARE's


def test_summary_leaves_out_empty_fields_and_gives_the_type_of_anything_else():
    torch = pytest.importorskip("torch")
    tensors = {"w": torch.zeros(1000, 1000), "b": torch.zeros(3)}
    m = FLModel(params=tensors, meta={"NUM_STEPS_CURRENT_ROUND": 5}, current_round=0)
    # params given without a params_type: FULL (FLARE's rule); start_round 0, current_round 0 and the empty
    # optimizer_params / metrics are left out, as FLARE leaves out every field that is not truthy
    assert m.summary() == {"params": 2, "meta": 1, "params_type": ParamsType.FULL}
    odd = FLModel(params_type="diff", params=["not", "a", "dict"], metrics={"acc": 1.0}, start_round=2,
                  total_rounds=3.5)  # fmt: skip
    assert odd.summary() == {"params": list, "metrics": 1, "params_type": ParamsType.DIFF, "start_round": 2,
                             "total_rounds": float}  # fmt: skip
    assert FLModel().summary() == {}


def test_str_and_repr_show_the_summary_not_the_tensors():
    torch = pytest.importorskip("torch")
    m = FLModel(params={"w": torch.arange(50_000.0)}, current_round=2)
    for text in (str(m), repr(m)):
        assert text == "FLModel({'params': 1, 'params_type': <ParamsType.FULL: 'FULL'>, 'current_round': 2})"


# -- multi-GPU: the script syncs the ranks, the client API issues no collective -----------------------------------

MULTI_GPU_SCRIPT = r"""
import json, os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
import fl_plugins.client as flare   # the only line that differs from FLARE's multi-GPU client

OUT = sys.argv[1]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(100 + rank)  # other weights per rank: only rank 0's global model (via DDP) aligns them
net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
g = torch.Generator().manual_seed(7 + rank)
x = torch.randn(32, 4, generator=g)
y = torch.sin(x.sum(dim=1, keepdim=True))
flare.init(rank=f"{rank}")
received = []
while True:
    running = [flare.is_running()] if rank == 0 else [None]   # only rank 0 asks the aggregator
    dist.broadcast_object_list(running, src=0)                 # the script tells the other ranks
    if not running[0]:
        break
    input_model = flare.receive()                              # every rank calls it; None on rank 1
    if rank == 0:
        net.load_state_dict(input_model.params)
        received.append(input_model.current_round)
    else:
        received.append(input_model)
    ddp = DDP(net)                                             # collectives: rank 0's weights reach rank 1
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"loss": loss.item()},
                                 meta={"NUM_STEPS_CURRENT_ROUND": 3}))
after = flare.is_running() if rank != 0 else None   # FLARE: other ranks never learn the job's end by themselves
torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, os.path.join(OUT, f"final-{rank}.pt"))
with open(os.path.join(OUT, f"rank-{rank}.json"), "w") as f:
    json.dump({"received": received, "is_running_after": after}, f)
flare.shutdown()
del ddp, opt  # DDP's reducer goes before its process group (else a rank can abort at exit)
dist.barrier()
dist.destroy_process_group()
"""


def _run_group(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int | None, str]:
    """Run `cmd` in its own process group; on timeout kill that group (torchrun and its workers). Returns
    (returncode or None on timeout, the output's tail)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-6000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out[-6000:]


@pytest.mark.integration
@pytest.mark.slow
def test_multi_gpu_script_where_only_rank_0_asks_is_running(server_factory, tmp_path: Path):
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.manual_seed(0)
    start = {k: v.detach().numpy().copy()
             for k, v in torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                             torch.nn.Linear(8, 1)).state_dict().items()}  # fmt: skip
    srv = server_factory(rounds=2, initial=start, evaluate_final=False)  # (the rounds seen are the point)
    script = tmp_path / "client.py"
    script.write_text(MULTI_GPU_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env.update(FL_SERVER=srv.address, FL_SITE="site-ddp", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]  # fmt: skip
    code, tail = _run_group(cmd, env, tmp_path, timeout=120)
    assert code is not None, "the ranks hung (the client API's collectives did not pair with the script's):\n" + tail
    assert code == 0, tail
    assert srv.wait() == 0

    ranks = {r: json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0]["received"] == [0, 1]
    assert ranks[1]["received"] == [None, None]  # receive() on rank 1: None, and no connection
    assert ranks[1]["is_running_after"] is True  # as in FLARE: rank 1's is_running() stays True
    run = srv.aggregator.config.run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(u["round"], u["site"], u["weight"]) for u in records if u["event"] == "update"] == [
        (0, "site-ddp", 3), (1, "site-ddp", 3)]  # fmt: skip
    assert sorted(srv.aggregator.sites) == ["site-ddp"]  # rank 1 never connected
    final0, final1 = torch.load(out / "final-0.pt"), torch.load(out / "final-1.pt")
    got = load_round(run, 2)  # one site: the global model is what rank 0 trained and sent
    for k, v in final0.items():
        np.testing.assert_array_equal(final1[k].numpy(), v.numpy(), err_msg=k)  # DDP kept the ranks in step
        np.testing.assert_allclose(got[k], v.numpy(), rtol=0, atol=1e-6, err_msg=k)


# -- fl_plugins.hf.patch() with FLARE's signature -----------------------------------------------------------------

N, BATCH = 64, 16  # 4 optimizer steps per epoch


def _hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import fl_plugins.hf as flare

    return flare


def tiny_llama(seed: int):
    """A tiny random causal LM with tied input/output embeddings (as FLARE's LLM example's GPT-Neo)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))  # fmt: skip


def tiny_bert(seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=3))  # fmt: skip


def rows(n: int = N, seed: int = 5, causal: bool = False):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    if causal:
        return [{"input_ids": r, "attention_mask": torch.ones(8, dtype=torch.long), "labels": r} for r in ids]
    return [{"input_ids": r, "attention_mask": torch.ones(8, dtype=torch.long), "labels": r[0] % 3} for r in ids]


def hf_args(tmp_path: Path, **kw: object):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, learning_rate=5e-3,
                lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                use_cpu=True, disable_tqdm=True, max_steps=50)  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def state_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _records(run: Path, name: str) -> list[dict]:
    path = run / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.integration
def test_hf_patch_with_flares_llm_arguments_prefixes_the_names_on_the_wire(server_factory, site, tmp_path):
    """FLARE's LLM example: patch(trainer, params_scope="auto", server_key_prefix="model.", local_epochs=...). The
    aggregator's model is FLARE's server-side wrapper (`model.` + the site's names): the prefix comes off what
    arrives (loaded before evaluate), goes on what is sent, and one round is one epoch whatever max_steps says."""
    flare = _hf()
    from transformers import Trainer

    start = tiny_llama(seed=0)
    srv = server_factory(rounds=2, initial={"model." + k: v for k, v in state_np(start).items()}, evaluate_final=False)
    site(srv)
    model = tiny_llama(seed=1)  # other weights: only loading the global model makes round 0 start from it
    tr = Trainer(model=model, args=hf_args(tmp_path), train_dataset=rows(causal=True),
                 eval_dataset=rows(16, seed=9, causal=True))  # fmt: skip
    assert flare.patch(tr, params_scope="auto", server_key_prefix="model.", local_epochs=1, stream_metrics=True) is tr
    assert (tr.args.max_steps, tr.args.num_train_epochs) == (-1, 1.0)  # local_epochs is the round's budget
    before_training, names = [], []
    while flare.is_running():
        input_model = flare.receive()
        names.append(sorted(input_model.params))
        tr.evaluate()  # the global model, loaded under the model's own names
        before_training.append(state_np(model))
        tr.train()
    assert srv.wait() == 0
    own = sorted(model.state_dict())
    assert "lm_head.weight" in own  # "auto" on a plain model: its whole state_dict, tied weights included
    assert names == [sorted("model." + k for k in own)] * 2
    for k, v in state_np(start).items():
        np.testing.assert_array_equal(before_training[0][k], v, err_msg=k)
    run = srv.aggregator.config.run_dir
    final = load_round(run, 2)  # one site: the global model is its last update, under the wire names
    assert sorted(final) == sorted("model." + k for k in own)
    for k, v in state_np(model).items():
        np.testing.assert_allclose(final["model." + k], v, rtol=0, atol=1e-6, err_msg=k)
    updates = [u for u in _records(run, "metrics.jsonl") if u["event"] == "update"]
    assert [u["weight"] for u in updates] == [N // BATCH] * 2  # one epoch of 4 steps per round, not max_steps=50
    assert all("eval_loss" in u["metrics"] for u in updates)
    assert [r["key"] for r in _records(run, "logs.jsonl")].count("loss") == 2 * N // BATCH  # stream_metrics=True


@pytest.mark.integration
def test_hf_patch_restore_state_false_local_steps_and_the_whole_model(server_factory, site, tmp_path):
    """restore_state=False: each train() call gets its own LR schedule (a linear one over local_steps=3 ends at
    0 every round; restore_state=True spans both rounds: see test_hf.py). "auto" on a plain model sends its
    whole state_dict, frozen weights too; stream_metrics is off by default, as in FLARE."""
    flare = _hf()
    from transformers import Trainer

    srv = server_factory(rounds=2, initial=None)  # the site offers its weights as round 0's
    site(srv)
    model = tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    tr = Trainer(model=model, args=hf_args(tmp_path), train_dataset=rows())
    flare.patch(tr, restore_state=False, local_steps=3)
    assert tr.args.max_steps == 3
    lrs = []
    while flare.is_running():
        flare.receive()
        tr.train()
        lrs.append(tr.lr_scheduler.get_last_lr()[0])
    assert srv.wait() == 0
    assert lrs == [0.0, 0.0]
    run = srv.aggregator.config.run_dir
    assert [u["weight"] for u in _records(run, "metrics.jsonl") if u["event"] == "update"] == [3, 3]
    final = load_round(run, 2)
    assert sorted(final) == sorted(model.state_dict())
    assert "bert.embeddings.word_embeddings.weight" in final  # frozen, and still part of the model that travels
    assert not [r for r in _records(run, "logs.jsonl") if r["key"] == "loss"]


def test_params_scope_picks_what_travels():
    flare = _hf()
    peft = pytest.importorskip("peft")
    plain = tiny_bert()
    for p in plain.bert.embeddings.parameters():
        p.requires_grad_(False)
    assert sorted(flare.exchanged_state(plain, params_scope="auto")) == sorted(plain.state_dict())
    assert sorted(flare.exchanged_state(plain, params_scope="MODEL")) == sorted(plain.state_dict())
    trainable = flare.exchanged_state(plain, params_scope="trainable")  # the callback's default: frozen stay home
    assert trainable and not any(k.startswith("bert.embeddings.") for k in trainable)
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                             target_modules=["query", "value"]))  # fmt: skip
    adapter = flare.exchanged_state(lora, params_scope="adapter")
    assert adapter and all("lora_" in k or "classifier" in k for k in adapter), list(adapter)
    assert sorted(flare.exchanged_state(lora, params_scope="auto")) == sorted(adapter)
    whole = flare.exchanged_state(lora, params_scope="model")
    assert any("lora_A" in k for k in whole) and any("word_embeddings" in k for k in whole)  # base weights too
    assert len(whole) > len(adapter)


REFUSALS = [
    (
        {"local_epochs": 1, "local_steps": 3},
        {},
        r"patch\(\): give local_steps or local_epochs, not both \(got local_steps=3, local_epochs=1\)",
    ),
    ({"local_steps": 2.5}, {}, r"local_steps must be a whole number of optimizer steps \(got 2.5\)"),
    ({"local_epochs": 0}, {}, r"local_epochs must be > 0 and finite \(got 0\)"),
    ({"local_steps": float("inf")}, {}, r"local_steps must be > 0 and finite \(got inf\)"),
    (
        {"params_scope": "everything"},
        {},
        r"params_scope must be one of 'auto', 'model', 'adapter', 'trainable' \(got 'everything'\)",
    ),
    (
        {"params_scope": "adapter"},
        {},
        r"params_scope='adapter' needs a PEFT model \(got BertForSequenceClassification\)",
    ),
    ({"server_key_prefix": 3}, {}, r"server_key_prefix must be a non-empty string such as 'model.' \(got 3\)"),
    (
        {},
        {"deepspeed": {"zero_optimization": {"stage": 2}}},
        r"DeepSpeed is not supported yet \(TrainingArguments.deepspeed=\{'zero_optimization'.*Train with DDP instead",
    ),
    ({}, {"fsdp": "full_shard"}, r"patch\(\) under FSDP \(TrainingArguments.fsdp='full_shard'\).*FLTrainerCallback"),
    (
        {},
        {"load_best_model_at_end": True},
        r"load_best_model_at_end=True cannot be federated.*Set load_best_model_at_end=False",
    ),
]


@pytest.mark.parametrize(("kwargs", "args_set", "message"), REFUSALS,
                         ids=["both-budgets", "fractional-steps", "zero-epochs", "endless-steps", "unknown-scope",
                              "adapter-no-peft", "bad-prefix", "deepspeed", "fsdp", "load-best"])  # fmt: skip
def test_hf_patch_refuses_what_flare_refuses_before_connecting(monkeypatch, tmp_path, kwargs, args_set, message):
    """Each refusal names the setting, the value and the fix, and comes before any connection (no FL_SERVER)."""
    flare = _hf()
    from transformers import Trainer

    from fl_plugins.errors import ConfigError

    monkeypatch.delenv("FL_SERVER", raising=False)
    tr = Trainer(model=tiny_bert(), args=hf_args(tmp_path), train_dataset=rows())
    for k, v in args_set.items():  # set on the built trainer's arguments: the DeepSpeed engine need not exist
        setattr(tr.args, k, v)
    with pytest.raises(ConfigError, match=message):
        flare.patch(tr, **kwargs)
    assert not any(type(cb).__name__ == "FLTrainerCallback" for cb in tr.callback_handler.callbacks)


@pytest.mark.integration
def test_hf_patch_once_per_trainer_and_one_trainer_per_process(server_factory, site, tmp_path):
    flare = _hf()
    from transformers import Trainer

    from fl_plugins.errors import ConfigError

    srv = server_factory(rounds=1, initial=None)
    site(srv)
    tr = Trainer(model=tiny_bert(), args=hf_args(tmp_path), train_dataset=rows())
    assert flare.patch(tr, local_steps=2) is tr
    assert flare.patch(tr, local_steps=2) is tr  # the same settings again: nothing changes
    with pytest.raises(ConfigError, match=r"already patched with other settings \(local_steps=2, now 3\)"):
        flare.patch(tr, local_steps=3)
    other = Trainer(model=tiny_bert(), args=hf_args(tmp_path / "other"), train_dataset=rows())
    with pytest.raises(ConfigError, match=r"another Trainer .* is already patched in this process.*flare.shutdown"):
        flare.patch(other)
    flare.shutdown()  # patch() may be called again afterwards: it connects anew
    assert flare.patch(tr, local_steps=2) is tr
    assert flare.is_running() and flare.receive().current_round == 0
    with pytest.raises(ConfigError, match=r"another Trainer .* is already patched in this process"):
        flare.patch(other)
