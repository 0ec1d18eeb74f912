"""A site's sealed transfers through the aggregator's relay: put one (seal and send records), get one (fetch and
open records), each resumed where it stopped, as transfers.py resumes uploads and downloads.

A transfer is a sequence of plaintext records (`RecordSource`), sealed one by one for its recipients
(security/seal.py): a model is its manifest (record 0) then every shard's chunk frames in order (`ModelRecords`),
so a recipient verifies each chunk as a download does (wire/stream.py) after opening it.

    put_sealed     RelayOpen (the header, the record count, a bound on the sealed bytes; again after a cut: how
                   many records the relay holds), RelayPut from there, RelayCommit
    get_sealed     RelayGet from the next record after a cut; the header opens (and is checked) once, each record
                   is opened in order and handed on; a SealError ends it at once, never retried
    receive_model  a sealed model into tensors (as Transfers.download)
    read_update    a sealed update into a sink the caller picks once it has seen the manifest

Nothing is held whole: a record is sealed as gRPC asks for it, and opened and used as it arrives.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from fl_plugins import tensors
from fl_plugins.client.transfers import IdleWatch, TensorSink
from fl_plugins.errors import ConfigError, FLError, IntegrityError, ProtocolError
from fl_plugins.security.seal import SIG, TAG, Opener, Sealer, SealError
from fl_plugins.wire import rpc
from fl_plugins.wire.frames import HEADER_SIZE
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_SHARD_BYTES, Manifest, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardReceiver, ShardSender, Sink, Source, TensorSource

if TYPE_CHECKING:
    from fl_plugins.client.site import SiteClient

log = logging.getLogger(__name__)

# What sealing adds to a record, at most: its fixed fields (magic, index, flags, length: 17 bytes), the sender's
# signature and the GCM tag (seal.py's record layout). RelayOpen's max_bytes is the plaintext plus this per record.
RECORD_OVERHEAD = 32 + SIG + TAG
TRANSFER_METADATA = "fl-transfer-id"  # RelayPut: the transfer its records belong to (relay_calls.py)
_CALLS = ("RelayOpen", "RelayPut", "RelayCommit", "RelayGet")


class RecordSource(Protocol):
    """A transfer's plaintext records: `count` of them, `nbytes` in all (an upper bound), record(i) made again
    identical whenever asked (a resumed put seals it again: other bytes under the same index are refused)."""

    count: int
    nbytes: int

    def record(self, i: int) -> bytes | memoryview: ...


class ModelRecords:
    """A model as records: record 0 is its manifest (with every shard's digest, computed here from `source`),
    then each shard's chunk frames in order. Record i is made again from (shard, offset) for a resume."""

    def __init__(self, manifest: Manifest, source: Source) -> None:
        senders = [ShardSender(manifest, i, source) for i in range(len(manifest.shards))]
        shards = [
            dataclasses.replace(s, digest=tx.shard_digest()) for s, tx in zip(manifest.shards, senders, strict=True)
        ]
        self.manifest = Manifest(shards, manifest.chunk_bytes, manifest.envelope)
        self.senders = senders
        self._json = self.manifest.to_json().encode()
        cb = manifest.chunk_bytes
        chunks = [-(-s.size // cb) for s in shards]
        self._firsts = [1 + sum(chunks[:i]) for i in range(len(chunks))]  # record index of each shard's first frame
        self.count = 1 + sum(chunks)
        self.nbytes = len(self._json) + self.manifest.total_bytes + HEADER_SIZE * sum(chunks)

    @classmethod
    def of(
        cls,
        params: Mapping[str, Any],
        envelope: dict[str, Any],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> ModelRecords:
        """The records of `params` (numpy or torch tensors, read in place) with the FLModel `envelope`."""
        shards = plan_shards(tensors.describe(params), max_shard_bytes=max_shard_bytes)
        manifest = Manifest(shards, chunk_bytes, envelope)
        return cls(manifest, TensorSource(manifest, tensors.ByteViews(params).get))

    def record(self, i: int) -> bytes:
        if i == 0:
            return self._json
        if not 0 < i < self.count:
            raise ProtocolError(f"a model of {self.count} records has no record {i}")
        shard = bisect.bisect_right(self._firsts, i) - 1
        offset = (i - self._firsts[shard]) * self.manifest.chunk_bytes
        return next(self.senders[shard].frames(offset))


def relay_transport(client: SiteClient) -> Any:
    """client.transport, with the relay's calls. A transport without them (transport.py's GrpcTransport, for
    now) gets them here from a stub on its channel: RelayPut as a future, as Upload is."""
    t: Any = client.transport
    if all(hasattr(t, name) for name in _CALLS):
        return t
    channel = getattr(t, "channel", None)
    if channel is None:
        raise ConfigError(f"the transport {t} does not carry the relay's calls {_CALLS}; use a gRPC transport")
    stub: Any = rpc.Stub(channel)
    t.RelayOpen, t.RelayCommit, t.RelayGet, t.RelayPut = (
        stub.RelayOpen,
        stub.RelayCommit,
        stub.RelayGet,
        stub.RelayPut.future,
    )
    return t


# -- put ---------------------------------------------------------------------------------------------------------
def put_sealed(
    client: SiteClient, transfer_id: str, sealer: Sealer, source: RecordSource, envelope: dict[str, Any] | None = None
) -> pb.CommitReply:
    """Seal `source`'s records with `sealer` and send them through the relay as `transfer_id`, then commit it
    (with `envelope`: an update's metrics and meta, no weights). Resumes after a cut from the records the relay
    holds; returns the aggregator's answer to the commit."""
    relay_transport(client)
    n = source.count
    max_bytes = source.nbytes + n * RECORD_OVERHEAD
    begin = pb.RelayOpen(
        site=client.site, transfer_id=transfer_id, header=sealer.header, records=n, max_bytes=max_bytes
    )
    put = _Put(client, begin, sealer, source)
    client.transfers.resumable(put.step, f"relay put of transfer {transfer_id!r}", progress=put.progress)
    commit = pb.RelayCommit(
        site=client.site, transfer_id=transfer_id, envelope_json=json.dumps(envelope) if envelope else ""
    )
    return client.call("RelayCommit", commit, f"relay commit of transfer {transfer_id!r}", per_call=120)


class _Put:
    """One put: RelayOpen says how many records the relay holds (again after every cut); the rest are sealed and
    streamed. A cut (the stream failing, or the source raising: gRPC ends the call then) resumes; a SealError or
    another of our errors from sealing ends it."""

    def __init__(self, client: SiteClient, begin: pb.RelayOpen, sealer: Sealer, source: RecordSource) -> None:
        self.client, self.begin, self.sealer, self.source = client, begin, sealer, source
        self.held = self.sent = 0
        self._fresh = False
        self.refresh()

    def refresh(self) -> None:
        what = f"relay open of transfer {self.begin.transfer_id!r}"
        state = self.client.call("RelayOpen", self.begin, what)
        self.held, self.sent, self._fresh = state.records, state.records, True

    def progress(self) -> int:
        return self.sent

    def step(self) -> None:
        if not self._fresh:
            self.refresh()  # after a cut: ask what the relay holds
        self._fresh = False
        if self.held >= self.begin.records:
            return
        c, failed = self.client, []
        idle: list[IdleWatch] = []

        def records() -> Iterator[bytes]:
            for i in range(self.held, self.begin.records):
                try:  # another error (OSError, say) ends the call (gRPC: UNKNOWN) and is resumed as a cut
                    sealed = self.sealer.seal(i, self.source.record(i), last=i == self.begin.records - 1)
                except FLError as e:
                    failed.append(e)
                    return
                if idle:
                    idle[0].kick()
                c.stats["bytes_sent"] += len(sealed)
                self.sent = i + 1
                yield sealed

        metadata = ((TRANSFER_METADATA, self.begin.transfer_id),)
        future = relay_transport(c).RelayPut(records(), metadata=metadata, wait_for_ready=True)
        idle.append(IdleWatch(future, c.idle_timeout))
        try:
            state = future.result()
        finally:
            idle[0].stop()
        if failed:
            raise failed[0]
        self.held = state.records


# -- get ---------------------------------------------------------------------------------------------------------
def get_sealed(
    client: SiteClient,
    transfer_id: str,
    opener: Callable[[bytes], Opener],
    consume: Callable[[int, bytes], None],
) -> None:
    """Fetch transfer `transfer_id` from the relay: `opener(header)` checks the header and returns the Opener,
    each record is opened in order and handed to `consume(i, plaintext)`, until the last record. A cut resumes
    from the next record; a SealError (or `consume`'s refusal) ends it, and nothing from that record on is
    handed on."""
    relay_transport(client)
    get = _Get(client, transfer_id, opener, consume)
    client.transfers.resumable(get.step, f"relay get of transfer {transfer_id!r}", progress=get.progress)


class _Get:
    def __init__(
        self,
        client: SiteClient,
        transfer_id: str,
        opener: Callable[[bytes], Opener],
        consume: Callable[[int, bytes], None],
    ) -> None:
        self.client, self.transfer_id, self.make_opener, self.consume = client, transfer_id, opener, consume
        self.next = 0  # the next record to open
        self.done = False
        self.header: bytes | None = None
        self.opener: Opener | None = None

    def progress(self) -> int:
        return self.next

    def step(self) -> None:
        if self.done:
            return
        c = self.client
        req = pb.RelayRequest(site=c.site, transfer_id=self.transfer_id, from_record=self.next)
        call = relay_transport(c).RelayGet(req, wait_for_ready=True)
        idle = IdleWatch(call, c.idle_timeout)
        try:
            items = iter(call)
            header = next(items, None)  # every stream starts with the header
            if header is not None:
                opener = self._open(header)
                for record in items:
                    idle.kick()
                    c.stats["bytes_received"] += len(record)
                    self._record(opener, record)
                    if self.done:
                        return
            raise IntegrityError(
                f"transfer {self.transfer_id!r}: the relay's stream ended before the last record (at record "
                f"{self.next}); resuming"
            )
        finally:
            idle.stop()
            call.cancel()

    def _open(self, header: bytes) -> Opener:
        self.client.stats["bytes_received"] += len(header)
        if self.opener is None:
            self.opener = self.make_opener(header)  # checks the header: a SealError ends the get
            self.header = header
        elif header != self.header:
            raise SealError(
                f"transfer {self.transfer_id!r}: the relay sent another header when the get resumed at record "
                f"{self.next}; refuse this transfer"
            )
        return self.opener

    def _record(self, opener: Opener, record: bytes) -> None:
        i = self.next
        self.done = _open_record(self.transfer_id, opener, i, record, self.consume)
        self.next = i + 1


def _open_record(
    transfer_id: str, opener: Opener, i: int, record: bytes, consume: Callable[[int, bytes], None]
) -> bool:
    """Open record `i` and hand it to `consume`; whether it was the transfer's last."""
    plain, last = opener.open(i, record)
    try:
        consume(i, plain)
    except IntegrityError as e:  # it opened, so its sender sealed it so: fetching it again would not help
        raise ProtocolError(f"transfer {transfer_id!r}, record {i}: {e}") from None
    return last


# -- models ------------------------------------------------------------------------------------------------------
class _ModelReader:
    """`consume` for a sealed model: record 0 is the manifest, which picks the sink; then each frame goes to its
    shard's receiver, which verifies it, and each shard's digest is checked as it completes."""

    def __init__(self, transfer_id: str, sink_for: Callable[[Manifest], Sink]) -> None:
        self.transfer_id, self.sink_for = transfer_id, sink_for
        self.manifest: Manifest | None = None
        self.receivers: list[ShardReceiver] = []
        self.shard = 0

    def consume(self, i: int, plain: bytes) -> None:
        if i == 0:
            self.manifest = Manifest.from_json(plain, f"transfer {self.transfer_id!r}'s manifest")
            sink = self.sink_for(self.manifest)
            self.receivers = [ShardReceiver(self.manifest, k, sink) for k in range(len(self.manifest.shards))]
            return
        if self.manifest is None or self.shard >= len(self.receivers):
            raise ProtocolError(
                f"transfer {self.transfer_id!r}: record {i} is beyond its manifest's chunks; refuse this transfer"
            )
        rx = self.receivers[self.shard]
        rx.accept(plain)
        if rx.complete:
            rx.finish(self.manifest.shards[self.shard].digest)
            self.shard += 1

    def finish(self) -> Manifest:
        if self.manifest is None or self.shard < len(self.receivers):
            raise ProtocolError(
                f"transfer {self.transfer_id!r} ended before its model did ({self.shard} of "
                f"{len(self.receivers)} shards); its sender sealed it short: refuse it"
            )
        return self.manifest


def read_update(
    client: SiteClient, transfer_id: str, opener: Callable[[bytes], Opener], sink_for: Callable[[Manifest], Sink]
) -> Manifest:
    """A sealed model (an update) into the sink `sink_for(manifest)` returns once the manifest is known (the
    swarm aggregator site's fold); returns the manifest once every shard's digest has checked."""
    reader = _ModelReader(transfer_id, sink_for)
    get_sealed(client, transfer_id, opener, reader.consume)
    return reader.finish()


def read_stream(
    transfer_id: str,
    opener: Callable[[bytes], Opener],
    sink_for: Callable[[Manifest], Sink],
    messages: Iterator[bytes],
) -> Manifest:
    """`read_update` from `messages` at hand (the header, then every record: a swarm site's own inbox, which
    swarm/peer.py fills), with the same checks: each record opened in order and verified, the last one required."""
    reader = _ModelReader(transfer_id, sink_for)
    header = next(messages, None)
    if header is None:
        raise ProtocolError(f"transfer {transfer_id!r} holds no header; refuse it")
    sealed = opener(header)
    last, i = False, 0
    for i, record in enumerate(messages):
        if last := _open_record(transfer_id, sealed, i, record, reader.consume):
            break
    if not last:
        raise ProtocolError(f"transfer {transfer_id!r} ended before its last record (at record {i}); refuse it")
    return reader.finish()


def receive_model(
    client: SiteClient,
    transfer_id: str,
    opener: Callable[[bytes], Opener],
    params_format: str,
    into: Mapping[str, Any] | None = None,
) -> tuple[Manifest, dict[str, Any]]:
    """A sealed model into tensors (`params_format`: "numpy" or "torch"); tensors of `into` that match (name,
    dtype, shape) receive the bytes in place, as Transfers.download does."""
    params: dict[str, Any] = {}

    def sink_for(manifest: Manifest) -> Sink:
        made, views = tensors.allocate([t for s in manifest.shards for t in s.tensors], params_format, into)
        params.update(made)
        return TensorSink(views)

    return read_update(client, transfer_id, opener, sink_for), params
