"""A site's connection to the aggregator: tasks, downloads and uploads that retry and resume.

Every call retries transient failures (aggregator restarting, connection cut) until `retry_timeout`; a
transfer resumes from the last verified chunk: downloads ask for the shard from the offset they have, uploads
ask the aggregator which offset it has verified (BeginUpload with the same nonce) and continue from there.
A transfer that moves no bytes for `idle_timeout` is cancelled and resumed, instead of a wall-clock timeout
that would have to grow with the model's size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from fl_plugins import tensors
from fl_plugins._version import __version__
from fl_plugins.errors import (
    ConfigError,
    FLError,
    IntegrityError,
    PolicyError,
    ProtocolError,
    TransportError,
)
from fl_plugins.security.policy import load_policy
from fl_plugins.security.tls import SiteKit, check_plaintext_target, load_site_kit
from fl_plugins.wire import rpc
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_SHARD_BYTES, Manifest, TensorInfo, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardReceiver, ShardSender, TensorSource

log = logging.getLogger(__name__)


class _TensorSink:
    def __init__(self, views: Mapping[str, memoryview]) -> None:
        self.views = views

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        self.views[tensor.name][lo : lo + len(payload)] = payload


class _Idle:
    """Cancels a call that has moved no bytes for `timeout` seconds."""

    def __init__(self, call, timeout: float) -> None:
        self.call, self.timeout = call, timeout
        self.last = time.monotonic()
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fl-idle-watch")
        self._thread.start()

    def kick(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.fired = True
                self.call.cancel()
                return

    def stop(self) -> None:
        self._stop.set()


class SiteClient:
    """One site's connection. With `kit` (a site's startup kit: a folder or a loaded SiteKit) it speaks mTLS: the
    site's name and, unless `address` is given, the aggregator's address come from the kit. Without a kit it speaks
    plaintext, so it dials loopback addresses only unless `insecure` (the explicit opt-out, logged as a warning),
    as the aggregator binds them only without --insecure."""

    def __init__(self, address: str | None, site: str | None = None, *, kit: SiteKit | str | Path | None = None,
                 connect_timeout: float = 60.0, retry_timeout: float = 120.0, idle_timeout: float = 60.0,
                 heartbeat: float = 5.0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 can_offer_initial: bool = False, insecure: bool = False) -> None:  # fmt: skip
        from fl_plugins._sys import limit_malloc_arenas

        limit_malloc_arenas()
        if kit is not None:
            if insecure:
                raise ConfigError("insecure=True and a kit do not go together: with a kit the site speaks mTLS only; "
                                  "drop insecure (FL_INSECURE, `fl-plugins client --insecure`)")  # fmt: skip
            kit = kit if isinstance(kit, SiteKit) else load_site_kit(kit)
            if site and site != kit.site:
                raise ConfigError(f"site name {site!r} differs from the kit's site {kit.site!r} ({kit.path}); the "
                                  "aggregator knows a site by its certificate: drop the site name or use that "
                                  "site's kit")  # fmt: skip
            site, address = kit.site, address or kit.server
            if not address:
                raise ConfigError(f"the kit {kit.path} names no aggregator address; pass it (FL_SERVER=host:port)")
        if not address:
            raise ConfigError("no aggregator address: pass HOST:PORT (FL_SERVER)")
        if not site:
            raise ConfigError("no site name: pass one (FL_SITE) or a site's kit (FL_KIT)")
        if kit is None:  # before any channel exists: a refused address is never dialled
            check_plaintext_target(address, insecure=insecure, opt_out="insecure=True (init(insecure=True), "
                                   "FL_INSECURE=1 in the environment, `fl-plugins client --insecure`)")  # fmt: skip
        self.address, self.site, self.kit = address, site, kit
        self.policy = load_policy(kit.path) if kit is not None else None  # what this site agrees to run
        self.connect_timeout, self.retry_timeout, self.idle_timeout = connect_timeout, retry_timeout, idle_timeout
        self.max_shard_bytes = max_shard_bytes
        self.can_offer_initial = can_offer_initial
        self.channel = rpc.insecure_channel(address) if kit is None else rpc.secure_channel(address, kit.credentials())
        self.stub = rpc.Stub(self.channel)
        self.job_id = ""
        self.total_rounds = 0
        self.chunk_bytes = 0
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "retries": 0, "corrupted_chunks": 0}
        self._closed = threading.Event()
        self._hb_period = heartbeat
        self._hb: threading.Thread | None = None
        self._kept: _Kept | None = None  # the last committed update, for a refold's RESEND

    # -- plumbing ----------------------------------------------------------------------------------------
    def _call(self, method: str, request: Any, what: str, *, per_call: float = 60.0,
              timeout: float | None = None, metadata: tuple[tuple[str, str], ...] = ()) -> Any:  # fmt: skip
        """Call `method`, retrying transient failures until `timeout` (default retry_timeout) has passed.

        Calls wait for a connection that is not ready yet (an aggregator restarting), but never past the
        overall deadline, so a site gives up when it said it would."""
        deadline = time.monotonic() + (self.retry_timeout if timeout is None else timeout)
        delay = 0.1
        fn = getattr(self.stub, method)
        while True:
            try:
                left = max(0.05, min(per_call, deadline - time.monotonic()))
                return fn(request, timeout=left, wait_for_ready=True, metadata=metadata or None)
            except grpc.RpcError as e:
                err = rpc.error_from_rpc(e, what)
                if err is not e or e.code() not in rpc.RETRYABLE:
                    raise err from None  # the aggregator refused on purpose: retrying would not help
                if time.monotonic() >= deadline or self._closed.is_set():
                    raise self._unreachable(what, e) from None
                self.stats["retries"] += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _unreachable(self, what: str, e: grpc.RpcError) -> TransportError:
        """The error for an aggregator that never answered. Calls wait for a connection, so they end with a bare
        "Deadline Exceeded"; one call that does not wait tells why connecting failed (refused, closed during the
        TLS handshake, a certificate that did not verify), and the message says what to check."""
        code, details = e.code().name, e.details() or ""
        if not self._closed.is_set():
            try:
                self.stub.Status(pb.StatusRequest(), timeout=5)
            except grpc.RpcError as probe:
                if probe.code() == grpc.StatusCode.UNAVAILABLE:
                    code, details = probe.code().name, probe.details() or ""
        low = details.lower()
        if "wrong_version_number" in low:
            hint = "the aggregator does not speak TLS: it was started without --kit, or another server listens there"
        elif "handshake" in low or "certificate" in low or "ssl" in low:
            hint = ("the TLS handshake failed: the aggregator's certificate did not verify against the kit's ca.crt "
                    "(a kit of another project, or a host that is not in the aggregator's certificate: `server.host` "
                    "and `alt_names` in the project file)")  # fmt: skip
        elif "socket closed" in low or "connection reset" in low:
            hint = ("the aggregator closed the connection during the TLS handshake: it refuses this site's "
                    "certificate (not signed by the project's CA, expired, or not yet valid; the aggregator's "
                    "stderr names the reason): ask the project's admin for a current kit" if self.kit is not None
                    else "the aggregator closed the connection: if it serves with mTLS (`fl-plugins server --kit`), "
                    "this site needs its startup kit: FL_KIT, init(kit=...) or `fl-plugins client --kit`")  # fmt: skip
        else:
            hint = "check that `fl-plugins server` runs there and FL_SERVER points at it"
        return TransportError(f"{what}: the aggregator at {self.address} did not answer ({code}: {details}); {hint}")

    def connect(self) -> None:
        """Hello, waiting (bounded by connect_timeout) for an aggregator that is still starting."""
        req = pb.HelloRequest(site=self.site, version=__version__, can_offer_initial=self.can_offer_initial)
        reply = self._call("Hello", req, "connect", per_call=10, timeout=self.connect_timeout)
        self.job_id, self.total_rounds, self.chunk_bytes = reply.job_id, reply.total_rounds, reply.chunk_bytes
        if self.policy is not None:
            self._within_policy(self.policy.check_job, self.job_id, 0)
        if self._hb is None and self._hb_period > 0:
            self._hb = threading.Thread(target=self._heartbeat, daemon=True, name="fl-heartbeat")
            self._hb.start()
        log.info("site %r connected to %s (job %s, %d rounds)", self.site, self.address, self.job_id,
                 self.total_rounds)  # fmt: skip

    def _heartbeat(self) -> None:
        req = pb.HelloRequest(site=self.site)
        while not self._closed.wait(self._hb_period):
            try:
                self.stub.Heartbeat(req, timeout=self._hb_period)
            except grpc.RpcError:
                pass  # the aggregator may be restarting; calls that matter retry on their own

    def close(self) -> None:
        self._closed.set()
        self.channel.close()

    # -- tasks -------------------------------------------------------------------------------------------
    def next_task(self, poll: float = 10.0, give_up_after: float | None = None) -> pb.Task:
        """Block until the aggregator hands out a task (TRAIN, OFFER_INITIAL or END).

        Every task's job id goes through the site's policy, not only the one seen at connect: an aggregator
        restarted under another job id is refused here (PolicyError) when the policy does not list it."""
        while True:
            kept = self._kept
            req = pb.TaskRequest(site=self.site, wait_seconds=poll, can_offer_initial=self.can_offer_initial,
                                 holds_update=kept.nonce if kept is not None else "")  # fmt: skip
            task = self._call("GetTask", req, "waiting for a task", per_call=poll + 30, timeout=give_up_after)
            if self.policy is not None:
                self._within_policy(self.policy.check_job, task.job_id, task.round)
            if task.job_id != self.job_id and self.job_id:
                log.warning("site %r: the aggregator at %s now runs job %r (this site connected to job %r): it was "
                            "restarted under another job id", self.site, self.address, task.job_id,
                            self.job_id)  # fmt: skip
            self.job_id = task.job_id
            if task.kind == pb.Task.RESEND:
                self._resend(task)
                continue
            if task.kind != pb.Task.WAIT:
                self._kept = None  # the round of the update kept for a refold is over
                if self.policy is not None and task.kind in (pb.Task.TRAIN, pb.Task.OFFER_INITIAL):
                    # offering round 0's weights is part of taking part in training
                    self._within_policy(self.policy.check_task, task.task_name or "train", task.round)
                return task

    def _within_policy(self, check, what: str, round_: int) -> None:
        """Refuse, at the site, what its policy does not allow: log it, tell the aggregator, raise PolicyError."""
        try:
            check(what)
        except PolicyError as e:
            log.error("site %r refuses: %s", self.site, e)
            with contextlib.suppress(FLError):
                self.log(round_, [{"key": "policy_refused", "value": str(e), "data_type": "TEXT"}])
            raise

    def status(self) -> dict[str, Any]:
        reply = self._call("Status", pb.StatusRequest(), "status", per_call=10, metadata=(("fl-site", self.site),))
        return json.loads(reply.status_json)

    def log(self, round_: int, records: list[dict]) -> None:
        req = pb.LogRequest(site=self.site, round=round_, records_json=json.dumps(records, default=float))
        self._call("Log", req, "log", per_call=30)

    # -- download ----------------------------------------------------------------------------------------
    def download(self, task: pb.Task, params_format: str,
                 into: Mapping[str, Any] | None = None) -> tuple[Manifest, dict[str, Any]]:  # fmt: skip
        """The round's global model. Tensors of `into` that match (name, dtype, shape) receive the bytes in
        place (their contents are unspecified if the download fails); the rest are allocated."""
        manifest = Manifest.from_json(task.manifest_json, f"round {task.round}'s global model")
        params, views = tensors.allocate([t for s in manifest.shards for t in s.tensors], params_format, into)
        sink = _TensorSink(views)
        for i, shard in enumerate(manifest.shards):
            rx = ShardReceiver(manifest, i, sink)
            self._resumable(lambda rx=rx, i=i: self._download_stream(task.round, i, rx), f"download {shard.name}",
                            progress=lambda rx=rx: rx.offset)  # fmt: skip
            rx.finish(shard.digest)
        return manifest, params

    def _download_stream(self, round_: int, shard: int, rx: ShardReceiver) -> None:
        if rx.complete:
            return
        call = self.stub.Download(pb.DownloadRequest(site=self.site, round=round_, shard=shard, offset=rx.offset),
                                  wait_for_ready=True)  # fmt: skip
        idle = _Idle(call, self.idle_timeout)
        try:
            for frame in call:
                idle.kick()
                try:
                    n = rx.accept(frame)
                except IntegrityError:
                    self.stats["corrupted_chunks"] += 1
                    call.cancel()
                    raise
                self.stats["bytes_received"] += n
        finally:
            idle.stop()

    def _resumable(self, step: Callable[[], None], what: str, progress: Callable[[], int]) -> None:
        """Run `step` until it completes, resuming after transient failures. Gives up after retry_timeout
        without progress."""
        last, since = progress(), time.monotonic()
        delay = 0.05
        while True:
            try:
                step()
                return
            except (grpc.RpcError, IntegrityError, ProtocolError) as e:
                if isinstance(e, grpc.RpcError):
                    err = rpc.error_from_rpc(e, what)
                    if err is not e and not isinstance(err, IntegrityError):
                        raise err from None
                    if err is e and e.code() not in rpc.RETRYABLE:
                        raise
                elif not isinstance(e, IntegrityError):
                    raise
                if progress() != last:
                    last, since, delay = progress(), time.monotonic(), 0.05
                if time.monotonic() - since > self.retry_timeout or self._closed.is_set():
                    raise TransportError(f"{what}: no progress for {self.retry_timeout:.0f} s ({e})") from None
                self.stats["retries"] += 1
                log.info("%s interrupted at offset %d (%s); resuming", what, progress(), _short(e))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- upload ------------------------------------------------------------------------------------------
    def upload(self, round_: int, attempt: int, params: Mapping[str, Any], envelope: dict[str, Any],
               initial: bool = False) -> pb.CommitReply:  # fmt: skip
        """Stream an update and commit it; returns once the aggregator has verified and counted it.

        An update's tensors stay referenced (not copied) until the next task arrives: if the aggregator has to
        refold the round (another site left part of an update in it), it asks for the same update again (task
        RESEND), and `next_task` sends it without the caller knowing. Tensors changed in place meanwhile are
        refused by the aggregator chunk by chunk (their digests differ) and the update no longer counts."""
        shards = plan_shards(tensors.describe(params), max_shard_bytes=self.max_shard_bytes)
        manifest = Manifest(shards, self.chunk_bytes or DEFAULT_CHUNK_BYTES, envelope)
        manifest_json = manifest.to_json()
        views = tensors.ByteViews(params)
        source = TensorSource(manifest, views.get)
        self._kept = None
        # A shard digest that fails at commit: an initial model is sent again under a new nonce; an update's
        # bytes were already folded, so its site sits the attempt out and the error goes to the caller.
        for _ in range(3 if initial else 1):
            nonce = uuid.uuid4().hex
            begin = pb.UploadBegin(site=self.site, round=round_, attempt=attempt, initial=initial,
                                   manifest_json=manifest_json, nonce=nonce)  # fmt: skip
            try:
                reply = self._send(manifest, source, begin)
            except IntegrityError as e:
                if not initial:
                    raise
                log.warning("upload failed its final check (%s); sending it again", e)
                continue
            if not initial:
                self._kept = _Kept(round_, attempt, nonce, manifest, manifest_json, source)
                views.clear()  # a converted (CPU, contiguous) copy of the last tensor is not kept
            return reply
        raise IntegrityError("the initial model failed its integrity check three times")

    def _send(self, manifest: Manifest, source: TensorSource, begin: pb.UploadBegin) -> pb.CommitReply:
        """One upload: begin (or resume), stream every shard from the offset the aggregator has, commit."""
        senders = [ShardSender(manifest, i, source) for i in range(len(manifest.shards))]
        upload = _Upload(self, begin)
        for sender in senders:
            name = manifest.shards[sender.index].name
            self._resumable(functools.partial(upload.send_shard, sender), f"upload {name}",
                            progress=functools.partial(upload.offset, sender.index))  # fmt: skip
        commit = pb.UploadCommit(upload_id=upload.id, shard_digests=[s.shard_digest() for s in senders])
        return self._call("CommitUpload", commit, "commit", per_call=120)

    def _resend(self, task: pb.Task) -> None:
        """RESEND: send the kept update again, unchanged (fresh senders: each chunk is hashed from the tensors as
        they are now, so a change since send() is caught by the aggregator before it is folded)."""
        k = self._kept
        if k is None or task.nonce != k.nonce or (task.round, task.attempt) != (k.round, k.attempt):
            log.warning("site %r: asked to resend an update it no longer holds (round %d); the aggregator drops it",
                        self.site, task.round)  # fmt: skip
            self._kept = None
            return
        log.info("round %d: resending this site's update (the aggregator refolds the round)", k.round)
        begin = pb.UploadBegin(site=self.site, round=k.round, attempt=k.attempt, manifest_json=k.manifest_json,
                               nonce=k.nonce)  # fmt: skip
        try:
            self._send(k.manifest, k.source, begin)
        except FLError as e:  # refused, or the aggregator unreachable: the update no longer counts; poll on
            log.warning("round %d: the resent update did not arrive: %s", k.round, e)
            self._kept = None

    def _upload_stream(self, upload_id: str, shard: int, sender: ShardSender, offset: int) -> None:
        holder: dict[str, Any] = {}

        def frames() -> Iterator[bytes]:
            for frame in sender.frames(offset):
                if "idle" in holder:
                    holder["idle"].kick()
                self.stats["bytes_sent"] += len(frame)
                yield frame

        future = self.stub.Upload.future(frames(), metadata=(("fl-upload-id", upload_id), ("fl-shard", str(shard))),
                                         wait_for_ready=True)  # fmt: skip
        holder["idle"] = _Idle(future, self.idle_timeout)
        try:
            future.result()
        finally:
            holder["idle"].stop()


class _Kept:
    """The last update this site's process committed, kept (by reference) for a refold's RESEND."""

    def __init__(self, round_: int, attempt: int, nonce: str, manifest: Manifest, manifest_json: str,
                 source: TensorSource) -> None:  # fmt: skip
        self.round, self.attempt, self.nonce = round_, attempt, nonce
        self.manifest, self.manifest_json, self.source = manifest, manifest_json, source


class _Upload:
    """One upload attempt: BeginUpload tells which offsets the aggregator has verified; after an interruption
    the same request (same nonce) asks again, and each shard continues from there."""

    def __init__(self, client: SiteClient, begin: pb.UploadBegin) -> None:
        self.client, self.begin = client, begin
        self.id = ""
        self.offsets: list[int] = []
        self._fresh = False
        self.refresh()

    def refresh(self) -> None:
        state = self.client._call("BeginUpload", self.begin, "begin upload")
        self.id, self.offsets, self._fresh = state.upload_id, list(state.offsets), True

    def offset(self, shard: int) -> int:
        return self.offsets[shard]

    def send_shard(self, sender: ShardSender) -> None:
        if not self._fresh:
            self.refresh()  # after an interruption: ask what the aggregator has verified
        self._fresh = False
        offset = self.offsets[sender.index]
        if offset < sender.size:
            self.client._upload_stream(self.id, sender.index, sender, offset)
            self.offsets[sender.index] = sender.size


def _short(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return str(e)

