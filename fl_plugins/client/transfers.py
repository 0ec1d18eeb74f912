"""A site's transfers: the global model's shards down, an update's shards up, each resumed where it stopped.

A download asks for a shard from the offset it has verified; an upload asks the aggregator which offset it has
verified (BeginUpload with the same nonce) and continues from there. A transfer that moves no bytes for the
client's `idle_timeout` is cancelled and resumed (`IdleWatch`), instead of a wall-clock timeout that would have
to grow with the model's size; one that makes no progress for `retry_timeout` gives up (retry.py).

The last update a site committed stays referenced (`KeptUpdate`, not copied) until the next task, so a refold's
RESEND can send it again without the caller knowing (`Transfers.resend`).

Compression (the job's `update_compression` / `model_compression`, told in Hello: compress.py): an update is
encoded once, at send, and the encoded bytes are what is kept for a RESEND; a global model that travels encoded is
decoded into its tensors as it arrives.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from fl_plugins import tensors
from fl_plugins.client import buffers
from fl_plugins.client.compress import Compression, DecodingSink
from fl_plugins.client.retry import retry
from fl_plugins.errors import FLError, IntegrityError, TransportError
from fl_plugins.wire import rpc
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, Manifest, TensorInfo, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardReceiver, ShardSender, Sink, TensorSource

if TYPE_CHECKING:
    from fl_plugins.client.site import SiteClient

log = logging.getLogger(__name__)


class TensorSink:
    """Where a download's verified bytes go: straight into the received tensors' memory."""

    def __init__(self, views: Mapping[str, memoryview]) -> None:
        self.views = views

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        self.views[tensor.name][lo : lo + len(payload)] = payload


def download_frames(client: Any, req: pb.DownloadRequest, accept: Callable[[bytes], int]) -> None:
    """One Download call: every frame to `accept` (verifies and keeps it, returns its payload bytes), the call
    cancelled when it moves nothing for the client's idle_timeout; a frame `accept` refuses (IntegrityError) is
    counted as a corrupted chunk and ends the call (the caller resumes from its verified offset)."""
    call = client.transport.Download(req, wait_for_ready=True)
    idle = IdleWatch(call, client.idle_timeout)
    try:
        for frame in call:
            idle.kick()
            try:
                n = accept(frame)
            except IntegrityError:
                client.stats["corrupted_chunks"] += 1
                call.cancel()
                raise
            client.stats["bytes_received"] += n
    finally:
        idle.stop()


class IdleWatch:
    """Cancels a call that has moved no bytes for `timeout` seconds (`kick()` on every frame)."""

    def __init__(self, call: Any, timeout: float) -> None:
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


@dataclass
class KeptUpdate:
    """The last update this site's process committed, kept (by reference) for a refold's RESEND."""

    round: int
    attempt: int
    nonce: str
    manifest: Manifest
    manifest_json: str
    source: TensorSource


class Transfers:
    """The transfers of one `SiteClient` (its transport, timeouts, stats and retrying calls)."""

    def __init__(self, client: SiteClient) -> None:
        self.client = client
        self.kept: KeptUpdate | None = None  # the last committed update, for a refold's RESEND
        self.resend_sealed: Callable[[pb.Task, KeptUpdate], None] | None = None  # swarm/site.py's, in a swarm job
        self.compression = Compression()

    def compress(self, update: str, model: str) -> None:
        """The job's compression settings (Hello's); the same ones again keep the state (residuals, the copy)."""
        if (update or "none", model or "none") != (self.compression.update, self.compression.model):
            self.compression = Compression(update, model)

    # -- download ----------------------------------------------------------------------------------------
    def download(
        self, task: pb.Task, params_format: str, into: Mapping[str, Any] | None = None
    ) -> tuple[Manifest, dict[str, Any]]:
        """The round's global model. Tensors of `into` that match (name, dtype, shape) receive the bytes in
        place (their contents are unspecified if the download fails); the rest are allocated."""
        manifest = Manifest.from_json(task.manifest_json, f"round {task.round}'s global model")
        pool = buffers if buffers.enabled() else None  # plain receive(): earlier rounds' memory, touched already
        params, views = tensors.allocate(list(manifest.model_tensors().values()), params_format, into, pool)
        sink = DecodingSink(views, manifest) if manifest.encoded else None
        try:
            self.download_to(task, manifest, sink or TensorSink(views))
        finally:
            if pool is not None:
                buffers.POOL.round_done()
        if sink is not None:
            sink.finish()
        if task.kind == pb.Task.TRAIN:
            self.compression.received(params)  # the model a DIFF is taken against (compress.py)
        return manifest, params

    def download_to(self, task: pb.Task, manifest: Manifest, sink: Sink) -> None:
        """`task`'s model (`manifest`), each verified chunk handed to `sink` (tensors, or a swarm site's files)."""
        for i, shard in enumerate(manifest.shards):
            rx = ShardReceiver(manifest, i, sink)
            step = functools.partial(self._download_stream, task.round, i, rx, task.model, manifest.encoding)
            self.resumable(step, f"download {shard.name}", progress=functools.partial(_offset, rx))
            rx.finish(shard.digest)

    def _download_stream(self, round_: int, shard: int, rx: ShardReceiver, model: str = "", encoding: str = "") -> None:
        if rx.complete:
            return
        c = self.client
        req = pb.DownloadRequest(site=c.site, round=round_, shard=shard, offset=rx.offset, model=model)
        req.encoding = encoding
        download_frames(c, req, rx.accept)

    # -- resuming ----------------------------------------------------------------------------------------
    def resumable(self, step: Callable[[], None], what: str, progress: Callable[[], int]) -> None:
        """Run `step` until it completes, resuming after transient failures (a cut connection, a corrupted chunk).
        Gives up after retry_timeout without progress."""
        c = self.client

        def fatal(e: Exception) -> BaseException | None:
            if isinstance(e, grpc.RpcError):
                err = rpc.error_from_rpc(e, what)
                if err is not e:
                    return None if isinstance(err, IntegrityError) else err
                return None if e.code() in rpc.RETRYABLE else e  # type: ignore[attr-defined]  # a grpc.Call
            return None if isinstance(e, IntegrityError) else e

        def again(e: Exception) -> None:
            c.stats["retries"] += 1
            log.info("%s interrupted at offset %d (%s); resuming", what, progress(), _short(e))

        def give_up(e: Exception) -> TransportError:
            return TransportError(f"{what}: no progress for {c.retry_timeout:.0f} s ({e})")

        retry(
            step,
            fatal=fatal,
            window=c.retry_timeout,
            give_up=give_up,
            progress=progress,
            stopped=lambda: c.closed,
            on_retry=again,
        )

    # -- upload ------------------------------------------------------------------------------------------
    def upload(
        self,
        round_: int,
        attempt: int,
        params: Mapping[str, Any],
        envelope: dict[str, Any],
        initial: bool = False,
        task_id: str = "",
    ) -> pb.CommitReply:
        """Stream an update (or, `task_id` set, a submitted local model) and commit it; returns once the aggregator
        has verified and counted it (see SiteClient.upload)."""
        c = self.client
        encoded: dict[str, Any] = {}
        if not initial and not task_id:  # an update: encoded once, here (compress.py)
            packed = self.compression.pack(params, envelope)
            params, envelope, encoded = packed.params, packed.envelope, packed.encoded
        shards = plan_shards(tensors.describe(params), max_shard_bytes=c.max_shard_bytes)
        manifest = Manifest(shards, c.chunk_bytes or DEFAULT_CHUNK_BYTES, envelope, encoded)
        manifest_json = manifest.to_json()
        views = tensors.ByteViews(params)
        source = TensorSource(manifest, views.get)
        self.kept = None
        # A shard digest that fails at commit: an initial model is sent again under a new nonce; an update's
        # bytes were already folded, so its site sits the attempt out and the error goes to the caller.
        for _ in range(3 if initial else 1):
            nonce = uuid.uuid4().hex
            begin = pb.UploadBegin(
                site=c.site, round=round_, attempt=attempt, initial=initial, manifest_json=manifest_json, nonce=nonce
            )
            begin.task_id = task_id
            try:
                reply = self._send(manifest, source, begin)
            except IntegrityError as e:
                if not initial:
                    raise
                log.warning("upload failed its final check (%s); sending it again", e)
                continue
            if not initial and not task_id:
                self.kept = KeptUpdate(round_, attempt, nonce, manifest, manifest_json, source)
                views.clear()  # a converted (CPU, contiguous) copy of the last tensor is not kept
            return reply
        raise IntegrityError("the initial model failed its integrity check three times")

    def _send(self, manifest: Manifest, source: TensorSource, begin: pb.UploadBegin) -> pb.CommitReply:
        """One upload: begin (or resume), stream every shard from the offset the aggregator has, commit."""
        senders = [ShardSender(manifest, i, source) for i in range(len(manifest.shards))]
        upload = _Upload(self, begin)
        for sender in senders:
            name = manifest.shards[sender.index].name
            progress = functools.partial(upload.offset, sender.index)
            self.resumable(functools.partial(upload.send_shard, sender), f"upload {name}", progress=progress)
        commit = pb.UploadCommit(upload_id=upload.id, shard_digests=[s.shard_digest() for s in senders])
        return self.client.call("CommitUpload", commit, "commit", per_call=120)

    def resend(self, task: pb.Task) -> None:
        """RESEND: send the kept update again, unchanged (fresh senders: each chunk is hashed from the tensors as
        they are now, so a change since send() is caught by the aggregator before it is folded)."""
        k = self.kept
        if task.transfer_id and self.resend_sealed is not None and k is not None and task.nonce == k.nonce:
            self.resend_sealed(task, k)  # swarm: sealed for the round's new aggregator site
            return
        if k is None or task.nonce != k.nonce or (task.round, task.attempt) != (k.round, k.attempt):
            log.warning(
                "site %r: asked to resend an update it no longer holds (round %d); the aggregator drops it",
                self.client.site,
                task.round,
            )
            self.kept = None
            return
        log.info("round %d: resending this site's update (the aggregator refolds the round)", k.round)
        begin = pb.UploadBegin(
            site=self.client.site, round=k.round, attempt=k.attempt, manifest_json=k.manifest_json, nonce=k.nonce
        )
        try:
            self._send(k.manifest, k.source, begin)
        except FLError as e:  # refused, or the aggregator unreachable: the update no longer counts; poll on
            log.warning("round %d: the resent update did not arrive: %s", k.round, e)
            self.kept = None

    def stream_shard(self, upload_id: str, shard: int, sender: ShardSender, offset: int) -> None:
        """One Upload stream: the shard's frames from `offset`, until the aggregator acknowledges them."""
        c = self.client
        idle: list[IdleWatch] = []

        def frames() -> Iterator[bytes]:
            for frame in sender.frames(offset):
                if idle:
                    idle[0].kick()
                c.stats["bytes_sent"] += len(frame)
                yield frame

        metadata = (("fl-upload-id", upload_id), ("fl-shard", str(shard)))
        future = c.transport.Upload(frames(), metadata=metadata, wait_for_ready=True)
        idle.append(IdleWatch(future, c.idle_timeout))
        try:
            future.result()
        finally:
            idle[0].stop()


class _Upload:
    """One upload attempt: BeginUpload tells which offsets the aggregator has verified; after an interruption
    the same request (same nonce) asks again, and each shard continues from there."""

    def __init__(self, transfers: Transfers, begin: pb.UploadBegin) -> None:
        self.transfers, self.begin = transfers, begin
        self.id = ""
        self.offsets: list[int] = []
        self._fresh = False
        self.refresh()

    def refresh(self) -> None:
        state = self.transfers.client.call("BeginUpload", self.begin, "begin upload")
        self.id, self.offsets, self._fresh = state.upload_id, list(state.offsets), True

    def offset(self, shard: int) -> int:
        return self.offsets[shard]

    def send_shard(self, sender: ShardSender) -> None:
        if not self._fresh:
            self.refresh()  # after an interruption: ask what the aggregator has verified
        self._fresh = False
        offset = self.offsets[sender.index]
        if offset < sender.size:
            self.transfers.stream_shard(self.id, sender.index, sender, offset)
            self.offsets[sender.index] = sender.size


def _short(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return str(e)


def _offset(rx: ShardReceiver) -> int:
    return rx.offset
