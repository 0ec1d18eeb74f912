"""What a built-in task's `task.data` (or a site's `data:`) may name, and reading its rows.

    data.jsonl              one JSON object a line
    data.json               a JSON list of objects, or JSON lines
    data.csv                a header row, then one row a line (every value a string: CSV has no types)
    data.parquet            read with `datasets` (pyarrow)
    folder/ (save_to_disk)  a Hugging Face `Dataset`, or a `DatasetDict` (its `train` split, or `task.data_split`)
    folder/ (files)         every data file under it, in path order (shards of one data set: one format);
                            when the files are named by split, one split's (below)

A folder of files named by split, as a Hugging Face Hub data set is stored (`data/train-00000-of-00001.parquet`
and `data/test-00000-of-00001.parquet`, or `train/` and `test/` folders; the split names `SPLIT_NAMES` and
`task.data_split`), is read one split at a time: `task.data_split`, else the only split there is, else `train`
(the site's log says which it took), else an error naming the splits found. Such a folder may hold no data file
outside the splits.

`source(path, split)` says what a path holds without reading its rows (at recipe load: nothing heavy is
imported); `read(path, split)` returns the rows and the column names found. `datasets` is imported only for
parquet files and `save_to_disk` folders; the text formats are read with the standard library (demo_data.py), so
a CSV value stays the string it was and a bad line is named with its number.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError
from fl_plugins.tasks import demo_data

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SUPPORTED = "a .jsonl, .json, .csv or .parquet file, a `save_to_disk` folder, or a folder of such files"
SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test", "eval")  # besides `task.data_split`'s
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """What a data path holds: `kind` is a suffix (".jsonl" ...), "dataset" or "datasetdict"; `files` the data
    files in read order (one for a file, every shard for a folder of files, none for a `save_to_disk` folder)."""

    path: Path
    kind: str
    files: tuple[Path, ...] = ()
    split: str | None = None  # a DatasetDict's split to read, or the split a folder's `files` are
    note: str = ""  # how the split was chosen, when the recipe did not name it (read() logs it)


def source(path: str | Path, split: str | None = None) -> Source:
    """What `path` holds (it must exist); ConfigError naming the path and what to change otherwise. `split`
    (`task.data_split`) picks a DatasetDict's split or a split of a folder's files; it is an error for anything
    else."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"{p}: unsupported data file extension {p.suffix or '(none)'!r}; use {SUPPORTED}")
        return _no_split(Source(p, p.suffix.lower(), (p,)), split)
    if not p.is_dir():
        raise ConfigError(f"{p}: does not exist")
    if (p / "dataset_dict.json").is_file():
        splits = _splits(p)
        want = split or "train"
        if want not in splits:
            raise ConfigError(
                f"{p}: a DatasetDict with the splits {', '.join(splits)}, none named {want!r}; set "
                f"`task.data_split` to one of them"
            )
        return Source(p, "datasetdict", (), want)
    if (p / "dataset_info.json").is_file() and (p / "state.json").is_file():
        return _no_split(Source(p, "dataset"), split)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES and not _hidden(f, p))
    if not files:
        raise ConfigError(
            f"{p}: a folder with no data files ({', '.join(SUFFIXES)}) and no `save_to_disk` data set "
            "(dataset_info.json or dataset_dict.json); point the recipe at the data"
        )
    kinds = sorted({f.suffix.lower() for f in files})
    if len(kinds) > 1:
        raise ConfigError(f"{p}: a folder of data files mixes formats ({', '.join(kinds)}); keep one format in it")
    return _folder_split(Source(p, kinds[0], tuple(files)), split)


def _no_split(s: Source, split: str | None) -> Source:
    if split is not None:
        raise ConfigError(
            f"{s.path}: `task.data_split` picks a split of a DatasetDict folder or of a folder of files named by split "
            f"(train-*.parquet, train/); this is neither: remove it"
        )
    return s


