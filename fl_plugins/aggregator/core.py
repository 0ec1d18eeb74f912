"""The aggregator's rounds, sites and uploads: a state machine with no gRPC in it.

The promise: the global model written for round R+1 is the weighted average of the updates *counted* in round
R, and of nothing else, whatever closes the round and whenever a site fails. The rules that keep it:

Round R runs in attempts (A = 0, 1, ...); an attempt is a window in which each site may have one update counted.
  * Round R starts once `min_sites` sites are connected; every site that asks gets the TRAIN task (R, A) unless
    its update is counted already or it sits out the attempt. Only a site that took round R's task may begin
    an upload for it (after an aggregator restart: once `min_sites` are connected again, for attempt 0).
  * Each chunk of an update is verified, then folded into the accumulator at once (fedavg.py). A commit checks
    every shard's digest; only then is the update *counted* (its weight added). A counted update is kept as a
    `Counted` record: its weight, its manifest's hash and its chunk digests (16 bytes per chunk), not its bytes.
  * An upload that ends without being counted after some of its chunks were folded (dropped for
    `idle_timeout`, its site gone for `site_timeout` or refused by its policy, replaced by a new send(), a wrong
    shard digest, content refused mid-stream, late at the round's close) leaves a *partial update* in the
    accumulator. Its site is the culprit: it sits out the rest of the attempt (later sends are refused, saying
    so), so one site cannot make the round refold again and again.
  * The round *closes* when (a) every participant still alive is counted and at least `min_sites` are, or
    (b) no participant is left to wait for and fewer than `min_sites` sites could still be counted (sites left or
    sit out): the round closes with the updates it has (at least one), or (c) the round deadline passed with at
    least `min_updates` counted. Closing refuses uploads that are not counted yet (late).
  * At the close, with folds excluded (the fold gate), the aggregator checks the accumulator: if any upload that
    is not counted folded a byte in this accumulator's *epoch*, the accumulator is *refolded*: it is zeroed (a
    new epoch), every counted update becomes *owed*, and its site is asked (task RESEND) to send the same update
    again; each resent chunk must match the committed chunk digest *before* it is folded, and the commit must
    match the committed shard digests. A site that cannot resend (its process no longer holds the update, it
    left, or it did not begin within `site_timeout`) loses its update for the round. When nothing is owed, the
    check runs again; the round then closes if it still has what its reason needed, else it goes back to
    collecting. Refolds are bounded: each one has a culprit, who sits out.
  * A new attempt starts when the deadline passed with fewer than `min_updates` counted, or when no site is left
    that could send an update and none is counted: counted updates stay counted, sit-outs end, the deadline
    starts again, and every other site gets the task (R, A+1). After `max_attempts` attempts the round closes
    with what it has (`on_attempts_exhausted="close"`, at least one update) or the job fails with an error
    that says why (`"fail"`, the default).
  * An update is refused, with an error that names what was wrong, when its manifest or envelope is malformed,
    its tensors or shard plan disagree with the global model, its chunk size is not the aggregator's, its weight
    is not in (0, MAX_WEIGHT], or (as its chunks arrive) a shard's header disagrees with the manifest, a shard
    holds more bytes than declared, or a value is NaN or infinite (`reject_nonfinite`).
A closed round is finalised on the background thread: the new global model is checked for NaN/Inf (unless
`reject_nonfinite` is off) and written to `global/round-R+1` (store.py), then round R+1 opens. Updates for a
closed round and duplicates are refused. tests/test_rounds.py drives these rules as a hypothesis state machine.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins.aggregator.fedavg import MAX_WEIGHT, Accumulator, check_averageable
from fl_plugins.aggregator.store import (
    GlobalReader,
    RunStore,
    same_tensors,
    undo_failed_start,
    write_chunk_digests,
)
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import (
    AuthError,
    ConfigError,
    FLError,
    IntegrityError,
    ModelMismatchError,
    ProtocolError,
    RoundError,
)
from fl_plugins.wire import limits
from fl_plugins.wire.layout import Manifest, ShardLayout, TensorInfo, build_header, short_repr
from fl_plugins.wire.stream import FileSource, ShardReceiver

log = logging.getLogger(__name__)

TASK_NAME = "train"
MAX_HEADER_SLACK = 64 << 10  # an update's shard header may exceed the one we would build by this much (metadata)


class Close(enum.Enum):
    """Why a round closes, and how many counted updates that reason needs."""

    ALL_IN = "every participant is counted"
    SITES_LEFT = "no other site can still send an update"
    DEADLINE = "the round deadline passed"
    EXHAUSTED = "the round used its attempts"


class Step(enum.Enum):
    """What the background thread does next (`Aggregator._tick`)."""

    CLOSE = "close"
    NEW_ATTEMPT = "new attempt"


@dataclass
class SiteState:
    name: str
    last_seen: float
    can_offer: bool = False
    took: tuple[int, int] | None = None  # (round, attempt) of the task it was given last
    asked: bool = False  # has asked for a task (and so said whether it can offer round 0's weights)
    sits_out: tuple[int, int] | None = None  # (round, attempt) it sits out: it left a partial update behind
    not_waited: int | None = None  # a round whose update from it was invalid: it may send another, unwaited for


@dataclass
class Counted:
    """A committed update: what a refold needs to take it again and to check that a resend is the same update
    (the chunk digests are 16 bytes per chunk: 4 KiB per GiB at 4 MiB chunks). Owed while a refold waits for it."""

    site: str
    attempt: int  # the attempt it was sent in (a resend names it)
    nonce: str
    manifest_sha: bytes
    weight: float
    params_type: str
    shard_digests: list[str]
    chunk_digests: list[list[bytes]]
    record: dict[str, Any]
    asked: float = 0.0  # when a refold asked for it again


class _FoldSink:
    def __init__(self, acc: Accumulator, weight: float, session: Upload, check_finite: bool) -> None:
        self.acc, self.weight, self.session, self.check_finite = acc, weight, session, check_finite
        self.diff = session.params_type == "DIFF"

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        self.acc.check(tensor, lo, payload, finite=self.check_finite, weight=self.weight)  # before it is folded
        self.session.folded = True  # before the fold, under the fold gate: the close's check sees it
        self.acc.fold(tensor, lo, payload, self.weight, diff=self.diff)


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
    nonce: str = ""
    manifest_sha: bytes = b""
    epoch: int = 0  # the accumulator epoch its chunks fold into
    resend_of: Counted | None = None  # a refold's resend of this counted update
    receivers: list[ShardReceiver] = field(default_factory=list)
    folded: bool = False  # some of its bytes reached the accumulator (set before the fold, under the fold gate)
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
        self.job_id = config.job_id  # _resume sets the run's: run.json's, else this one, else a new one
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
        self._closing: Close | None = None  # why the round is closing; None while it collects updates
        self.epoch = 0  # the accumulator's epoch: a refold starts a new one
        self._epoch_uploads: list[Upload] = []  # every update upload that could fold into this epoch
        self.counted: dict[str, Counted] = {}  # site -> its update, counted in this round (folded in this epoch)
        self.owed: dict[str, Counted] = {}  # site -> its counted update, zeroed by a refold, to be sent again
        self._round_began: float | None = None
        self._refolds_before = 0
        self._stop = threading.Event()
        self.stats: dict[str, Any] = {"bytes_received": 0, "bytes_sent": 0, "corrupted_chunks": 0,
                                      "updates_accepted": 0, "updates_refused": 0, "invalid_updates": 0,
                                      "round_restarts": 0, "refolds": 0, "updates_lost": 0}  # fmt: skip
        self._fold_gate = _Gate()
        # the round this process found checkpointed when it started (None: a new run): its sites may hold that
        # round's task from the process before, and may resume their uploads before asking again
        self._restarted_at: int | None = self.store.latest_round()
        self._resume()
        self._thread = threading.Thread(target=self._loop, name="fl-aggregator", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Open the run directory: a new run (its run.json is written with round 0), or the run it holds if
        this start's inputs are the run's (store.RunStore.open_run: another job id, recipe or initial model is
        a ConfigError). A start that fails here leaves no state behind."""
        cfg = self.config
        with undo_failed_start(cfg.run_dir):
            ident = self.store.open_run(job_id=cfg.job_id, recipe=cfg.recipe, initial_model=cfg.initial_model)
            self.job_id = ident.job_id
            latest = self.store.latest_round()
            if latest is not None:
                log.info("resuming run %s (job %s) from global/round-%05d", cfg.run_dir, self.job_id, latest)
            elif cfg.initial_model is not None:
                log.info("importing initial model %s", cfg.initial_model)
                self.store.import_initial(cfg.initial_model, cfg.chunk_bytes)
                latest = 0
            if latest is not None:
                manifest = self.store.load(latest)
                self.store.check_tensors(manifest, latest)
                self._open_round(min(latest, cfg.rounds), manifest)

    def _open_round(self, r: int, manifest: Manifest, directory: Path | None = None) -> None:
        """Called with the lock held (or before the thread starts). `directory`: where the shards are, if not
        yet in `global/round-R` (a checkpoint still being made durable)."""
        self.global_manifest = manifest
        self._serving = directory or self.store.round_dir(r)
        self._digests = self.store.chunk_digests(manifest, self._serving)
        self.round, self.attempt = r, 0
        self._round_started = self._round_began = None
        self._closing = None
        self.counted, self.owed = {}, {}
        self._epoch_uploads = []
        self.epoch += 1
        self._refolds_before = self.stats["refolds"]
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
            if not isinstance(site, str) or not site or len(site) > 128 or any(c in site for c in "/\\\0"):
                raise ConfigError(f"site name {short_repr(site)} must be 1-128 characters without path separators")
            s = self.sites[site] = SiteState(site, time.monotonic(), can_offer)
            log.info("site %r connected (%d connected)", site, len(self.sites))
        s.last_seen = time.monotonic()
        s.can_offer = s.can_offer or can_offer
        return s

    def hello(self, site: str, can_offer: bool) -> dict[str, Any]:
        with self._cond:  # (_touch checks the site's name)
            self._touch(site, can_offer)
            self._cond.notify_all()
            return {"job_id": self.job_id, "total_rounds": self.config.rounds, "chunk_bytes": self.config.chunk_bytes}

    def heartbeat(self, site: str) -> None:
        with self._cond:
            self._touch(site)

    def _alive(self) -> int:
        now = time.monotonic()
        return sum(1 for s in self.sites.values() if now - s.last_seen < self.config.site_timeout)

    def get_task(self, site: str, wait: float, can_offer: bool = False, holds: str = "",
                 gone: Callable[[], bool] | None = None) -> dict[str, Any]:  # fmt: skip
        """The site's next task. `holds`: the nonce of the counted update the site's process still holds (it can
        send it again for a refold); a site owing a resend that does not hold it loses that update. `gone`: true
        once the caller has gone away (the wait then ends with WAIT; `wake()` makes it look at once)."""
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        with self._cond:
            while True:
                s = self._touch(site, can_offer)
                if self.error is not None:
                    raise RoundError(f"the aggregator stopped: {self.error}")
                if self.done:
                    return {"kind": "END", "round": self.round, "message": "the job is finished"}
                owed = self.owed.get(site)
                if owed is not None and not any(u.resend_of is owed for u in self.uploads.values()):
                    if holds and holds == owed.nonce:
                        return {"kind": "RESEND", "round": self.round, "attempt": owed.attempt, "nonce": owed.nonce,
                                "message": "send the same update again: the round is refolded without another "
                                           "site's partial update"}  # fmt: skip
                    self._lose(owed, "its process no longer holds the update (it restarted or sent another one)")
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
                elif self._closing is None and self._may_train(s):
                    if self._round_started is None and self._alive() >= self.config.min_sites:
                        self._round_started = time.monotonic()
                        self._round_began = self._round_began or self._round_started
                        log.info("round %d attempt %d started with %d sites", self.round, self.attempt, self._alive())
                    if self._round_started is not None:
                        s.took = (self.round, self.attempt)
                        return {"kind": "TRAIN", "round": self.round, "attempt": self.attempt,
                                "manifest": self.global_manifest}  # fmt: skip
                left = deadline - time.monotonic()
                if left <= 0 or (gone is not None and gone()):
                    return {"kind": "WAIT", "round": self.round}
                self._cond.wait(min(left, 1.0))

    def wake(self) -> None:
        """Wake every waiting call so it looks at its state again (a long poll whose caller went away)."""
        with self._cond:
            self._cond.notify_all()

    def _may_train(self, s: SiteState) -> bool:
        """Lock held. The site may get (or has) this attempt's task: not counted, not owing, not sitting out."""
        return s.name not in self.counted and s.name not in self.owed and s.sits_out != (self.round, self.attempt)

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
        with self._cond:  # (progress is bytes arriving: opening streams again and again keeps nothing alive)
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
            if manifest.chunk_bytes != self.config.chunk_bytes:
                raise ProtocolError(f"site {site!r}: the manifest's chunk_bytes is {manifest.chunk_bytes}, the "
                                    f"aggregator's is {self.config.chunk_bytes}: chunk with the size Hello "
                                    "returned")  # fmt: skip
            if not initial and not 0 < weight <= MAX_WEIGHT:
                raise ProtocolError(f"site {site!r}: NUM_STEPS_CURRENT_ROUND must be at most {MAX_WEIGHT:g} "
                                    f"(got {weight:g}); send a step or sample count")  # fmt: skip
        except FLError as e:
            with self._cond:
                self._invalid(site, round_, attempt, initial, e)
            raise
        sha = hashlib.sha256(manifest_json.encode() if isinstance(manifest_json, str) else manifest_json).digest()
        if not isinstance(nonce, str) or not 1 <= len(nonce) <= 64:
            raise ProtocolError(f"site {site!r}: an upload's nonce must be 1-64 characters (got {short_repr(nonce)})")
        upload_id = f"{site}:{round_}:{attempt}:{'init' if initial else 'upd'}:{nonce}"
        with self._cond:
            s = self._touch(site)
            existing = self.uploads.get(upload_id)
            if existing is not None and not existing.dead:
                if existing.manifest_sha != sha:
                    raise ProtocolError(f"site {site!r}: upload {upload_id!r} resumed with another manifest; "
                                        "a new send() needs a new nonce")  # fmt: skip
                return existing  # a resume: same site, same send() call
            if initial:
                if self.global_manifest is not None or self._offering != site:
                    raise RoundError(f"site {site!r}: the aggregator did not ask this site for an initial model")
                try:
                    check_averageable([t for s_ in manifest.shards for t in s_.tensors], f"site {site!r}'s initial "
                                      "model")  # fmt: skip
                except FLError as e:
                    self._invalid(site, round_, attempt, initial, e)
                    raise
                for old in [u for u in self.uploads.values() if u.initial]:
                    self._kill(old)
                u = Upload(upload_id, site, 0, 0, manifest, 1.0, "FULL", True, nonce, sha)
                staging = self.store.begin(0)
                u.file_sink = _FileSink(staging, manifest)
                u.receivers = [ShardReceiver(manifest, i, u.file_sink) for i in range(len(manifest.shards))]
            else:
                u = self._begin_update(s, round_, attempt, manifest, params_type, weight, nonce, sha, upload_id)
            self.uploads[upload_id] = u
            log.info("site %r uploading %s for round %d (%.1f MB, weight %g, %s)", site,
                     "its initial model" if initial else "a resend" if u.resend_of else "an update", round_,
                     manifest.total_bytes / 1e6, u.weight, u.params_type)  # fmt: skip
            return u

    def _begin_update(self, s: SiteState, round_: int, attempt: int, manifest: Manifest, params_type: str,
                      weight: float, nonce: str, sha: bytes, upload_id: str) -> Upload:  # fmt: skip
        """Lock held. The checks an update passes before its first byte, in the order a site can act on."""
        site = s.name
        if self.done or self.global_manifest is None:
            raise RoundError(f"site {site!r}: no round is open for updates")
        if attempt < 0:
            raise ProtocolError(f"site {site!r}: attempt must be >= 0 (got {attempt})")
        if round_ != self.round or attempt > self.attempt:
            self.stats["updates_refused"] += 1
            raise RoundError(f"site {site!r}: the update for round {round_} (attempt {attempt}) is late: the "
                             f"aggregator is on round {self.round} attempt {self.attempt}")  # fmt: skip
        owed = self.owed.get(site)
        if owed is not None and owed.nonce == nonce:
            if attempt != owed.attempt or any(x.resend_of is owed for x in self.uploads.values()):
                raise RoundError(f"site {site!r}: a resend of its update for round {round_} must name attempt "
                                 f"{owed.attempt}, and only one may run at a time")  # fmt: skip
            if owed.manifest_sha != sha:
                self._lose(owed, "its resend's manifest differs from the committed one")
                raise ProtocolError(f"site {site!r}: the update resent for round {round_}'s refold has another "
                                    "manifest than the one committed; it is no longer counted")  # fmt: skip
            u = Upload(upload_id, site, round_, attempt, manifest, owed.weight, owed.params_type, False, nonce, sha,
                       self.epoch, resend_of=owed)  # fmt: skip
            self._epoch_uploads.append(u)
            sink = _FoldSink(self.acc, owed.weight, u, self.config.reject_nonfinite)  # type: ignore[arg-type]
            u.receivers = [ShardReceiver(manifest, i, sink) for i in range(len(manifest.shards))]
            return u
        if s.sits_out == (self.round, self.attempt):
            self.stats["updates_refused"] += 1
            raise RoundError(f"site {site!r}: an update of this site for round {round_} was dropped after part of "
                             f"it was folded; the site sits attempt {self.attempt} of the round out and gets the "
                             "next round's (or attempt's) task")  # fmt: skip
        if self._closing is not None:
            self.stats["updates_refused"] += 1
            raise RoundError(f"site {site!r}: the update for round {round_} is late: the round is closing "
                             f"({self._closing.value})")  # fmt: skip
        if site in self.counted or site in self.owed:
            self.stats["updates_refused"] += 1
            raise RoundError(f"site {site!r} already sent its update for round {round_}: duplicate refused")
        if s.took is None or s.took[0] != round_:
            if (self._round_started is None and attempt == 0 == self.attempt and self.round == self._restarted_at
                    and self._alive() >= self.config.min_sites):  # fmt: skip
                # the site holds this round's task from before an aggregator restart: the round is under way
                self._round_started = self._round_began = time.monotonic()
                log.info("round %d attempt %d resumed by site %r's update", self.round, self.attempt, site)
            else:
                self.stats["updates_refused"] += 1
                raise RoundError(f"site {site!r} was not given round {round_}'s task: only a site that received "
                                 "the round's TRAIN task may send an update for it (ask for a task first; the "
                                 f"round starts once {self.config.min_sites} sites are connected)")  # fmt: skip
        try:
            self._check_plan(manifest, f"the update from site {site!r}")
        except FLError as e:
            self._invalid(site, round_, attempt, False, e)
            raise
        for old in [u for u in self.uploads.values() if u.site == site and not u.initial]:
            self._kill(old)  # a new send() from the same site replaces an unfinished one
            if old.folded:
                raise RoundError(f"site {site!r}: a new update replaced one whose chunks were already folded; the "
                                 f"site sits attempt {self.attempt} of round {round_} out (the round is refolded "
                                 "without its partial update)")  # fmt: skip
        s.took = (round_, s.took[1] if s.took else attempt)
        s.not_waited = None
        u = Upload(upload_id, site, round_, attempt, manifest, weight, params_type, False, nonce, sha, self.epoch)
        self._epoch_uploads.append(u)
        sink = _FoldSink(self.acc, weight, u, self.config.reject_nonfinite)  # type: ignore[arg-type]
        u.receivers = [ShardReceiver(manifest, i, sink) for i in range(len(manifest.shards))]
        return u

    def _check_plan(self, manifest: Manifest, what: str) -> None:
        """An update's tensors must be the global model's, in at most as many shards as it has tensors (no empty
        shards), with headers no larger than the ones we would build plus MAX_HEADER_SLACK."""
        assert self.global_manifest is not None
        same_tensors({t.name: t for s_ in self.global_manifest.shards for t in s_.tensors},
                     {t.name: t for s_ in manifest.shards for t in s_.tensors}, what)  # fmt: skip
        for shard in manifest.shards:
            if not shard.tensors:
                raise ProtocolError(f"{what}: shard {shard.name!r} holds no tensor; every shard must hold one")
            bound = len(build_header(shard.tensors)) + MAX_HEADER_SLACK
            if shard.data_start > bound:
                raise ProtocolError(f"{what}: shard {shard.name!r} declares a {shard.data_start}-byte header, over "
                                    f"the {bound} bytes its tensor table needs (+{MAX_HEADER_SLACK} for metadata)")

    def upload(self, upload_id: str, shard: int, *, site: str | None = None) -> tuple[Upload, ShardReceiver]:
        """The upload and the receiver of its shard. `site`: the caller's site, known from its certificate with
        mTLS; another site's upload is refused."""
        with self._cond:
            u = self.uploads.get(upload_id)
            if u is None or u.dead:
                raise RoundError(f"upload {upload_id!r} is unknown or its round ended; begin the upload again")
            _check_owner(u, site)
            if not 0 <= shard < len(u.receivers):
                raise ProtocolError(f"upload {upload_id!r} has no shard {shard}")
            self._touch(u.site)
            return u, u.receivers[shard]

    def accept_chunk(self, u: Upload, rx: ShardReceiver, frame: bytes) -> None:
        """Verify and fold one chunk (called on the stream's thread, concurrently for different sites).

        A damaged, repeated or misplaced chunk is refused and the upload goes on (the site resends from the
        offset the aggregator has). A chunk whose content disagrees with the manifest (its length, the shard's
        header), that holds NaN or Inf (`reject_nonfinite`), or that differs from the committed update it
        resends, refuses the whole update (`_refuse`)."""
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
            if u.resend_of is not None:
                k = chunk[0] // self.config.chunk_bytes
                want = u.resend_of.chunk_digests[rx.index]
                if k >= len(want) or want[k] != chunk[2]:
                    with self._cond:
                        self._lose(u.resend_of, f"chunk {k} of shard {rx.index} differs from the committed one")
                        raise self._refuse(u, IntegrityError(
                            f"the update resent for round {u.round}'s refold differs from the one committed (chunk "
                            f"{k} of shard {rx.layout.name!r}): the tensors changed after send(); it no longer "
                            "counts")) from None  # fmt: skip
            try:
                with self._fold_gate.shared():
                    if u.dead or u.epoch != self.epoch:
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
                if u.resend_of is not None and list(digests) != u.resend_of.shard_digests:
                    raise IntegrityError("the resent update's shard digests differ from the committed ones")
            except IntegrityError as e:
                with self._cond:
                    if u.resend_of is not None:
                        self._lose(u.resend_of, str(e))
                    self._kill(u)  # its folded bytes are a partial update: its site sits out, the round refolds
                    sits = "" if u.initial else f" and site {u.site!r} sits attempt {u.attempt} of round {u.round} out"
                raise IntegrityError(f"{e}; the update was not counted{sits}") from None
        with self._cond:
            if u.dead:
                raise RoundError(f"upload {upload_id!r}: its round ended while it was committing; not counted")
            u.committed = True
            self._touch(u.site)
            if u.initial:
                return self._commit_initial(u, digests)
            if u.resend_of is not None:
                if self.owed.get(u.site) is not u.resend_of:
                    u.committed = False
                    self._kill(u)  # its bytes were folded for an update that is no longer owed: refold
                    raise RoundError(f"upload {upload_id!r}: the update it resends no longer counts; not counted")
                c = self.owed.pop(u.site)
                self.counted[u.site] = c
                self.acc.add_weight(c.weight, c.params_type)  # type: ignore[union-attr]
                log.info("round %d: update from %r resent and refolded (%d owed)", u.round, u.site, len(self.owed))
                self._cond.notify_all()
                return {"round": u.round, "message": "update accepted (resent for a refold)"}
            self.acc.add_weight(u.weight, u.params_type)  # type: ignore[union-attr]
            self.stats["updates_accepted"] += 1
            env = u.manifest.envelope
            rec = {"event": "update", "round": u.round, "attempt": u.attempt, "site": u.site, "weight": u.weight,
                   "params_type": u.params_type, "bytes": u.manifest.total_bytes,
                   "bytes_received": u.bytes_received, "corrupted_chunks": u.corrupted_chunks,
                   "seconds": round(time.monotonic() - u.started, 3), "metrics": env.get("metrics") or {}}  # fmt: skip
            self.counted[u.site] = Counted(u.site, u.attempt, u.nonce, u.manifest_sha, u.weight, u.params_type,
                                           list(digests), [list(rx.digest.digests) for rx in u.receivers],
                                           rec)  # fmt: skip
            self.store.append("metrics.jsonl", [rec])
            log.info("round %d: update from %r accepted (%d/%d)", u.round, u.site, len(self.counted),
                     len(self._participants()))  # fmt: skip
            self._cond.notify_all()
            return {"round": u.round, "message": "update accepted"}

    def _commit_initial(self, u: Upload, digests: list[str]) -> dict[str, Any]:
        """Lock held. An offered initial model arrived whole: it becomes round 0's global model."""
        sink = u.file_sink
        assert sink is not None
        sink.close()
        shards = [ShardLayout(s_.name, sink.headers[i], s_.tensors, d)
                  for i, (s_, d) in enumerate(zip(u.manifest.shards, digests, strict=True))]  # fmt: skip
        manifest = Manifest(shards, u.manifest.chunk_bytes, {"current_round": 0})
        for shard, rx in zip(shards, u.receivers, strict=True):
            write_chunk_digests(sink.directory / shard.name, rx.digest.digests)
        self.store.commit(0, sink.directory, manifest)
        del self.uploads[u.id]
        self._offering = None
        log.info("round 0's global model set from site %r's weights", u.site)
        self._open_round(0, self.store.load(0))
        self._cond.notify_all()
        return {"round": 0, "message": "initial model accepted"}

    def log_records(self, site: str, round_: int, records: list[dict]) -> None:
        """A site's flare.log records, appended to logs.jsonl; their shape and size are checked first
        (limits.check_log_records: ProtocolError naming the limit)."""

        records = limits.check_log_records(f"site {site!r}", records)
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
        return [s for s in self.sites.values() if s.took is not None and s.took[0] == self.round]

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
        elif s is not None and round_ == self.round:
            s.not_waited = round_
        self._cond.notify_all()

    def _refuse(self, u: Upload, e: FLError) -> FLError:
        """Lock held. An update refused mid-stream for its content: dropped, and its site sits out the rest of
        the attempt (its folded chunks, if any, make the round refold at its close, and the site must not make it
        refold again and again). Returns the error for the site, of the same class, saying all that."""
        self.stats["invalid_updates"] += 1
        what = "its initial model" if u.initial else f"its update for round {u.round}"
        s = self.sites.get(u.site)
        if u.initial:
            if self._offering == u.site:
                self._offering = None
        elif s is not None and u.round == self.round:
            s.sits_out = (self.round, self.attempt)
            s.took = None
        u.streams = []  # the caller's stream ends with this error, not a cancellation
        self._kill(u)
        self._cond.notify_all()
        msg = f"{e}; site {u.site!r}: {what} was refused"
        if not u.initial:
            msg += f" and the site sits attempt {self.attempt} of round {u.round} out"
        if u.folded and not u.initial:
            msg += " (part of it was already folded: the round is refolded without it)"
        log.warning("%s", msg)
        return type(e)(msg)

    def _kill(self, u: Upload) -> None:
        """Lock held. Drop an upload. One that folded bytes and will not count leaves a partial update: its site
        sits out the attempt (the close's check under the fold gate finds the bytes and refolds)."""
        if not u.initial and u.folded and not u.committed and u.round == self.round and not u.dead:
            s = self.sites.get(u.site)
            if s is not None:
                s.sits_out = (self.round, self.attempt)
        u.dead = True
        for ctx in u.streams:
            ctx.cancel()
        if u.file_sink is not None:
            u.file_sink.close()
        self.uploads.pop(u.id, None)

    def _lose(self, c: Counted, why: str) -> None:
        """Lock held. An owed update is no longer counted: its site could not send it again."""
        if self.owed.get(c.site) is not c:
            return  # lost already
        self.owed.pop(c.site, None)
        if self.counted.get(c.site) is c:  # pragma: no cover - only owed updates are lost
            del self.counted[c.site]
        self.stats["updates_lost"] += 1
        log.warning("round %d: site %r's update no longer counts: %s", self.round, c.site, why)
        self.store.append("metrics.jsonl", [{"event": "update_lost", "round": self.round, "attempt": self.attempt,
                                             "site": c.site, "reason": why}])  # fmt: skip
        self._cond.notify_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._cond:
                    step = self._tick()
                    if step is None:
                        self._cond.wait(0.2)
                        continue
                if step is Step.CLOSE:
                    self._finalize()
                elif step is Step.NEW_ATTEMPT:
                    self._new_attempt()
            except BaseException as e:  # a failed checkpoint write: stop serving, say why
                log.exception("aggregator failed")
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                return

    def _alive_site(self, s: SiteState, now: float) -> bool:
        return now - s.last_seen < self.config.site_timeout

    def _tick(self) -> Step | None:
        """Lock held. Apply the timeouts, then decide what the round does next (the module docstring's rules)."""
        if self.done or self.global_manifest is None or self._round_started is None:
            return None
        now = time.monotonic()
        for u in list(self.uploads.values()):  # cancel stalled uploads: a site that is alive begins again
            if not u.committed and now - u.last_progress > self.config.idle_timeout:
                log.warning("site %r: upload moved no bytes for %.0f s; dropped", u.site, self.config.idle_timeout)
                if u.resend_of is not None:
                    self._lose(u.resend_of, f"its resend moved no bytes for {self.config.idle_timeout:.0f} s")
                self._kill(u)
        for c in list(self.owed.values()):
            s = self.sites[c.site]
            if not self._alive_site(s, now):
                self._lose(c, f"the site was silent for {self.config.site_timeout:.0f} s")
            elif now - c.asked > self.config.site_timeout and not any(u.resend_of is c for u in self.uploads.values()):
                self._lose(c, f"the site did not send it again within {self.config.site_timeout:.0f} s")
            elif self.config.round_deadline is not None and now - c.asked > self.config.round_deadline:
                self._lose(c, f"its resend took longer than the round deadline ({self.config.round_deadline:g} s)")
        for u in list(self.uploads.values()):  # uploads of sites that left (silent, or refused by their policy)
            if not u.committed and not self._alive_site(self.sites[u.site], now):
                log.warning("site %r left mid-upload; its upload is dropped", u.site)
                if u.resend_of is not None:
                    self._lose(u.resend_of, "the site left while sending it again")
                self._kill(u)
        if self._closing is not None:
            return None if self.owed else Step.CLOSE
        r, a = self.round, self.attempt
        counted = len(self.counted)
        could = [s for s in self.sites.values() if self._alive_site(s, now) and self._may_train(s)]
        waiting = [s for s in could if s.took is not None and s.took[0] == r and s.not_waited != r]
        deadline = self.config.round_deadline
        if not waiting and counted >= self.config.min_sites:
            return self._close(Close.ALL_IN)
        if not waiting and counted and counted + len(could) < self.config.min_sites:
            log.warning("round %d: sites left or sit out; closing with %d updates", r, counted)
            return self._close(Close.SITES_LEFT)
        if deadline is not None and now - self._round_started >= deadline:
            if counted >= self.config.min_updates:
                missing = sorted(s.name for s in waiting)
                log.warning("round %d: deadline passed; closing with %d updates (missing: %s)", r, counted, missing)
                return self._close(Close.DEADLINE)
            log.warning("round %d attempt %d: deadline passed with %d of %d updates", r, a, counted,
                        self.config.min_updates)  # fmt: skip
            return Step.NEW_ATTEMPT
        if not could and counted == 0 and any(self._alive_site(s, now) for s in self.sites.values()):
            log.warning("round %d attempt %d: every site still connected sits out", r, a)
            return Step.NEW_ATTEMPT
        return None

    def _close(self, reason: Close) -> Step:
        """Lock held. The round closes: uploads not counted yet are late and dropped."""
        self._closing = reason
        for u in list(self.uploads.values()):
            if not u.committed and u.resend_of is None:
                self._kill(u)
        self._cond.notify_all()
        return Step.CLOSE if not self.owed else None  # type: ignore[return-value]

    def _needed(self, reason: Close) -> int:
        return {Close.ALL_IN: self.config.min_sites, Close.DEADLINE: self.config.min_updates}.get(reason, 1)

    def _new_attempt(self) -> None:
        """Another window for the round: counted updates stay, sit-outs end, the deadline starts again, and the
        other sites get the task (R, A+1). After `max_attempts`: close with what it has, or fail."""
        with self._cond:
            if self.attempt + 1 >= self.config.max_attempts:
                if self.config.on_attempts_exhausted == "close" and self.counted:
                    log.warning("round %d used its %d attempts; closing with %d updates", self.round,
                                self.config.max_attempts, len(self.counted))  # fmt: skip
                    self._close(Close.EXHAUSTED)
                    return
                raise RoundError(
                    f"round {self.round} used its {self.config.max_attempts} attempts with {len(self.counted)} "
                    f"updates counted ({self._needed(Close.DEADLINE)} needed at the deadline, {self.config.min_sites}"
                    " sites to close without one): sites left, were too slow or sent updates that were refused (the "
                    "aggregator's log names them); raise --max-attempts or --round-deadline, lower --min-updates, "
                    "or set on_attempts_exhausted: close to go on with the updates a round has"
                )
            self.attempt += 1
            self.stats["round_restarts"] += 1
            self._round_started = time.monotonic()  # the new window: deadline, timeouts and closes apply at once
            self.store.append("metrics.jsonl", [{"event": "attempt", "round": self.round, "attempt": self.attempt,
                                                 "counted": sorted(self.counted)}])  # fmt: skip
            log.warning("round %d: attempt %d (%d updates kept)", self.round, self.attempt, len(self.counted))
            self._cond.notify_all()

    def _refold(self, partial: list[Upload]) -> None:
        """Lock and fold gate held. The accumulator holds bytes of `partial` uploads that will never count: zero
        it and ask every counted update's site to send it again."""
        culprits = sorted({u.site for u in partial})
        for name in culprits:
            s = self.sites.get(name)
            if s is not None:
                s.sits_out = (self.round, self.attempt)
        self.acc.reset()  # type: ignore[union-attr]
        self.epoch += 1
        self._epoch_uploads = []
        now = time.monotonic()
        for c in self.counted.values():
            c.asked = now
        self.owed, self.counted = self.counted, {}
        for u in list(self.uploads.values()):
            self._kill(u)
        self.stats["refolds"] += 1
        log.warning("round %d: partial updates of %s were folded; refolding from %d counted updates", self.round,
                    culprits, len(self.owed))  # fmt: skip
        self.store.append("metrics.jsonl", [{"event": "refold", "round": self.round, "attempt": self.attempt,
                                             "partial": culprits, "owed": sorted(self.owed)}])  # fmt: skip
        self._cond.notify_all()

    def _finalize(self) -> None:
        """On the background thread (the one that runs `_tick`, so no second close can start meanwhile)."""
        if self._durable is not None:
            self._durable.join()  # the previous checkpoint is published before this one is written
        with self._fold_gate.exclusive():
            with self._cond:  # no fold runs now: what the accumulator holds is settled
                reason = self._closing
                assert reason is not None
                partial = [u for u in self._epoch_uploads if u.folded and not u.committed]
                if partial:
                    self._refold(partial)
                    return
                if len(self.counted) < self._needed(reason):
                    log.warning("round %d: %d updates after the refold, %d needed (%s); collecting again",
                                self.round, len(self.counted), self._needed(reason), reason.value)  # fmt: skip
                    self._closing = None
                    self._cond.notify_all()
                    return
                records = [c.record for c in self.counted.values()]
            self._write_round(records)

    def _write_round(self, records: list[dict]) -> None:
        """Fold gate held. Write the average of the counted updates as round R+1's global model; open R+1."""
        acc, r = self.acc, self.round
        assert acc is not None and self.global_manifest is not None
        t0 = time.monotonic()
        with self._cond:
            reader = GlobalReader(self.store.shard_paths(r, self.global_manifest, self._serving),
                                  self.global_manifest)  # fmt: skip
        try:
            def blocks_of(t: TensorInfo):
                blocks = acc.finalize(t, reader.reader(t.name))
                return acc.checked(t, blocks, r) if self.config.reject_nonfinite else blocks

            metrics = _mean_metrics(records)
            env = {"current_round": r + 1, "metrics": metrics}
            tmp, manifest = self.store.write_round(r + 1, self.global_manifest, blocks_of, env)
        finally:
            reader.close()
        last = r + 1 >= self.config.rounds
        if last:  # the job ends only once the final model is durable
            self.store.commit(r + 1, tmp, manifest)
        with self._cond:
            rec = {"event": "round", "round": r, "attempt": self.attempt, "updates": len(records),
                   "sites": sorted(rec["site"] for rec in records),
                   "weight": acc.weight, "metrics": metrics, "refolds": self._round_refolds(),
                   "checkpoint_seconds": round(time.monotonic() - t0, 3),
                   "seconds": round(time.monotonic() - (self._round_began or t0), 3)}  # fmt: skip
            self.store.append("metrics.jsonl", [rec])
            log.info("round %d done: %d updates, checkpoint %s", r, len(records), self.store.round_dir(r + 1))
            for u in list(self.uploads.values()):
                self._kill(u)
            # Round r+1 opens at once, served from the written (page-cached) files; fsync and the rename to
            # global/round-R+1 finish in the background. A crash before the rename redoes round r.
            self._open_round(r + 1, manifest, None if last else tmp)
            if not last:
                self._durable = threading.Thread(target=self._make_durable, args=(r + 1, tmp, manifest),
                                                 name="fl-checkpoint", daemon=True)  # fmt: skip
                self._durable.start()
            self._cond.notify_all()

    def _round_refolds(self) -> int:
        return self.stats["refolds"] - self._refolds_before

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

    def status(self, site: str | None = None) -> dict[str, Any]:
        """The job's progress. `site` None: everything (the operator's view: in-process callers, and over the
        Status RPC the server kit's certificate); a site's name: the job and round and that site's own entries
        only (`sites` lists at most itself, `uploads` only its own; no totals over all sites); "": the job and
        round only. service.py's Status decides which view a caller gets."""
        with self._cond:
            job = {"job_id": self.job_id, "round": self.round, "attempt": self.attempt, "done": self.done,
                   "total_rounds": self.config.rounds}  # fmt: skip
            uploads = [u for u in self.uploads.values() if site is None or u.site == site]
            mine = {"sites": sorted(self.sites) if site is None else [site] if site in self.sites else [],
                    "uploads": {u.id: {"bytes_received": u.bytes_received, "corrupted_chunks": u.corrupted_chunks,
                                       "offsets": [rx.offset for rx in u.receivers]} for u in uploads}}  # fmt: skip
            if site is None:
                return {**job, **mine, **self.stats}
            return {**job, "site": site, **mine} if site else job


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
        if env.get(key) is not None:  # bounded: the round's metrics go into the next global model's manifest
            limits.check_envelope_dict(f"site {site!r}", key, env[key])
    weight = (env.get("meta") or {}).get("NUM_STEPS_CURRENT_ROUND", 1)
    w = limits.finite_float(weight)
    if w is None or not w > 0:
        raise ProtocolError(f"site {site!r}: NUM_STEPS_CURRENT_ROUND must be a finite number > 0 "
                            f"(got {short_repr(weight)})")  # fmt: skip
    return manifest, params_type, w


def _check_owner(u: Upload, site: str | None) -> None:
    if site is not None and site != u.site:
        raise AuthError(f"upload {u.id!r} belongs to site {u.site!r}, but the caller's certificate is site "
                        f"{site!r}; a site may only send its own update")  # fmt: skip


def _mean_metrics(records: list[dict]) -> dict[str, float]:
    """Weighted mean of each numeric metric over the round's updates: unusable values are left out (a site's
    metrics are informative, never fatal), at most limits.MAX_DICT_KEYS keys, rounded to METRIC_DIGITS
    significant digits (limits.mean_metrics), so the next global model's manifest stays small."""

    return limits.mean_metrics(records)


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
