"""RUN_DIR/run.json: what a run directory belongs to, and the checks a start makes against it.

run.json records what the run belongs to, so that a restart resumes the same job or is refused:

    {"format": "fl-plugins-run", "version": 1, "fl_plugins_version": "0.1.0", "created": "2025-01-31T12:00:00Z",
     "job_id": "quickstart",                  # kept across restarts (sites' policy.yaml allow-lists job ids)
     "recipe": {"path": "recipes/quickstart.yaml", "digest": "sha256:...",   # null without a recipe
                "job": {"name": ..., "script": ..., "args": [...], "sites": [...], ...}},  # Recipe.identity()
     "initial_model": {"path": "/abs/initial.safetensors",                   # or {"offered": true}: a site's
                       "files": [{"name": "initial.safetensors", "size": 1234, "mtime_ns": ...,  # weights
                                  "xxh3_128": "..."}]},                      # (hash of the file's own bytes)
     "tensors": {"fc.weight": ["F32", [32, 2]], ...}}                        # the global model's tensor table

It is written atomically (tmp, fsync, rename, fsync the folder) just before round 0's checkpoint is published,
and counts only once a checkpoint exists: a start that dies in between leaves a run.json that the next start
discards. `RunStore.open_run` (store.py; `new_run` / `resume_run` here) compares a start's inputs with it:
another `job_id`, another recipe (its `job` part: what is trained, by which sites; `rounds`, `min_sites`,
deadlines, `aggregation`, `transfer` and `tracking` may change between restarts, like the server's flags), or
another initial model is refused with a ConfigError that names the difference and the fix; an input left out
resumes as the run was. A run directory with checkpoints but no run.json (made before run.json existed) is
adopted with the inputs given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from fl_plugins.aggregator.files import COPY_BUFFER, private_dir, write_atomic
from fl_plugins.errors import ConfigError
from fl_plugins.wire.layout import Manifest, short_repr

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = "fl-plugins-run"
RUN_VERSION = 1


def read_identity(root: Path) -> RunIdentity | None:
    """ROOT/run.json's identity, None if there is none (ConfigError if it is not a run record)."""
    path = root / RUN_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return RunIdentity.from_json(text, path)


def new_run(job_id: str, recipe: dict[str, Any] | None, initial_model: str | os.PathLike | None) -> RunIdentity:
    """A new run's identity (its run.json is written with round 0's checkpoint: `write_identity`): `job_id`, else
    the recipe's name, else a random id."""
    given_recipe = _recipe_ref(recipe)
    initial = None if initial_model is None else {"path": str(initial_model)}
    return RunIdentity(_new_id(job_id, given_recipe), given_recipe, initial)


def resume_run(
    root: Path,
    tensors: Callable[[], dict[str, list]],
    *,
    job_id: str = "",
    recipe: dict[str, Any] | None = None,
    initial_model: str | os.PathLike | None = None,
    check_only: bool = False,
) -> RunIdentity:
    """The identity of a run that has checkpoints, if this start's inputs are the ones it was started with
    (another job id, recipe or initial model raises ConfigError naming the difference and the fix). A run
    directory without run.json is adopted with this start's inputs and `tensors()` (the latest checkpoint's
    tensor table). `check_only`: only check (no run.json is adopted, nothing is written)."""
    stored = read_identity(root)
    given_recipe = _recipe_ref(recipe)
    where = root / RUN_FILE
    if stored is None:
        ident = RunIdentity(_new_id(job_id, given_recipe), given_recipe, None, tensors(), adopted=True)
        if not check_only:
            log.warning(
                "%s has checkpoints but no %s (made by an earlier fl-plugins): adopting it as job %r "
                "with this start's recipe; its initial model is not known",
                root,
                RUN_FILE,
                ident.job_id,
            )
            private_dir(root)
            write_atomic(where, ident.to_json())
        return ident
    if job_id and job_id != stored.job_id:
        raise ConfigError(
            f"{where}: this run directory belongs to job {stored.job_id!r}, not `--job-id` {job_id!r}: drop "
            f"--job-id to resume job {stored.job_id!r} as it was, or pass a new --run-dir to start job "
            f"{job_id!r} (sites' policy.yaml files allow job ids, so a run keeps its own)"
        )
    if given_recipe is not None:
        _check_recipe(where, stored, given_recipe)
    if initial_model is not None:
        _check_initial_model(where, stored, Path(initial_model))
    if not check_only:
        private_dir(root)
    return stored


