"""The aggregator's rounds, sites and uploads: a state machine with no gRPC in it.

Round R, attempt A:
  * starts once `min_sites` sites are connected; every site that asks gets the TRAIN task for (R, A);
  * each update's chunks are folded into the accumulator as they arrive (fedavg.py); a commit checks that
    every shard is complete and its digest matches, then adds the update's weight: only then does it count;
  * closes when every site that took the task has committed (and at least `min_sites` have), or, with a
    round deadline, when the deadline passes and at least `min_updates` have committed;
  * a site that vanished (no heartbeat for `site_timeout`) no longer holds the round up;
  * if bytes of an update that never committed were folded (a site died mid-upload), the accumulator holds a
    partial update: the round is run again from the same global model as attempt A+1, so no partial update
    ever reaches the global model (the rare, slow path; the common path folds at wire speed);
  * an update is refused, with an error that names what was wrong, when its manifest or envelope is malformed,
    its tensors disagree with the global model, or (as its chunks arrive) a shard's header disagrees with the
    manifest, a shard holds more bytes than declared, or a value is NaN or infinite (`reject_nonfinite`). A
    refused update does not hold the round up; one refused mid-stream also keeps its site out of the rest of
    the round (its folded chunks, if any, make the round run again, and the site must not make it run again
    and again).
A closed round is finalised on the background thread: the new global model is written to `global/round-R+1`
(store.py), then round R+1 opens. Updates for a closed round or an old attempt, and duplicates, are refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins.aggregator.fedavg import Accumulator
from fl_plugins.aggregator.store import GlobalReader, RunStore, same_tensors, write_chunk_digests
from fl_plugins.errors import (
    AuthError,
    ConfigError,
    FLError,
    IntegrityError,
    ModelMismatchError,
    ProtocolError,
    RoundError,
)
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, Manifest, ShardLayout, TensorInfo, short_repr
from fl_plugins.wire.stream import FileSource, ShardReceiver

log = logging.getLogger(__name__)

TASK_NAME = "train"


@dataclass
class AggregatorConfig:
    run_dir: Path
    rounds: int
    min_sites: int = 1
    initial_model: Path | None = None
    round_deadline: float | None = None  # seconds; None: wait for every site that took the task
    min_updates: int = 1  # at the deadline, close the round only with at least this many updates
    idle_timeout: float = 60.0  # a transfer that moves no bytes for this long is cancelled
    site_timeout: float = 60.0  # a site silent (no heartbeat, no call) for this long has left the round
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    job_id: str = ""
    linger: float = 5.0  # after the last round, keep answering END this long so sites learn the job is over
    reject_nonfinite: bool = True  # refuse an update holding NaN or Inf (checked on each chunk as it arrives)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.rounds < 1:
            raise ConfigError(f"`--rounds` must be >= 1 (got {self.rounds})")
        if self.min_sites < 1:
            raise ConfigError(f"`--min-sites` must be >= 1 (got {self.min_sites})")
        if self.round_deadline is not None and self.round_deadline <= 0:
            raise ConfigError(f"`--round-deadline` must be > 0 seconds (got {self.round_deadline})")
        if self.chunk_bytes % 8 or not 64 << 10 <= self.chunk_bytes <= 64 << 20:
            raise ConfigError(f"`chunk_bytes` must be a multiple of 8 in 64 KiB..64 MiB (got {self.chunk_bytes})")


@dataclass
class SiteState:
    name: str
    last_seen: float
    can_offer: bool = False
    took: tuple[int, int] | None = None  # (round, attempt) of the task it was given
    committed: tuple[int, int] | None = None
    asked: bool = False  # has asked for a task (and so said whether it can offer round 0's weights)
    sits_out: int | None = None  # a round whose update from this site was refused mid-stream


class _FoldSink:
    def __init__(self, acc: Accumulator, weight: float, session: Upload, check_finite: bool) -> None:
        self.acc, self.weight, self.session, self.check_finite = acc, weight, session, check_finite

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        if self.check_finite:
            self.acc.check_finite(tensor, lo, payload)  # before any of it is folded
        self.session.folded = True
        self.acc.fold(tensor, lo, payload, self.weight)


class _FileSink:
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


@dataclass
class Upload:
    id: str
    site: str
    round: int
    attempt: int
    manifest: Manifest
    weight: float
    params_type: str
    initial: bool
    receivers: list[ShardReceiver] = field(default_factory=list)
    folded: bool = False
    committed: bool = False
    dead: bool = False  # its round attempt ended: any further chunk is refused
    bytes_received: int = 0
    corrupted_chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    file_sink: _FileSink | None = None
    last_progress: float = field(default_factory=time.monotonic)
    streams: list = field(default_factory=list)  # live gRPC contexts, cancelled when the upload is dropped


class Aggregator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.store = RunStore(config.run_dir)
        self.job_id = config.job_id or uuid.uuid4().hex[:12]
        self._cond = threading.Condition()
        self.sites: dict[str, SiteState] = {}
        self.uploads: dict[str, Upload] = {}
        self.round = 0
        self.attempt = 0
        self.global_manifest: Manifest | None = None
        self._digests: list[list[bytes] | None] = []
        self._serving: Path | None = None  # the directory the current global model's shards are served from
        self._durable: threading.Thread | None = None  # fsync + rename of the latest checkpoint
        self.acc: Accumulator | None = None
        self._round_started: float | None = None
        self._offering: str | None = None  # site uploading its weights as round 0's model
        self.done = False
        self.done_at: float | None = None
        self.error: BaseException | None = None
        self._closing = False
        self._dirty = False
        self._stop = threading.Event()
        self.stats: dict[str, Any] = {"bytes_received": 0, "bytes_sent": 0, "corrupted_chunks": 0,
                                      "updates_accepted": 0, "updates_refused": 0, "invalid_updates": 0,
                                      "round_restarts": 0}  # fmt: skip
        self._fold_gate = _Gate()
        self._round_metrics: list[dict] = []
        self._resume()
        self._thread = threading.Thread(target=self._loop, name="fl-aggregator", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        latest = self.store.latest_round()
        if latest is None and self.config.initial_model is not None:
            log.info("importing initial model %s", self.config.initial_model)
            self.store.import_initial(self.config.initial_model, self.config.chunk_bytes)
            latest = 0
        if latest is not None:
            if latest > 0 or self.config.initial_model is None:
                log.info("resuming run %s from global/round-%05d", self.config.run_dir, latest)
            self._open_round(min(latest, self.config.rounds), self.store.load(latest))

    def _open_round(self, r: int, manifest: Manifest, directory: Path | None = None) -> None:
        """Called with the lock held (or before the thread starts). `directory`: where the shards are, if not
        yet in `global/round-R` (a checkpoint still being made durable)."""
        self.global_manifest = manifest
        self._serving = directory or self.store.round_dir(r)
        self._digests = self.store.chunk_digests(manifest, self._serving)
        self.round, self.attempt = r, 0
        self._round_started = None
        if r >= self.config.rounds:
            self.done, self.done_at = True, time.monotonic()
            log.info("all %d rounds done; final model in %s", self.config.rounds, self.store.round_dir(r))
            return
        if self.acc is None:
            self.acc = Accumulator([t for s in manifest.shards for t in s.tensors])
        else:
            self.acc.reset()
        log.info("round %d open (%d sites connected, %d needed)", r, self._alive(), self.config.min_sites)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._durable is not None:
            self._durable.join()

    def finished(self) -> bool:
        """True once the final model is checkpointed and sites have had `linger` seconds to hear END."""
        with self._cond:
            if self.error is not None:
                return True
            return self.done and time.monotonic() - (self.done_at or 0) >= self.config.linger

    # -- site calls --------------------------------------------------------------------------------------
    def _touch(self, site: str, can_offer: bool = False) -> SiteState:
        s = self.sites.get(site)
        if s is None:
            s = self.sites[site] = SiteState(site, time.monotonic(), can_offer)
            log.info("site %r connected (%d connected)", site, len(self.sites))
        s.last_seen = time.monotonic()
        s.can_offer = s.can_offer or can_offer
        return s

    def hello(self, site: str, can_offer: bool) -> dict[str, Any]:
        if not site or len(site) > 128 or any(c in site for c in "/\\\0"):
            raise ConfigError(f"site name {site!r} must be 1-128 characters without path separators")
        with self._cond:
            self._touch(site, can_offer)
            self._cond.notify_all()
            return {"job_id": self.job_id, "total_rounds": self.config.rounds, "chunk_bytes": self.config.chunk_bytes}

    def heartbeat(self, site: str) -> None:
        with self._cond:
            self._touch(site)

    def _alive(self) -> int:
        now = time.monotonic()
        return sum(1 for s in self.sites.values() if now - s.last_seen < self.config.site_timeout)

    def get_task(self, site: str, wait: float, can_offer: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        with self._cond:
            while True:
                s = self._touch(site, can_offer)
                if self.error is not None:
                    raise RoundError(f"the aggregator stopped: {self.error}")
                if self.done:
                    return {"kind": "END", "round": self.round, "message": "the job is finished"}
                if self.global_manifest is None:
                    offerer = self.sites.get(self._offering or "")
                    if offerer is not None and time.monotonic() - offerer.last_seen > self.config.site_timeout:
                        log.warning("site %r left before its initial model arrived; asking another", offerer.name)
                        self._offering = None
                    if self._offering is None and s.can_offer:
                        self._offering = site
                        log.info("no initial model: site %r offers its weights as round 0's model", site)
                        return {"kind": "OFFER_INITIAL", "round": 0}
                    # every site the round needs has asked for a task and none can offer: nobody will (a
                    # site that asks before the one that offers has said so must wait for it, not fail)
                    s.asked = True
                    asked = [x for x in self.sites.values() if x.asked]
                    if (self._offering is None and len(asked) >= self.config.min_sites
                            and not any(x.can_offer for x in self.sites.values())):  # fmt: skip
                        raise ConfigError(
                            "the aggregator has no initial model and no site offered one: start it with "
                            "`fl-plugins server ... --initial-model PATH` (a .safetensors file or a Hugging Face "
                            "model folder), or use the Lightning/HF integrations, which offer the site's weights"
                        )
                elif not self._closing and s.committed != (self.round, self.attempt) and s.sits_out != self.round:
                    if self._round_started is None and self._alive() >= self.config.min_sites:
                        self._round_started = time.monotonic()
                        log.info("round %d attempt %d started with %d sites", self.round, self.attempt, self._alive())
                    if self._round_started is not None:
                        s.took = (self.round, self.attempt)
                        return {"kind": "TRAIN", "round": self.round, "attempt": self.attempt,
                                "manifest": self.global_manifest}  # fmt: skip
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"kind": "WAIT", "round": self.round}
                self._cond.wait(min(left, 1.0))

    def global_source(self, round_: int) -> tuple[Manifest, FileSource, list[list[bytes] | None]]:
        """The round's global model: manifest, its shard files opened (the caller closes them; opened under
        the lock, so a checkpoint being renamed meanwhile does not matter) and chunk digests."""
        with self._cond:
            if self.global_manifest is None or round_ != self.round:
                raise RoundError(f"round {round_}'s global model is not being served (current round {self.round})")
            paths = self.store.shard_paths(round_, self.global_manifest, self._serving)
            return self.global_manifest, FileSource(paths), self._digests

    def count_sent(self, n: int) -> None:
        with self._cond:
            self.stats["bytes_sent"] += n

    def watch(self, u: Upload, context) -> None:
        """Register a live upload stream so an idle one (no bytes for `idle_timeout`) can be cancelled."""
        with self._cond:
            u.last_progress = time.monotonic()
            u.streams.append(context)

    def unwatch(self, u: Upload, context) -> None:
        with self._cond:
            if context in u.streams:
                u.streams.remove(context)

    # -- uploads -----------------------------------------------------------------------------------------
    def begin_upload(self, site: str, round_: int, attempt: int, manifest_json: str, initial: bool,
                     nonce: str) -> Upload:  # fmt: skip
        try:
            manifest, params_type, weight = _parse_update(site, manifest_json)
        except FLError as e:
            with self._cond:
                self._invalid(site, round_, attempt, initial, e)
            raise
        upload_id = f"{site}:{round_}:{attempt}:{'init' if initial else 'upd'}:{nonce}"
        with self._cond:
            s = self._touch(site)
            existing = self.uploads.get(upload_id)
            if existing is not None and not existing.dead:
                return existing  # a resume: same site, same send() call
            if initial:
                if self.global_manifest is not None or self._offering != site:
                    raise RoundError(f"site {site!r}: the aggregator did not ask this site for an initial model")
                for old in [u for u in self.uploads.values() if u.initial]:
                    self._kill(old)
                u = Upload(upload_id, site, 0, 0, manifest, 1.0, "FULL", True)
                staging = self.store.begin(0)
                u.file_sink = _FileSink(staging, manifest)
                u.receivers = [ShardReceiver(manifest, i, u.file_sink) for i in range(len(manifest.shards))]
            else:
                if self.done or self.global_manifest is None:
                    raise RoundError(f"site {site!r}: no round is open for updates")
                if s.sits_out == round_ == self.round:
                    self.stats["updates_refused"] += 1
                    raise RoundError(f"site {site!r}: its update for round {round_} was refused while it was "
                                     f"being sent; the site sits this round out and gets round {round_ + 1}'s "
                                     "task")  # fmt: skip
                if (round_, attempt) != (self.round, self.attempt) or self._closing:
                    self.stats["updates_refused"] += 1
                    raise RoundError(
                        f"site {site!r}: the update for round {round_} (attempt {attempt}) is late: the aggregator "
                        f"is on round {self.round} attempt {self.attempt}{' (closing)' if self._closing else ''}"
                    )
                if s.committed == (round_, attempt):
                    self.stats["updates_refused"] += 1
                    raise RoundError(f"site {site!r} already sent its update for round {round_}: duplicate refused")
                try:
                    same_tensors({t.name: t for s_ in self.global_manifest.shards for t in s_.tensors},
                                 {t.name: t for s_ in manifest.shards for t in s_.tensors},
                                 f"the update from site {site!r}")  # fmt: skip
                except ModelMismatchError as e:
                    self._invalid(site, round_, attempt, initial, e)
                    raise
                for old in [u for u in self.uploads.values() if u.site == site and not u.initial]:
                    self._kill(old)  # a new send() from the same site replaces an unfinished one
                if self._round_started is None:
                    # the site holds this round's task from before an aggregator restart: the round is under way
                    self._round_started = time.monotonic()
                    log.info("round %d attempt %d resumed by site %r's update", self.round, self.attempt, site)
                s.took = (round_, attempt)
                u = Upload(upload_id, site, round_, attempt, manifest, weight, params_type, False)
                sink = _FoldSink(self.acc, weight, u, self.config.reject_nonfinite)  # type: ignore[arg-type]
                u.receivers = [ShardReceiver(manifest, i, sink) for i in range(len(manifest.shards))]
            self.uploads[upload_id] = u
            log.info("site %r uploading %s for round %d (%.1f MB, weight %g, %s)", site,
                     "its initial model" if initial else "an update", round_, manifest.total_bytes / 1e6,
                     u.weight, u.params_type)  # fmt: skip
            return u

    def upload(self, upload_id: str, shard: int, *, site: str | None = None) -> tuple[Upload, ShardReceiver]:
        """The upload and the receiver of its shard. `site`: the caller's site, known from its certificate with
        mTLS; another site's upload is refused."""
        with self._cond:
            u = self.uploads.get(upload_id)
            if u is None or u.dead:
                raise RoundError(f"upload {upload_id!r} is unknown or its round ended; begin the upload again")
            _check_owner(u, site)
            u.last_progress = time.monotonic()
            if not 0 <= shard < len(u.receivers):
                raise ProtocolError(f"upload {upload_id!r} has no shard {shard}")
            self._touch(u.site)
            return u, u.receivers[shard]

    def accept_chunk(self, u: Upload, rx: ShardReceiver, frame: bytes) -> None:
        """Verify and fold one chunk (called on the stream's thread, concurrently for different sites).

        A damaged, repeated or misplaced chunk is refused and the upload goes on (the site resends from the
        offset the aggregator has). A chunk whose content disagrees with the manifest (its length, the shard's
        header), or that holds NaN or Inf (`reject_nonfinite`), refuses the whole update (`_refuse`)."""
        with u.lock:  # one stream per upload at a time
            if u.dead:
                raise RoundError(f"upload {u.id!r}: its round ended, or it was refused; the chunk is refused")
            if u.committed:
                raise RoundError(f"upload {u.id!r} is committed already; the chunk is refused")
            try:
                chunk = rx.verify(frame)
            except ProtocolError:
                u.corrupted_chunks += 1
                with self._cond:
                    self.stats["corrupted_chunks"] += 1
                raise
            if chunk is None:  # an exact repeat of a chunk already folded (a resend racing its old stream)
                return
            try:
                with self._fold_gate.shared():
                    if u.dead:
                        raise RoundError(f"upload {u.id!r}: its round ended; the chunk is refused")
                    n = rx.use(*chunk)
            except (ProtocolError, ModelMismatchError) as e:
                with self._cond:
                    raise self._refuse(u, e) from None
            u.bytes_received += n
            with self._cond:
                u.last_progress = time.monotonic()
                self.stats["bytes_received"] += n
                self.sites[u.site].last_seen = time.monotonic()

    def commit(self, upload_id: str, digests: list[str], *, site: str | None = None) -> dict[str, Any]:
        with self._cond:
            u = self.uploads.get(upload_id)
            if u is None or u.dead:
                raise RoundError(f"upload {upload_id!r} is unknown or its round ended; it was not counted")
            _check_owner(u, site)
            if u.committed:
                return {"round": u.round, "message": "already committed"}
            if len(digests) != len(u.receivers):
                raise ProtocolError(f"commit lists {len(digests)} shard digests, the upload has {len(u.receivers)}")
        with u.lock:
            try:
                for rx, d in zip(u.receivers, digests, strict=True):
                    rx.finish(d)
            except IntegrityError as e:
                with self._cond:
                    self._kill(u)  # its folded bytes make the accumulator dirty: the round runs again
                raise IntegrityError(f"{e}; the update was not counted" +
                                     ("" if u.initial else f" and round {u.round} will run again")) from None
        with self._cond:
            if u.dead:
                raise RoundError(f"upload {upload_id!r}: its round ended while it was committing; not counted")
            u.committed = True
            s = self._touch(u.site)
            if u.initial:
                u.file_sink.close()  # type: ignore[union-attr]
                sink = u.file_sink
                shards = [ShardLayout(s_.name, sink.headers[i], s_.tensors, d)  # type: ignore[union-attr]
                          for i, (s_, d) in enumerate(zip(u.manifest.shards, digests, strict=True))]  # fmt: skip
                manifest = Manifest(shards, u.manifest.chunk_bytes, {"current_round": 0})
                for shard, rx in zip(shards, u.receivers, strict=True):
                    write_chunk_digests(sink.directory / shard.name, rx.digest.digests)  # type: ignore[union-attr]
                self.store.commit(0, sink.directory, manifest)  # type: ignore[union-attr]
                del self.uploads[upload_id]
                self._offering = None
                log.info("round 0's global model set from site %r's weights", u.site)
                self._open_round(0, self.store.load(0))
                self._cond.notify_all()
                return {"round": 0, "message": "initial model accepted"}
            self.acc.add_weight(u.weight, u.params_type)  # type: ignore[union-attr]
            s.committed = (u.round, u.attempt)
            self.stats["updates_accepted"] += 1
            env = u.manifest.envelope
            rec = {"event": "update", "round": u.round, "attempt": u.attempt, "site": u.site, "weight": u.weight,
                   "params_type": u.params_type, "bytes": u.manifest.total_bytes,
                   "bytes_received": u.bytes_received, "corrupted_chunks": u.corrupted_chunks,
                   "seconds": round(time.monotonic() - u.started, 3), "metrics": env.get("metrics") or {}}  # fmt: skip
            self._round_metrics.append(rec)
            self.store.append("metrics.jsonl", [rec])
            log.info("round %d: update from %r accepted (%d/%d)", u.round, u.site, self._n_committed(),
                     len(self._participants()))  # fmt: skip
            self._cond.notify_all()
            return {"round": u.round, "message": "update accepted"}

    def log_records(self, site: str, round_: int, records: list[dict]) -> None:
        with self._cond:
            self._touch(site)
        # the caller's site last: a record cannot pass itself off as another site's
        self.store.append("logs.jsonl", [{"round": round_, **r, "site": site} for r in records])
        refusal = next((r for r in records if r.get("key") == "policy_refused"), None)
        if refusal is not None:  # the site's own policy refused the job or the task: it is gone, do not wait for it
            with self._cond:
                s = self.sites.get(site)
                if s is not None:
                    s.last_seen = float("-inf")
                log.warning("site %r left: its policy refused: %s", site, refusal.get("value"))
                self._cond.notify_all()

    # -- round closing -----------------------------------------------------------------------------------
    def _participants(self) -> list[SiteState]:
        key = (self.round, self.attempt)
        return [s for s in self.sites.values() if s.took == key]

    def _n_committed(self) -> int:
        key = (self.round, self.attempt)
        return sum(1 for s in self.sites.values() if s.committed == key)

    def _invalid(self, site: str, round_: int, attempt: int, initial: bool, e: FLError) -> None:
        """Lock held. An upload refused before it began for what it holds (malformed manifest or envelope,
        tensors that disagree with the global model): nothing was folded; the site may send a corrected one, but
        the round does not wait for it."""
        self.stats["invalid_updates"] += 1
        what = "its initial model" if initial else f"its update for round {round_}"
        log.warning("site %r: %s refused: %s", site, what, e)
        s = self.sites.get(site)
        if initial:
            if self._offering == site:
                self._offering = None  # another site (or this one, again) may offer round 0's model
        elif s is not None and s.took == (round_, attempt) == (self.round, self.attempt):
            s.took = None
        self._cond.notify_all()

    def _refuse(self, u: Upload, e: FLError) -> FLError:
        """Lock held. An update refused mid-stream for its content: dropped (if chunks of it were folded, the
        round runs again), and its site sits out the rest of the round so it cannot make the round run again and
        again. Returns the error for the site, of the same class, saying all that."""
        restart = u.folded and not u.initial and (u.round, u.attempt) == (self.round, self.attempt)
        self.stats["invalid_updates"] += 1
        what = "its initial model" if u.initial else f"its update for round {u.round}"
        s = self.sites.get(u.site)
        if u.initial:
            if self._offering == u.site:
                self._offering = None
        elif s is not None:
            s.sits_out = u.round
            if s.took == (u.round, u.attempt):
                s.took = None
        u.streams = []  # the caller's stream ends with this error, not a cancellation
        self._kill(u)
        self._cond.notify_all()
        msg = f"{e}; site {u.site!r}: {what} was refused"
        if not u.initial:
            msg += f" and the site sits round {u.round} out"
        if restart:
            msg += " (the round runs again without it: part of the update was already folded in)"
        log.warning("%s", msg)
        return type(e)(msg)

    def _kill(self, u: Upload) -> None:
        if u.folded and not u.committed and (u.round, u.attempt) == (self.round, self.attempt):
            self._dirty = True  # part of an update that will never count is in the accumulator
        u.dead = True
        for ctx in u.streams:
            ctx.cancel()
        if u.file_sink is not None:
            u.file_sink.close()
        self.uploads.pop(u.id, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._cond:
                    action = self._tick()
                    if action is None:
                        self._cond.wait(0.2)
                        continue
                if action == "close":
                    self._finalize()
                elif action == "restart":
                    self._restart()
            except BaseException as e:  # a failed checkpoint write: stop serving, say why
                log.exception("aggregator failed")
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                return

    def _tick(self) -> str | None:
        if self.done or self.global_manifest is None or self._round_started is None or self._closing:
            return None
        now = time.monotonic()
        key = (self.round, self.attempt)
        for u in list(self.uploads.values()):  # cancel stalled uploads: a site that is alive begins again
            if not u.committed and now - u.last_progress > self.config.idle_timeout:
                log.warning("site %r: upload moved no bytes for %.0f s; dropped", u.site, self.config.idle_timeout)
                self._kill(u)
        committed = [s for s in self.sites.values() if s.committed == key]
        alive = self.config.site_timeout
        waiting = [s for s in self.sites.values() if s.took == key and s.committed != key and now - s.last_seen < alive]
        if self._dirty:
            return "restart"
        if not waiting and len(committed) >= self.config.min_sites:
            return "close"
        if not waiting and committed and self._alive() < self.config.min_sites:
            # sites left for good after others committed; without a deadline the round would stall
            if any(s.took == key and s.committed != key for s in self.sites.values()):
                log.warning("round %d: sites left without an update; closing with %d updates", self.round,
                            len(committed))  # fmt: skip
                return "close"
        if self.config.round_deadline is not None and now - self._round_started >= self.config.round_deadline:
            missing = sorted(s.name for s in self.sites.values() if s.took == key and s.committed != key)
            if len(committed) >= self.config.min_updates:
                log.warning("round %d: deadline passed; closing with %d updates (missing: %s)", self.round,
                            len(committed), missing)  # fmt: skip
                return "close"
            log.warning("round %d: deadline passed with %d updates; running the round again", self.round,
                        len(committed))  # fmt: skip
            return "restart"
        return None

    def _restart(self) -> None:
        with self._cond:
            self._closing = True
        with self._fold_gate.exclusive():
            with self._cond:
                for u in list(self.uploads.values()):
                    self._kill(u)
                self.acc.reset()  # type: ignore[union-attr]
                self.attempt += 1
                self._dirty = False
                self.stats["round_restarts"] += 1
                self._round_started = None
                self._round_metrics = []
                self._closing = False
                log.warning("round %d restarted as attempt %d", self.round, self.attempt)
                self._cond.notify_all()

    def _finalize(self) -> None:
        with self._cond:
            self._closing = True
            for u in list(self.uploads.values()):
                if not u.committed:
                    self._kill(u)  # late: refused from now on
        if self._durable is not None:
            self._durable.join()  # the previous checkpoint is published before this one is written
        with self._fold_gate.exclusive():
            acc, r = self.acc, self.round
            assert acc is not None and self.global_manifest is not None
            t0 = time.monotonic()
            with self._cond:
                reader = GlobalReader(self.store.shard_paths(r, self.global_manifest, self._serving),
                                      self.global_manifest)  # fmt: skip
            try:
                def blocks_of(t: TensorInfo):
                    return acc.finalize(t, reader.reader(t.name) if acc.weight_diff else None)

                metrics = _mean_metrics(self._round_metrics)
                env = {"current_round": r + 1, "metrics": metrics}
                tmp, manifest = self.store.write_round(r + 1, self.global_manifest, blocks_of, env)
            finally:
                reader.close()
            last = r + 1 >= self.config.rounds
            if last:  # the job ends only once the final model is durable
                self.store.commit(r + 1, tmp, manifest)
            with self._cond:
                rec = {"event": "round", "round": r, "attempt": self.attempt, "updates": len(self._round_metrics),
                       "weight": acc.weight, "metrics": metrics,
                       "checkpoint_seconds": round(time.monotonic() - t0, 3),
                       "seconds": round(time.monotonic() - (self._round_started or t0), 3)}  # fmt: skip
                self.store.append("metrics.jsonl", [rec])
                log.info("round %d done: %d updates, checkpoint %s", r, len(self._round_metrics),
                         self.store.round_dir(r + 1))  # fmt: skip
                self.uploads.clear()
                self._round_metrics = []
                self._closing = False
                # Round r+1 opens at once, served from the written (page-cached) files; fsync and the rename to
                # global/round-R+1 finish in the background. A crash before the rename redoes round r.
                self._open_round(r + 1, manifest, None if last else tmp)
                if not last:
                    self._durable = threading.Thread(target=self._make_durable, args=(r + 1, tmp, manifest),
                                                     name="fl-checkpoint", daemon=True)  # fmt: skip
                    self._durable.start()
                self._cond.notify_all()

    def _make_durable(self, r: int, tmp: Path, manifest: Manifest) -> None:
        try:
            self.store.sync(tmp, manifest)
            with self._cond:  # downloads open files under this lock: none sees a half-renamed directory
                self.store.publish(r, tmp)
                if self.round == r:
                    self._serving = self.store.round_dir(r)
        except BaseException as e:
            log.exception("checkpoint of round %d could not be made durable", r)
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "job_id": self.job_id, "round": self.round, "attempt": self.attempt, "done": self.done,
                "total_rounds": self.config.rounds, "sites": sorted(self.sites),
                "uploads": {u.id: {"bytes_received": u.bytes_received, "corrupted_chunks": u.corrupted_chunks,
                                   "offsets": [rx.offset for rx in u.receivers]} for u in self.uploads.values()},
                **self.stats,
            }  # fmt: skip


