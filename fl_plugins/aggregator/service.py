"""The gRPC face of the aggregator: decode, call `Aggregator`, encode. Errors map to status codes in rpc.py."""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from fl_plugins._version import __version__
from fl_plugins.aggregator import ports
from fl_plugins.aggregator.core import Aggregator
from fl_plugins.aggregator.encoded import encoded_models, encoded_source
from fl_plugins.aggregator.relay_calls import RelayCalls, encode_sealed
from fl_plugins.aggregator.served import ServedFolder
from fl_plugins.aggregator.slots import CallSlots
from fl_plugins.aggregator.swarm import SwarmAggregator
from fl_plugins.aggregator.workflow import Task, TaskKind
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import ConfigError, ProtocolError
from fl_plugins.security.seal import Certificates
from fl_plugins.security.tls import ServerKit, SiteAuth, is_loopback, load_server_kit
from fl_plugins.wire import limits, rpc
from fl_plugins.wire.layout import Manifest
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardSender

log = logging.getLogger(__name__)

KINDS = {
    TaskKind.WAIT: pb.Task.WAIT,
    TaskKind.TRAIN: pb.Task.TRAIN,
    TaskKind.END: pb.Task.END,
    TaskKind.OFFER_INITIAL: pb.Task.OFFER_INITIAL,
    TaskKind.RESEND: pb.Task.RESEND,
    TaskKind.EVALUATE: pb.Task.EVALUATE,
    TaskKind.SUBMIT_MODEL: pb.Task.SUBMIT_MODEL,
    TaskKind.AGGREGATE: pb.Task.AGGREGATE,
}  # every TaskKind's protobuf value (tests/test_wire.py checks none is missing)
SITE_METADATA = "fl-site"  # Status: the site a plaintext caller speaks for (SiteClient.status() should send it)


