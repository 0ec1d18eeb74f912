"""The run directory: global-model checkpoints, round state, metrics.

    RUN_DIR/
      global/round-00000/manifest.json     round 0's global model (the initial model)
      global/round-00000/*.safetensors
      global/round-00000/*.safetensors.chunks   each shard's chunk digests (16 bytes each), served with the bytes
      global/round-00001/...               the model after round 0, i.e. round 1's global model
      run.json                             what the run belongs to (below); written with round 0's checkpoint
      metrics.jsonl                        one line per accepted update and per completed round
      logs.jsonl                           records sites sent with flare.log()

`global/round-R` holds the model *given to* round R; after the last round (R = total) it holds the final
model. A checkpoint is written into `round-R.tmp`, fsynced, then renamed: a directory named `round-R` is
always complete, so a restarted aggregator resumes from the highest one. Files are written through reused
buffers and read with pread, never mapped (mapped pages would count in the aggregator's RSS).

The run directory is private to its owner, like a startup kit: folders are created 0700 and files 0600 (the
run directory itself is made 0700 when a run opens it), whatever the umask.

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
discards. `RunStore.open_run` compares a start's inputs with it: another `job_id`, another recipe (its `job`
part: what is trained, by which sites; `rounds`, `min_sites`, deadlines, `aggregation`, `transfer` and
`tracking` may change between restarts, like the server's flags), or another initial model is refused with a
ConfigError that names the difference and the fix; an input left out resumes as the run was. A run directory
with checkpoints but no run.json (made before run.json existed) is adopted with the inputs given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fl_plugins.errors import ConfigError, IntegrityError, ProtocolError
from fl_plugins.wire.frames import ChunkHasher
from fl_plugins.wire.layout import (
    MAX_HEADER_BYTES,
    Manifest,
    ShardLayout,
    TensorInfo,
    build_header,
    numpy_dtype,
    parse_header,
    short_repr,
)

log = logging.getLogger(__name__)

_ROUND_DIR = re.compile(r"^round-(\d{5,})$")
COPY_BUFFER = 8 << 20
RUN_FILE = "run.json"
RUN_FORMAT = "fl-plugins-run"
RUN_VERSION = 1
DIR_MODE = 0o700  # the run directory's folders and files: private to the owner, as the startup kits are
FILE_MODE = 0o600


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private(path: str, flags: int) -> int:
    """`open(..., opener=_private)`: a file the open creates is 0600 from the moment it exists."""
    return os.open(path, flags, FILE_MODE)


def private_dir(path: str | os.PathLike) -> Path:
    """Make the folder `path` (its missing parents with the default mode) and give it mode 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if os.name == "posix" and path.stat().st_mode & 0o777 != DIR_MODE:
        with contextlib.suppress(PermissionError):  # not ours: leave it as it is
            os.chmod(path, DIR_MODE)
    return path


def private_file(path: str | os.PathLike, mode: str = "ab"):
    """Open `path` with `mode` and mode bits 0600 (also a file an older run left 0644), e.g. a log file."""
    f = open(path, mode, opener=_private)  # noqa: SIM115
    if os.name == "posix":
        with contextlib.suppress(PermissionError):
            os.fchmod(f.fileno(), FILE_MODE)
    return f


