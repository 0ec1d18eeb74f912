"""An upload's way in: begin (checks before the first byte), chunks (verified, then folded), commit (counted).

The coordinator (core.py) hands the upload calls of service.py to `Intake`, which applies rounds.py's rules to
them: what an update must be to begin, what a resend must match, and what happens to the site and the round
when an upload is refused or dropped. Chunks are verified and folded outside the coordinator's lock (each
upload's own lock orders its stream; the fold gate orders folds against the close).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fl_plugins.aggregator import submissions
from fl_plugins.aggregator.fedavg import MAX_WEIGHT, check_averageable
from fl_plugins.aggregator.rounds import Counted, SiteState
from fl_plugins.aggregator.strategy import Strategy
from fl_plugins.aggregator.uploads import (
    FoldSink,
    Stream,
    Upload,
    check_chunk_bytes,
    check_owner,
    check_plan,
    parse_update,
    upload_key,
)
from fl_plugins.errors import FLError, IntegrityError, ModelMismatchError, ProtocolError, RoundError
from fl_plugins.records import UpdateRecord
from fl_plugins.wire.layout import Manifest
from fl_plugins.wire.stream import ShardReceiver

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.rounds, self.uploads, self.offer = agg.rounds, agg.uploads, agg.offer
        self.config, self.lock, self.stats = agg.config, agg.lock, agg.stats

    # -- begin ------------------------------------------------------------------------------------------------
    def begin(
        self, site: str, round_: int, attempt: int, manifest_json: str, initial: bool, nonce: str, task_id: str = ""
    ) -> Upload:
        """An upload begins: an update (or a resend), an offered initial model (`initial`), or a submitted local
        model (`task_id`: the SUBMIT_MODEL task it answers)."""
        if task_id:
            return submissions.begin(self, site, round_, manifest_json, nonce, task_id)
        manifest, params_type, weight = self._parsed(site, round_, attempt, initial, manifest_json)
        sha = upload_key(site, manifest_json, nonce)
        upload_id = f"{site}:{round_}:{attempt}:{'init' if initial else 'upd'}:{nonce}"
        with self.lock:
            now = self.agg.clock()
            s = self.rounds.touch(site, now)
            existing = self.uploads.get(upload_id)
            if existing is not None and not existing.dead:
                if existing.manifest_sha != sha:
                    raise ProtocolError(
                        f"site {site!r}: upload {upload_id!r} resumed with another manifest; a new send() needs a "
                        "new nonce"
                    )
                return existing  # a resume: same site, same send() call
            u = Upload(upload_id, site, round_, attempt, manifest, weight, params_type, initial, nonce, sha)
            u.started = u.last_progress = now
            if initial:
                self._begin_offer(u)
            else:
                self._begin_update(s, u)
            self.uploads.add(u)
            what = "its initial model" if initial else "a resend" if u.resend_of else "an update"
            mb = manifest.total_bytes / 1e6
            log.info(
                "site %r uploading %s for round %d (%.1f MB, weight %g, %s)",
                *(site, what, round_, mb, u.weight, u.params_type),
            )
            return u

    def _parsed(self, site: str, round_: int, attempt: int, initial: bool, js: str) -> tuple[Manifest, str, float]:
        try:
            manifest, params_type, weight = parse_update(site, js)
            check_chunk_bytes(site, manifest, self.config.chunk_bytes)
            if not initial and not 0 < weight <= MAX_WEIGHT:
                raise ProtocolError(
                    f"site {site!r}: NUM_STEPS_CURRENT_ROUND must be at most {MAX_WEIGHT:g} (got {weight:g}); "
                    "send a step or sample count"
                )
        except FLError as e:
            with self.lock:
                self.invalid(site, round_, initial, e)
            raise
        return manifest, params_type, weight

    def _begin_offer(self, u: Upload) -> None:
        """Lock held. The site's weights, offered as round 0's global model."""
        self.offer.expects(u.site, self.agg.global_manifest is not None)
        try:
            if u.manifest.encoded:
                raise ProtocolError(
                    f"site {u.site!r}'s initial model holds encoded tensors ({sorted(u.manifest.encoded)[:5]}); round "
                    "0's global model is offered as trained, unencoded"
                )
            check_averageable([t for s in u.manifest.shards for t in s.tensors], f"site {u.site!r}'s initial model")
        except FLError as e:
            self.invalid(u.site, u.round, True, e)
            raise
        u.round, u.attempt, u.weight, u.params_type = 0, 0, 1.0, "FULL"
        self.offer.begin(u, self.uploads, self.rounds)

    def _begin_update(self, s: SiteState, u: Upload) -> None:
        """Lock held. The checks an update passes before its first byte, in the order a site can act on."""
        site, round_, attempt = s.name, u.round, u.attempt
        if self.agg.done or self.agg.global_manifest is None:
            raise RoundError(f"site {site!r}: no round is open for updates")
        if self.agg.job.sweep is not None:  # the evaluation between rounds is a barrier, also after a restart
            raise RoundError(
                f"site {site!r}: round {self.rounds.round}'s global model is being evaluated; updates wait for it"
            )
        if attempt < 0:
            raise ProtocolError(f"site {site!r}: attempt must be >= 0 (got {attempt})")
        self.rounds.check_current(site, round_, attempt)
        owed = self.rounds.owed.get(site)
        if owed is not None and owed.nonce == u.nonce:
            return self._begin_resend(u, owed)
        self.rounds.may_update(s, round_, attempt, self.agg.clock())
        try:
            check_plan(
                self.agg.global_manifest,
                u.manifest,
                f"the update from site {site!r}",
                strategy=self.config.strategy,
                encoding=self.config.update_compression,
            )
        except FLError as e:
            self.invalid(site, round_, False, e)
            raise
        for old in [x for x in self.uploads.live.values() if x.site == site and not x.initial]:
            self.uploads.kill(old, self.rounds)  # a new send() from the same site replaces an unfinished one
            if old.folded:
                raise RoundError(
                    f"site {site!r}: a new update replaced one whose chunks were already folded; the site sits "
                    f"attempt {self.rounds.attempt} of round {round_} out (the round is refolded without its "
                    "partial update)"
                )
        self.rounds.began_update(s, round_, attempt)
        self._fold_into(u)

    def _begin_resend(self, u: Upload, owed: Counted) -> None:
        """Lock held. A refold's resend: the same update as the one counted, checked chunk by chunk."""
        if u.attempt != owed.attempt or self.uploads.resending(owed):
            raise RoundError(
                f"site {u.site!r}: a resend of its update for round {u.round} must name attempt {owed.attempt}, and "
                "only one may run at a time"
            )
        if owed.manifest_sha != u.manifest_sha:
            self.rounds.lose(owed, "its resend's manifest differs from the committed one")
            self.lock.notify_all()
            raise ProtocolError(
                f"site {u.site!r}: the update resent for round {u.round}'s refold has another manifest than the one "
                "committed; it is no longer counted"
            )
        u.weight, u.params_type, u.resend_of = owed.weight, owed.params_type, owed
        self._fold_into(u)

    def _fold_into(self, u: Upload) -> None:
        u.epoch = self.uploads.epoch
        u.receive_into(FoldSink(self._strategy(), u.weight, u, self.config.reject_nonfinite))

    def _strategy(self) -> Strategy:
        strategy = self.agg.strategy
        assert strategy is not None  # made when round 0 opens, before any update may begin
        return strategy

    # -- chunks -------------------------------------------------------------------------------------------------
    def upload(self, upload_id: str, shard: int, *, site: str | None = None) -> tuple[Upload, ShardReceiver]:
        """The upload and the receiver of its shard. `site`: the caller's site, known from its certificate with
        mTLS; another site's upload is refused."""
        with self.lock:
            u = self.uploads.get(upload_id)
            if u is None or u.dead:
                raise RoundError(f"upload {upload_id!r} is unknown or its round ended; begin the upload again")
            check_owner(u, site)
            if not 0 <= shard < len(u.receivers):
                raise ProtocolError(f"upload {upload_id!r} has no shard {shard}")
            self.rounds.touch(u.site, self.agg.clock())
            return u, u.receivers[shard]

    def watch(self, u: Upload, stream: Stream) -> None:
        """Register a live upload stream so an idle one (no bytes for `idle_timeout`) can be cancelled."""
        with self.lock:  # (progress is bytes arriving: opening streams again and again keeps nothing alive)
            u.streams.append(stream)

    def unwatch(self, u: Upload, stream: Stream) -> None:
        with self.lock:
            if stream in u.streams:
                u.streams.remove(stream)

    def accept_chunk(self, u: Upload, rx: ShardReceiver, frame: bytes) -> None:
        """Verify and fold one chunk (called on the stream's thread, concurrently for different sites).

        A damaged, repeated or misplaced chunk is refused and the upload goes on (the site resends from the
        offset the aggregator has). A chunk whose content disagrees with the manifest (its length, the shard's
        header), that holds NaN or Inf (`reject_nonfinite`), or that differs from the committed update it
        resends, refuses the whole update (`refuse`)."""
        with u.lock:  # one stream per upload at a time
            if u.dead:
                raise RoundError(f"upload {u.id!r}: its round ended, or it was refused; the chunk is refused")
            if u.committed:
                raise RoundError(f"upload {u.id!r} is committed already; the chunk is refused")
            chunk = self._verified(u, rx, frame)
            if chunk is None:  # an exact repeat of a chunk already folded (a resend racing its old stream)
                return
            try:
                with self.agg.gate.shared():
                    if u.dead or u.epoch != self.uploads.epoch:
                        raise RoundError(f"upload {u.id!r}: its round ended; the chunk is refused")
                    n = rx.use(*chunk)
            except (ProtocolError, ModelMismatchError) as e:
                with self.lock:
                    raise self.refuse(u, e) from None
            u.bytes_received += n
            with self.lock:
                now = self.agg.clock()
                u.last_progress = now
                self.stats["bytes_received"] += n
                self.rounds.sites[u.site].last_seen = now

    def _verified(self, u: Upload, rx: ShardReceiver, frame: bytes) -> tuple[Any, ...] | None:
        """u.lock held. The chunk, verified (and for a resend, the committed chunk's digest matched)."""
        try:
            chunk = rx.verify(frame)
        except ProtocolError:
            u.corrupted_chunks += 1
            with self.lock:
                self.stats["corrupted_chunks"] += 1
            raise
        if chunk is not None and u.resend_of is not None:
            k = chunk[0] // self.config.chunk_bytes
            want = u.resend_of.chunk_digests[rx.index]
            if k >= len(want) or want[k] != chunk[2]:
                with self.lock:
                    self.rounds.lose(u.resend_of, f"chunk {k} of shard {rx.index} differs from the committed one")
                    e = IntegrityError(
                        f"the update resent for round {u.round}'s refold differs from the one committed (chunk {k} "
                        f"of shard {rx.layout.name!r}): the tensors changed after send(); it no longer counts"
                    )
                    raise self.refuse(u, e) from None
        return chunk

    # -- commit -------------------------------------------------------------------------------------------------
    def commit(self, upload_id: str, digests: list[str], *, site: str | None = None) -> dict[str, Any]:
        with self.lock:
            u = self.uploads.get(upload_id)
            kept = self.agg.models.committed.get(upload_id)  # a submission's retried commit, after its phase
            if (u is None or u.dead) and kept is not None and (site is None or site == kept):
                return {"round": self.rounds.round, "message": "already committed"}
            if u is None or u.dead:
                raise RoundError(f"upload {upload_id!r} is unknown or its round ended; it was not counted")
            check_owner(u, site)
            if u.committed:
                return {"round": u.round, "message": "already committed"}
            if len(digests) != len(u.receivers):
                raise ProtocolError(f"commit lists {len(digests)} shard digests, the upload has {len(u.receivers)}")
        self._check_digests(u, digests)
        with self.lock:
            if u.dead:
                raise RoundError(f"upload {upload_id!r}: its round ended while it was committing; not counted")
            if u.committed:  # a second Commit of the same upload (a client's retry) raced this one
                return {"round": u.round, "message": "already committed"}
            if u.task_id:
                return submissions.commit(self, u, digests)
            u.committed = True
            self.rounds.touch(u.site, self.agg.clock())
            if u.initial:
                return self._commit_offer(u, digests)
            reply = self._count_resend(u) if u.resend_of is not None else self._count(u, digests)
            self.lock.notify_all()
            return reply

    def _commit_offer(self, u: Upload, digests: list[str]) -> dict[str, Any]:
        """Lock held. The offered weights arrived whole: round 0's global model. If writing them fails, the offer
        is dropped, so the site (or another) is asked to offer again instead of every site waiting for it."""
        try:
            manifest = self.offer.commit(u, digests)
        except BaseException:
            u.committed = False
            self.uploads.kill(u, self.rounds)
            self.offer.refused(u.site)
            self.lock.notify_all()
            raise
        del self.uploads.live[u.id]
        self.agg.open_round(0, manifest)
        self.lock.notify_all()
        return {"round": 0, "message": "initial model accepted"}

    def _check_digests(self, u: Upload, digests: list[str]) -> None:
        with u.lock:
            try:
                for rx, d in zip(u.receivers, digests, strict=True):
                    rx.finish(d)
                if u.resend_of is not None and list(digests) != u.resend_of.shard_digests:
                    raise IntegrityError("the resent update's shard digests differ from the committed ones")
            except IntegrityError as e:
                with self.lock:
                    if u.resend_of is not None:
                        self.rounds.lose(u.resend_of, str(e))
                    self.uploads.kill(u, self.rounds)  # its folded bytes are a partial update: the round refolds
                    self.lock.notify_all()
                    sits = ""
                    if not u.initial and not u.task_id:
                        sits = f" and site {u.site!r} sits attempt {u.attempt} of round {u.round} out"
                raise IntegrityError(f"{e}; the update was not counted{sits}") from None

    def _count_resend(self, u: Upload) -> dict[str, Any]:
        """Lock held. A refold's resend arrived whole and matched: the update counts again."""
        assert u.resend_of is not None
        if not self.rounds.counted_again(u.resend_of):
            u.committed = False
            self.uploads.kill(u, self.rounds)  # its bytes were folded for an update that is no longer owed: refold
            raise RoundError(f"upload {u.id!r}: the update it resends no longer counts; not counted")
        self._strategy().add_weight(u.resend_of.weight, u.resend_of.params_type)
        log.info("round %d: update from %r resent and refolded (%d owed)", u.round, u.site, len(self.rounds.owed))
        return {"round": u.round, "message": "update accepted (resent for a refold)"}

    def _count(self, u: Upload, digests: list[str]) -> dict[str, Any]:
        """Lock held. An update arrived whole: counted, and recorded in RUN_DIR/metrics.jsonl."""
        self._strategy().add_weight(u.weight, u.params_type)
        now = self.agg.clock()
        rec = UpdateRecord(
            round=u.round,
            attempt=u.attempt,
            site=u.site,
            weight=u.weight,
            params_type=u.params_type,
            bytes=u.manifest.total_bytes,
            bytes_received=u.bytes_received,
            corrupted_chunks=u.corrupted_chunks,
            seconds=round(now - u.started, 3),
            metrics=u.manifest.envelope.get("metrics") or {},
            timeline=self.agg.timeline.update(u.site, u.round, self.rounds.began, u.started, now),
        )
        chunk_digests = [list(rx.digest.digests) for rx in u.receivers]
        c = Counted(
            u.site,
            u.attempt,
            u.nonce,
            u.manifest_sha,
            u.weight,
            u.params_type,
            list(digests),
            chunk_digests,
            rec.to_json(),
        )
        self.rounds.count(c)
        self.agg.record(rec)
        n, of = len(self.rounds.counted), len(self.rounds.participants())
        log.info("round %d: update from %r accepted (%d/%d)", u.round, u.site, n, of)
        return {"round": u.round, "message": "update accepted"}

    # -- refusals -----------------------------------------------------------------------------------------------
    def invalid(self, site: str, round_: int, initial: bool, e: FLError) -> None:
        """Lock held. An upload refused before it began for what it holds (malformed manifest or envelope,
        tensors that disagree with the global model): nothing was folded; the site may send a corrected one, but
        the round does not wait for it."""
        self.stats["invalid_updates"] += 1
        what = "its initial model" if initial else f"its update for round {round_}"
        log.warning("site %r: %s refused: %s", site, what, e)
        if initial:
            self.offer.refused(site)
        else:
            self.rounds.invalid(site, round_)
        self.lock.notify_all()

    def refuse(self, u: Upload, e: FLError) -> FLError:
        """Lock held. An update refused mid-stream for its content: dropped, and its site sits out the rest of
        the attempt (its folded chunks, if any, make the round refold at its close, and the site must not make it
        refold again and again). Returns the error for the site, of the same class, saying all that."""
        self.stats["invalid_updates"] += 1
        what = "its initial model" if u.initial else f"its update for round {u.round}"
        if u.task_id:
            sweep = self.agg.job.sweep
            if sweep is not None:
                sweep.fail(u.site, u.task_id, str(e))
            self.uploads.kill(u, self.rounds)
            self.lock.notify_all()
            return type(e)(f"{e}; site {u.site!r}: its submitted model was refused")
        if u.initial:
            self.offer.refused(u.site)
        else:
            self.rounds.refused_midstream(u.site, u.round)
        u.streams = []  # the caller's stream ends with this error, not a cancellation
        self.uploads.kill(u, self.rounds)
        self.lock.notify_all()
        msg = f"{e}; site {u.site!r}: {what} was refused"
        if not u.initial:
            msg += f" and the site sits attempt {self.rounds.attempt} of round {u.round} out"
        if u.folded and not u.initial:
            msg += " (part of it was already folded: the round is refolded without it)"
        log.warning("%s", msg)
        return type(e)(msg)
