"""A round's close, on the aggregator's thread (core.py's `_finalize`): the counted updates' average written as
round R+1's global model, round R+1 opened, its checkpoint made durable behind it.

    close()          under the fold gate's exclusive side (every fold that started has ended): a refold when the
                     accumulator holds bytes of an upload that will never count, else, once the round settles,
                     write_round()
    write_round()    the strategy's finished blocks streamed into RUN_DIR/global/round-R+1.tmp (its next state
                     staged beside them), the round's record (with its timeline, timeline.py), R+1 opened at once
                     and served from those page-cached files; fsync and the rename to global/round-R+1 follow
                     on a thread of their own (make_durable). A crash before the rename redoes round R. The last
                     round's checkpoint is made durable before the job ends.
    join()           wait for the latest checkpoint to be durable (the next close, and stop())

Moved out of core.py (issue 16) so that the close can change (the next round's download starting while the
checkpoint is written) without the coordinator growing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fl_plugins.aggregator import results
from fl_plugins.aggregator.store import GlobalReader
from fl_plugins.wire import limits

if TYPE_CHECKING:
    import numpy as np

    from fl_plugins.aggregator.core import Aggregator
    from fl_plugins.aggregator.rounds import Counted
    from fl_plugins.aggregator.uploads import Upload
    from fl_plugins.wire.layout import Manifest, TensorInfo

log = logging.getLogger("fl_plugins.aggregator.core")  # the operator's lines, under the coordinator's name


class Closer:
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.durable: threading.Thread | None = None  # fsync + rename of the latest checkpoint

    def join(self) -> None:
        if self.durable is not None:
            self.durable.join()

    def close(self) -> None:
        """On the aggregator's thread (the one that decides, so no second close can start meanwhile)."""
        agg = self.agg
        closing = agg.clock()  # (the timeline's fold wait includes the previous checkpoint's fsync)
        self.join()  # the previous checkpoint is published before this one is written
        with agg.gate.exclusive():
            with agg.lock:  # no fold runs now: what the accumulator holds is settled
                partial = agg.uploads.partial()
                if partial:
                    self.refold(partial)
                    return
                if not agg.rounds.settle():
                    agg.lock.notify_all()
                    return
                counted = list(agg.rounds.counted.values())
            self.write_round(counted, closing)

    def refold(self, partial: list[Upload]) -> None:
        """Lock and fold gate held. The accumulator holds bytes of `partial` uploads that will never count: zero
        it and ask every counted update's site to send it again."""
        agg = self.agg
        assert agg.strategy is not None
        agg.strategy.reset()
        agg.uploads.new_epoch()
        agg.rounds.refold(sorted({u.site for u in partial}), agg.clock())
        agg.uploads.kill_all(agg.rounds)
        agg.lock.notify_all()

    def write_round(self, counted: list[Counted], closing: float) -> None:
        """Fold gate held. Write the average of the counted updates as round R+1's global model; open R+1."""
        agg = self.agg
        strategy, r = agg.strategy, agg.rounds.round
        assert strategy is not None and agg.global_manifest is not None
        t0, began = time.monotonic(), agg.rounds.began
        records = [c.record for c in counted]
        with agg.lock:
            paths = agg.store.shard_paths(r, agg.global_manifest, agg.serving)
            reader = GlobalReader(paths, agg.global_manifest)
            serving = agg.serving or agg.store.round_dir(r)  # round r's model and the strategy's state with it
        try:

            def blocks_of(t: TensorInfo) -> Iterator[np.ndarray]:
                blocks = strategy.finalize(t, reader.reader(t.name))
                return strategy.checked(t, blocks, r) if agg.config.reject_nonfinite else blocks

            metrics = limits.mean_metrics(records)
            env = {"current_round": r + 1, "metrics": metrics}

            def stage(staging: Path) -> None:  # the strategy's next state, into round r+1's staging directory
                strategy.stage(serving, staging)

            tmp, manifest = agg.store.write_round(r + 1, agg.global_manifest, blocks_of, env, on_begin=stage)
        finally:
            reader.close()
        last = r + 1 >= agg.config.total_rounds
        if last:  # the job ends only once the final model is durable
            agg.store.commit(r + 1, tmp, manifest)
        with agg.lock:
            seconds = agg.clock() - began if began is not None else time.monotonic() - t0
            write_s = round(time.monotonic() - t0, 3)
            line = agg.timeline.close(r, [c.site for c in counted], began, closing, write_s)
            agg.record(results.round_record(agg.rounds, records, strategy.weight, metrics, write_s, seconds, line))
            log.info("round %d done: %d updates, checkpoint %s", r, len(records), agg.store.round_dir(r + 1))
            agg.uploads.kill_all(agg.rounds)
            # R+1 opens at once from the written (page-cached) files; fsync and the rename follow in the background
            agg.open_round(r + 1, manifest, None if last else tmp)
            if not last:
                args = (r + 1, tmp, manifest)
                self.durable = threading.Thread(target=self.make_durable, args=args, name="fl-checkpoint")
                self.durable.daemon = True
                self.durable.start()
            agg.lock.notify_all()

    def make_durable(self, r: int, tmp: Path, manifest: Manifest) -> None:
        agg = self.agg
        try:
            agg.store.sync(tmp, manifest)
            with agg.lock:  # downloads open files under this lock: none sees a half-renamed directory
                agg.store.publish(r, tmp)
                if agg.rounds.round == r:
                    agg.serving = agg.store.round_dir(r)
        except BaseException as e:
            log.exception("checkpoint of round %d could not be made durable", r)
            with agg.lock:
                agg.error = e
                agg.lock.notify_all()
