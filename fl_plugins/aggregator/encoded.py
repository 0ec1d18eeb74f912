"""The global model of a training task, encoded for the wire (config.py's `model_compression`).

With `model_compression` set, a TRAIN task's global model travels encoded (wire/quantize.py): each float tensor
that `worth_encoding` becomes a U8 tensor of its encoding's bytes, and the manifest's `encoded` table says what it
stands for (wire/layout.py); the site decodes it into its tensors (client/compress.py). Round R's encoded copy is
made once, when the first TRAIN task of round R is handed out (so the round's close does not wait for it), beside
the checkpoint:

    RUN_DIR/global/round-00003.int8/manifest.json     the encoded model's manifest (shards, sizes, digests)
    RUN_DIR/global/round-00003.int8/source.json       the shard digests of the checkpoint it was made from
    RUN_DIR/global/round-00003.int8/*.safetensors     its shards, each with its chunk digests (.chunks)

It is written into `round-R.ENC.tmp`, made durable and renamed (a folder with that name is whole); a restart serves
it again while `source.json` names the checkpoint's digests (else it is made again), and the copies of other rounds
are removed when a new one is made. The checkpoint (global/round-R) stays full precision, and so does what EVALUATE
tasks and END serve: the model evaluated and the one a site keeps at the end are the checkpoint's. A model that the
encoding cannot carry (a value beyond its range, or a NaN let through by --allow-nonfinite) is served as
checkpointed, with a warning.

Cost: one read of the checkpoint and one write of the encoded size per round (encoding runs at about 0.5-1 GB of
float32 per second and core: benchmarks/transfer.py --quantize), and the encoded size on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fl_plugins.aggregator.files import DIR_MODE, fsync_dir, write_private
from fl_plugins.aggregator.store import write_shard
from fl_plugins.aggregator.workflow import Task, TaskKind
from fl_plugins.errors import ProtocolError, RoundError
from fl_plugins.wire import quantize
from fl_plugins.wire.layout import EncodedTensor, Manifest, ShardLayout, TensorInfo, numpy_dtype, plan_shards
from fl_plugins.wire.stream import FileSource, OpenSource

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator

log = logging.getLogger(__name__)

READ_ELEMENTS = 1 << 20  # elements read and encoded at a time (a multiple of every encoding's block)
COPY_BYTES = 4 << 20  # bytes of an unencoded tensor copied at a time


class EncodedModels:
    """The encoded copies of the global model that `agg` serves, in `encoding` (the module docstring)."""

    def __init__(self, agg: Aggregator, encoding: str) -> None:
        quantize.encoding(encoding)
        self.agg, self.encoding = agg, encoding
        self._lock = threading.Lock()  # one copy is made at a time; the others wait for it
        self._made: tuple[int, list[str], Manifest | None] | None = None  # round, source digests, the copy

    def folder(self, round_: int) -> Path:
        return self.agg.store.global_dir / f"round-{round_:05d}.{self.encoding}"

    def task_manifest(self, t: Task) -> Manifest | None:
        """The manifest whose shards (and `encoded` table) task `t` carries: round R's encoded copy for a TRAIN
        task, else None (the checkpoint's, as `t` has it)."""
        if t.kind is not TaskKind.TRAIN or t.manifest is None:
            return None
        try:
            return self._copy(t.round)
        except RoundError:  # the round moved on meanwhile: the site's download says so
            return None

    def source(self, round_: int, encoding: str) -> tuple[Manifest, OpenSource, list[list[bytes] | None]]:
        """Round `round_`'s encoded copy: manifest, its shard files opened (the caller closes them) and chunk
        digests. RoundError if the round is not served now; ProtocolError if it is not served in `encoding`."""
        copy = self._copy(round_) if encoding == self.encoding else None
        if copy is None:
            raise ProtocolError(
                f"round {round_}'s global model is not served encoded with {encoding!r} (this aggregator's "
                f"model_compression is {self.encoding}): download it as the task's manifest says"
            )
        folder = self.folder(round_)
        return copy, FileSource([folder / s.name for s in copy.shards]), self.agg.store.chunk_digests(copy, folder)

    def _copy(self, round_: int) -> Manifest | None:
        manifest, source, _ = self.agg.global_source(round_)  # RoundError unless round_ is served now
        try:
            digests = [s.digest for s in manifest.shards]
            with self._lock:
                if self._made is None or self._made[:2] != (round_, digests):
                    self._made = (round_, digests, self._load(round_, digests) or self._make(round_, manifest, source))
                return self._made[2]
        finally:
            source.close()

    def _load(self, round_: int, digests: list[str]) -> Manifest | None:
        """The copy a previous start made of this checkpoint, if whole."""
        folder = self.folder(round_)
        try:
            if json.loads((folder / "source.json").read_text()) != digests:
                return None
            copy = Manifest.from_json((folder / "manifest.json").read_bytes(), f"{folder}/manifest.json")
        except (OSError, ValueError):  # none, or not ours: made again
            return None
        ok = copy.encoding == self.encoding and all((folder / s.name).stat().st_size == s.size for s in copy.shards)
        return copy if ok else None

    def _make(self, round_: int, manifest: Manifest, source: OpenSource) -> Manifest | None:
        """Encode round `round_`'s model (`manifest`, read from `source`) into its folder; None if it cannot be."""
        folder = self.folder(round_)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=DIR_MODE)
        try:
            copy = self._write(tmp, manifest, source)
            write_private(tmp / "source.json", json.dumps([s.digest for s in manifest.shards]))
            self.agg.store.sync(tmp, copy)  # manifest.json, and every file durable before the rename
        except ValueError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning(
                "round %d's global model is served unencoded: %s can not carry it (%s)", round_, self.encoding, e
            )
            return None
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        self._remove_others(round_)
        saved = 1 - copy.total_bytes / manifest.total_bytes
        mb = copy.total_bytes / 1e6
        log.info(
            "round %d's global model encoded with %s: %.1f MB (%.0f%% saved)", round_, self.encoding, mb, saved * 100
        )
        return copy

    def _write(self, tmp: Path, manifest: Manifest, source: OpenSource) -> Manifest:
        shards, encoded = [], {}
        for i, shard in enumerate(manifest.shards):
            layout, table = encoded_layout(shard, self.encoding)
            encoded.update(table)
            src = {t.name: t for t in shard.tensors}
            blocks = (b for t in layout.tensors for b in self._blocks(source, i, shard, src[t.name], t.name in table))
            shards.append(write_shard(tmp / shard.name, layout, blocks, manifest.chunk_bytes))
        return Manifest(
            shards, manifest.chunk_bytes, {"current_round": manifest.envelope.get("current_round")}, encoded
        )

    def _blocks(
        self, source: OpenSource, i: int, shard: ShardLayout, t: TensorInfo, encode: bool
    ) -> Iterator[np.ndarray]:
        """Tensor `t` of shard `i`, as the encoded shard holds it: encoded, or its bytes as they are."""
        base = shard.data_start + t.start
        if not encode:
            for off in range(0, t.nbytes, COPY_BYTES):
                yield np.frombuffer(b"".join(source.pieces(i, base + off, min(COPY_BYTES, t.nbytes - off))), np.uint8)
            return
        dtype = numpy_dtype(t.dtype)
        for e0 in range(0, t.numel, READ_ELEMENTS):
            n = min(READ_ELEMENTS, t.numel - e0)
            raw = b"".join(source.pieces(i, base + e0 * dtype.itemsize, n * dtype.itemsize))
            yield quantize.encode(self.encoding, np.frombuffer(raw, dtype), name=t.name)

    def _remove_others(self, round_: int) -> None:
        pattern = re.compile(rf"^round-\d{{5,}}\.{re.escape(self.encoding)}(\.tmp)?$")
        for p in self.agg.store.global_dir.iterdir():
            if pattern.match(p.name) and p.name != self.folder(round_).name:
                shutil.rmtree(p, ignore_errors=True)


