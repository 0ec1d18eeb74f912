"""Every site's share of a built-in task's data: the rows (demo data or a .jsonl/.csv file), the labels as
indices, and the same seeded split on every site (each keeps its own part; the union of the validation parts is
the pooled validation set the baselines score on). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_plugins.data import split_indices
from fl_plugins.errors import ConfigError
from fl_plugins.tasks import demo_data
from fl_plugins.tasks.spec import TaskSpec


@dataclass
class Shares:
    train: list[list[dict]]  # per site
    val: list[list[dict]]  # per site; their union is the pooled validation set
    labels: tuple[str, ...] | None

    @property
    def pooled_val(self) -> list[dict]:
        return [r for part in self.val for r in part]


def load_rows(spec: TaskSpec) -> list[dict]:
    if spec.data == "demo:financial-sentiment":
        return demo_data.financial_sentiment(spec.rows, seed=spec.seed)
    if spec.data == "demo:instructions":
        return demo_data.instruction_pairs(spec.rows, seed=spec.seed)
    return demo_data.read_rows(spec.data)


def _label_index(spec: TaskSpec, rows: list[dict]) -> tuple[np.ndarray, tuple[str, ...]]:
    for i, r in enumerate(rows[:1000]):
        if "text" not in r or "label" not in r:
            raise ConfigError(
                f"{spec.data}: row {i} needs `text` and `label` fields for sequence-classification (got {sorted(r)})"
            )
    names = spec.labels or (demo_data.SENTIMENT_LABELS if spec.data == "demo:financial-sentiment" else None)
    if names is None:
        names = tuple(sorted({str(r["label"]) for r in rows}))
    out = []
    for i, r in enumerate(rows):
        v = r["label"]
        if isinstance(v, str) and v in names:
            out.append(names.index(v))
        elif isinstance(v, int | str) and str(v).isdigit() and int(v) < len(names):
            out.append(int(v))
        else:
            raise ConfigError(
                f"{spec.data}: row {i} has label {v!r}, which is neither a label name "
                f"({', '.join(names)}) nor an index below {len(names)}; fix the row or `task.labels`"
            )
    return np.array(out), tuple(names)


def shares(spec: TaskSpec, n_sites: int) -> Shares:
    """Every site's train and validation rows (the same on every site: seeded)."""
    rows = load_rows(spec)
    labels = None
    if spec.type == "sequence-classification":
        keys, labels = _label_index(spec, rows)
        rows = [{"text": r["text"], "label": int(k)} for r, k in zip(rows, keys, strict=True)]
    else:
        for i, r in enumerate(rows[:1000]):
            if "instruction" not in r or "response" not in r:
                raise ConfigError(
                    f"{spec.data}: row {i} needs `instruction` and `response` fields for causal-lm (got {sorted(r)})"
                )
        cats = sorted({str(r.get("category", "")) for r in rows})
        keys = np.array([cats.index(str(r.get("category", ""))) for r in rows])
    alpha = spec.alpha if spec.split == "dirichlet" else None
    parts = split_indices(keys, n_sites, alpha, seed=spec.split_seed, min_per_site=max(8, 2 * spec.batch_size))
    rng = np.random.default_rng(spec.split_seed + 1)
    train, val = [], []
    for p in parts:
        p = rng.permutation(p)
        k = max(1, int(round(len(p) * spec.validation_fraction)))
        val.append([rows[i] for i in p[:k]])
        train.append([rows[i] for i in p[k:]])
    return Shares(train, val, labels)
