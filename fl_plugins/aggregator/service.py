"""The gRPC face of the aggregator: decode, call `Aggregator`, encode. Errors map to status codes in rpc.py."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from fl_plugins._version import __version__
from fl_plugins.aggregator.core import TASK_NAME, Aggregator, AggregatorConfig
from fl_plugins.errors import ConfigError, ProtocolError
from fl_plugins.security.tls import ServerKit, SiteAuth, load_server_kit
from fl_plugins.wire import rpc
from fl_plugins.wire.layout import Manifest
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardSender

log = logging.getLogger(__name__)

_KIND = {"WAIT": pb.Task.WAIT, "TRAIN": pb.Task.TRAIN, "END": pb.Task.END, "OFFER_INITIAL": pb.Task.OFFER_INITIAL}


class Servicer:
    """Decode, call `Aggregator`, encode. With `auth` (mTLS), the site of every call is its certificate's
    common name: a request that claims another name, or a certificate of a site not in the project, is refused
    (AuthError -> PERMISSION_DENIED)."""

    def __init__(self, agg: Aggregator, auth: SiteAuth | None = None) -> None:
        self.agg = agg
        self.auth = auth

    def _site(self, claimed: str, context) -> str:
        return claimed if self.auth is None else self.auth.site_of(context, claimed)

    def _caller(self, context) -> str | None:
        """The certificate's site with mTLS (calls that carry no site name: uploads, commits, status)."""
        return None if self.auth is None else self.auth.site_of(context)

    def Hello(self, req: pb.HelloRequest, context) -> pb.HelloReply:
        info = self.agg.hello(self._site(req.site, context), req.can_offer_initial)
        return pb.HelloReply(version=__version__, **info)

    def Heartbeat(self, req: pb.HelloRequest, context) -> pb.Empty:
        self.agg.heartbeat(self._site(req.site, context))
        return pb.Empty()

    def GetTask(self, req: pb.TaskRequest, context) -> pb.Task:
        t = self.agg.get_task(self._site(req.site, context), req.wait_seconds, req.can_offer_initial)
        task = pb.Task(kind=_KIND[t["kind"]], round=t.get("round", 0), attempt=t.get("attempt", 0),
                       total_rounds=self.agg.config.rounds, start_round=0, task_name=TASK_NAME,
                       job_id=self.agg.job_id, message=t.get("message", ""))  # fmt: skip
        manifest: Manifest | None = t.get("manifest")
        if manifest is not None:
            env = dict(manifest.envelope, current_round=task.round, total_rounds=task.total_rounds, start_round=0,
                       attempt=task.attempt, params_type="FULL")  # fmt: skip
            task.manifest_json = Manifest(manifest.shards, manifest.chunk_bytes, env).to_json()
        return task

    def BeginUpload(self, req: pb.UploadBegin, context) -> pb.UploadState:
        site = self._site(req.site, context)
        u = self.agg.begin_upload(site, req.round, req.attempt, req.manifest_json, req.initial, req.nonce)
        return pb.UploadState(upload_id=u.id, offsets=[rx.offset for rx in u.receivers])

    def Upload(self, request_iterator, context) -> pb.UploadAck:
        md = dict(context.invocation_metadata())
        try:
            upload_id, shard = md["fl-upload-id"], int(md["fl-shard"])
        except (KeyError, ValueError):
            raise ProtocolError("Upload needs `fl-upload-id` and `fl-shard` metadata") from None
        u, rx = self.agg.upload(upload_id, shard, site=self._caller(context))
        self.agg.watch(u, context)
        try:
            for frame in request_iterator:
                self.agg.accept_chunk(u, rx, frame)
        finally:
            self.agg.unwatch(u, context)
        return pb.UploadAck(offset=rx.offset)

    def CommitUpload(self, req: pb.UploadCommit, context) -> pb.CommitReply:
        r = self.agg.commit(req.upload_id, list(req.shard_digests), site=self._caller(context))
        return pb.CommitReply(**r)

    def Download(self, req: pb.DownloadRequest, context):
        self._site(req.site, context)
        manifest, source, digests = self.agg.global_source(req.round)
        try:
            if not 0 <= req.shard < len(manifest.shards):
                raise ProtocolError(f"round {req.round}'s global model has no shard {req.shard}")
            for frame in ShardSender(manifest, req.shard, source, digests[req.shard]).frames(req.offset):
                self.agg.count_sent(len(frame))
                yield frame
        finally:
            source.close()

    def Log(self, req: pb.LogRequest, context) -> pb.Empty:
        site = self._site(req.site, context)
        try:
            records = json.loads(req.records_json)
        except json.JSONDecodeError as e:
            raise ProtocolError(f"log records are not valid JSON ({e})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ProtocolError("log records must be a JSON list of objects")
        self.agg.log_records(site, req.round, records)
        return pb.Empty()

    def Status(self, req: pb.StatusRequest, context) -> pb.StatusReply:
        self._caller(context)
        return pb.StatusReply(status_json=json.dumps(self.agg.status()))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {address!r} must be HOST:PORT, e.g. 127.0.0.1:8443 (port 0 picks a free one)")
    return host, int(port)


class AggregatorServer:
    """The aggregator and its gRPC server. `port` is the bound port (useful with port 0).

    With `kit` (the server kit written by `fl-plugins provision`, a folder or a loaded ServerKit) it serves
    mTLS only, on `address` or else the kit's address, and takes each call's site from the caller's certificate.
    Without a kit it speaks plaintext, so it binds loopback addresses only unless `insecure`."""

    def __init__(self, config: AggregatorConfig, address: str | None = None, *, insecure: bool = False,
                 kit: ServerKit | str | Path | None = None, max_workers: int = 128) -> None:  # fmt: skip
        kit = kit if kit is None or isinstance(kit, ServerKit) else load_server_kit(kit)
        if kit is not None and insecure:
            raise ConfigError("--insecure and --kit do not go together: with a kit the aggregator serves mTLS only; "
                              "drop --insecure")  # fmt: skip
        address = address or (kit.address if kit is not None else "127.0.0.1:0")
        host, port = split_address(address)
        if kit is None and not is_loopback(host):
            if not insecure:
                raise ConfigError(
                    f"--address {address}: without a certificate kit the aggregator speaks plaintext, so it only "
                    "binds loopback addresses (127.0.0.1, ::1, localhost); serve with --kit kits/server (written by "
                    "`fl-plugins provision`), or pass --insecure to bind another address anyway"
                )
            log.warning("INSECURE: plaintext gRPC on non-loopback address %s: anyone on the network can read "
                        "and send weights", address)  # fmt: skip
        self.kit: ServerKit | None = kit
        self.aggregator = Aggregator(config)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fl-rpc"),
                                   options=rpc.SERVER_OPTIONS, maximum_concurrent_rpcs=max_workers)  # fmt: skip
        servicer = Servicer(self.aggregator, kit.auth() if kit is not None else None)
        self._server.add_generic_rpc_handlers([rpc.generic_handler(servicer)])
        if kit is not None:
            self.port = self._server.add_secure_port(f"{host}:{port}", kit.credentials())
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            hint = " (the kit's address by default; --address 0.0.0.0:PORT listens on every interface)" if kit else ""
            raise ConfigError(f"could not bind {address}{hint}: is the port in use, or the host not this machine's?")
        self.address = f"{host}:{self.port}"

    def start(self) -> AggregatorServer:
        self._server.start()
        self.aggregator.start()
        log.info("aggregator listening on %s (%s, job %s, run dir %s)", self.address,
                 f"mTLS, project {self.kit.project!r}, {len(self.kit.sites)} sites" if self.kit else "plaintext",
                 self.aggregator.job_id, self.aggregator.config.run_dir)  # fmt: skip
        return self

    def wait(self, poll: float = 0.2, stop_event: threading.Event | None = None) -> int:
        """Block until the job is finished; 0 when every round is checkpointed, 1 on an aggregator error."""
        while not self.aggregator.finished():
            if stop_event is not None and stop_event.is_set():
                break
            time.sleep(poll)
        return 1 if self.aggregator.error is not None else 0

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
        self.aggregator.stop()

    def __enter__(self) -> AggregatorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)