def write_private(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a small file, mode 0600."""
    with private_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


class RunStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.global_dir = self.root / "global"
        self._pending: RunIdentity | None = None  # a new run's identity: run.json, written with round 0
        # (nothing is created until the first write: a start that fails before it leaves no folder behind)

    # -- reading -----------------------------------------------------------------------------------------
    def round_dir(self, r: int) -> Path:
        return self.global_dir / f"round-{r:05d}"

    def latest_round(self) -> int | None:
        if not self.global_dir.is_dir():
            return None
        rounds = [int(m.group(1)) for p in self.global_dir.iterdir() if (m := _ROUND_DIR.match(p.name))]
        rounds = [r for r in rounds if (self.round_dir(r) / "manifest.json").is_file()]
        return max(rounds) if rounds else None

    def load(self, r: int) -> Manifest:
        d = self.round_dir(r)
        manifest = Manifest.from_json((d / "manifest.json").read_bytes(), f"{d}/manifest.json")
        for i, shard in enumerate(manifest.shards):
            path = d / shard.name
            with open(path, "rb") as f:
                shard.header = f.read(shard.data_start)
            manifest.check_header(i, shard.header)
            if path.stat().st_size != shard.size:
                raise IntegrityError(f"{path}: {path.stat().st_size} bytes, the manifest says {shard.size}")
        return manifest

    def shard_paths(self, r: int, manifest: Manifest, directory: Path | None = None) -> list[Path]:
        return [(directory or self.round_dir(r)) / s.name for s in manifest.shards]

    def chunk_digests(self, manifest: Manifest, directory: Path) -> list[list[bytes] | None]:
        """Each shard's chunk digests as written with the checkpoint (None where missing or malformed: the
        chunks are then hashed as they are served)."""
        out: list[list[bytes] | None] = []
        for s in manifest.shards:
            p = directory / (s.name + ".chunks")
            n = -(-s.size // manifest.chunk_bytes)
            raw = p.read_bytes() if p.is_file() else b""
            out.append([raw[i : i + 16] for i in range(0, len(raw), 16)] if len(raw) == 16 * n else None)
        return out

    # -- writing -----------------------------------------------------------------------------------------
    def begin(self, r: int) -> Path:
        private_dir(self.root)
        private_dir(self.global_dir)
        tmp = self.global_dir / f"round-{r:05d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=DIR_MODE)
        return tmp

    def commit(self, r: int, tmp: Path, manifest: Manifest) -> None:
        self.sync(tmp, manifest)
        if self._pending is not None:  # a new run's first checkpoint: run.json goes with it
            self._write_identity(manifest)
        self.publish(r, tmp)

    def sync(self, tmp: Path, manifest: Manifest) -> None:
        """Write the manifest and make everything in `tmp` durable (the slow part: the shards' fsync)."""
        write_private(tmp / "manifest.json", manifest.to_json())
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                if os.name == "posix":
                    os.fchmod(f.fileno(), FILE_MODE)  # also the files others wrote here (an offered model's)
                os.fsync(f.fileno())
        _fsync_dir(tmp)

    def publish(self, r: int, tmp: Path) -> None:
        """Rename a synced `round-R.tmp` to `round-R`: from here on a restart resumes from it."""
        final = self.round_dir(r)
        if final.exists():  # left by a run that died between rename and state; same round, replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.global_dir)

    def write_round(self, r: int, layout: Manifest, blocks_of, envelope: dict) -> tuple[Path, Manifest]:
        """Write round r's global model into `round-R.tmp` with `layout`'s shards (`blocks_of(tensor)` yields
        its data blocks); `commit` (or `sync` + `publish`) makes it round r's checkpoint."""
        tmp = self.begin(r)
        shards = []
        for s in layout.shards:
            hasher = ChunkHasher(layout.chunk_bytes)
            with open(tmp / s.name, "wb", buffering=0, opener=_private) as f:
                _write(f, hasher, s.header)
                for t in s.tensors:
                    for block in blocks_of(t):
                        _write(f, hasher, memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)))
            if hasher.size != s.size:
                raise IntegrityError(f"{s.name}: wrote {hasher.size} bytes, layout says {s.size}")
            shards.append(ShardLayout(s.name, s.header, s.tensors, hasher.hexdigest()))
            write_chunk_digests(tmp / s.name, hasher.shard.digests)
        return tmp, Manifest(shards, layout.chunk_bytes, envelope)

    def import_initial(self, source: str | os.PathLike, chunk_bytes: int) -> Manifest:
        """Copy an initial model into round 0: one .safetensors file, or a folder with a single
        model.safetensors or a Hugging Face sharded checkpoint (model.safetensors.index.json). Whatever fails
        leaves no `round-00000.tmp` behind."""
        files = initial_model_files(source)
        tmp = self.begin(0)
        try:
            shards = []
            recorded = []
            buf = bytearray(COPY_BUFFER)
            for path in files:
                with open(path, "rb") as f:
                    raw = xxhash.xxh3_128()  # the source file's own bytes, recorded in run.json
                    prefix = f.read(8)
                    raw.update(prefix)
                    if len(prefix) < 8:
                        raise ProtocolError(f"{path}: not a safetensors file ({len(prefix)} bytes)")
                    (n,) = struct.unpack("<Q", prefix)
                    if n > MAX_HEADER_BYTES:
                        raise ProtocolError(f"{path}: safetensors header of {n} bytes is over the limit")
                    head = f.read(n)
                    raw.update(head)
                    tensors = parse_header(prefix + head, str(path))
                    meta = json.loads(head).get("__metadata__")
                    header = build_header(tensors, meta)  # re-padded to 8 bytes, our canonical form
                    size = len(header) + (tensors[-1].end if tensors else 0)
                    hasher = ChunkHasher(chunk_bytes)
                    with open(tmp / path.name, "wb", buffering=0, opener=_private) as out:
                        _write(out, hasher, header)
                        mv = memoryview(buf)
                        while (k := f.readinto(mv)) > 0:
                            raw.update(mv[:k])
                            _write(out, hasher, mv[:k])
                    if hasher.size != size:
                        raise IntegrityError(f"{path}: data section is {hasher.size - len(header)} bytes, header "
                                             f"says {size - len(header)}")  # fmt: skip
                    st = os.fstat(f.fileno())
                recorded.append({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                 "xxh3_128": raw.hexdigest()})  # fmt: skip
                shards.append(ShardLayout(path.name, header, tensors, hasher.hexdigest()))
                write_chunk_digests(tmp / path.name, hasher.shard.digests)
            manifest = Manifest(shards, chunk_bytes, {"current_round": 0})
            if self._pending is not None:
                self._pending.initial_model = {"path": str(Path(source).resolve()), "files": recorded}
            self.commit(0, tmp, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    # -- what the run belongs to (run.json) --------------------------------------------------------------
    def read_identity(self) -> RunIdentity | None:
        path = self.root / RUN_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return RunIdentity.from_json(text, path)

    def open_run(self, *, job_id: str = "", recipe: dict[str, Any] | None = None,
                 initial_model: str | os.PathLike | None = None, check_only: bool = False) -> RunIdentity:  # fmt: skip
        """Compare a start's inputs with run.json and return the run's identity (its job id is the one to
        serve). A new run gets `job_id`, else the recipe's name, else a random one; its run.json is written
        with round 0's checkpoint (`commit`). A run with checkpoints must have been started with the same
        inputs: another job id, recipe or initial model raises ConfigError naming the difference and the fix.
        `check_only`: only check (no run.json is adopted, nothing is written or remembered)."""
        latest = self.latest_round()
        stored = self.read_identity() if latest is not None else None
        given_recipe = _recipe_ref(recipe)
        new_id = job_id or (given_recipe["job"].get("name") if given_recipe else "") or uuid.uuid4().hex[:12]
        if latest is None:  # a new run (a run.json without a checkpoint is from a start that died: ignored)
            initial = None if initial_model is None else {"path": str(initial_model)}
            ident = RunIdentity(new_id, given_recipe, initial)
            if not check_only:
                self._pending = ident
            return ident
        where = self.root / RUN_FILE
        if stored is None:
            ident = RunIdentity(new_id, given_recipe, None, _tensor_table(self.load(latest)), adopted=True)
            if not check_only:
                log.warning("%s has checkpoints but no %s (made by an earlier fl-plugins): adopting it as job %r "
                            "with this start's recipe; its initial model is not known", self.root, RUN_FILE,
                            ident.job_id)  # fmt: skip
                private_dir(self.root)
                _write_atomic(where, ident.to_json())
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
            private_dir(self.root)
        return stored

    def check_tensors(self, manifest: Manifest, r: int) -> None:
        """The checkpoint of round r holds the tensors run.json records (a folder that mixes two jobs' files
        does not)."""
        ident = self.read_identity()
        if ident is None or ident.tensors is None:
            return
        got = _tensor_table(manifest)
        if got != ident.tensors:
            missing = sorted(ident.tensors.keys() - got.keys())[:5]
            unexpected = sorted(got.keys() - ident.tensors.keys())[:5]
            changed = sorted(k for k in got.keys() & ident.tensors.keys() if got[k] != ident.tensors[k])[:5]
            raise ConfigError(
                f"{self.round_dir(r)}: its tensors are not the ones {self.root / RUN_FILE} records for this run "
                f"(missing {missing}, unexpected {unexpected}, changed {changed}): the folder holds checkpoints "
                "of another job; pass a new --run-dir"
            )

    def _write_identity(self, manifest: Manifest) -> None:
        ident = self._pending
        assert ident is not None
        ident.tensors = _tensor_table(manifest)
        if ident.initial_model is None:
            ident.initial_model = {"offered": True}  # no initial model given: a site offered its weights
        _write_atomic(self.root / RUN_FILE, ident.to_json())
        self._pending = None

    # -- metrics -----------------------------------------------------------------------------------------
    def append(self, name: str, records: Iterable[dict]) -> None:
        if not self.root.is_dir():
            private_dir(self.root)
        with open(self.root / name, "a", opener=_private) as f:
            for rec in records:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def write_chunk_digests(shard_path: Path, digests: list[bytes]) -> None:
    write_private(shard_path.with_name(shard_path.name + ".chunks"), b"".join(digests))


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

        top = {"format": RUN_FORMAT, "version": RUN_VERSION, "fl_plugins_version": self.fl_plugins_version or
               __version__, "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "job_id": self.job_id, "recipe": self.recipe, "initial_model": self.initial_model,
               **({"adopted": True} if self.adopted else {})}  # fmt: skip
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
        ok = (isinstance(obj, dict) and obj.get("format") == RUN_FORMAT and obj.get("version") == RUN_VERSION
              and isinstance(obj.get("job_id"), str) and obj["job_id"]
              and isinstance(obj.get("recipe"), (dict, type(None)))
              and isinstance(obj.get("initial_model"), (dict, type(None)))
              and isinstance(obj.get("tensors"), (dict, type(None))))  # fmt: skip
        if not ok:
            raise ConfigError(f"{where}: not a run record of format {RUN_FORMAT!r} version {RUN_VERSION} (got "
                              f"{short_repr(obj)}); restore it from a backup, or pass a new --run-dir")  # fmt: skip
        return cls(obj["job_id"], obj["recipe"], obj["initial_model"], obj["tensors"], bool(obj.get("adopted")),
                   str(obj.get("created", "")), str(obj.get("fl_plugins_version", "")))  # fmt: skip


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
    diffs = [f"`{k}` ({short_repr(old.get(k), 60)} in the run, {short_repr(new.get(k), 60)} now)"
             for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]  # fmt: skip
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
    fix = (f"drop --initial-model (or the recipe's `initial_model`) to resume from the run's checkpoints as it was, "
           f"or pass a new --run-dir to start from {given}")  # fmt: skip
    if before.get("offered"):
        raise ConfigError(f"{where}: round 0 of job {stored.job_id!r} is the weights a site offered, not "
                          f"`--initial-model` {given}: {fix}")  # fmt: skip
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
                detail = (f"{path.name} holds other bytes: xxh3_128 {digest}, the run's {rec.get('name')} had "
                          f"{rec.get('xxh3_128')}")  # fmt: skip
    if detail is not None:
        raise ConfigError(f"{where}: job {stored.job_id!r} started from the initial model {before.get('path')}; "
                          f"`--initial-model` {given} is another model ({detail}): {fix}")  # fmt: skip


def _file_xxh3(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(COPY_BUFFER)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(mv)) > 0:
            h.update(mv[:k])
    return h.hexdigest()


def _tensor_table(manifest: Manifest) -> dict[str, list]:
    return {t.name: [t.dtype, list(t.shape)] for s in manifest.shards for t in s.tensors}


def _write_atomic(path: Path, text: str) -> None:
    """Write a small file 0600 via `path.tmp`, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", opener=_private) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def undo_failed_start(run_dir: str | os.PathLike) -> Iterator[None]:
    """Around a start: if it raises while the run directory holds no checkpoint yet, remove what the start
    created there (the folder itself if it did not exist), so that a failed start (a busy port, a bad kit or
    initial model) leaves no state behind. An existing run is never touched."""
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    before = set(os.listdir(run_dir)) if run_dir.is_dir() else set()
    fresh = RunStore(run_dir).latest_round() is None
    try:
        yield
    except BaseException:
        if fresh and RunStore(run_dir).latest_round() in (None, 0):
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif run_dir.is_dir():
                for name in set(os.listdir(run_dir)) - before:
                    p = run_dir / name
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        raise


def _write(f, hasher: ChunkHasher, data) -> None:
    mv = memoryview(data)
    hasher.update(mv)
    while len(mv):
        k = f.write(mv)
        mv = mv[k:]


class GlobalReader:
    """Elements of the current global model's tensors, read with pread into a reused buffer."""

    def __init__(self, paths: list[Path], manifest: Manifest) -> None:
        self._fds = [os.open(p, os.O_RDONLY) for p in paths]
        self._index = manifest.tensor_index()
        self._data_start = [s.data_start for s in manifest.shards]
        self._buf = bytearray()

    def reader(self, name: str):
        shard, t = self._index[name]
        dtype = numpy_dtype(t.dtype)

        def read(e0: int, n: int) -> np.ndarray:
            nbytes = n * dtype.itemsize
            if len(self._buf) < nbytes:
                self._buf = bytearray(nbytes)
            mv = memoryview(self._buf)[:nbytes]
            got = os.preadv(self._fds[shard], [mv], self._data_start[shard] + t.start + e0 * dtype.itemsize)
            if got != nbytes:
                raise IntegrityError(f"global shard for {name!r} ended early")
            return np.frombuffer(mv, dtype)

        return read

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def same_tensors(expected: dict[str, TensorInfo], got: dict[str, TensorInfo], what: str) -> None:
    """Raise ModelMismatchError listing missing, unexpected and mis-shaped/typed tensors."""
    from fl_plugins.errors import ModelMismatchError

    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    bad = sorted(
        f"{k}: {got[k].dtype}{list(got[k].shape)} (global model: {expected[k].dtype}{list(expected[k].shape)})"
        for k in expected.keys() & got.keys()
        if (got[k].dtype, got[k].shape) != (expected[k].dtype, expected[k].shape)
    )
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        if bad:
            parts.append(f"mismatched {bad[:10]}")
        raise ModelMismatchError(f"{what} does not match the global model: " + "; ".join(parts))
