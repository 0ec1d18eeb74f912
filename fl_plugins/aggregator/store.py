"""The run directory: global-model checkpoints, round state, metrics.

    RUN_DIR/
      global/round-00000/manifest.json     round 0's global model (the initial model)
      global/round-00000/*.safetensors
      global/round-00000/*.safetensors.chunks   each shard's chunk digests (16 bytes each), served with the bytes
      global/round-00000/scaffold.safetensors   --strategy scaffold: the control variates (scaffold.py), zeros
      global/round-00001/...               the model after round 0, i.e. round 1's global model
      global/round-00001/strategy/         a server optimizer's state after making it (optimizers.py); FedAvg's none
      run.json                             what the run belongs to (runfile.py); written with round 0's checkpoint
      metrics.jsonl                        one line per accepted update and per completed round
      logs.jsonl                           records sites sent with flare.log()

`global/round-R` holds the model *given to* round R; after the last round (R = total) it holds the final
model. A checkpoint is written into `round-R.tmp` (the model, and the strategy's state with it), fsynced, then
renamed: a directory named `round-R` is always complete, so a restarted aggregator resumes from the highest one
with the state that belongs to its model. Files are written through reused
buffers and read with pread, never mapped (mapped pages would count in the aggregator's RSS).

The run directory is private to its owner, like a startup kit: folders are created 0700 and files 0600 (the
run directory itself is made 0700 when a run opens it), whatever the umask (files.py).

run.json, what the run belongs to, and the checks a restart makes against it live in runfile.py; `open_run`
and `check_tensors` here are its entry points. The names that moved to files.py and runfile.py are imported
here too, for the modules and tests that import them from store.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash

from fl_plugins.aggregator.files import (
    COPY_BUFFER,
    DIR_MODE,
    FILE_MODE,
    fsync_dir,
    private_dir,
    private_file,
    private_opener,
    write_atomic,
    write_private,
)
from fl_plugins.aggregator.runfile import (
    RUN_FILE,
    RUN_FORMAT,
    RUN_VERSION,
    RunIdentity,
    check_tensors,
    initial_model_files,
    new_run,
    read_identity,
    resume_run,
    tensor_table,
    write_identity,
)
from fl_plugins.errors import IntegrityError, ProtocolError
from fl_plugins.wire.frames import ChunkHasher
from fl_plugins.wire.layout import (
    MAX_HEADER_BYTES,
    Manifest,
    ShardLayout,
    TensorInfo,
    build_header,
    numpy_dtype,
    parse_header,
)

__all__ = [  # the names that moved to files.py and runfile.py are still importable from here
    "COPY_BUFFER",
    "DIR_MODE",
    "FILE_MODE",
    "RUN_FILE",
    "RUN_FORMAT",
    "RUN_VERSION",
    "GlobalReader",
    "RunIdentity",
    "RunStore",
    "initial_model_files",
    "private_dir",
    "private_file",
    "same_tensors",
    "undo_failed_start",
    "write_atomic",
    "write_chunk_digests",
    "write_private",
    "write_shard",
]


_ROUND_DIR = re.compile(r"^round-(\d{5,})$")
# more shards for round 0 beside an initial model's: (staging directory, its shards, chunk_bytes) -> the new shards
ExtraShards = Callable[[Path, list[ShardLayout], int], list[ShardLayout]]


class RunStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.global_dir = self.root / "global"
        self._pending: RunIdentity | None = None  # a new run's identity: run.json, written with round 0
        self.on_publish: Callable[[int, Path], None] | None = None  # told each durable round (remote.py)
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
            write_identity(self.root, self._pending, manifest)
            self._pending = None
        self.publish(r, tmp)

    def sync(self, tmp: Path, manifest: Manifest) -> None:
        """Write the manifest and make everything in `tmp` durable (the slow part: the shards' fsync), the
        files in its folders (the strategy's state) too."""
        write_private(tmp / "manifest.json", manifest.to_json())
        _fsync_tree(tmp)

    def publish(self, r: int, tmp: Path) -> None:
        """Rename a synced `round-R.tmp` to `round-R`: from here on a restart resumes from it."""
        final = self.round_dir(r)
        if final.exists():  # left by a run that died between rename and state; same round, replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.global_dir)
        if self.on_publish is not None:  # the run directory's object store (remote.py) uploads it
            self.on_publish(r, final)

    def write_round(
        self,
        r: int,
        layout: Manifest,
        blocks_of: Callable[[TensorInfo], Iterable[Any]],
        envelope: dict,
        *,
        on_begin: Callable[[Path], None] | None = None,
    ) -> tuple[Path, Manifest]:
        """Write round r's global model into `round-R.tmp` with `layout`'s shards (`blocks_of(tensor)` yields
        its data blocks); `commit` (or `sync` + `publish`) makes it round r's checkpoint. `on_begin(tmp)` runs
        once the folder exists, before the first block (the strategy stages its state there)."""
        tmp = self.begin(r)
        if on_begin is not None:
            on_begin(tmp)
        shards = [
            write_shard(tmp / s.name, s, (b for t in s.tensors for b in blocks_of(t)), layout.chunk_bytes)
            for s in layout.shards
        ]
        return tmp, Manifest(shards, layout.chunk_bytes, envelope)

    def import_initial(
        self, source: str | os.PathLike, chunk_bytes: int, *, extra: ExtraShards | None = None
    ) -> Manifest:
        """Copy an initial model into round 0: one .safetensors file, or a folder with a single
        model.safetensors or a Hugging Face sharded checkpoint (model.safetensors.index.json). `extra(tmp,
        shards, chunk_bytes)` writes more shards beside the copied ones before the commit and returns them
        (strategy.py `extra_shards`: SCAFFOLD's control variates). Whatever fails leaves no `round-00000.tmp`
        behind."""
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
                    with open(tmp / path.name, "wb", buffering=0, opener=private_opener) as out:
                        _write(out, hasher, header)
                        mv = memoryview(buf)
                        while (k := f.readinto(mv)) > 0:
                            raw.update(mv[:k])
                            _write(out, hasher, mv[:k])
                    if hasher.size != size:
                        raise IntegrityError(
                            f"{path}: data section is {hasher.size - len(header)} bytes, header "
                            f"says {size - len(header)}"
                        )
                    st = os.fstat(f.fileno())
                recorded.append(
                    {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3_128": raw.hexdigest()}
                )
                shards.append(ShardLayout(path.name, header, tensors, hasher.hexdigest()))
                write_chunk_digests(tmp / path.name, hasher.shard.digests)
            if extra is not None:
                shards += extra(tmp, shards, chunk_bytes)
            manifest = Manifest(shards, chunk_bytes, {"current_round": 0})
            if self._pending is not None:
                self._pending.initial_model = {"path": str(Path(source).resolve()), "files": recorded}
            self.commit(0, tmp, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    # -- what the run belongs to (run.json: runfile.py) ---------------------------------------------------
    def read_identity(self) -> RunIdentity | None:
        return read_identity(self.root)

    def open_run(
        self,
        *,
        job_id: str = "",
        recipe: dict[str, Any] | None = None,
        initial_model: str | os.PathLike | None = None,
        check_only: bool = False,
    ) -> RunIdentity:
        """Compare a start's inputs with run.json and return the run's identity (its job id is the one to
        serve). A new run gets `job_id`, else the recipe's name, else a random one; its run.json is written
        with round 0's checkpoint (`commit`). A run with checkpoints must have been started with the same
        inputs: another job id, recipe or initial model raises ConfigError naming the difference and the fix.
        `check_only`: only check (no run.json is adopted, nothing is written or remembered)."""
        latest = self.latest_round()
        if latest is None:  # a new run (a run.json without a checkpoint is from a start that died: ignored)
            ident = new_run(job_id, recipe, initial_model)
            if not check_only:
                self._pending = ident
            return ident
        return resume_run(
            self.root,
            lambda: tensor_table(self.load(latest)),
            job_id=job_id,
            recipe=recipe,
            initial_model=initial_model,
            check_only=check_only,
        )

    def check_tensors(self, manifest: Manifest, r: int) -> None:
        """The checkpoint of round r holds the tensors run.json records (a folder that mixes two jobs' files
        does not)."""
        check_tensors(self.root, manifest, self.round_dir(r))

    # -- metrics -----------------------------------------------------------------------------------------
    def append(self, name: str, records: Iterable[dict]) -> None:
        if not self.root.is_dir():
            private_dir(self.root)
        with open(self.root / name, "a", opener=private_opener) as f:
            for rec in records:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def write_chunk_digests(shard_path: Path, digests: list[bytes]) -> None:
    write_private(shard_path.with_name(shard_path.name + ".chunks"), b"".join(digests))


def write_shard(path: Path, layout: ShardLayout, blocks: Iterable[Any], chunk_bytes: int) -> ShardLayout:
    """Write the shard file `path`: `layout`'s header, then `blocks` (its tensors' data, in order), and its chunk
    digests beside it. Returns the layout with the shard's digest."""
    hasher = ChunkHasher(chunk_bytes)
    with open(path, "wb", buffering=0, opener=private_opener) as f:
        _write(f, hasher, layout.header)
        for block in blocks:
            _write(f, hasher, np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
    if hasher.size != layout.size:
        raise IntegrityError(f"{layout.name}: wrote {hasher.size} bytes, layout says {layout.size}")
    digest = hasher.hexdigest()  # first: it hashes the last, partial chunk, whose digest the .chunks file needs
    write_chunk_digests(path, hasher.shard.digests)
    return ShardLayout(layout.name, layout.header, layout.tensors, digest)


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


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder` (made 0600: also those others wrote, an offered model's), then the
    folders themselves."""
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            _fsync_tree(p)
            continue
        with open(p, "rb") as f:
            if os.name == "posix":
                os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
    fsync_dir(folder)


def _write(f: BinaryIO, hasher: ChunkHasher, data: bytes | memoryview) -> None:
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

    def reader(self, name: str) -> Callable[[int, int], np.ndarray]:
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