def file_split(rel: Path, names: Collection[str]) -> str | None:
    """The split of the data file at `rel` (relative to the data folder) by the Hub's naming: a folder on its path
    named for the split (`train/0000.parquet`), else a file name that starts with it followed by `-`, `_`, `.` or a
    digit (`train-00000-of-00001.parquet`, `test.jsonl`); None when it follows neither."""
    for part in rel.parts[:-1]:
        if part in names:
            return part
    hits = [n for n in names if re.match(rf"{re.escape(n)}(?=[-_.0-9])", rel.name)]
    return max(hits, key=len) if hits else None


def _folder_split(s: Source, split: str | None) -> Source:
    """A folder of files, or, when they are named by split, the files of one split (the module docstring)."""
    names = (*SPLIT_NAMES, split) if split else SPLIT_NAMES
    of = {f: file_split(f.relative_to(s.path), names) for f in s.files}
    found = sorted({x for x in of.values() if x is not None})
    if not found:
        return _no_split(s, split)
    outside = [str(f.relative_to(s.path)) for f, x in of.items() if x is None]
    if outside:
        raise ConfigError(
            f"{s.path}: its data files are named by split ({', '.join(found)}), but {', '.join(outside[:3])}"
            f"{' ...' if len(outside) > 3 else ''} belongs to none; move it out, or name it for its split "
            "(train-0.parquet, or a train/ folder)"
        )
    note = ""
    if split is None:
        if len(found) > 1 and "train" not in found:
            raise ConfigError(
                f"{s.path}: its data files hold the splits {', '.join(found)}, none named 'train'; set "
                "`task.data_split` to the one to train on"
            )
        split = found[0] if len(found) == 1 else "train"
        if len(found) > 1:
            note = f"the {split} split (of {', '.join(found)}; `task.data_split` picks another)"
    elif split not in found:
        raise ConfigError(
            f"{s.path}: its data files hold the splits {', '.join(found)}, none named {split!r}; set "
            "`task.data_split` to one of them"
        )
    return Source(s.path, s.kind, tuple(f for f in s.files if of[f] == split), split, note)


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in f.relative_to(root).parts)


def _splits(p: Path) -> list[str]:
    try:
        splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{p}/dataset_dict.json: not a `save_to_disk` DatasetDict record ({e})") from e
    if not isinstance(splits, list) or not all(isinstance(x, str) for x in splits):
        raise ConfigError(f"{p}/dataset_dict.json: `splits` must be a list of names (got {splits!r})")
    return splits


def read(path: str | Path, split: str | None = None) -> tuple[list[dict], list[str]]:
    """The rows of the data at `path` (see the module docstring) and the column names found (in order of first
    appearance). ConfigError naming the path for a missing path, an unsupported format or a bad row."""
    s = source(path, split)
    if s.note:
        log.info("%s: reading %s", s.path, s.note)
    if s.kind in (".jsonl", ".csv"):
        rows = [r for f in s.files for r in demo_data.read_rows(f)]
    elif s.kind == ".json":
        rows = [r for f in s.files for r in demo_data.read_json(f)]
    else:
        rows = _read_arrow(s)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return rows, columns


def _read_arrow(s: Source) -> list[dict]:
    """Parquet files or a `save_to_disk` folder, through `datasets` (imported here), as a list of rows."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{s.path}: reading it needs `datasets`: pip install 'fl-plugins[hf]'") from e
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        ds: Any
        if s.kind == ".parquet":
            with tempfile.TemporaryDirectory(prefix="fl-data-") as cache:  # leave no cache behind
                files = [str(f) for f in s.files]
                ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
                return ds.to_list()
        ds = datasets.load_from_disk(str(s.path))
        if s.kind == "datasetdict":
            ds = ds[s.split]
        return ds.to_list()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{s.path}: cannot be read as {s.kind.lstrip('.')} data ({e})") from e
    finally:
        if not quiet:
            enable_progress_bars()
