"""Splitting one data set across simulated sites: IID, or label-skewed with a Dirichlet prior.

    parts = split_indices(labels, n_sites=3, alpha=0.3, seed=0)   # label skew; alpha=None: IID
    site_rows = parts[site_index]

Dirichlet label skew is the usual way to simulate non-IID sites: for each class, its rows are dealt to the sites
in proportions drawn from Dirichlet(alpha, ..., alpha). Small alpha (0.1) gives each site a few dominant
classes; large alpha (100) approaches IID. Draws are repeated (a new seed stream each time) until every site
holds at least `min_per_site` rows, so no site ends up empty. Everything is numpy and deterministic per seed:
every site process computes the same split and keeps its own part, so no data moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fl_plugins.errors import ConfigError

if TYPE_CHECKING:
    import numpy.typing as npt

MAX_DRAWS = 1000


def split_indices(
    labels: npt.ArrayLike, n_sites: int, alpha: float | None = None, *, seed: int = 0, min_per_site: int = 1
) -> list[np.ndarray]:
    """Row indices of each site's part, sorted; together they are a partition of range(len(labels)).
    `alpha=None`: IID (a seeded shuffle dealt into near-equal parts)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"split_indices: labels must be one-dimensional (got shape {labels.shape})")
    if n_sites < 1:
        raise ConfigError(f"split_indices: n_sites must be >= 1 (got {n_sites})")
    if len(labels) < n_sites * min_per_site:
        raise ConfigError(
            f"split_indices: {len(labels)} rows cannot give {n_sites} sites {min_per_site} row(s) "
            f"each; use fewer sites or more data"
        )
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_sites)]
    if not alpha > 0:
        raise ConfigError(f"split_indices: alpha must be > 0 (got {alpha}); use alpha=None for an IID split")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for rows in by_class:
            rows = rng.permutation(rows)
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites))[:-1] * len(rows)).astype(int)
            for site, chunk in enumerate(np.split(rows, cuts)):
                parts[site].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_per_site:
            return out
    raise ConfigError(
        f"split_indices: no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} gave every one of {n_sites} "
        f"sites {min_per_site} row(s); raise alpha or lower min_per_site"
    )


def label_counts(labels: npt.ArrayLike, parts: list[np.ndarray]) -> np.ndarray:
    """A (sites x classes) table of how many rows of each class each site holds, to print or check skew."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    return np.array([[int((labels[p] == c).sum()) for c in classes] for p in parts])
