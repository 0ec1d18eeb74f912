"""A Hugging Face Trainer site for tests/test_scaffold.py, in a process of its own (the flare module is one per
process): `python _scaffold_hf_site.py DATA.npz STEPS LR ADDRESS...` joins each aggregator in turn as site "hf"
(FL_SERVER, as `fl-plugins run` sets it), trains a linear least-squares model on DATA.npz's rows with full-batch
SGD at a constant rate, STEPS optimizer steps a round (FLTrainerCallback(local_steps=STEPS)), one train() for
every round, and shuts the flare module down before the next aggregator."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

import fl_plugins.hf as flare


class Line(torch.nn.Module):
    """y = w . x + b with the mean squared error, under the Lightning site's tensor names (net.weight, net.bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}


def main(data: str, steps: str, lr: str, *addresses: str) -> None:
    rows = np.load(data)
    x, y = torch.from_numpy(rows["x"]), torch.from_numpy(rows["y"])
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(y))]
    os.environ["FL_SITE"] = "hf"
    for address in addresses:
        os.environ["FL_SERVER"] = address
        model = Line()  # its weights do not matter: round 0 loads the aggregator's initial model
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=len(y), learning_rate=float(lr),
                                     lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                                     save_strategy="no", logging_strategy="no", report_to=[], seed=0, use_cpu=True,
                                     disable_tqdm=True)  # fmt: skip
            sgd = torch.optim.SGD(model.parameters(), lr=float(lr))
            trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(sgd, None),
                              callbacks=[flare.FLTrainerCallback(local_steps=int(steps))])  # fmt: skip
            trainer.train()
        flare.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