def write_identity(root: Path, ident: RunIdentity, manifest: Manifest) -> None:
    """Write a new run's run.json (atomically) with round 0's tensor table, just before round 0 is published."""
    ident.tensors = tensor_table(manifest)
    if ident.initial_model is None:
        ident.initial_model = {"offered": True}  # no initial model given: a site offered its weights
    write_atomic(root / RUN_FILE, ident.to_json())


def check_tensors(root: Path, manifest: Manifest, where: Path) -> None:
    """The checkpoint in `where` holds the tensors run.json records (a folder that mixes two jobs' files does
    not)."""
    ident = read_identity(root)
    if ident is None or ident.tensors is None:
        return
    got = tensor_table(manifest)
    if got != ident.tensors:
        missing = sorted(ident.tensors.keys() - got.keys())[:5]
        unexpected = sorted(got.keys() - ident.tensors.keys())[:5]
        changed = sorted(k for k in got.keys() & ident.tensors.keys() if got[k] != ident.tensors[k])[:5]
        raise ConfigError(
            f"{where}: its tensors are not the ones {root / RUN_FILE} records for this run "
            f"(missing {missing}, unexpected {unexpected}, changed {changed}): the folder holds checkpoints "
            "of another job; pass a new --run-dir"
        )


def tensor_table(manifest: Manifest) -> dict[str, list]:
    """A manifest's tensors as run.json records them: name -> [dtype, shape]."""
    return {t.name: [t.dtype, list(t.shape)] for s in manifest.shards for t in s.tensors}


def _new_id(job_id: str, given_recipe: dict[str, Any] | None) -> str:
    return job_id or (given_recipe["job"].get("name") if given_recipe else "") or uuid.uuid4().hex[:12]


def initial_model_files(source: str | os.PathLike) -> list[Path]:
    """The safetensors files of an initial model: one .safetensors file, or a folder with a single
    model.safetensors or a Hugging Face sharded checkpoint (model.safetensors.index.json)."""
    src = Path(source)
    if src.is_dir():
        index = src / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = [src / f for f in dict.fromkeys(weight_map.values())]
        elif (src / "model.safetensors").is_file():
            files = [src / "model.safetensors"]
        else:
            raise ConfigError(
                f"--initial-model {src}: the folder has neither model.safetensors nor "
                "model.safetensors.index.json; pass a .safetensors file or a Hugging Face model folder"
            )
    elif src.is_file() and src.suffix == ".safetensors":
        files = [src]
    else:
        raise ConfigError(f"--initial-model {src}: expected a .safetensors file or a model folder")
    for path in files:
        if not path.is_file():
            raise ConfigError(f"--initial-model: shard {path} listed in the index does not exist")
    return files


@dataclass
class RunIdentity:
    """What a run directory belongs to: RUN_DIR/run.json (the module's docstring shows it)."""

    job_id: str
    recipe: dict[str, Any] | None = None  # {"path", "digest", "job"}; None: started without a recipe
    initial_model: dict[str, Any] | None = None  # {"path", "files"} or {"offered": True}; None: not known
    tensors: dict[str, list] | None = None  # the global model's tensor table: name -> [dtype, shape]
    adopted: bool = False  # a run directory from before run.json, adopted with a later start's inputs
    created: str = ""
    fl_plugins_version: str = ""

    def to_json(self) -> str:
        """One key per line, and one line per tensor of the table (a model can have thousands)."""
        from fl_plugins._version import __version__

        top = {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "fl_plugins_version": self.fl_plugins_version or __version__,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "job_id": self.job_id,
            "recipe": self.recipe,
            "initial_model": self.initial_model,
            **({"adopted": True} if self.adopted else {}),
        }
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in top.items()]
        if self.tensors is None:
            lines.append('  "tensors": null')
        else:
            rows = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in self.tensors.items()]
            lines.append('  "tensors": {' + ("\n" + ",\n".join(rows) + "\n  }" if rows else "}"))
        return "{\n" + "\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> RunIdentity:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            obj = e
        ok = (
            isinstance(obj, dict)
            and obj.get("format") == RUN_FORMAT
            and obj.get("version") == RUN_VERSION
            and isinstance(obj.get("job_id"), str)
            and obj["job_id"]
            and isinstance(obj.get("recipe"), (dict, type(None)))
            and isinstance(obj.get("initial_model"), (dict, type(None)))
            and isinstance(obj.get("tensors"), (dict, type(None)))
        )
        if not ok:
            raise ConfigError(
                f"{where}: not a run record of format {RUN_FORMAT!r} version {RUN_VERSION} (got "
                f"{short_repr(obj)}); restore it from a backup, or pass a new --run-dir"
            )
        return cls(
            obj["job_id"],
            obj["recipe"],
            obj["initial_model"],
            obj["tensors"],
            bool(obj.get("adopted")),
            str(obj.get("created", "")),
            str(obj.get("fl_plugins_version", "")),
        )