class Servicer(RelayCalls):
    """Decode, call `Aggregator`, encode. With `auth` (mTLS), the site of every call is its certificate's
    common name: a request that claims another name, a certificate of a site not in the project, or the operator's
    certificate, is refused (AuthError -> PERMISSION_DENIED). The operator is a caller with the operator's
    certificate (`auth.operator`), or with `operator_cert`, the server kit's certificate (PEM): Status shows it
    everything. `max_workers`: the server's worker threads, which `CallSlots` shares out. `served`: the model
    folder the sites may fetch (served.py), or None."""

    def __init__(
        self,
        agg: Aggregator,
        auth: SiteAuth | None = None,
        *,
        operator_cert: bytes | None = None,
        max_workers: int = 128,
        served: ServedFolder | None = None,
    ) -> None:
        self.agg = agg
        self.auth = auth
        self.slots = CallSlots(max_workers)
        self.log_budget = limits.LogBudget()
        self._operator = _der(operator_cert) if operator_cert else None
        self.served = served
        self.encoded = encoded_models(agg)  # the global model of TRAIN tasks, encoded (model_compression)

    def _site(self, claimed: str, context: grpc.ServicerContext) -> str:
        return claimed if self.auth is None else self.auth.site_of(context, claimed)

    def _caller(self, context: grpc.ServicerContext) -> str | None:
        """The certificate's site with mTLS (calls that carry no site name: uploads, commits, status)."""
        return None if self.auth is None else self.auth.site_of(context)

    def Hello(self, req: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        site = self._site(req.site, context)
        cert = self.auth.certificate(context) if self.auth else None
        info = self.agg.hello(site, req.can_offer_initial, cert, req.inbound)
        reply = pb.HelloReply(version=__version__, **info)
        reply.served_model_json = self.served.listing_json if self.served is not None else ""
        reply.update_compression = self.agg.config.update_compression
        reply.model_compression = self.agg.config.model_compression
        return reply

    def Heartbeat(self, req: pb.HelloRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.agg.heartbeat(self._site(req.site, context))
        return pb.Empty()

    def GetTask(self, req: pb.TaskRequest, context: grpc.ServicerContext) -> pb.Task:
        site = self._site(req.site, context)
        with self.slots.poll(f"{site}/aggregates" if req.aggregates else site, context):  # (no site has a "/")
            t = self._poll(site, req, context)
        return self._task(t)

    def _task(self, t: Task) -> pb.Task:
        task = pb.Task(kind=KINDS[t.kind], round=t.round, attempt=t.attempt, total_rounds=self.agg.config.total_rounds)
        task.start_round, task.task_name, task.job_id = 0, t.name, self.agg.job_id
        task.message, task.nonce, task.task_id, task.model = t.message, t.nonce, t.task_id, t.model
        if t.sealed is not None:
            encode_sealed(task, t.sealed)
        if t.manifest is not None:
            env = dict(t.manifest.envelope, current_round=task.round, total_rounds=task.total_rounds)
            env.update(start_round=0, attempt=task.attempt, params_type="FULL")
            copy = self.encoded.task_manifest(t) if self.encoded is not None else None
            shards, encoded = (copy.shards, copy.encoded) if copy is not None else (t.manifest.shards, {})
            task.manifest_json = Manifest(shards, t.manifest.chunk_bytes, env, encoded).to_json()
        return task

    def _poll(self, site: str, req: pb.TaskRequest, context: grpc.ServicerContext) -> Task:
        """Aggregator.get_task, ended as soon as its caller goes away (cancelled, timed out, its process
        restarted): gRPC's termination callback wakes the wait, so a poll nobody listens to frees its worker at
        once, without periodic wake-ups in between (polling in 0.25 s slices cost 3-5% of benchmarks/load.py)."""
        wait = req.wait_seconds if not math.isnan(req.wait_seconds) else 0.0
        gone = threading.Event()

        def on_end() -> None:
            gone.set()
            self.agg.wake()

        if not context.add_callback(on_end):
            gone.set()  # the call has ended already
        if req.aggregates:  # a swarm site's aggregator lane (swarm.py)
            if not isinstance(self.agg, SwarmAggregator):
                raise ProtocolError(f"site {site!r} asked for aggregation tasks, but this job is not a swarm")
            return self.agg.aggregate_task(site, max(0.0, min(wait, limits.MAX_POLL_SECONDS)), gone=gone.is_set)
        return self.agg.get_task(
            site,
            max(0.0, min(wait, limits.MAX_POLL_SECONDS)),
            req.can_offer_initial,
            req.holds_update,
            gone=gone.is_set,
        )

    def BeginUpload(self, req: pb.UploadBegin, context: grpc.ServicerContext) -> pb.UploadState:
        site = self._site(req.site, context)
        u = self.agg.begin_upload(site, req.round, req.attempt, req.manifest_json, req.initial, req.nonce, req.task_id)
        return pb.UploadState(upload_id=u.id, offsets=[rx.offset for rx in u.receivers])

    def Upload(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.UploadAck:
        md = dict(context.invocation_metadata())
        try:
            upload_id, shard = md["fl-upload-id"], int(md["fl-shard"])
        except (KeyError, ValueError):
            raise ProtocolError("Upload needs `fl-upload-id` and `fl-shard` metadata") from None
        u, rx = self.agg.upload(upload_id, shard, site=self._caller(context))
        with self.slots.transfer(u.site, "Upload"):
            self.agg.watch(u, context)
            try:
                for frame in request_iterator:
                    self.agg.accept_chunk(u, rx, frame)
            finally:
                self.agg.unwatch(u, context)
        return pb.UploadAck(offset=rx.offset)

    def CommitUpload(self, req: pb.UploadCommit, context: grpc.ServicerContext) -> pb.CommitReply:
        r = self.agg.commit(req.upload_id, list(req.shard_digests), site=self._caller(context))
        return pb.CommitReply(**r)

    def Download(self, req: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        site = self._site(req.site, context)
        with self.slots.transfer(site, "Download"):
            if req.file:  # a file of the served model folder (served.py)
                yield from _served(self.served).frames(req.file, req.offset, req.folder)
                return
            if req.encoding:  # a TRAIN task's global model, encoded (encoded.py)
                manifest, source, digests = encoded_source(self.encoded, req.round, req.encoding)
            else:
                manifest, source, digests = self.agg.global_source(req.round, req.model, site)
            start = self.agg.clock()
            try:
                if not 0 <= req.shard < len(manifest.shards):
                    what = f"site {req.model!r}'s model" if req.model else f"round {req.round}'s global model"
                    raise ProtocolError(f"{what} has no shard {req.shard}")
                for frame in ShardSender(manifest, req.shard, source, digests[req.shard]).frames(req.offset):
                    self.agg.count_sent(len(frame))
                    yield frame
            finally:
                source.close()
                if not req.model:  # the round's global model: where the round's time goes (timeline.py)
                    self.agg.timeline.download(site, req.round, start, self.agg.clock())

    def SendResult(self, req: pb.ResultRequest, context: grpc.ServicerContext) -> pb.CommitReply:
        """An EVALUATE task's answer: metrics only (Aggregator.result)."""
        site = self._site(req.site, context)
        return pb.CommitReply(**self.agg.result(site, req.round, req.task_id, req.envelope_json))

    def Log(self, req: pb.LogRequest, context: grpc.ServicerContext) -> pb.Empty:
        """flare.log records: bounded per call, per second and per round (limits.py) before they are parsed;
        their content is checked by Aggregator.log_records."""
        site = self._site(req.site, context)
        text = req.records_json
        limits.check_log_size(f"site {site!r}", text)
        self.log_budget.charge(site, self.agg.round, len(text))
        records = limits.parse_log_records(f"site {site!r}", text)
        self.agg.log_records(site, req.round, records)
        return pb.Empty()

    def Status(self, req: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        """The job's progress, for whom the caller is (Aggregator.status):

        * mTLS: a caller presenting the operator's certificate (`fl-plugins provision`'s admin kit) or the server
          kit's own is the operator and sees everything; a site (its certificate) sees the job and round and its
          own entries only;
        * plaintext (loopback only, unless --insecure): the aggregator cannot tell who calls. A caller that names
          itself with `fl-site` metadata sees that site's view; one that names nobody is taken for the operator's
          own tools on this machine (the local demo's progress, tests) and sees everything when it calls from a
          loopback address, and the job and round only from elsewhere (--insecure). Plaintext hides nothing from
          a process that lies about itself: that is what mTLS is for."""
        named = dict(context.invocation_metadata()).get(SITE_METADATA, "")
        if not isinstance(named, str):
            raise ProtocolError(f"`{SITE_METADATA}` metadata must be text (a site's name)")
        if self.auth is not None:
            view = None if self._is_operator(context) else self.auth.site_of(context, named)
        elif named:
            view = named
        else:
            view = None if _peer_is_loopback(context.peer()) else ""
        return pb.StatusReply(status_json=json.dumps(self.agg.status(view)))

    def _is_operator(self, context: grpc.ServicerContext) -> bool:
        """The caller presents the operator's certificate (the admin kit: SiteAuth.operator, which refuses a
        revoked one) or the server kit's own."""
        if self.auth is not None and self.auth.operator(context) is not None:
            return True
        pem = ((context.auth_context() or {}).get("x509_pem_cert") or [b""])[0]
        return self._operator is not None and bool(pem) and _der(pem) == self._operator


def make_aggregator(config: AggregatorConfig, kit: ServerKit | None) -> Aggregator:
    """The coordinator `config.workflow` needs: a swarm's (aggregator/swarm.py) needs the project's certificates."""
    if config.workflow == "swarm" and kit is None:
        raise ConfigError(
            "--workflow swarm seals every site's weights for its recipient's certificate: provision the project "
            "(`fl-plugins provision`) and start the aggregator with --kit kits/server"
        )
    agg = (SwarmAggregator if config.workflow == "swarm" else Aggregator)(config)
    if kit is not None:  # a sealed header's sender must hold a certificate of this project, not revoked
        agg.relay.certs = Certificates(kit.ca, kit.revoked.lookup if kit.revoked else None)
    return agg


def _served(served: ServedFolder | None) -> ServedFolder:
    if served is None:
        raise ProtocolError(
            "this aggregator serves no model folder: start it with --serve-model PATH, or with a recipe whose "
            "`task.model` is {from_aggregator: PATH}"
        )
    return served


def _der(pem: bytes) -> bytes | None:
    """A PEM certificate's DER bytes (so formatting differences do not matter), or None if it is not one."""
    try:
        return ssl.PEM_cert_to_DER_cert(pem.decode("ascii", "replace"))
    except ValueError:
        return None


def _peer_is_loopback(peer: str) -> bool:
    """gRPC's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") names a loopback caller."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    host = rest.rpartition(":")[0] if scheme in ("ipv4", "ipv6") else ""
    return bool(host) and is_loopback(host)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {address!r} must be HOST:PORT, e.g. 127.0.0.1:8443 (port 0 picks a free one)")
    return host, int(port)


def _plaintext_elsewhere(address: str, insecure: bool) -> None:
    """Without a kit, a non-loopback address is refused unless `insecure` (then a warning says what it means)."""
    if not insecure:
        raise ConfigError(
            f"--address {address}: without a certificate kit the aggregator speaks plaintext, so it only "
            "binds loopback addresses (127.0.0.1, ::1, localhost); serve with --kit kits/server (written by "
            "`fl-plugins provision`), or pass --insecure to bind another address anyway"
        )
    log.warning(
        "INSECURE: plaintext gRPC on non-loopback address %s: anyone on the network can read and send weights",
        address,
    )


class AggregatorServer:
    """The aggregator and its gRPC server. `port` is the bound port (useful with port 0).

    With `kit` (the server kit written by `fl-plugins provision`, a folder or a loaded ServerKit) it serves
    mTLS only, on `address` or else the kit's address, and takes each call's site from the caller's certificate.
    Without a kit it speaks plaintext, so it binds loopback addresses only unless `insecure`."""

    def __init__(
        self,
        config: AggregatorConfig,
        address: str | None = None,
        *,
        insecure: bool = False,
        kit: ServerKit | str | Path | None = None,
        max_workers: int = 128,
    ) -> None:
        CallSlots.check(max_workers)
        kit = kit if kit is None or isinstance(kit, ServerKit) else load_server_kit(kit)
        if kit is not None and insecure:
            raise ConfigError(
                "--insecure and --kit do not go together: with a kit the aggregator serves mTLS only; drop --insecure"
            )
        address = address or (kit.address if kit is not None else "127.0.0.1:0")
        host, port = split_address(address)
        given = "--address" if kit is None or address != kit.address else "the kit's address"
        ports.check_bindable(host, port, given=given)  # one line, before gRPC's native "Failed to add port"
        if kit is None and not is_loopback(host):
            _plaintext_elsewhere(address, insecure)
        self.kit: ServerKit | None = kit
        # The port first, the run directory second: a start that fails (a busy port, a bad kit, a bad initial
        # model, a run directory of another job) leaves no state behind (Aggregator._resume undoes its own).
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fl-rpc"),
            options=rpc.server_options(config.chunk_bytes),
            maximum_concurrent_rpcs=2 * max_workers,
        )
        # Twice the workers: a burst of short calls waits for a worker (the reserved ones, see CallSlots) instead
        # of being refused; long polls and transfers never take more than their share.
        try:
            if kit is not None:
                self.port = self._server.add_secure_port(f"{host}:{port}", kit.credentials())
            else:
                self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0
            self.port = 0
        if self.port == 0:  # taken since the check: a plain socket may tell why now
            ports.check_bindable(host, port, given=given)
            raise ConfigError(ports.bind_error(address, None, given=given))
        self.address = f"{host}:{self.port}"
        try:
            served = ServedFolder.open(config.serve_model, config.chunk_bytes) if config.serve_model else None
            self.aggregator = make_aggregator(config, kit)
        except BaseException:
            self._server.stop(None)  # never started: frees the port
            raise
        servicer = Servicer(
            self.aggregator,
            kit.auth() if kit is not None else None,
            operator_cert=kit.cert if kit is not None else None,
            served=served,
            max_workers=max_workers,
        )
        self.servicer = servicer  # its call slots and log budget (limits.py) are the server's, per run
        self._server.add_generic_rpc_handlers([rpc.generic_handler(servicer)])

    def start(self) -> AggregatorServer:
        self._server.start()
        self.aggregator.start()
        log.info(
            "aggregator listening on %s (%s, job %s, run dir %s)",
            self.address,
            f"mTLS, project {self.kit.project!r}, {len(self.kit.sites)} sites" if self.kit else "plaintext",
            self.aggregator.job_id,
            self.aggregator.config.run_dir,
        )
        return self

    def wait(self, poll: float = 0.2, stop_event: threading.Event | None = None) -> int:
        """Block until the job is finished; 0 when every round is checkpointed, 1 on an aggregator error. After
        the end it waits for the streams still open (sites fetching the final model END names), at most
        `site_timeout` seconds."""
        while not self.aggregator.finished() or self._sending():
            if stop_event is not None and stop_event.is_set():
                break
            time.sleep(poll)
        return 1 if self.aggregator.error is not None else 0

    def _sending(self) -> bool:
        agg = self.aggregator
        late = agg.done_at is None or time.monotonic() - agg.done_at > agg.config.site_timeout
        return agg.error is None and not late and self.servicer.slots.transfers() > 0

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
        self.aggregator.stop()

    def __enter__(self) -> AggregatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0)
