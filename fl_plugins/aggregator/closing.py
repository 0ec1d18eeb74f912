"""A round's close, on the aggregator's thread (core.py's `_finalize`): the counted updates' average written as
round R+1's global model, round R+1 opened, its checkpoint made durable behind it.

    close()          under the fold gate's exclusive side (every fold that started has ended): a refold when the
                     accumulator holds bytes of an upload that will never count, else, once the round settles,
                     write_round()
    write_round()    the strategy's finished blocks (its next state staged in RUN_DIR/global/round-R+1.tmp) go into
                     the accumulator's own memory (finished.py), the round's record is written (with its timeline,
                     timeline.py) and R+1 opens at once, served from that memory. The fold gate stays held: it
                     goes to the checkpoint's own thread (make_durable), which writes the shards into
                     round-R+1.tmp, switches the serving to them, resets the accumulator and releases the gate (R+1's
                     first folds wait for that), then fsyncs and renames to global/round-R+1. A crash before the
                     rename redoes round R. The last round's checkpoint, and every checkpoint of a strategy that
                     does not fold into one accumulator array per tensor (flexlora), is written before R+1 opens,
                     as before; the last one is made durable before the job ends.
    join()           wait for the latest checkpoint to be durable (the next close, and stop())

Moved out of core.py (issue 16) so that the close could change (the next round's download starting while the
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
from fl_plugins.aggregator.fedavg import Accumulator
from fl_plugins.aggregator.finished import Finished
from fl_plugins.aggregator.store import GlobalReader
from fl_plugins.aggregator.strategy import KeepsUpdates, Strategy
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
        self.finished: Finished | None = None  # the latest model served from memory (finished.py)

    def join(self) -> None:
        if self.durable is not None:
            self.durable.join()

    def retire(self) -> None:
        """The round the latest in-memory model served is over (or the aggregator stops): its shared files close (a
        download still reading it has switched to its own; one that has not fails and asks again)."""
        finished, self.finished = self.finished, None
        if finished is not None:
            finished.close()

    def close(self) -> None:
        """On the aggregator's thread (the one that decides, so no second close can start meanwhile)."""
        agg = self.agg
        closing = agg.clock()  # (the timeline's fold wait includes the previous checkpoint's fsync)
        self.join()  # the previous checkpoint is published before this one is written
        if agg.error is not None:  # (a checkpoint that failed: the aggregator stops, nothing more is made)
            return
        agg.gate.acquire()
        handed = False  # the gate went to the checkpoint's thread, which releases it
        try:
            with agg.lock:  # no fold runs now: what the accumulator holds is settled
                partial = agg.uploads.partial()
                if partial:
                    self.refold(partial)
                    return
                if not agg.rounds.settle():
                    agg.lock.notify_all()
                    return
                counted = list(agg.rounds.counted.values())
            handed = self.write_round(counted, closing)
        finally:
            if not handed:
                agg.gate.release()

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

    def write_round(self, counted: list[Counted], closing: float) -> bool:
        """Fold gate held. Round R+1's global model, the average of the counted updates, made (in memory, or
        written) and R+1 opened. True when the gate went to the checkpoint's thread."""
        agg = self.agg
        strategy, r = agg.strategy, agg.rounds.round
        assert strategy is not None and agg.global_manifest is not None
        t0, began = time.monotonic(), agg.rounds.began
        records = [c.record for c in counted]
        last = r + 1 >= agg.config.total_rounds
        finished = None if last else in_memory(strategy, agg.global_manifest, r + 1)
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

            if finished is None:
                tmp, manifest = agg.store.write_round(r + 1, agg.global_manifest, blocks_of, env, on_begin=stage)
            else:
                tmp = agg.store.begin(r + 1)
                stage(tmp)
                manifest = finished.fill(blocks_of, env)
        finally:
            reader.close()
        if last:  # the job ends only once the final model is durable
            agg.store.commit(r + 1, tmp, manifest)
            agg.retention.published(r + 1)
        with agg.lock:
            seconds = agg.clock() - began if began is not None else time.monotonic() - t0
            write_s = round(time.monotonic() - t0, 3)
            line = agg.timeline.close(r, [c.site for c in counted], began, closing, write_s)
            agg.record(results.round_record(agg.rounds, records, strategy.weight, metrics, write_s, seconds, line))
            log.info("round %d done: %d updates, checkpoint %s", r, len(records), agg.store.round_dir(r + 1))
            agg.uploads.kill_all(agg.rounds)
            self.retire()
            # R+1 opens at once, served from memory (or the page-cached files); the checkpoint follows behind
            agg.open_round(r + 1, manifest, None if last else tmp, finished)
            if not last:
                self.finished = finished
                args = (r + 1, tmp, manifest, finished)
                self.durable = threading.Thread(target=self.make_durable, args=args, name="fl-checkpoint")
                self.durable.daemon = True
                self.durable.start()
            agg.lock.notify_all()
        return finished is not None

    def make_durable(self, r: int, tmp: Path, manifest: Manifest, finished: Finished | None) -> None:
        """The checkpoint's thread: round r's shards written (from memory: the fold gate is released once the
        serving switched to them and the accumulator is reset), fsynced and renamed."""
        agg = self.agg
        try:
            if finished is not None:
                self.write_finished(tmp, finished)
            agg.store.sync(tmp, manifest)
            with agg.lock:  # downloads open files under this lock: none sees a half-renamed directory
                agg.store.publish(r, tmp)
                if agg.rounds.round == r:
                    agg.serving = agg.store.round_dir(r)
                    agg.memory_model = None
            agg.retention.published(r)  # (older rounds: nothing reads them)
        except BaseException as e:
            log.exception("checkpoint of round %d could not be made durable", r)
            with agg.lock:
                agg.error = e
                agg.lock.notify_all()

    def write_finished(self, tmp: Path, finished: Finished) -> None:
        agg = self.agg
        assert agg.strategy is not None
        try:
            t0 = time.monotonic()
            finished.to_files(finished.write(tmp))
            agg.strategy.reset()  # the memory served nothing since the switch; the folds wait for the gate
            log.debug("checkpoint written from memory in %.2f s", time.monotonic() - t0)
        except BaseException as e:  # the aggregator stops: the folds waiting at the gate are refused, not folded
            finished.fail(e)
            with agg.lock:
                agg.error = agg.error or e
                agg.uploads.new_epoch()
                agg.lock.notify_all()
            raise
        finally:
            agg.gate.release()


def in_memory(strategy: Strategy, layout: Manifest, r: int) -> Finished | None:
    """Where the close makes round r's model: in the accumulator's memory (finished.py), or None: written into
    files first (a strategy that does not fold into fedavg.py's one array per tensor, or keeps updates; an
    accumulator on disk, whose memory is the page cache anyway)."""
    if isinstance(strategy, KeepsUpdates) or not isinstance(strategy, Accumulator) or strategy.on_disk:
        return None
    return Finished(layout, strategy.arrays, f"round {r}'s global model")
