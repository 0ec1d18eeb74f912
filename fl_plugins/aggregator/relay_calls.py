"""The relay's four calls on the gRPC face (service.py's `Servicer` inherits them): decode, find the calling site
as the other calls do, call the aggregator's `Relay` (relay.py), encode.

    RelayOpen     unary           RelayOpen       RelayState    the sender opens (or resumes) a transfer
    RelayPut      client stream   sealed records  RelayState    metadata: fl-transfer-id
    RelayCommit   unary           RelayCommit     CommitReply   the sender says the transfer is whole
    RelayGet      server stream   RelayRequest    header, then records from `from_record`
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from fl_plugins.errors import ProtocolError
from fl_plugins.wire.proto import fl_pb2 as pb

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator
    from fl_plugins.aggregator.service import CallSlots
    from fl_plugins.aggregator.workflow import Sealed

TRANSFER_METADATA = "fl-transfer-id"  # RelayPut: the transfer its records belong to


class RelayCalls:
    """RelayOpen, RelayPut, RelayCommit, RelayGet for a servicer that has `agg`, `slots`, `_site`, `_caller`."""

    if TYPE_CHECKING:
        agg: Aggregator
        slots: CallSlots

        def _site(self, claimed: str, context: grpc.ServicerContext) -> str: ...

        def _caller(self, context: grpc.ServicerContext) -> str | None: ...

    def RelayOpen(self, req: pb.RelayOpen, context: grpc.ServicerContext) -> pb.RelayState:
        site = self._site(req.site, context)
        t = self.agg.relay.open(site, req.transfer_id, req.header, req.records, req.max_bytes)
        return pb.RelayState(transfer_id=t.transfer_id, records=t.held, bytes=t.bytes_in)

    def RelayPut(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.RelayState:
        transfer_id = dict(context.invocation_metadata()).get(TRANSFER_METADATA)
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ProtocolError(f"RelayPut needs `{TRANSFER_METADATA}` metadata: the transfer its records belong to")
        site = self._caller(context)
        if site is None:  # plaintext (tests, the local demo): the transfer's own sender speaks
            t = self.agg.relay.transfer(transfer_id)
            site = t.sender if t is not None else ""
        with self.slots.transfer(site, "RelayPut"):
            t = self.agg.relay.put(site, transfer_id, request_iterator)
        return pb.RelayState(transfer_id=t.transfer_id, records=t.held, bytes=t.bytes_in)

    def RelayCommit(self, req: pb.RelayCommit, context: grpc.ServicerContext) -> pb.CommitReply:
        site = self._site(req.site, context)
        t = self.agg.relay.transfer(req.transfer_id)  # (on_commit may drop it)
        message = self.agg.relay.commit(site, req.transfer_id, req.envelope_json, req.bytes if req.direct else None)
        return pb.CommitReply(round=t.round if t is not None else 0, message=message)

    def RelayGet(self, req: pb.RelayRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        site = self._site(req.site, context)
        with self.slots.transfer(site, "RelayGet"):
            yield from self.agg.relay.get(site, req.transfer_id, req.from_record)


def encode_sealed(task: pb.Task, sealed: Sealed) -> None:
    """A swarm task's sealed transfers into its protobuf fields (fl.proto's Task)."""
    task.transfer_id, task.peers_json, task.aggregator = sealed.transfer_id, json.dumps(sealed.peers), sealed.aggregator
    task.model_transfer, task.model_sender = sealed.model_transfer, sealed.model_sender
    if sealed.direct:
        task.direct_json = json.dumps(sealed.direct)
    if sealed.inputs:
        task.inputs_json = json.dumps([{"site": site, "transfer": t} for site, t in sealed.inputs])
