"""The initial-model offer: with no `--initial-model`, one site's weights become round 0's global model.

The first site that says it can offer (the Lightning and HF integrations can) gets the OFFER_INITIAL task and
uploads its weights, which are written into round 0's staging directory as they arrive and committed as
`global/round-00000` once whole, with what the strategy adds to round 0's model (SCAFFOLD: its zero control
variates, strategy.py `extra_shards`). If that site leaves first, another is asked; if every site the round needs has
asked and none can offer, the job fails with an error that says how to give it an initial model. The caller
holds the coordinator's lock around every call.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fl_plugins.aggregator.rounds import RoundState, SiteState
from fl_plugins.aggregator.store import ExtraShards, RunStore, write_chunk_digests
from fl_plugins.aggregator.uploads import Upload, Uploads
from fl_plugins.errors import ConfigError, RoundError
from fl_plugins.wire.layout import Manifest, ShardLayout, TensorInfo

log = logging.getLogger(__name__)


class FileSink:
    """Writes an offered initial model's shards into the round-0 staging directory."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.fds = [open(directory / s.name, "wb", buffering=0) for s in manifest.shards]  # noqa: SIM115
        self.manifest = manifest
        self.directory = directory
        self.headers: dict[int, bytes] = {}

    def header(self, shard: int, prefix: bytes) -> None:
        self.headers[shard] = prefix
        self.fds[shard].write(prefix)

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        f = self.fds[shard]
        f.seek(self.manifest.shards[shard].data_start + tensor.start + lo)
        f.write(payload)

    def close(self) -> None:
        for f in self.fds:
            f.close()

    def finish(self, u: Upload, digests: list[str]) -> list[ShardLayout]:
        """Upload `u` arrived whole: close the files, write each shard's chunk digests beside it, and return its
        shards' layouts (headers as received, the committed shard digests)."""
        self.close()
        shards = [
            ShardLayout(s.name, self.headers[i], s.tensors, d)
            for i, (s, d) in enumerate(zip(u.manifest.shards, digests, strict=True))
        ]
        for shard, rx in zip(shards, u.receivers, strict=True):
            write_chunk_digests(self.directory / shard.name, rx.digest.digests)
        return shards


class Offer:
    def __init__(self, store: RunStore, min_sites: int, site_timeout: float, extra: ExtraShards | None = None) -> None:
        self.store = store
        self.extra = extra  # shards round 0's model gets beside the offered ones (strategy.py `extra_shards`)
        self.min_sites = min_sites
        self.site_timeout = site_timeout
        self.offering: str | None = None  # the site uploading its weights as round 0's model

    def asks(self, s: SiteState, rounds: RoundState, now: float) -> bool:
        """Site `s` asks for a task while there is no global model: True if it is to offer its weights (else it
        waits for the site that does). ConfigError when every site the round needs has asked and none can."""
        offerer = rounds.sites.get(self.offering or "")
        if offerer is not None and now - offerer.last_seen > self.site_timeout:
            log.warning("site %r left before its initial model arrived; asking another", offerer.name)
            self.offering = None
        if self.offering is None and s.can_offer:
            self.offering = s.name
            log.info("no initial model: site %r offers its weights as round 0's model", s.name)
            return True
        # every site the round needs has asked for a task and none can offer: nobody will (a site that asks
        # before the one that offers has said so must wait for it, not fail)
        s.asked = True
        asked = [x for x in rounds.sites.values() if x.asked]
        nobody = not any(x.can_offer for x in rounds.sites.values())
        if self.offering is None and len(asked) >= self.min_sites and nobody:
            raise ConfigError(
                "the aggregator has no initial model and no site offered one: start it with "
                "`fl-plugins server ... --initial-model PATH` or the recipe's `initial_model: PATH` (a .safetensors "
                "file or a Hugging Face model folder), or use the Lightning/HF integrations, which offer the site's "
                "weights"
            )
        return False

    def expects(self, site: str, have_global: bool) -> None:
        """Site `site` may begin uploading its weights only when it was asked to (RoundError otherwise)."""
        if have_global or self.offering != site:
            raise RoundError(f"site {site!r}: the aggregator did not ask this site for an initial model")

    def begin(self, u: Upload, uploads: Uploads, rounds: RoundState) -> None:
        """The offered weights `u` replace an unfinished offer; their bytes go to round 0's staging directory."""
        for old in [x for x in uploads.live.values() if x.initial]:
            uploads.kill(old, rounds)
        u.sink = FileSink(self.store.begin(0), u.manifest)
        u.receive_into(u.sink)

    def refused(self, site: str) -> None:
        """The site's offer was refused: another site (or this one, again) may offer round 0's model."""
        if self.offering == site:
            self.offering = None

    def commit(self, u: Upload, digests: list[str]) -> Manifest:
        """The offered model arrived whole: it becomes round 0's global model (returned)."""
        sink = u.sink
        assert isinstance(sink, FileSink)
        shards = sink.finish(u, digests)
        if self.extra is not None:
            shards += self.extra(sink.directory, shards, u.manifest.chunk_bytes)
        manifest = Manifest(shards, u.manifest.chunk_bytes, {"current_round": 0})
        self.store.commit(0, sink.directory, manifest)
        self.offering = None
        log.info("round 0's global model set from site %r's weights", u.site)
        return self.store.load(0)
