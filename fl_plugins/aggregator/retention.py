"""Which round checkpoints a run keeps (`keep_rounds`).

    keep_rounds None   every round's checkpoint stays (global/round-R for every R): the default
    keep_rounds N      round 0 (the initial model) and the N latest rounds stay; an older one is deleted once a newer
                       one is durable, so a restart always finds the latest (and, while it is written, the one before)

A 7B model's checkpoint is ~14 GB in bf16: keeping every round of a long job fills a disk. Reusing the dropped
rounds' files for the next checkpoint (writing over cached pages instead of new ones, ~5x faster on this VM in
isolation) was measured in a round and did not pay (benchmarks/README.md, issue 16), so they are deleted.

With the run directory in an object store (`store_url`) nothing is deleted: its uploads read the working copy's
rounds behind the aggregator, and the store's own rounds are not pruned (yet).
"""

from __future__ import annotations

import logging
import shutil

from fl_plugins.aggregator.store import RunStore

log = logging.getLogger("fl_plugins.aggregator.core")


class Retention:
    def __init__(self, store: RunStore, keep: int | None) -> None:
        self.store = store
        self.keep = keep

    def published(self, latest: int) -> None:
        """Round `latest` is durable: delete the rounds the run no longer keeps. A failure here is a warning: the
        checkpoint is durable, and the rounds stay until the next one."""
        if self.keep is None:
            return
        try:
            names = [p.name for p in self.store.global_dir.iterdir()]
            rounds = sorted(int(n[6:]) for n in names if n.startswith("round-") and n[6:].isascii() and n[6:].isdigit())
            for r in rounds:
                if 0 < r <= latest - self.keep:
                    shutil.rmtree(self.store.round_dir(r))
                    log.debug("round %d's checkpoint deleted (keep_rounds %d)", r, self.keep)
        except OSError as e:
            log.warning("old round checkpoints could not be deleted (keep_rounds %d): %s", self.keep, e)
