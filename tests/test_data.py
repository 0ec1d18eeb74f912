"""fl_plugins.data: IID and Dirichlet label-skew splits are partitions, deterministic, and as skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from fl_plugins.data import label_counts, split_indices
from fl_plugins.errors import ConfigError

LABELS = np.random.default_rng(0).integers(0, 5, 3000)


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0, 100.0])
def test_split_is_a_deterministic_partition(alpha):
    parts = split_indices(LABELS, 4, alpha, seed=3, min_per_site=10)
    assert len(parts) == 4 and min(len(p) for p in parts) >= 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    again = split_indices(LABELS, 4, alpha, seed=3, min_per_site=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split_indices(LABELS, 4, alpha, seed=4, min_per_site=10)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _skew(alpha):
    """Mean over sites of the share of the site's largest class (1/5 for a perfectly IID split of 5 classes)."""
    counts = label_counts(LABELS, split_indices(LABELS, 4, alpha, seed=0))
    return float((counts.max(1) / counts.sum(1)).mean())


def test_small_alpha_skews_large_alpha_does_not():
    assert _skew(0.1) > 0.6 > 0.3 > _skew(100.0)
    assert _skew(None) < 0.25


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_sites": 0}, "n_sites must be >= 1"),
    ({"n_sites": 3, "alpha": 0.0}, "alpha must be > 0"),
    ({"n_sites": 3, "alpha": -1.0}, "alpha must be > 0"),
    ({"n_sites": 3000, "min_per_site": 2}, "cannot give 3000 sites 2 row(s) each"),
])  # fmt: skip
def test_bad_arguments_say_what_to_change(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_indices(LABELS, **kwargs)


def test_unlucky_draws_give_up_with_advice(monkeypatch):
    monkeypatch.setattr("fl_plugins.data.MAX_DRAWS", 5)
    one_class = np.zeros(6, dtype=int)  # alpha this small deals the class whole to one site: 6/0, never 3/3
    with pytest.raises(ConfigError, match="raise alpha or lower min_per_site"):
        split_indices(one_class, 2, 0.001, min_per_site=3)
