"""The global models a swarm site keeps in its output folder (`FL_OUTPUT_DIR`, default ./fl-output/JOB/SITE).

    global/round-R/   each global model the site received (its shards as they came: safetensors files), the last
                      KEEP_ROUNDS of them; the aggregator site folds from the current one without fetching it again
    best/             the received global model that scored best on this site's own validation data: the metrics
                      its script sent with the update it trained from that model (FLARE's swarm "best model
                      selection"); best.json says which round and what score
    final/            the job's final global model (fetched at the end: the last round's fold, sealed for every site)

A folder is written as NAME.tmp and renamed, so a reader never sees half of one; best/ is hard links to the round's
files (no copy). The metric is the job's (`workflow.metric`, the aggregator tells it at connect): higher is better,
a leading "-" means lower is better.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fl_plugins.aggregator.offer import FileSink
from fl_plugins.client.transfers import TensorSink
from fl_plugins.wire import limits
from fl_plugins.wire.layout import Manifest, TensorInfo

log = logging.getLogger(__name__)

KEEP_ROUNDS = 2  # received global models kept (the current and the one before)
BEST, FINAL = "best", "final"


class Tee:
    """A download's sink that hands each verified chunk to two sinks (the script's tensors and the site's files)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def header(self, shard: int, prefix: bytes) -> None:
        self.first.header(shard, prefix)
        self.second.header(shard, prefix)

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        self.first.data(shard, tensor, lo, payload)
        self.second.data(shard, tensor, lo, payload)


class SiteModels:
    def __init__(self, out: Path, metric: str = "accuracy") -> None:
        self.out, self.metric = out, metric or "accuracy"
        self.rounds: dict[int, Manifest] = {}  # round -> its model's manifest (with the shards' headers), on disk
        self.best: float | None = None
        self._sinks: dict[int, FileSink] = {}

    def round_dir(self, r: int) -> Path:
        return self.out / "global" / f"round-{r:05d}"

    def paths(self, r: int, manifest: Manifest) -> list[Path]:
        return [self.round_dir(r) / s.name for s in manifest.shards]

    # -- received models ---------------------------------------------------------------------------------------
    def sink(self, r: int, manifest: Manifest, views: Any = None) -> Any:
        """Where round `r`'s model goes as it arrives: its files (and the script's tensors' `views`, if given).
        `kept(r)` after the transfer completes."""
        directory = self.round_dir(r)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        files = self._sinks[r] = FileSink(directory, manifest)
        self.rounds.pop(r, None)
        return files if views is None else Tee(TensorSink(views), files)

    def kept(self, r: int, manifest: Manifest) -> Manifest:
        """Round `r`'s model arrived whole: its files are closed, and its manifest knows its shards' headers."""
        files = self._sinks.pop(r)
        files.close()
        shards = [dataclasses.replace(s, header=files.headers[i]) for i, s in enumerate(manifest.shards)]
        kept = self.rounds[r] = Manifest(shards, manifest.chunk_bytes, manifest.envelope)
        self.prune(r)
        return kept

    def abandon(self, r: int) -> None:
        files = self._sinks.pop(r, None)
        if files is not None:
            files.close()
        shutil.rmtree(self.round_dir(r), ignore_errors=True)

    def prune(self, newest: int) -> None:
        for r in [r for r in self.rounds if r <= newest - KEEP_ROUNDS]:
            del self.rounds[r]
        for old in (self.out / "global").glob("round-*"):
            if old.name < self.round_dir(newest - KEEP_ROUNDS + 1).name:
                shutil.rmtree(old, ignore_errors=True)

    # -- best and final ----------------------------------------------------------------------------------------
    def scored(self, r: int, metrics: dict[str, Any] | None) -> bool:
        """The site scored round `r`'s model (the metrics sent with its update): kept as best/ if it beats the best
        so far. False when it does not, or the metric is missing, or the model is no longer on disk."""
        key, sign = (self.metric[1:], -1.0) if self.metric.startswith("-") else (self.metric, 1.0)
        value = limits.finite_float((metrics or {}).get(key))
        if value is None or r not in self.rounds or (self.best is not None and sign * value <= sign * self.best):
            return False
        self.best = value
        self._publish(BEST, self.round_dir(r), {"round": r, "metric": self.metric, "value": value})
        log.info("round %d's global model is this site's best so far (%s %g): %s", r, key, value, self.out / BEST)
        return True

    def final(self, r: int, manifest: Manifest, source: Path) -> Path:
        """The job's final model (round `r`'s, its files in `source`) as final/."""
        self._publish(FINAL, source, {"round": r, "shards": [s.name for s in manifest.shards]})
        log.info("the final global model (round %d) is in %s", r, self.out / FINAL)
        return self.out / FINAL

    def _publish(self, name: str, source: Path, info: dict[str, Any]) -> None:
        tmp, dest = self.out / f"{name}.tmp", self.out / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        for f in source.iterdir():
            if f.is_file() and not f.name.endswith(".chunks"):
                os.link(f, tmp / f.name)
        (tmp / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
        old = self.out / f"{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