def encoded_layout(shard: ShardLayout, encoding: str) -> tuple[ShardLayout, dict[str, EncodedTensor]]:
    """The layout of `shard` with every tensor that `worth_encoding` replaced by its encoding's bytes (U8), and the
    `encoded` table of those."""
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    table = {}
    for t in shard.tensors:
        if quantize.worth_encoding(encoding, t.dtype, t.numel):
            specs.append((t.name, "U8", (quantize.encoded_nbytes(encoding, t.numel),)))
            table[t.name] = EncodedTensor(encoding, t.dtype, t.shape)
        else:
            specs.append((t.name, t.dtype, t.shape))
    (one,) = plan_shards(specs, max_shard_bytes=1 << 62)
    return ShardLayout(shard.name, one.header, one.tensors), table


def encoded_models(agg: Aggregator) -> EncodedModels | None:
    """The encoded copies `agg` serves: None when its `model_compression` is none."""
    enc = agg.config.model_compression
    return EncodedModels(agg, enc) if enc != "none" else None


def encoded_source(
    models: EncodedModels | None, round_: int, encoding: str
) -> tuple[Manifest, OpenSource, list[list[bytes] | None]]:
    """`EncodedModels.source`, or a ProtocolError when the aggregator encodes no global model."""
    if models is None:
        raise ProtocolError(
            f"a download asked for round {round_}'s global model encoded with {encoding!r}, but this aggregator's "
            "model_compression is none: download it without an encoding, as the task's manifest says"
        )
    return models.source(round_, encoding)
