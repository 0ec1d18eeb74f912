"""gRPC plumbing: channel options in one place, the method table, a client stub and a server handler.

Control calls use protobuf (proto/fl.proto); chunk streams (Upload requests, Download responses) are raw
frames with identity serializers (frames.py). The servicer side only maps: decode, call the aggregator,
turn our errors into status codes (`STATUS_OF`); the client side turns status codes back into our errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from fl_plugins import errors
from fl_plugins.wire.proto import fl_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.message import Message

    # A servicer method: (request, context) -> reply, or an iterator of replies (Download). The request is a
    # protobuf message, or an iterator of raw frames (Upload): Any, as the generated messages are untyped.
    Handler = Callable[[Any, grpc.ServicerContext], Any]

log = logging.getLogger(__name__)

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

SEALED_OVERHEAD = 1024  # what sealing adds to a chunk frame (security/seal.py: 97 bytes), with room to spare
MAX_CONTROL_BYTES = 16 << 20  # the largest control message a site may send (a manifest: ~150 bytes per tensor)


def server_options(chunk_bytes: int) -> list[tuple[str, int | str]]:
    """SERVER_OPTIONS with the receive limit cut to what this aggregator needs: a chunk frame of its own
    `chunk_bytes` or a control message of MAX_CONTROL_BYTES. gRPC buffers a message whole before our code sees
    it, so this limit, times the calls a site may hold (limits.py), bounds what one site can make it buffer."""
    from fl_plugins.wire.frames import HEADER_SIZE

    limit = max(chunk_bytes + HEADER_SIZE + SEALED_OVERHEAD, MAX_CONTROL_BYTES)
    return [(k, limit if k == "grpc.max_receive_message_length" else v) for k, v in SERVER_OPTIONS]


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
    "SendResult": ("unary_unary", pb.ResultRequest, pb.CommitReply),
    "Status": ("unary_unary", pb.StatusRequest, pb.StatusReply),
    # swarm: sealed transfers between sites, through the aggregator (aggregator/relay.py)
    "RelayOpen": ("unary_unary", pb.RelayOpen, pb.RelayState),
    "RelayPut": ("stream_unary", RAW, pb.RelayState),
    "RelayCommit": ("unary_unary", pb.RelayCommit, pb.CommitReply),
    "RelayGet": ("unary_stream", pb.RelayRequest, RAW),
}

STATUS_OF = [  # most specific first
    (errors.BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # over a call limit (limits.py): the client retries
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


def _ser(t: type[Message] | None) -> Callable[[Any], bytes]:
    return _identity if t is RAW else t.SerializeToString


def _de(t: type[Message] | None) -> Callable[[bytes], Any]:
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
            setattr(
                self, name, factory(f"/{SERVICE}/{name}", request_serializer=_ser(req), response_deserializer=_de(resp))
            )


def generic_handler(servicer: object, names: Iterable[str] | None = None) -> grpc.GenericRpcHandler:
    """A handler that calls `servicer.<Method>(request, context)` for each method in METHODS (or in `names`: a swarm
    site's inbound port serves the relay's calls alone)."""
    handlers = {}
    for name, (kind, req, resp) in METHODS.items():
        if names is not None and name not in names:
            continue
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handlers[name] = make(
            _guard(getattr(servicer, name), kind), request_deserializer=_de(req), response_serializer=_ser(resp)
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _guard(fn: Handler, kind: str) -> Handler:
    """Map our errors to status codes with the error's message (context.abort raises to end the call). Anything
    else a handler raises is a bug, never a site's fault to be shown as ours: it is logged here with its traceback
    and the call ends with INTERNAL and a message; the aggregator goes on serving."""
    method = getattr(fn, "__name__", "?")

    def abort(context: grpc.ServicerContext, e: Exception) -> None:
        if isinstance(e, errors.FLError):
            for cls, code in STATUS_OF:
                if isinstance(e, cls):
                    context.abort(code, f"{type(e).__name__}: {e}")
            code = grpc.StatusCode.FAILED_PRECONDITION  # an FLError without a code of its own
            context.abort(code, f"{type(e).__name__}: {e}")
        log.error(
            "%s failed with an unexpected %s (a bug in fl-plugins; the call ends with INTERNAL)",
            method,
            type(e).__name__,
            exc_info=e,
        )
        context.abort(
            grpc.StatusCode.INTERNAL,
            f"InternalError: the aggregator failed handling {method}: "
            f"{type(e).__name__}: {str(e)[:200]}; this is a bug in fl-plugins, please report it with the "
            "aggregator's log (it has the traceback)",
        )

    def unexpected(context: grpc.ServicerContext, e: Exception) -> bool:
        """False for what only looks unexpected: the call ended (a site went away; context.abort's own raise)."""
        return not isinstance(e, grpc.RpcError) and context.is_active() and not _aborted(context)

    if kind == "unary_stream":

        def stream_handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(request, context)
            except errors.FLError as e:
                abort(context, e)
            except Exception as e:
                if not unexpected(context, e):
                    raise
                abort(context, e)

        return stream_handler

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(request, context)
        except errors.FLError as e:
            abort(context, e)
        except Exception as e:
            if not unexpected(context, e):
                raise
            abort(context, e)

    return handler


def _aborted(context: grpc.ServicerContext) -> bool:
    """Whether the handler already ended the call with context.abort (grpc then raises a bare Exception)."""
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


def error_from_rpc(e: grpc.RpcError, what: str) -> Exception:
    """Our error for a failed call whose status the aggregator set on purpose (its details start with the
    error's class name, see `_guard`), else the RpcError itself. RESOURCE_EXHAUSTED (a call limit, BusyError)
    stays the RpcError: it is retryable, and the caller retries it after a pause."""
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return e
    details = (e.details() if hasattr(e, "details") else "") or ""
    name, sep, message = details.partition(": ")
    cls = getattr(errors, name, None) if sep else None
    if isinstance(cls, type) and issubclass(cls, errors.FLError) and code in {c for _, c in STATUS_OF}:
        return cls(f"{what}: {message}")
    if code in _ERROR_OF_CODE:
        return _ERROR_OF_CODE[code](f"{what}: {details}")
    return e


RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
