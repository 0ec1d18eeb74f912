"""fl_plugins.lightning under multi-process training: Lightning DDP with 2 CPU ranks (gloo) against a real
aggregator on loopback.

The site script runs as a subprocess (Lightning's own launcher re-runs it for rank 1), exactly as a user runs it:
the three-line FLARE loop on every rank, FL_SERVER / FL_SITE from the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning.pytorch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from conftest import load_round  # noqa: E402

SCRIPT = r"""
import json, os, sys
import torch
import lightning.pytorch as L
import fl_plugins.lightning as flare

OUT = sys.argv[1]


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))  # other weights per rank: the broadcast aligns them
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


model = Tiny()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, enable_progress_bar=False,
                    logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
flare.patch(trainer)
seen = []
while flare.is_running():
    input_model = flare.receive()
    assert input_model is not None
    trainer.validate(model, dataloaders=data())
    seen.append({"round": input_model.current_round, "total": input_model.total_rounds,
                 "has_params": input_model.params is not None})
    trainer.fit(model, train_dataloaders=data())
rank = trainer.global_rank
assert flare.receive() is None
torch.save(model.state_dict(), os.path.join(OUT, f"final-{rank}.pt"))
with open(os.path.join(OUT, f"rank-{rank}.json"), "w") as f:
    json.dump({"rank": rank, "seen": seen, "steps": trainer.global_step}, f)
flare.shutdown()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_two_cpu_ranks_two_rounds_one_update_per_round(server_factory, tmp_path: Path):
    srv = server_factory(rounds=2)  # no initial model: rank 0 offers its module's weights as round 0's
    script = tmp_path / "site.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env.update(FL_SERVER=srv.address, FL_SITE="site-ddp", MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=150)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert srv.wait() == 0

    ranks = {r: json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)}
    for r in (0, 1):  # both ranks ran 2 rounds and knew the round once validate had broadcast it; round 2's is the
        # final model's evaluation (the site sent metrics): validate only, so the step count below stays 2 rounds'
        assert [s["round"] for s in ranks[r]["seen"]] == [0, 1, 2], ranks[r]
        assert all(s["total"] == 2 and s["has_params"] for s in ranks[r]["seen"][:2]), ranks[r]
    steps = ranks[0]["steps"]
    assert steps == ranks[1]["steps"] == 2 * (64 // 8 // 2)  # DistributedSampler: half the batches per rank

    run = srv.aggregator.config.run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    updates = [u for u in records if u["event"] == "update"]
    assert [(u["round"], u["site"]) for u in updates] == [(0, "site-ddp"), (1, "site-ddp")]
    assert [u["weight"] for u in updates] == [steps // 2] * 2  # NUM_STEPS_CURRENT_ROUND: the round's global steps
    assert all("val_loss" in u["metrics"] for u in updates)
    (final,) = [e for e in records if e["event"] == "evaluation"]  # the final model, scored by rank 0's validate
    assert final["round"] == 2 and "val_loss" in final["sites"]["site-ddp"]["metrics"]

    final0 = torch.load(out / "final-0.pt")
    final1 = torch.load(out / "final-1.pt")
    got = load_round(run, 2)  # one site: the global model is what rank 0 trained and sent
    assert sorted(got) == sorted(final0)
    for k, v in final0.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=0, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(final1[k].numpy(), v.numpy(), err_msg=k)  # DDP kept the ranks equal
    initial = load_round(run, 0)  # rank 0's module (seed 0), offered as round 0's global model
    torch.manual_seed(0)
    seed0 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    for k, v in seed0.state_dict().items():
        np.testing.assert_array_equal(initial[f"net.{k}"], v.detach().numpy(), err_msg=k)
