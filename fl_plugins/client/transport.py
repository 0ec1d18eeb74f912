"""The seam between a site and the aggregator service: the ten calls of fl.proto, over gRPC or in memory.

`SiteClient` makes every call through a `Transport`. Its contract is the service's (fl_plugins/wire/proto/fl.proto
and rpc.METHODS): each call takes and returns those protobuf messages, Upload streams raw chunk frames up and
Download streams them down, and a failed call raises `grpc.RpcError` with a status code and details as the
aggregator set them (`rpc.error_from_rpc` turns them back into our errors). So the client's retry logic sees the
same things whichever transport carries the call.

    call          kind                       request            reply
    Hello         unary                      HelloRequest       HelloReply
    Heartbeat     unary                      HelloRequest       Empty
    GetTask       unary (long poll)          TaskRequest        Task
    BeginUpload   unary                      UploadBegin        UploadState
    Upload        client stream, a future    frames (bytes)     UploadAck     metadata: fl-upload-id, fl-shard
    CommitUpload  unary                      UploadCommit       CommitReply
    Download      server stream              DownloadRequest    frames (bytes)
    Log           unary                      LogRequest         Empty
    SendResult    unary                      ResultRequest      CommitReply   (an EVALUATE task's metrics)
    Status        unary                      StatusRequest      StatusReply   metadata: fl-site

`GrpcTransport` is a channel to an aggregator's address. `InMemoryTransport` (implemented in memory.py) calls an
aggregator's service object in this process, with no socket: fast unit tests of the client API and the round driver
run over it, while integration tests keep the real server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from fl_plugins.client.memory import InMemoryRpcError, InMemoryTransport
from fl_plugins.wire import rpc
from fl_plugins.wire.proto import fl_pb2 as pb

__all__ = [
    "DownloadCall",
    "GrpcTransport",
    "InMemoryRpcError",
    "InMemoryTransport",
    "Metadata",
    "Transport",
    "UnaryCall",
    "UploadCall",
]

Metadata = Sequence[tuple[str, str]]
Req = TypeVar("Req", contravariant=True)
Resp = TypeVar("Resp", covariant=True)


class UnaryCall(Protocol[Req, Resp]):
    """One unary call: `transport.Hello(request, timeout=10)`. `wait_for_ready`: wait (until the timeout) for a
    connection that is not ready yet instead of failing at once."""

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> Resp: ...


class UploadCall(Protocol):
    """An Upload under way: `result()` waits for the aggregator's UploadAck; `cancel()` ends it (any thread)."""

    def result(self, timeout: float | None = None) -> pb.UploadAck: ...

    def cancel(self) -> bool: ...


class DownloadCall(Protocol):
    """A Download under way: iterate it for the frames; `cancel()` ends it (any thread)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def cancel(self) -> bool: ...


class Transport(Protocol):
    """The aggregator service's ten calls (see the module docstring), plus `close()`."""

    Hello: UnaryCall[pb.HelloRequest, pb.HelloReply]
    Heartbeat: UnaryCall[pb.HelloRequest, pb.Empty]
    GetTask: UnaryCall[pb.TaskRequest, pb.Task]
    BeginUpload: UnaryCall[pb.UploadBegin, pb.UploadState]
    CommitUpload: UnaryCall[pb.UploadCommit, pb.CommitReply]
    Log: UnaryCall[pb.LogRequest, pb.Empty]
    Status: UnaryCall[pb.StatusRequest, pb.StatusReply]
    SendResult: UnaryCall[pb.ResultRequest, pb.CommitReply]

    def Upload(
        self,
        frames: Iterator[bytes],
        *,
        metadata: Metadata,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> UploadCall:
        """Start streaming `frames` (one shard, from an offset) into the upload that `metadata` names."""
        ...

    def Download(
        self,
        request: pb.DownloadRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> DownloadCall:
        """Start streaming a shard of a round's global model down, from `request.offset`."""
        ...

    def close(self) -> None:
        """End every call under way; no call may be made afterwards."""
        ...


class GrpcTransport:
    """The service over a gRPC channel (rpc.py holds the channel options and the method table)."""

    def __init__(self, channel: grpc.Channel, address: str = "") -> None:
        self.channel, self.address = channel, address
        stub: Any = rpc.Stub(channel)
        self.Hello: UnaryCall[pb.HelloRequest, pb.HelloReply] = stub.Hello
        self.Heartbeat: UnaryCall[pb.HelloRequest, pb.Empty] = stub.Heartbeat
        self.GetTask: UnaryCall[pb.TaskRequest, pb.Task] = stub.GetTask
        self.BeginUpload: UnaryCall[pb.UploadBegin, pb.UploadState] = stub.BeginUpload
        self.CommitUpload: UnaryCall[pb.UploadCommit, pb.CommitReply] = stub.CommitUpload
        self.Log: UnaryCall[pb.LogRequest, pb.Empty] = stub.Log
        self.Status: UnaryCall[pb.StatusRequest, pb.StatusReply] = stub.Status
        self.SendResult: UnaryCall[pb.ResultRequest, pb.CommitReply] = stub.SendResult
        self._upload, self._download = stub.Upload, stub.Download
        # swarm: the relay's calls (client/relay.py), RelayPut started as a future as Upload is
        self.RelayOpen: UnaryCall[pb.RelayOpen, pb.RelayState] = stub.RelayOpen
        self.RelayCommit: UnaryCall[pb.RelayCommit, pb.CommitReply] = stub.RelayCommit
        self.RelayGet, self.RelayPut = stub.RelayGet, stub.RelayPut.future

    @classmethod
    def open(cls, address: str, credentials: grpc.ChannelCredentials | None = None) -> GrpcTransport:
        """A channel to `address`: plaintext, or TLS with `credentials` (mTLS with a site's kit)."""
        if credentials is None:
            return cls(rpc.insecure_channel(address), address)
        return cls(rpc.secure_channel(address, credentials), address)

    def Upload(
        self,
        frames: Iterator[bytes],
        *,
        metadata: Metadata,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> UploadCall:
        return self._upload.future(frames, metadata=metadata, timeout=timeout, wait_for_ready=wait_for_ready)

    def Download(
        self,
        request: pb.DownloadRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> DownloadCall:
        return self._download(request, timeout=timeout, metadata=metadata, wait_for_ready=wait_for_ready)

    def close(self) -> None:
        self.channel.close()

    def __str__(self) -> str:
        return self.address or "a gRPC channel"
