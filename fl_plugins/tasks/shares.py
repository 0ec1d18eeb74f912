"""Every site's share of a built-in task's data: the rows, with the recipe's columns (`task.columns`) renamed to the
roles the task reads, the labels as indices, and each site's train/validation parts (the union of the validation
parts is the pooled validation set the baselines score on). numpy only (`datasets` for some files: datafiles.py).

A site with its own `data:` (recipe.py's SiteSpec) keeps that file's rows, split into train and validation by
`task.validation_fraction` (seeded). `task.data` (demo data or a file) is split among the other sites by
`task.split`, the same seeded split on every site, each keeping its own part. A site reads only what it uses:
`site_share`; the baselines read every site's: `shares`.

The rows a task reads: `{"text": str, "label": int}` (sequence-classification), `{"instruction": str, "response":
str}` or `{"messages": [{"role": str, "content": str}, ...]}` (causal-lm; an optional `category` column is kept,
the key the split skews by).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.data import split_indices
from fl_plugins.errors import ConfigError
from fl_plugins.tasks import datafiles, demo_data
from fl_plugins.tasks.spec import TaskSpec

_NUMBER = re.compile(r"-?\d+(\.\d+)?")  # a label name that sorts (and never counts as an index) as a number


@dataclass
class Shares:
    train: list[list[dict]]  # per site
    val: list[list[dict]]  # per site; their union is the pooled validation set
    labels: tuple[str, ...] | None

    @property
    def pooled_val(self) -> list[dict]:
        return [r for part in self.val for r in part]


def load_rows(spec: TaskSpec, path: str | None = None) -> list[dict]:
    """The rows of `path` (a site's own data), else of `task.data`, with the task's columns (`task.columns`)."""
    src = path or spec.data
    if src == "demo:financial-sentiment":
        return demo_data.financial_sentiment(spec.rows, seed=spec.seed)
    if src == "demo:instructions":
        return demo_data.instruction_pairs(spec.rows, seed=spec.seed)
    if src is None:
        raise ConfigError("task.data is not set and no site data was given; name the data in the recipe")
    if not Path(src).exists():
        raise ConfigError(
            f"{src}: the data does not exist on this site; a path in the recipe is relative to the recipe file's "
            "folder (a site's `data:` need exist only on that site)"
        )
    rows, found = datafiles.read(src, spec.data_split)
    return with_columns(spec, rows, found, src)


def with_columns(spec: TaskSpec, rows: list[dict], found: list[str], where: str) -> list[dict]:
    """`rows` with the roles the task reads (the module docstring), from the columns `task.columns` names (or the
    default names). A missing column is a ConfigError that lists the columns found and the key to set."""
    cols = dict(spec.columns)
    roles: tuple[str, ...]
    if spec.type == "sequence-classification":
        roles = ("text", "label")
    elif "messages" in cols or ("messages" in found and not ({"instruction", "response"} & cols.keys())):
        roles = ("messages",)
    else:
        roles = ("instruction", "response")
    for role in roles:
        col = cols.get(role, role)
        if col not in found:
            hint = " (or `task.columns.messages` for chat data)" if role in ("instruction", "response") else ""
            raise ConfigError(
                f"{where}: no column {col!r} for the {role} (`task.columns.{role}`); the columns found: "
                f"{', '.join(found) or 'none'}. Set `task.columns.{role}` to the column that holds it{hint}"
            )
    out = []
    for i, r in enumerate(rows):
        row = {role: r.get(cols.get(role, role)) for role in roles}
        for role, v in row.items():
            if v is None:
                raise ConfigError(f"{where}: row {i} has no value in column {cols.get(role, role)!r} ({role})")
            if role in ("text", "instruction", "response"):
                row[role] = str(v)
        if "messages" in row:
            row["messages"] = _messages(row["messages"], where, i)
        if "category" in r and spec.type == "causal-lm":
            row["category"] = r["category"]
        out.append(row)
    return out


def _messages(v: Any, where: str, i: int) -> list[dict]:
    ok = isinstance(v, list) and v and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)
    if not ok:
        raise ConfigError(
            f"{where}: row {i}: the messages must be a non-empty list of {{role, content}} mappings "
            f"(got {str(v)[:120]!r})"
        )
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in v]


def _label_value(v: Any) -> Any:
    """A whole float as the integer it is (a parquet column of integers with a gap reads as floats: 2.0 is 2)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _label_text(v: Any) -> str:
    """A label value as the name it is matched by: a bool as JSON writes it (`true`, `false`), anything else str()."""
    v = _label_value(v)
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _label_names(spec: TaskSpec, rows: list[dict]) -> tuple[str, ...]:
    """`task.labels`, the demo's names, else the data's own label values as names, in order: numerically when every
    one is a number (so "2" comes before "10"), else as strings (`false` before `true`)."""
    names = spec.labels or (demo_data.SENTIMENT_LABELS if spec.data == "demo:financial-sentiment" else None)
    if names is not None:
        return tuple(names)
    found = {_label_text(r["label"]) for r in rows}
    return tuple(sorted(found, key=float) if all(_NUMBER.fullmatch(n) for n in found) else sorted(found))


def _label_index(spec: TaskSpec, rows: list[dict], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each row's label as an index into the label names (`_label_names`). A value is matched by its text against
    the names first (a bool also without regard to case: `True` matches `true`); only a value that matches no name
    and is an integer (or a CSV string of digits; a bool is 0 or 1) is an index, and never when the names are
    themselves numbers (ratings `task.labels: ["1", "2", "3"]`: the value 1 is the name "1", and 0 is an error)."""
    names = _label_names(spec, rows)
    exact: dict[str, int] = {}
    folded: dict[str, int] = {}
    for i, n in enumerate(names):
        exact.setdefault(n, i)
        folded.setdefault(n.lower(), i)
    numbered = all(_NUMBER.fullmatch(n) for n in names)
    out = []
    for i, r in enumerate(rows):
        v = _label_value(r["label"])
        k = exact.get(_label_text(v), folded.get(str(v).lower()) if isinstance(v, bool) else None)
        if k is None and not numbered:
            if isinstance(v, int) and 0 <= v < len(names):
                k = int(v)
            elif isinstance(v, str) and v.isdigit() and int(v) < len(names):
                k = int(v)
        if k is None:
            why = "not one of the label names" if numbered else "neither a label name"
            index = "" if numbered else f" nor an index below {len(names)}"
            raise ConfigError(
                f"{where}: row {i} has label {v!r}, which is {why} ({', '.join(names)}){index}; fix the row or "
                "`task.labels` (the label names, in index order)"
            )
        out.append(k)
    return np.array(out, dtype=np.int64), names


def _keyed(spec: TaskSpec, rows: list[dict], where: str) -> tuple[list[dict], np.ndarray, tuple[str, ...] | None]:
    """The rows (labels as indices), the key a skewed split divides by, and the label names."""
    if spec.type == "sequence-classification":
        keys, labels = _label_index(spec, rows, where)
        return [{"text": r["text"], "label": int(k)} for r, k in zip(rows, keys, strict=True)], keys, labels
    cats = sorted({str(r.get("category", "")) for r in rows})
    return rows, np.array([cats.index(str(r.get("category", ""))) for r in rows]), None


def _train_val(spec: TaskSpec, rows: list[dict], part: np.ndarray, rng: np.random.Generator) -> tuple[list, list]:
    p = rng.permutation(part)
    k = max(1, int(round(len(p) * spec.validation_fraction)))
    return [rows[i] for i in p[k:]], [rows[i] for i in p[:k]]


def _shared(spec: TaskSpec, n: int) -> tuple[list[tuple[list, list]], tuple[str, ...] | None]:
    """`task.data` split among `n` sites: each one's (train, validation), and the label names."""
    rows, keys, labels = _keyed(spec, load_rows(spec), str(spec.data))
    alpha = spec.alpha if spec.split == "dirichlet" else None
    parts = split_indices(keys, n, alpha, seed=spec.split_seed, min_per_site=max(8, 2 * spec.batch_size))
    rng = np.random.default_rng(spec.split_seed + 1)
    return [_train_val(spec, rows, p, rng) for p in parts], labels


def _own(spec: TaskSpec, site: str, path: str) -> tuple[tuple[list, list], tuple[str, ...] | None]:
    """A site's own data, split into (train, validation) by `validation_fraction` (seeded), and the label names."""
    rows, _, labels = _keyed(spec, load_rows(spec, path), path)
    if len(rows) < 2:
        raise ConfigError(
            f"{path}: site {site!r}'s data has {len(rows)} row(s); it needs at least 2 (one to train on, one to "
            "validate)"
        )
    rng = np.random.default_rng(spec.split_seed + 1)
    return _train_val(spec, rows, np.arange(len(rows)), rng), labels


def site_share(spec: TaskSpec, site_data: Mapping[str, str | None], site: str) -> Shares:
    """One site's train and validation rows only (`site_data`: every site's own data path, or None for a share of
    `task.data`, in the recipe's order): `Shares` with that one site."""
    path = site_data[site]
    if path:
        (train, val), labels = _own(spec, site, path)
        return Shares([train], [val], labels)
    others = [n for n, d in site_data.items() if not d]
    parts, labels = _shared(spec, len(others))
    train, val = parts[others.index(site)]
    return Shares([train], [val], labels)


def shares(spec: TaskSpec, site_data: Mapping[str, str | None] | int) -> Shares:
    """Every site's train and validation rows (seeded: the same on every site), in the order of `site_data`: every
    site's own data path, or None for a share of `task.data`; a count: that many sites, none with its own."""
    if isinstance(site_data, int):
        site_data = {f"site-{i}": None for i in range(1, site_data + 1)}
    others = [n for n, d in site_data.items() if not d]
    parts, labels = _shared(spec, len(others)) if others else ([], None)
    train, val = [], []
    for name, path in site_data.items():
        if path:
            (t, v), labels = _own(spec, name, path)
        else:
            t, v = parts[others.index(name)]
        train.append(t)
        val.append(v)
    return Shares(train, val, labels)
