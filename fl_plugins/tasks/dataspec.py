"""The data keys of a recipe's `task:` (`data`, `data_split`, `columns`) and the sites' own `data:`, checked when the
recipe loads (torch-free; spec.py's docstring shows the keys). What a path holds is datafiles.py's `source`; the
columns themselves are checked when the rows are read (shares.py), as only then are they known."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins._config import Checker
from fl_plugins.errors import ConfigError
from fl_plugins.tasks import datafiles

DEMO_DATA = {"demo:financial-sentiment": "sequence-classification", "demo:instructions": "causal-lm"}
COLUMNS = {"sequence-classification": ("text", "label"), "causal-lm": ("instruction", "response", "messages")}


@dataclass(frozen=True)
class DataKeys:
    data: str | None  # demo:... or an absolute path; None when every site has its own
    data_split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)


def parse_data(c: Checker, data: dict, ttype: str, site_data: Mapping[str, str | None]) -> DataKeys:
    """`task.data`, `task.data_split` and `task.columns`; each site's own `data:` checked where it exists."""
    split = data.get("data_split")
    if split is not None and (not isinstance(split, str) or not split.strip()):
        raise c.fail(
            "data_split", "must be the name of a split (a DatasetDict's, or a folder's train-*), e.g. train", split
        )
    shared = [n for n, d in site_data.items() if not d]
    dsrc = data.get("data")
    if dsrc is None:
        if shared or not site_data:
            names = f" (sites without their own `data:`: {', '.join(shared)})" if site_data else ""
            raise ConfigError(
                f"{c.source}: `task.data` is required{names}; name the data (see fl_plugins/tasks/spec.py), or give "
                "every site its own in `sites:`, e.g. [{name: site-1, data: site1.parquet}, ...]"
            )
    elif site_data and not shared:
        raise c.fail("data", "is not used: every site in `sites:` has its own `data:`; remove it", dsrc)
    out = DataKeys(
        None if dsrc is None else _data(c, dsrc, ttype, split), split, _columns(c, data.get("columns"), ttype)
    )
    for name, path in site_data.items():
        if path:
            _site_data(c.source, name, Path(path), split)
    return out


def check_sites(
    c: Checker,
    data: dict,
    ttype: str,
    dsrc: str | None,
    labels: tuple[str, ...] | None,
    site_data: Mapping[str, str | None],
) -> None:
    """What per-site data asks of the other keys: the label names (classification), no split without shared data."""
    own = [n for n, d in site_data.items() if d]
    if not own:
        return
    if len(own) == len(site_data) and "split" in data:
        must = "divides `task.data` among the sites without their own `data:`; every site has one: remove it"
        raise c.fail("split", must, data["split"])
    if ttype == "sequence-classification" and labels is None and dsrc != "demo:financial-sentiment":
        raise ConfigError(
            f"{c.source}: `task.labels` is required when sites bring their own data ({', '.join(own)}), so that "
            "every site numbers the labels alike; list the label names in index order, e.g. "
            "labels: [negative, neutral, positive]"
        )


def _data(c: Checker, dsrc: Any, ttype: str, split: str | None) -> str:
    """`task.data`: a demo data set that fits the task type, or a path (made absolute) `datafiles` can read."""
    if not isinstance(dsrc, str) or not dsrc:
        raise c.fail("data", f"must be demo:financial-sentiment, demo:instructions or {datafiles.SUPPORTED}", dsrc)
    if dsrc.startswith("demo:"):
        c.choice("data", dsrc, tuple(DEMO_DATA))
        if DEMO_DATA[dsrc] != ttype:
            raise c.fail("data", f"is a {DEMO_DATA[dsrc]} data set; this task is {ttype}", dsrc)
        if split is not None:
            raise c.fail("data_split", "picks a split of a DatasetDict folder; demo data has none: remove it", split)
        return dsrc
    p = resolve(c.source, dsrc)
    if not p.exists():
        raise ConfigError(
            f"{c.source}: `task.data`: {dsrc!r} does not exist (looked for {p}); the path is "
            "relative to the recipe file's folder"
        )
    try:
        datafiles.source(p, split)
    except ConfigError as e:
        raise ConfigError(f"{c.source}: `task.data`: {e}") from e
    return str(p)


def resolve(source: Path, path: str) -> Path:
    """`path` made absolute: relative paths start at the recipe file's folder."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else source.resolve().parent / p).resolve()


def _site_data(source: Path, site: str, p: Path, split: str | None) -> None:
    """A site's own data: checked like `task.data` where it exists here; elsewhere only its extension (the file
    need be only on that site, which reports a missing one when it starts)."""
    where = f"{source}: site {site!r}: `data`"
    if not p.exists():
        if p.suffix and p.suffix.lower() not in datafiles.SUFFIXES:
            raise ConfigError(f"{where}: {p} has the extension {p.suffix!r}; use {datafiles.SUPPORTED}")
        return
    try:
        datafiles.source(p, split)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _columns(c: Checker, v: Any, ttype: str) -> dict[str, str]:
    """`task.columns`: which of the data's columns holds each role the task reads."""
    if v is None:
        return {}
    roles = COLUMNS[ttype]
    example = "{text: sentence, label: sentiment}" if ttype == "sequence-classification" else "{messages: chat}"
    if not isinstance(v, dict) or not v:
        raise c.fail("columns", f"must be a mapping of {', '.join(roles)} to column names, e.g. {example}", v)
    c.keys(v, roles, "columns.")
    for k, col in v.items():
        if not isinstance(col, str) or not col:
            raise c.fail(f"columns.{k}", "must be a column name", col)
    if "messages" in v and ("instruction" in v or "response" in v):
        raise c.fail("columns", "names chat data (`messages`) or instruction/response columns, not both", v)
    return dict(v)
