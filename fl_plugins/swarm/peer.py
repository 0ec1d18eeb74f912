"""Direct transfers between swarm sites: a site's inbound port (`Inbox`), and a sender's channel to it (`dial`).

A site started with `FL_INBOUND=HOST:PORT` (port 0: any free one) serves its own small gRPC server: mTLS with its
site certificate (ca.py issues it for `peer_host(site)`, a name under .invalid that no real host has) and the
project's CA for its callers, and only the relay's calls (RelayOpen, RelayPut, RelayCommit), over a `Relay` of its
own in its output folder (inbox/). It tells the aggregator where it listens (Hello's `inbound`); a sender whose task
names the recipient in `direct_json` puts its sealed update there instead of at the aggregator's relay, then
commits it at the aggregator with `direct` and the byte count (the aggregator counts it; it never held a byte of it).
If the recipient cannot be reached, the sender falls back to the relay: the same sealed bytes either way, so the
recipient opens both the same (client/relay.py `read_stream`).

What the inbox takes: a transfer the caller opens whose header, checked against the project's CA (the sender's
certificate and signature), names the caller as its sender and this site alone as its recipient; at most
MAX_TRANSFERS at a time (the oldest are dropped), each at most MAX_BYTES. Whether the transfer counts is the
aggregator's business (it issued the id); the aggregator site folds only the ids its AGGREGATE task names.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from fl_plugins.aggregator.relay import Relay, RelayTransfer
from fl_plugins.aggregator.relay_calls import RelayCalls
from fl_plugins.aggregator.service import CallSlots, split_address
from fl_plugins.client.site import SiteClient
from fl_plugins.client.transport import GrpcTransport
from fl_plugins.errors import AuthError, FLError, ProtocolError
from fl_plugins.security.ca import peer_host
from fl_plugins.security.seal import Certificates, header_info
from fl_plugins.security.tls import SiteKit
from fl_plugins.wire import rpc
from fl_plugins.wire.proto import fl_pb2 as pb

log = logging.getLogger(__name__)

MAX_TRANSFERS = 64  # transfers an inbox holds at once (a round's updates; the oldest go first)
MAX_BYTES = 1 << 40
CALLS = ("RelayOpen", "RelayPut", "RelayCommit")


class Inbox:
    """This site's inbound port and the sealed updates other sites put there."""

    @classmethod
    def before_hello(cls, client: SiteClient) -> Inbox | None:
        """FL_INBOUND=HOST:PORT set and a kit: this site's inbound port, started before its first Hello, which
        tells the aggregator its address (`client.inbound`); the session closes it if the job is no swarm."""
        address = os.environ.get("FL_INBOUND", "")
        if not address or client.kit is None:
            return None
        inbox = cls(client.kit, Path("fl-output") / "inbox", address)  # (the swarm site moves it to its own folder)
        client.inbound = inbox.address
        return inbox

    def __init__(self, kit: SiteKit, directory: Path, address: str) -> None:
        self.site = kit.site
        self.relay = Relay(directory, max_bytes=MAX_BYTES)
        self.relay.certs = Certificates(kit.ca)
        self.expected: OrderedDict[str, None] = OrderedDict()
        host, port = split_address(address)
        pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fl-inbox")
        self.server = grpc.server(pool, options=rpc.SERVER_OPTIONS)
        creds = grpc.ssl_server_credentials([(kit.key, kit.cert)], root_certificates=kit.ca, require_client_auth=True)
        port = self.server.add_secure_port(f"{host}:{port}", creds)
        if not port:
            raise ProtocolError(f"FL_INBOUND={address}: the inbound port cannot be bound; name a free HOST:PORT")
        self.address = f"{host}:{port}"
        self.server.add_generic_rpc_handlers([rpc.generic_handler(_Servicer(self), CALLS)])
        self.server.start()
        log.info("site %r takes sealed updates directly at %s", self.site, self.address)

    def admit(self, caller: str, transfer_id: str, header: bytes) -> None:
        """Before a caller's RelayOpen: expect its transfer if its header is the caller's, for this site alone."""
        if self.relay.transfer(transfer_id) is not None:
            return
        try:
            info = header_info(header, self.relay.certs)
        except FLError as e:
            raise AuthError(f"site {caller!r}: transfer {transfer_id!r}: its header is refused: {e}") from None
        if info.transfer_id != transfer_id or info.sender != caller or tuple(info.recipients) != (self.site,):
            raise AuthError(
                f"site {caller!r}: transfer {transfer_id!r}: this inbound port takes updates from their sender, "
                f"sealed for {self.site!r} alone (the header says {info.sender!r} for {list(info.recipients)})"
            )
        while len(self.expected) >= MAX_TRANSFERS:
            self.relay.drop([self.expected.popitem(last=False)[0]])
        self.relay.expect(transfer_id, caller, (self.site,), "update", 0, 0, _received)
        self.expected[transfer_id] = None

    def holds(self, transfer_id: str) -> bool:
        t = self.relay.transfer(transfer_id)
        return t is not None and t.committed

    def records(self, transfer_id: str) -> Any:
        """The header, then the records, of a transfer put here (swarm/site.py folds it)."""
        return self.relay.get(self.site, transfer_id, 0)

    def close(self) -> None:
        self.server.stop(0)


def _received(t: RelayTransfer, envelope: dict[str, Any]) -> str:
    return "received"


class _Servicer(RelayCalls):
    """The relay's calls at a site's inbound port; the caller is its certificate's common name."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.agg: Any = inbox  # (RelayCalls calls `self.agg.relay`)
        self.slots = CallSlots(8)

    def _caller(self, context: grpc.ServicerContext) -> str | None:
        names = (context.auth_context() or {}).get("x509_common_name") or [b""]
        name = names[0].decode()
        if not name:
            raise AuthError("this inbound port takes calls from the project's sites only (mTLS with a site's kit)")
        return name

    def _site(self, claimed: str, context: grpc.ServicerContext) -> str:
        site = self._caller(context) or ""
        if claimed and claimed != site:
            raise AuthError(f"the caller's certificate is site {site!r}, but the call claims {claimed!r}")
        return site

    def RelayOpen(self, req: pb.RelayOpen, context: grpc.ServicerContext) -> pb.RelayState:
        self.inbox.admit(self._site(req.site, context), req.transfer_id, req.header)
        return super().RelayOpen(req, context)

    def RelayCommit(self, req: pb.RelayCommit, context: grpc.ServicerContext) -> pb.CommitReply:
        if req.direct:
            raise ProtocolError("a commit at a site's inbound port holds its records: `direct` is the aggregator's")
        return super().RelayCommit(req, context)


def dial(kit: SiteKit, peer: str, address: str, retry_timeout: float = 30.0) -> SiteClient:
    """A client of site `peer`'s inbound port at `address` (mTLS: its certificate must be the project's, for
    `peer_host(peer)`), with the retries and resumes of any SiteClient; the caller closes it."""
    options = [*rpc.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer_host(peer))]
    channel = grpc.secure_channel(address, kit.credentials(), options=options)
    transport = GrpcTransport(channel, address)
    try:
        return SiteClient(None, kit.site, transport=transport, retry_timeout=retry_timeout, heartbeat=0)
    except BaseException:
        transport.close()
        raise
