"""The example's model and data: a small MLP classifying 8 overlapping Gaussian blobs in 16 dimensions.

The data is generated (seeded), so the example needs no download. `site_data(site)` gives one site's share,
split with Dirichlet label skew (alpha=0.3 over 3 sites): each site sees mostly two or three of the 8 classes,
so a model trained on one site alone misses the others, which is the point of federating. The validation set is
split the same way; `site_data("all")` gives the pooled data, on which the test compares the models.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_plugins.data import split_indices

CLASSES, DIM, SITES, ALPHA = 8, 16, 3, 0.3


def make_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(7).normal(0.0, 1.0, (CLASSES, DIM)).astype(np.float32)  # same for all splits
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = centers[y] + rng.normal(0.0, 0.8, (n, DIM)).astype(np.float32)
    return x.astype(np.float32), y


def site_data(site: str = "all", n_train: int = 4800, n_val: int = 1600) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) for `site` ("site-1".."site-3", or "all" for the pooled sets)."""
    out = []
    for n, seed in ((n_train, 1), (n_val, 2)):
        x, y = make_blobs(n, seed)
        if site != "all":
            k = int(site.rsplit("-", 1)[-1]) - 1
            rows = split_indices(y, SITES, ALPHA, seed=seed, min_per_site=32)[k]
            x, y = x[rows], y[rows]
        out.append(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
    return out[0], out[1]


def loaders(site: str, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    train, val = site_data(site)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=512)


class BlobClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
