"""A site's connection to the aggregator: tasks, downloads and uploads that retry and resume.

Every call retries transient failures (aggregator restarting, connection cut) until the aggregator has been silent
for `retry_timeout` (retry.py, reach.py); a failure that waiting cannot mend (a TLS handshake that cannot succeed)
fails at once, and a waiting site says so on its log every few seconds (reach.py). Transfers resume from the last
verified chunk (transfers.py). The calls go through a `Transport`
(transport.py): gRPC to the aggregator's address by default, or one passed in (`InMemoryTransport` for tests).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from fl_plugins._version import __version__
from fl_plugins.client.reach import PROBE_TIMEOUT, RETRY_KNOBS, Wait
from fl_plugins.client.retry import CALLS, CONNECTS, check_timeout, retry
from fl_plugins.client.transfers import Transfers
from fl_plugins.client.transport import GrpcTransport, Metadata, Transport
from fl_plugins.errors import ConfigError, FLError, PolicyError
from fl_plugins.security.policy import load_policy
from fl_plugins.security.tls import SiteKit, check_plaintext_target, load_site_kit
from fl_plugins.wire import rpc
from fl_plugins.wire.layout import DEFAULT_MAX_SHARD_BYTES, Manifest
from fl_plugins.wire.proto import fl_pb2 as pb

log = logging.getLogger(__name__)

_PLAINTEXT_OPT_OUT = (
    "insecure=True (init(insecure=True), FL_INSECURE=1 in the environment, `fl-plugins client --insecure`)"
)


def _identity(
    address: str | None, site: str | None, kit: SiteKit | str | Path | None, insecure: bool, named: bool
) -> tuple[str, str, SiteKit | None]:
    """(address, site, kit) after the checks: a kit names the site and, unless given, the address. `named`: an
    address is needed (not with a transport passed in, which knows where its aggregator is; then it may be "")."""
    if kit is not None:
        if insecure:
            raise ConfigError(
                "insecure=True and a kit do not go together: with a kit the site speaks mTLS only; "
                "drop insecure (FL_INSECURE, `fl-plugins client --insecure`)"
            )
        kit = kit if isinstance(kit, SiteKit) else load_site_kit(kit)
        if site and site != kit.site:
            raise ConfigError(
                f"site name {site!r} differs from the kit's site {kit.site!r} ({kit.path}); the aggregator knows a "
                "site by its certificate: drop the site name or use that site's kit"
            )
        site, address = kit.site, address or kit.server
        if not address and named:
            raise ConfigError(f"the kit {kit.path} names no aggregator address; pass it (FL_SERVER=host:port)")
    if not address and named:
        raise ConfigError("no aggregator address: pass HOST:PORT (FL_SERVER)")
    if not site:
        raise ConfigError("no site name: pass one (FL_SITE) or a site's kit (FL_KIT)")
    return address or "", site, kit


_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # a heartbeat that did not get through

# the site policy's task types (security/policy.py) of the tasks it checks; offering round 0's weights is training
_POLICY_TASK = {
    pb.Task.TRAIN: "train",
    pb.Task.OFFER_INITIAL: "train",
    pb.Task.EVALUATE: "evaluate",
    pb.Task.SUBMIT_MODEL: "submit_model",
}


class SiteClient:
    """One site's connection. With `kit` (a site's startup kit: a folder or a loaded SiteKit) it speaks mTLS: the
    site's name and, unless `address` is given, the aggregator's address come from the kit. Without a kit it speaks
    plaintext, so it dials loopback addresses only unless `insecure` (the explicit opt-out, logged as a warning),
    as the aggregator binds them only without --insecure.

    transport: the calls' carrier (transport.py); default a gRPC channel to `address`, which may then be None."""

    def __init__(
        self,
        address: str | None,
        site: str | None = None,
        *,
        kit: SiteKit | str | Path | None = None,
        connect_timeout: float = 60.0,
        retry_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        heartbeat: float = 5.0,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        can_offer_initial: bool = False,
        insecure: bool = False,
        transport: Transport | None = None,
    ) -> None:
        from fl_plugins._sys import limit_malloc_arenas

        limit_malloc_arenas()
        address, site, kit = _identity(address, site, kit, insecure, named=transport is None)
        if transport is None:
            if kit is None:  # before any channel exists: a refused address is never dialled
                check_plaintext_target(address, insecure=insecure, opt_out=_PLAINTEXT_OPT_OUT)
            transport = GrpcTransport.open(address, kit.credentials() if kit is not None else None)
        self.address, self.site, self.kit = address or str(transport), site, kit
        self.policy = load_policy(kit.path) if kit is not None else None  # what this site agrees to run
        self.connect_timeout = check_timeout(connect_timeout, "connect_timeout")
        self.retry_timeout = check_timeout(retry_timeout, "retry_timeout")
        self.idle_timeout = idle_timeout
        self.last_heard: float | None = None  # time.monotonic() of the aggregator's last answer; None: never
        self.max_shard_bytes = max_shard_bytes
        self.can_offer_initial = can_offer_initial
        self.transport: Transport = transport
        self.job_id = ""
        self.total_rounds = 0
        self.evaluates_after = False
        self.workflow = self.best_metric = ""
        self.inbound = ""  # swarm: HOST:PORT of this site's inbound port (swarm/peer.py), told in Hello
        self.chunk_bytes = 0
        self.served_model = ""  # the listing of the model folder the aggregator serves (fetch.py); "": none
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "retries": 0, "corrupted_chunks": 0}
        self.transfers = Transfers(self)
        self._closed = threading.Event()
        self._hb_period = heartbeat
        self._hb: threading.Thread | None = None

    @property
    def stub(self) -> Transport:
        """The transport (its former name, when it was always a gRPC stub): `client.stub.Heartbeat(req, ...)`."""
        return self.transport

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- plumbing ----------------------------------------------------------------------------------------
    @property
    def heartbeating(self) -> bool:
        """Whether the heartbeats run, so `last_heard` is at most a heartbeat period old while the aggregator
        answers."""
        return self._hb is not None and self._hb.is_alive()

    def heard(self) -> None:
        """The aggregator answered (a call returned, or refused on purpose)."""
        self.last_heard = time.monotonic()

    def call(
        self,
        method: str,
        request: Any,
        what: str,
        *,
        per_call: float = 60.0,
        timeout: float | None = None,
        metadata: Metadata = (),
        wait: bool = True,
    ) -> Any:
        """Call `method`, retrying transient failures until `timeout` has passed, or by default (retry_timeout)
        until the aggregator has been silent for retry_timeout (reach.py `Wait`). A failure that waiting cannot
        mend (a TLS handshake that cannot succeed) fails at once.

        `wait`: each attempt waits for a connection that is not ready yet (an aggregator restarting), never past
        the call's end, so a site gives up when it said it would; connect's attempts do not (their failures say
        why at once, reach.py). `what` names the call in errors."""
        window = self.retry_timeout if timeout is None else timeout
        waiting = Wait(self, what, window, silence=timeout is None)
        fn = getattr(self.transport, method)

        def attempt() -> Any:
            left = max(0.05, min(per_call, waiting.until() - time.monotonic()))
            reply = fn(request, timeout=left, wait_for_ready=wait, metadata=metadata or None)
            self.heard()
            return reply

        def fatal(e: Exception) -> BaseException | None:
            if not isinstance(e, grpc.RpcError):
                return e
            err = rpc.error_from_rpc(e, what)
            if err is not e or e.code() not in rpc.RETRYABLE:  # type: ignore[attr-defined]  # a grpc.Call
                return err  # the aggregator refused on purpose: retrying would not help
            return waiting.fatal(e)

        def stopped() -> bool:
            return self._closed.is_set() or time.monotonic() >= waiting.until()

        return retry(
            attempt,
            fatal=fatal,
            window=window,
            give_up=waiting.give_up,
            stopped=stopped,
            on_retry=waiting.again,
            backoff=CALLS if wait else CONNECTS,
        )

    def probe(self) -> grpc.RpcError | None:
        """One call that does not wait for a connection: its error says why connecting fails (None if it got
        through, or failed otherwise). A waiting call that found no connection ends with a bare "Deadline
        Exceeded"."""
        if self._closed.is_set():
            return None
        try:
            self.transport.Status(pb.StatusRequest(), timeout=PROBE_TIMEOUT, metadata=(("fl-site", self.site),))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]  # a grpc.Call
                return e
            self.heard()  # refused on purpose: the aggregator is there
            return None
        self.heard()
        return None

    def connect(self) -> None:
        """Hello, waiting (bounded by connect_timeout) for an aggregator that is still starting."""
        req = pb.HelloRequest(site=self.site, version=__version__, can_offer_initial=self.can_offer_initial)
        req.inbound = self.inbound
        reply = self.call("Hello", req, "connect", per_call=10, timeout=self.connect_timeout, wait=False)
        self.job_id, self.total_rounds, self.chunk_bytes = reply.job_id, reply.total_rounds, reply.chunk_bytes
        self.evaluates_after = reply.evaluates_after  # evaluations follow the last round
        self.workflow = reply.workflow  # "swarm": weights go sealed between sites (swarm/site.py)
        self.best_metric = reply.best_metric
        self.served_model = reply.served_model_json
        self.transfers.compress(reply.update_compression, reply.model_compression)  # (compress.py)
        if self.policy is not None:
            self._within_policy(self.policy.check_job, self.job_id, 0)
        if self._hb is None and self._hb_period > 0:
            self._hb = threading.Thread(target=self._heartbeat, daemon=True, name="fl-heartbeat")
            self._hb.start()
        log.info("site %r connected to %s (job %s, %d rounds)", self.site, self.address, self.job_id, self.total_rounds)

    def _heartbeat(self) -> None:
        """Every heartbeat period: tell the aggregator this site is alive, and learn whether it is. Calls that
        matter retry on their own, and give up once it has been silent for retry_timeout (reach.py `Wait`)."""
        req = pb.HelloRequest(site=self.site)
        said = False
        while not self._closed.wait(self._hb_period):
            try:
                self.transport.Heartbeat(req, timeout=self._hb_period)
            except grpc.RpcError as e:
                if e.code() in _NO_ANSWER:  # type: ignore[attr-defined]  # a grpc.Call
                    said = said or self._say_silent()
                    continue  # else refused on purpose (busy): the aggregator is there
            if said:
                log.warning("site %r: the aggregator at %s answers again", self.site, self.address)
            said = False
            self.heard()

    def _say_silent(self) -> bool:
        """Once the aggregator has been silent for two heartbeat periods, say so on the site's log (once, until it
        answers again: the heartbeats return True then)."""
        silent = time.monotonic() - (self.last_heard or 0.0)
        if silent < 2 * self._hb_period or self._closed.is_set():
            return False
        msg = "site %r: the aggregator at %s has not answered for %.0f s; this site gives up after %g s of silence (%s)"
        log.warning(msg, self.site, self.address, silent, self.retry_timeout, RETRY_KNOBS)
        return True

    def close(self) -> None:
        self._closed.set()
        self.transport.close()

    # -- tasks -------------------------------------------------------------------------------------------
    def next_task(self, poll: float = 10.0, give_up_after: float | None = None, *, aggregates: bool = False) -> pb.Task:
        """Block until the aggregator hands out a task (TRAIN, OFFER_INITIAL or END).

        Every task's job id goes through the site's policy, not only the one seen at connect: an aggregator
        restarted under another job id is refused here (PolicyError) when the policy does not list it. A RESEND
        is answered here (the kept update goes again) and the wait goes on."""
        while True:
            kept = self.transfers.kept
            req = pb.TaskRequest(
                site=self.site,
                wait_seconds=poll,
                can_offer_initial=self.can_offer_initial,
                holds_update=kept.nonce if kept is not None else "",
                aggregates=aggregates,  # a swarm site's aggregator lane (swarm/site.py)
            )
            task = self.call("GetTask", req, "waiting for a task", per_call=poll + 30, timeout=give_up_after)
            self._check_job(task)
            if task.kind == pb.Task.RESEND:
                self.transfers.resend(task)
                continue
            if aggregates and task.kind != pb.Task.WAIT:
                return task
            if task.kind != pb.Task.WAIT:
                self.transfers.kept = None  # the round of the update kept for a refold is over
                if self.policy is not None and task.kind in _POLICY_TASK:
                    # offering round 0's weights is part of taking part in training
                    self._within_policy(self.policy.check_task, _POLICY_TASK[task.kind], task.round)
                return task

    def _check_job(self, task: pb.Task) -> None:
        if self.policy is not None:
            self._within_policy(self.policy.check_job, task.job_id, task.round)
        if task.job_id != self.job_id and self.job_id:
            log.warning(
                "site %r: the aggregator at %s now runs job %r (this site connected to job %r): it was "
                "restarted under another job id",
                self.site,
                self.address,
                task.job_id,
                self.job_id,
            )
        self.job_id = task.job_id

    def _within_policy(self, check: Callable[[str], Any], what: str, round_: int) -> None:
        """Refuse, at the site, what its policy does not allow: log it, tell the aggregator, raise PolicyError."""
        try:
            check(what)
        except PolicyError as e:
            log.error("site %r refuses: %s", self.site, e)
            with contextlib.suppress(FLError):
                self.log(round_, [{"key": "policy_refused", "value": str(e), "data_type": "TEXT"}])
            raise

    def status(self) -> dict[str, Any]:
        reply = self.call("Status", pb.StatusRequest(), "status", per_call=10, metadata=(("fl-site", self.site),))
        return json.loads(reply.status_json)

    def log(self, round_: int, records: list[dict]) -> None:
        req = pb.LogRequest(site=self.site, round=round_, records_json=json.dumps(records, default=float))
        self.call("Log", req, "log", per_call=30)

    # -- transfers (transfers.py) ------------------------------------------------------------------------
    def download(
        self, task: pb.Task, params_format: str, into: Mapping[str, Any] | None = None
    ) -> tuple[Manifest, dict[str, Any]]:
        """The round's global model. Tensors of `into` that match (name, dtype, shape) receive the bytes in
        place (their contents are unspecified if the download fails); the rest are allocated."""
        return self.transfers.download(task, params_format, into)

    def send_result(self, round_: int, task_id: str, envelope: dict[str, Any]) -> pb.CommitReply:
        """An EVALUATE task's answer: its metrics (and meta), no weights."""
        req = pb.ResultRequest(site=self.site, round=round_, task_id=task_id, envelope_json=json.dumps(envelope))
        return self.call("SendResult", req, "send result", per_call=30)

    def upload(
        self,
        round_: int,
        attempt: int,
        params: Mapping[str, Any],
        envelope: dict[str, Any],
        initial: bool = False,
        task_id: str = "",
    ) -> pb.CommitReply:
        """Stream an update and commit it; returns once the aggregator has verified and counted it.

        An update's tensors stay referenced (not copied) until the next task arrives: if the aggregator has to
        refold the round (another site left part of an update in it), it asks for the same update again (task
        RESEND), and `next_task` sends it without the caller knowing. Tensors changed in place meanwhile are
        refused by the aggregator chunk by chunk (their digests differ) and the update no longer counts."""
        return self.transfers.upload(round_, attempt, params, envelope, initial, task_id)
