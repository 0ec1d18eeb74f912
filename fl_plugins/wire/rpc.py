"""gRPC plumbing: channel options in one place, the method table, a client stub and a server handler.

Control calls use protobuf (proto/fl.proto); chunk streams (Upload requests, Download responses) are raw
frames with identity serializers (frames.py). The servicer side only maps: decode, call the aggregator,
turn our errors into status codes (`STATUS_OF`); the client side turns status codes back into our errors.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from fl_plugins import errors
from fl_plugins.wire.proto import fl_pb2 as pb

SERVICE = "flplugins.v1.Aggregator"
MAX_MESSAGE_BYTES = 96 << 20  # chunks are at most 64 MiB + header; manifests at most 64 MiB

# Every channel and server option, explicitly. Keepalive finds dead peers on idle connections; the
# idle-progress timeout (a transfer moving no bytes) is enforced by the aggregator and the client themselves.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # we retry ourselves, resuming from offsets
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.use_local_subchannel_pool", 1),
]
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]

_identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
RAW = None  # marker: identity-serialized frames

# name: (kind, request type, response type)
METHODS = {
    "Hello": ("unary_unary", pb.HelloRequest, pb.HelloReply),
    "GetTask": ("unary_unary", pb.TaskRequest, pb.Task),
    "BeginUpload": ("unary_unary", pb.UploadBegin, pb.UploadState),
    "Upload": ("stream_unary", RAW, pb.UploadAck),
    "CommitUpload": ("unary_unary", pb.UploadCommit, pb.CommitReply),
    "Download": ("unary_stream", pb.DownloadRequest, RAW),
    "Heartbeat": ("unary_unary", pb.HelloRequest, pb.Empty),
    "Log": ("unary_unary", pb.LogRequest, pb.Empty),
    "Status": ("unary_unary", pb.StatusRequest, pb.StatusReply),
}

STATUS_OF = [  # most specific first
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AuthError, grpc.StatusCode.PERMISSION_DENIED),
]
_ERROR_OF_CODE = {
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.ProtocolError,
    grpc.StatusCode.PERMISSION_DENIED: errors.AuthError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthError,
}


def _ser(t):
    return _identity if t is RAW else t.SerializeToString


def _de(t):
    return _identity if t is RAW else t.FromString


def insecure_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def secure_channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    """A TLS channel (mTLS with a site's kit, security/tls.py); the aggregator's certificate must be valid for
    the host in `address`."""
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


class Stub:
    """Callables for each method: `stub.Hello(request, timeout=...)`."""

    def __init__(self, channel: grpc.Channel) -> None:
        for name, (kind, req, resp) in METHODS.items():
            factory = getattr(channel, kind)
            setattr(self, name, factory(f"/{SERVICE}/{name}", request_serializer=_ser(req),
                                        response_deserializer=_de(resp)))  # fmt: skip


def generic_handler(servicer) -> grpc.GenericRpcHandler:
    """A handler that calls `servicer.<Method>(request, context)` for each method in METHODS."""
    handlers = {}
    for name, (kind, req, resp) in METHODS.items():
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handlers[name] = make(_guard(getattr(servicer, name), kind), request_deserializer=_de(req),
                              response_serializer=_ser(resp))  # fmt: skip
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _guard(fn, kind: str):
    """Map our errors to status codes with the error's message (context.abort raises to end the call)."""

    def abort(context, e: Exception):
        for cls, code in STATUS_OF:
            if isinstance(e, cls):
                context.abort(code, f"{type(e).__name__}: {e}")
        raise e

    if kind == "unary_stream":

        def stream_handler(request, context):
            try:
                yield from fn(request, context)
            except errors.FLError as e:
                abort(context, e)

        return stream_handler

    def handler(request, context):
        try:
            return fn(request, context)
        except errors.FLError as e:
            abort(context, e)

    return handler


def error_from_rpc(e: grpc.RpcError, what: str) -> Exception:
    """Our error for a failed call whose status the aggregator set on purpose (its details start with the
    error's class name, see `_guard`), else the RpcError itself."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or ""
    name, sep, message = details.partition(": ")
    cls = getattr(errors, name, None) if sep else None
    if isinstance(cls, type) and issubclass(cls, errors.FLError) and code in {c for _, c in STATUS_OF}:
        return cls(f"{what}: {message}")
    if code in _ERROR_OF_CODE:
        return _ERROR_OF_CODE[code](f"{what}: {details}")
    return e


RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
