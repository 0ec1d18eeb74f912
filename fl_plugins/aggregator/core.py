"""The aggregator's coordinator: it owns the lock, the fold gate, the run directory and the background thread,
and feeds the parts that decide (no gRPC in them; service.py is the wire face): rounds.py (the round rules and the
promise), workflow.py and job.py (which `Task` a site gets next), intake.py / uploads.py (an upload's begin, chunks
and commit), offer.py (a site's weights as round 0's model), strategy.py (counted updates -> the next global model),
store.py (checkpoints, records, the run's identity), presence.py and ending.py (what the operator reads; the end of
a job), closing.py (a round's close), timeline.py (where a round's time goes). docs/architecture.md has the whole map.

Service calls take the lock (`lock`, a Condition: long polls wait on it); a heartbeat finding it held by a long
write is noted, told at the next step. Chunks fold outside it, under the fold gate's shared side; the close takes
the exclusive side, so it sees every fold that started. The thread runs `step()`: timeouts, the decision, the
close (a refold, or round R+1 written and opened) or a new attempt. Time comes from `clock`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_plugins.aggregator import ending, presence, remote, results, sitelogs, status
from fl_plugins.aggregator.closing import Closer
from fl_plugins.aggregator.evaluation import GLOBAL
from fl_plugins.aggregator.finished import Finished
from fl_plugins.aggregator.intake import Intake
from fl_plugins.aggregator.job import CROSS, Job
from fl_plugins.aggregator.models import SubmittedModels
from fl_plugins.aggregator.offer import Offer
from fl_plugins.aggregator.relay import Relay
from fl_plugins.aggregator.retention import Retention
from fl_plugins.aggregator.rounds import Decision, RoundState, SiteState
from fl_plugins.aggregator.store import RunStore, undo_failed_start
from fl_plugins.aggregator.strategy import Strategy, extra_shards, make_strategy
from fl_plugins.aggregator.timeline import Timeline
from fl_plugins.aggregator.uploads import Gate, Stream, Upload, Uploads
from fl_plugins.aggregator.workflow import FedAvgWorkflow, Task, TaskKind
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import RoundError
from fl_plugins.records import MetricsRecord
from fl_plugins.wire import limits
from fl_plugins.wire.layout import Manifest
from fl_plugins.wire.stream import FileSource, OpenSource, ShardReceiver

__all__ = ["Aggregator", "AggregatorConfig", "Decision", "Task", "TaskKind"]

ENDED = "the job is finished"  # END's message; END names the final global model (its manifest)
log = logging.getLogger(__name__)

HEARD_WAIT = 1.0  # seconds a heartbeat waits for the lock before it is noted for the next step instead

STATS = (
    *("bytes_received", "bytes_sent", "corrupted_chunks", "updates_accepted", "updates_refused"),
    *("invalid_updates", "round_restarts", "refolds", "updates_lost"),
)


class Aggregator:
    def __init__(self, config: AggregatorConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.remote = remote.open_remote(config, self._failed) if config.store_url else None  # (fetched first)
        self.store = RunStore(config.run_dir)
        if self.remote is not None:
            self.store.on_publish = self.remote.publish
        self.job_id = config.job_id  # _resume sets the run's: run.json's, else this one, else a new one
        self.lock = threading.Condition()
        self.stats: dict[str, Any] = dict.fromkeys(STATS, 0)
        self.rounds = RoundState(config, self.stats, self.record, restarted_at=self.store.latest_round())
        self.uploads = Uploads()
        self.offer = Offer(self.store, config.min_sites, config.site_timeout, extra_shards(config))
        self.job = Job(config, self.rounds, FedAvgWorkflow(self.rounds, self.offer, self.uploads))
        self.models = SubmittedModels(config.run_dir)
        self.intake = Intake(self)
        self.relay = Relay(config.run_dir / "relay")  # sealed transfers between sites (swarm.py)
        self.heard: dict[str, float] = {}  # site -> a heartbeat's time, noted while the lock was held (heartbeat)
        self.timeline = Timeline(clock)
        self.presence = presence.Presence(self)  # the operator's lines on who is connected, silent, dropped, back
        self.gate = Gate()
        self.strategy: Strategy | None = None  # made for the global model's tensors when round 0 opens
        self.global_manifest: Manifest | None = None
        self._digests: list[list[bytes] | None] = []
        self.serving: Path | None = None  # the directory the current global model's shards are served from
        self.memory_model: Finished | None = None  # or the memory they are served from until written (finished.py)
        self.closer = Closer(self)  # the round's close: the new global model written, round R+1 opened
        self.retention = Retention(self.store, None if config.store_url else config.keep_rounds)
        if config.store_url and config.keep_rounds:
            log.warning("keep_rounds is not applied to a run directory in an object store: every round is kept")
        self.done = False
        self.done_at: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._resume()
        self._thread = threading.Thread(target=self._loop, name="fl-aggregator", daemon=True)

    round = property(lambda self: self.rounds.round)  # the round's view, for status pages and tests
    attempt = property(lambda self: self.rounds.attempt)
    sites: property = property(lambda self: self.rounds.sites)
    counted: property = property(lambda self: self.rounds.counted)
    owed: property = property(lambda self: self.rounds.owed)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Open the run directory: a new run, or the one it holds if this start's inputs are its own (another job
        id, recipe, initial model or strategy is a ConfigError). A start that fails here leaves no state behind."""
        from fl_plugins.aggregator.strategy import check_resume

        cfg = self.config
        with undo_failed_start(cfg.run_dir):
            ident = self.store.open_run(job_id=cfg.job_id, recipe=cfg.recipe, initial_model=cfg.initial_model)
            self.job_id = ident.job_id
            latest = self.store.latest_round()
            resumed = latest is not None and 0 < latest < cfg.total_rounds and self.job.trains  # the strategy steps on
            check_resume(cfg, self.store.round_dir(latest or 0) if resumed else None)
            if latest is not None:
                log.info("resuming run %s (job %s) from global/round-%05d", cfg.run_dir, self.job_id, latest)
            elif cfg.initial_model is not None:
                log.info("importing initial model %s", cfg.initial_model)
                self.store.import_initial(cfg.initial_model, cfg.chunk_bytes, extra=self.offer.extra)
                latest = 0
            if latest is not None:
                manifest = self.store.load(latest)
                self.store.check_tensors(manifest, latest)
                self.open_round(min(latest, cfg.total_rounds), manifest)

    def open_round(
        self, r: int, manifest: Manifest, directory: Path | None = None, memory: Finished | None = None
    ) -> None:
        """Lock held (or before the thread starts). Round `r` serves `manifest` from `directory` (if not yet in
        `global/round-R`: a checkpoint still being made durable), or from `memory` until its files are written
        (the checkpoint's thread then resets the strategy: closing.py), and collects updates."""
        self.global_manifest = manifest
        self.serving = directory or self.store.round_dir(r)
        self.memory_model = memory
        self._digests = memory.chunk_digests if memory else self.store.chunk_digests(manifest, self.serving)
        self.rounds.open(r)
        self.uploads.new_epoch()
        last = r >= self.config.total_rounds or not self.job.trains
        self.job.opened(r, last, self.clock())
        if self.job.complete:
            self._complete()
        if last:
            if self.job.trains:
                log.info("all %d rounds done; final model in %s", self.config.total_rounds, self.store.round_dir(r))
            return
        if self.strategy is None:
            self.strategy = make_strategy(self.config, [t for s in manifest.shards for t in s.tensors])
            if self.config.accumulator_dir is not None:
                gib, where = self.strategy.nbytes / 2**30, self.config.accumulator_dir
                log.info("the accumulator (%.2f GiB) is a file in %s, mapped: not held in memory", gib, where)
        elif memory is None:
            self.strategy.reset()
        log.info("round %d open (%d sites connected, %d needed)", r, self._alive(), self.config.min_sites)

    def _complete(self) -> None:
        """Lock held (or before the thread starts). The job has nothing left to do: sites get END."""
        with self.lock:  # (re-entrant: held by every caller but the start's)
            if not self.done:
                ending.conclude(self)  # RUN_DIR/final and summary.json, before sites hear END
                self.done, self.done_at = True, time.monotonic()
                self.lock.notify_all()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            self.lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.closer.join()
        self.closer.retire()
        if self.remote is not None and self.remote.close(ending=self.done) is not None:
            log.error("the run directory's object store: %s", self.remote.error)

    def _failed(self, e: BaseException) -> None:
        """A background part failed (the object store's uploads): the aggregator stops with it."""
        with self.lock:
            self.error = self.error or e
            self.lock.notify_all()

    def finished(self) -> bool:
        """True once the final model is checkpointed and sites have had `linger` seconds to hear END."""
        with self.lock:
            lingered = self.done and time.monotonic() - (self.done_at or 0) >= self.config.linger
            return self.error is not None or lingered

    def record(self, rec: MetricsRecord) -> None:
        """Lock held. Append a record to RUN_DIR/metrics.jsonl; waiting calls look again (something changed)."""
        self.store.append("metrics.jsonl", [rec.to_json()])
        self.lock.notify_all()

    # -- site calls ---------------------------------------------------------------------------------------------
    def _touch(self, site: str, can_offer: bool = False) -> SiteState:
        return self.rounds.touch(site, self.clock(), can_offer)

    def _alive(self) -> int:
        return self.rounds.alive_count(self.clock())

    def hello(self, site: str, can_offer: bool, cert: bytes | None = None, inbound: str = "") -> dict[str, Any]:
        with self.lock:  # (touch checks the site's name)
            self.presence.hello(site, self.clock())
            self._touch(site, can_offer)
            self.lock.notify_all()
            info = {"job_id": self.job_id, "total_rounds": self.config.total_rounds}
            return {**info, "evaluates_after": self.job.after_training, "chunk_bytes": self.config.chunk_bytes}

    def heartbeat(self, site: str) -> None:
        if not self.lock.acquire(timeout=HEARD_WAIT):  # a long write holds it (an fsync of a big offer)
            self.heard[site] = self.clock()  # told at the next step: the site's call answers now
            return
        try:
            self._touch(site)
        finally:
            self.lock.release()

    def get_task(
        self,
        site: str,
        wait: float,
        can_offer: bool = False,
        holds: str = "",
        gone: Callable[[], bool] | None = None,
    ) -> Task:
        """The site's next task, waiting up to `wait` seconds (at most 30) for one. `holds`: the nonce of the
        counted update the site's process still holds (it can send it again for a refold); a site owing a resend
        that does not hold it loses that update. `gone`: true once the caller has gone away (the wait then ends
        with WAIT; `wake()` makes it look at once)."""
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        with self.lock:
            while True:
                now = self.clock()
                s = self.rounds.touch(site, now, can_offer)
                if self.error is not None:
                    raise RoundError(f"the aggregator stopped: {self.error}")
                if self.done:
                    return Task(TaskKind.END, self.rounds.round, manifest=self.global_manifest, message=ENDED)
                task = self.job.next_task(s, now, holds, self.global_manifest)
                if task is not None:
                    return task
                left = deadline - time.monotonic()
                if left <= 0 or (gone is not None and gone()):
                    return Task(TaskKind.WAIT, self.rounds.round)
                self.lock.wait(min(left, 1.0))

    def wake(self) -> None:
        """Wake every waiting call so it looks at its state again (a long poll whose caller went away)."""
        with self.lock:
            self.lock.notify_all()

    def global_source(
        self, round_: int, model: str = "", site: str | None = None
    ) -> tuple[Manifest, OpenSource, list[list[bytes] | None]]:
        """The round's global model (or, `model` naming a site, its submitted model being evaluated): manifest,
        its shard files opened (the caller closes them; opened under the lock, so a checkpoint being renamed
        meanwhile does not matter) and chunk digests."""
        with self.lock:
            if model and model != GLOBAL:
                sweep = self.job.sweep
                if self.job.phase != CROSS or sweep is None or (site is not None and site not in sweep.cells):
                    raise RoundError(
                        f"site {site!r}: the sites' submitted models are served during the cross-site evaluation, "
                        "to the sites that take part in it"
                    )
                return self.models.source(model)
            if self.global_manifest is None or round_ != self.rounds.round:
                raise RoundError(
                    f"round {round_}'s global model is not being served (current round {self.rounds.round})"
                )
            if self.memory_model is not None:
                return self.global_manifest, self.memory_model.source(), self._digests
            paths = self.store.shard_paths(round_, self.global_manifest, self.serving)
            return self.global_manifest, FileSource(paths), self._digests

    def result(self, site: str, round_: int, task_id: str, envelope_json: str) -> dict[str, Any]:
        """An EVALUATE task's answer: its metrics fill the site's cell (job.py, evaluation.py)."""
        envelope = limits.parse_envelope(f"site {site!r}", envelope_json)
        with self.lock:
            self._touch(site)
            self.lock.notify_all()
            return {"round": round_, "message": self.job.answer(site, task_id, envelope, self.clock())}

    def count_sent(self, n: int) -> None:
        with self.lock:
            self.stats["bytes_sent"] += n

    def log_records(self, site: str, round_: int, records: list[dict]) -> None:
        """A site's flare.log records, appended to logs.jsonl (sitelogs.py)."""
        sitelogs.append(self, site, round_, records)

    # -- uploads (intake.py) ------------------------------------------------------------------------------------
    def begin_upload(
        self, site: str, round_: int, attempt: int, manifest_json: str, initial: bool, nonce: str, task_id: str = ""
    ) -> Upload:
        return self.intake.begin(site, round_, attempt, manifest_json, initial, nonce, task_id)

    def upload(self, upload_id: str, shard: int, *, site: str | None = None) -> tuple[Upload, ShardReceiver]:
        return self.intake.upload(upload_id, shard, site=site)

    def watch(self, u: Upload, stream: Stream) -> None:
        self.intake.watch(u, stream)

    def unwatch(self, u: Upload, stream: Stream) -> None:
        self.intake.unwatch(u, stream)

    def accept_chunk(self, u: Upload, rx: ShardReceiver, frame: bytes) -> None:
        self.intake.accept_chunk(u, rx, frame)

    def commit(self, upload_id: str, digests: list[str], *, site: str | None = None) -> dict[str, Any]:
        return self.intake.commit(upload_id, digests, site=site)

    # -- the background step ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.lock:  # decide and wait in one hold: a commit's wake-up cannot fall in between
                    decision = self._decide()
                    if decision is None:
                        self.lock.wait(0.2)
                        continue
                self._act(decision)
            except BaseException as e:  # a failed checkpoint write: stop serving, say why
                log.exception("aggregator failed")
                with self.lock:
                    self.error = e
                    self.lock.notify_all()
                return

    def step(self) -> Decision | None:
        """One step of the background thread: the timeouts, the round's decision, and what it says to do (a
        close, or a new attempt). Returns the decision (None: nothing to do now)."""
        with self.lock:
            decision = self._decide()
        self._act(decision)
        return decision

    def _act(self, decision: Decision | None) -> None:
        if decision is Decision.CLOSE:
            self._finalize()
        elif decision is Decision.NEW_ATTEMPT:
            self._new_attempt()

    def _decide(self) -> Decision | None:
        """Lock held. Apply the timeouts, then ask the round's rules."""
        rounds = self.rounds
        self.presence.step(self.clock())  # (first, the heartbeats noted while the lock was held)
        if not self.done and self.job.phase is not None:
            self._step_job()
        if self.done or self.global_manifest is None or rounds.started is None:
            return None
        now = self.clock()
        self.uploads.drop_idle(now, rounds, self.config.idle_timeout)
        rounds.expire_owed(now, self.uploads.resending)
        self.uploads.drop_gone(now, rounds)
        closing = rounds.closing
        decision = rounds.decide(now)
        if closing is None and rounds.closing is not None:
            self._drop_late()
        return decision

    def _step_job(self) -> None:
        """Lock held. The evaluation phase's timeouts; a phase that is over is recorded, and the next starts."""
        self.job.step(self.clock())
        done = self.job.drain()
        for phase, sweep in done:
            results.record(self, phase, sweep)
            for u in [u for u in self.uploads.live.values() if u.task_id]:  # submissions: kept until now
                self.uploads.kill(u, self.rounds)
        if self.job.complete:
            self._complete()
        if done:
            self.lock.notify_all()

    def _drop_late(self) -> None:
        """Lock held. The round closes: uploads not counted yet are late (a refold's resends go on)."""
        self.uploads.kill_all(self.rounds, keep_resends=True)
        self.lock.notify_all()

    def _new_attempt(self) -> None:
        with self.lock:
            if not self.rounds.new_attempt(self.clock()):
                self._drop_late()  # the round used its attempts and closes with what it has
            self.lock.notify_all()

    def _finalize(self) -> None:
        """On the background thread (the one that decides, so no second close can start meanwhile): closing.py."""
        self.closer.close()

    def status(self, site: str | None = None) -> dict[str, Any]:
        """The job's progress (aggregator/status.py: which view `site` gets)."""
        with self.lock:
            return status.view(self, site)
