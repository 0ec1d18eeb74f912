"""The sites' submitted local models (SUBMIT_MODEL), kept for cross-site evaluation in RUN_DIR/cross_site/.

A submission streams into `cross_site/staging/model-H/` as any upload does (verified chunk by chunk, offer.py's
FileSink writes the bytes where they belong), and its commit renames it to `cross_site/model-H/` with its manifest
and chunk digests, so it is served to the other sites exactly as a global model is (resumable, verified). H is a
hash of the site's name (a site's name never becomes a path: "..", or "x" beside "x.tmp"); `cross_site/models.json`
maps each site to its folder.
A submission must hold the global model's tensors (same names, dtypes and shapes) as FULL params; it may leave
SCAFFOLD's control variates out (they are not part of the model: aggregator/scaffold.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from fl_plugins.aggregator.files import DIR_MODE, fsync_dir, private_dir, write_atomic, write_private
from fl_plugins.aggregator.offer import FileSink
from fl_plugins.aggregator.uploads import Upload
from fl_plugins.errors import RoundError
from fl_plugins.wire.layout import Manifest
from fl_plugins.wire.stream import FileSource


def _folder(site: str) -> str:
    return f"model-{hashlib.sha256(site.encode()).hexdigest()[:16]}"


class SubmittedModels:
    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir) / "cross_site"
        self.served: dict[str, tuple[Manifest, Path, list[list[bytes] | None]]] = {}
        self.committed: dict[str, str] = {}  # upload id -> site: a retried commit is answered "already committed"

    def begin(self, u: Upload) -> None:
        """`u`'s bytes go to cross_site/SITE.tmp (a new submission replaces an unfinished one)."""
        private_dir(self.root)
        tmp = private_dir(self.root / "staging") / _folder(u.site)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=DIR_MODE)
        u.sink = FileSink(tmp, u.manifest)
        u.receive_into(u.sink)

    def commit(self, u: Upload, digests: list[str]) -> Manifest:
        """The submission arrived whole: cross_site/SITE holds it, ready to serve; returns its manifest."""
        sink = u.sink
        assert isinstance(sink, FileSink)
        manifest = Manifest(sink.finish(u, digests), u.manifest.chunk_bytes, {})  # (the task names the owner)
        write_private(sink.directory / "manifest.json", manifest.to_json())
        final = self.root / _folder(u.site)
        if final.exists():
            shutil.rmtree(final)
        os.rename(sink.directory, final)
        fsync_dir(self.root)
        chunk_digests = [list(rx.digest.digests) for rx in u.receivers]
        self.served[u.site] = (manifest, final, list(chunk_digests))
        self.committed[u.id] = u.site
        index = {site: path.name for site, (_, path, _) in sorted(self.served.items())}
        write_atomic(self.root / "models.json", json.dumps(index, indent=1))
        return manifest

    def source(self, name: str) -> tuple[Manifest, FileSource, list[list[bytes] | None]]:
        """A submitted model's manifest, its shard files opened (the caller closes them) and chunk digests."""
        got = self.served.get(name)
        if got is None:
            raise RoundError(f"no submitted model of {name!r} is being served")
        manifest, directory, digests = got
        return manifest, FileSource([directory / s.name for s in manifest.shards]), digests