def _recipe_ref(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recipe's identity as run.json keeps it: {"path", "digest", "job"} (digest: sha256 of `job`)."""
    if recipe is None:
        return None
    job = json.loads(json.dumps(recipe["job"], sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    return {"path": str(recipe.get("path", "")), "digest": f"sha256:{digest}", "job": job}


def _check_recipe(where: Path, stored: RunIdentity, given: dict[str, Any]) -> None:
    if stored.recipe is None:
        raise ConfigError(
            f"{where}: this run directory's job {stored.job_id!r} was started without a recipe, and this start "
            f"gives {given['path']}: pass a new --run-dir to run the recipe, or start the aggregator as the run "
            "was started (without a recipe) to resume it"
        )
    if stored.recipe.get("digest") == given["digest"]:
        return
    old, new = stored.recipe.get("job") or {}, given["job"]
    diffs = [
        f"`{k}` ({short_repr(old.get(k), 60)} in the run, {short_repr(new.get(k), 60)} now)"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    raise ConfigError(
        f"{where}: this run directory belongs to recipe {stored.recipe.get('path')} (job {stored.job_id!r}); "
        f"{given['path']} differs in {', '.join(diffs) or 'its content'}: pass a new --run-dir to start it, or "
        f"resume with the recipe as the run was started (only rounds, min_sites, round_deadline, aggregation, "
        "transfer and tracking may change between restarts)"
    )


def _check_initial_model(where: Path, stored: RunIdentity, given: Path) -> None:
    """`given` is the initial model the run started from: as many files, each of the same size and bytes (a
    file at the same path with the same mtime is taken as unchanged, without reading it)."""
    before = stored.initial_model
    if before is None:  # an adopted run directory: nothing to compare with
        return
    fix = (
        f"drop --initial-model (or the recipe's `initial_model`) to resume from the run's checkpoints as it was, "
        f"or pass a new --run-dir to start from {given}"
    )
    if before.get("offered"):
        raise ConfigError(
            f"{where}: round 0 of job {stored.job_id!r} is the weights a site offered, not "
            f"`--initial-model` {given}: {fix}"
        )
    files = initial_model_files(given)
    recorded = before.get("files") or []
    detail = None
    if len(files) != len(recorded):
        detail = f"{len(files)} files, the run's had {len(recorded)}"
    for path, rec in zip(files, recorded, strict=False):
        if detail is not None:
            break
        st = path.stat()
        if st.st_size != rec.get("size"):
            detail = f"{path.name} is {st.st_size} bytes, the run's {rec.get('name')} was {rec.get('size')}"
        elif st.st_mtime_ns != rec.get("mtime_ns") or str(given.resolve()) != before.get("path"):
            digest = _file_xxh3(path)
            if digest != rec.get("xxh3_128"):
                detail = (
                    f"{path.name} holds other bytes: xxh3_128 {digest}, the run's {rec.get('name')} had "
                    f"{rec.get('xxh3_128')}"
                )
    if detail is not None:
        raise ConfigError(
            f"{where}: job {stored.job_id!r} started from the initial model {before.get('path')}; "
            f"`--initial-model` {given} is another model ({detail}): {fix}"
        )


def _file_xxh3(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(COPY_BUFFER)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(mv)) > 0:
            h.update(mv[:k])
    return h.hexdigest()
