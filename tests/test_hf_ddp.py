"""fl_plugins.hf under torchrun: 2 CPU processes (gloo) train one site with the HF Trainer's DDP; only the main
process talks to the aggregator and sends; every process loads the same global model each round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from conftest import SiteThread, free_port, load_round  # noqa: E402

SCRIPT = r"""
import json, os, sys
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
import fl_plugins.hf as flare

OUT = sys.argv[1]
rank = int(os.environ["RANK"])
torch.manual_seed(rank)  # other weights per process: only the broadcast of the global model aligns them
model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=32, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0))


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(1, 50, (64, 8), generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 3}


args = TrainingArguments(output_dir=os.path.join(OUT, "hf"), per_device_train_batch_size=8, max_steps=2,
                         learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
                         logging_steps=1, disable_tqdm=True)
from transformers import TrainerCallback


class KeepTrained(TrainerCallback):  # the weights the last step trained, before the job's final model is loaded
    def on_step_end(self, args, state, control, model=None, **kwargs):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(sd, os.path.join(OUT, f"trained-{rank}.pt"))


cb = flare.FLTrainerCallback()
trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[KeepTrained(), cb])
trainer.train()
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(OUT, f"final-{rank}.pt"))
with open(os.path.join(OUT, f"rank-{rank}.json"), "w") as f:
    json.dump({"rank": rank, "process_index": args.process_index, "steps": trainer.state.global_step}, f)
flare.shutdown()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_only_the_main_one_talks(server_factory, tmp_path: Path):
    # no initial model: the main process offers its model's weights. An anchor site sends the global model back
    # with an overwhelming weight, so round 1's global model differs from what the DDP site trained in round 0:
    # only if process 1 receives it too do the two processes start round 1 (and end it) with equal weights.
    srv = server_factory(rounds=2, min_sites=2)
    anchor = SiteThread(srv.address, "anchor", lambda r, p: (p, "FULL", 1e11))
    anchor.start()
    script = tmp_path / "site.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env.update(FL_SERVER=srv.address, FL_SITE="site-ddp", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert srv.wait() == 0

    ranks = {r: json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert [ranks[r]["process_index"] for r in (0, 1)] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 2 rounds x max_steps 2, one schedule over both
    run = srv.aggregator.config.run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    updates = [u for u in records if u["event"] == "update"]
    anchor.join(30)
    assert not anchor.is_alive() and anchor.error is None
    ddp = [(u["round"], u["weight"]) for u in updates if u["site"] == "site-ddp"]
    assert ddp == [(0, 2), (1, 2)]  # one update per round, from the main process only
    assert sorted(srv.aggregator.sites) == ["anchor", "site-ddp"]  # process 1 never connected
    trained0, trained1 = torch.load(out / "trained-0.pt"), torch.load(out / "trained-1.pt")
    for k, v in trained0.items():  # process 1 got round 1's global model: both trained from it, in step
        np.testing.assert_allclose(trained1[k].numpy(), v.numpy(), rtol=0, atol=1e-6, err_msg=k)
    initial, global1 = load_round(run, 0), load_round(run, 1)
    for k, v in initial.items():  # the anchor held the global model at round 0's
        np.testing.assert_allclose(global1[k], v, rtol=0, atol=1e-6, err_msg=k)
    final = load_round(run, 2)
    assert any(not np.allclose(final[k], trained0[k].numpy()) for k in final)  # (anchor again: back to initial)
    for rank in (0, 1):  # at the end every process holds the job's final global model (rank 0's, broadcast)
        got = torch.load(out / f"final-{rank}.pt")
        for k, v in final.items():
            np.testing.assert_allclose(got[k].numpy(), v, rtol=0, atol=1e-6, err_msg=f"rank {rank}: {k}")