def _parse_update(site: str, manifest_json: str) -> tuple[Manifest, str, float]:
    """An update's manifest, params_type and weight, checked: whatever is malformed is a ProtocolError."""
    manifest = Manifest.from_json(manifest_json, f"update manifest from site {site!r}")
    env = manifest.envelope
    params_type = str(env.get("params_type", "FULL")).upper()
    if params_type not in ("FULL", "DIFF"):
        raise ProtocolError(f"site {site!r}: params_type must be FULL or DIFF (got {short_repr(params_type)})")
    for key in ("meta", "metrics"):
        if env.get(key) is not None and not isinstance(env[key], dict):
            raise ProtocolError(f"site {site!r}: envelope `{key}` must be an object (got {short_repr(env[key])})")
    weight = (env.get("meta") or {}).get("NUM_STEPS_CURRENT_ROUND", 1)
    w = _finite(weight)
    if w is None or not w > 0:
        raise ProtocolError(f"site {site!r}: NUM_STEPS_CURRENT_ROUND must be a finite number > 0 "
                            f"(got {short_repr(weight)})")  # fmt: skip
    return manifest, params_type, w


def _finite(x: Any) -> float | None:
    """x as a finite float, or None (not a number, a bool, NaN, infinite, or an int too big for a float)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _check_owner(u: Upload, site: str | None) -> None:
    if site is not None and site != u.site:
        raise AuthError(f"upload {u.id!r} belongs to site {u.site!r}, but the caller's certificate is site "
                        f"{site!r}; a site may only send its own update")  # fmt: skip


def _mean_metrics(records: list[dict]) -> dict[str, float]:
    """Weighted mean of each numeric metric over the round's updates."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        for k, v in (rec.get("metrics") or {}).items():
            f = _finite(v)  # a site's metrics are informative: unusable values are left out, not fatal
            if f is not None:
                sums[k] = sums.get(k, 0.0) + rec["weight"] * f
                weights[k] = weights.get(k, 0.0) + rec["weight"]
    return {k: sums[k] / weights[k] for k in sums}


class _Gate:
    """Many folds at once (shared), or one round close/restart (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._shared:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
