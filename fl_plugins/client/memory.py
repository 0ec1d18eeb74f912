"""`InMemoryTransport`: the aggregator service in this process, called without a socket or a gRPC server.

    agg = Aggregator(AggregatorConfig(run_dir=tmp_path / "run", rounds=2, initial_model=path))
    agg.start()
    client = SiteClient(None, "site-1", transport=InMemoryTransport(Servicer(agg)))

Each call goes through the same handler table as the gRPC server (`rpc.generic_handler(servicer)`), so the
servicer's errors become the same status codes (rpc.py's mapping: our errors by class, RESOURCE_EXHAUSTED for a busy
site, INTERNAL for a bug), and the client gets `InMemoryRpcError`, a `grpc.RpcError` with `code()` and `details()`,
where it would get gRPC's; `rpc.error_from_rpc` then gives back the same error class. Requests and replies are
serialized and parsed as on the wire (the protobuf messages are the contract; chunk frames pass as they are).
What it does not model: TLS (a call's context carries no certificate), message size limits and the server's
worker pool.

As on a server, each call's handler runs on a thread of its own, so a call's deadline, a cancel from
either side (the client's idle watch, the aggregator dropping an upload) and close() end the call for its caller
at once, and the servicer sees its context go inactive and its callbacks run (a long poll then returns). A
handler's context (`_Context`) has what the servicer uses: invocation_metadata, peer (a local caller, as on
loopback), auth_context (none: plaintext), is_active, add_callback, cancel, abort, code.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from fl_plugins.wire import rpc
from fl_plugins.wire.proto import fl_pb2 as pb

if TYPE_CHECKING:  # transport.py imports this module: no cycle at run time
    from fl_plugins.client.transport import Metadata, UnaryCall

log = logging.getLogger(__name__)

PEER = "unix:in-memory"  # gRPC's peer string for a caller on this machine without a network address
_REPLY: dict[str, Any] = {name: resp for name, (_, _, resp) in rpc.METHODS.items()}


class InMemoryRpcError(grpc.RpcError):
    """A failed in-memory call: the status code and details a gRPC client would have got."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f'<InMemoryRpcError: status = {self._code}, details = "{self._details}">'


class _Aborted(Exception):
    """What `context.abort()` raises to end the handler (gRPC raises a bare Exception)."""


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "invocation_metadata")), grpc.HandlerCallDetails):
    pass


class _Context:
    """One call: the servicer's context (the grpc.ServicerContext methods it uses) and how the call ended.

    A call ends once: the handler finished (`finish`), or it was cancelled, ran past its deadline or its
    transport closed (`end`); then `is_active()` is False and the callbacks run."""

    def __init__(self, handler: grpc.RpcMethodHandler, metadata: Metadata | None, timeout: float | None) -> None:
        self.handler = handler  # the method's entry of rpc.generic_handler: the servicer's, error mapping around it
        self._metadata = tuple(metadata or ())
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.ended_as: tuple[grpc.StatusCode, str] | None = None  # cancelled, past the deadline, closed
        self.value: Any = None
        self.error: BaseException | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""

    # -- what the servicer sees --------------------------------------------------------------------------
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return PEER

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def is_active(self) -> bool:
        return not self._ended.is_set()

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._ended.is_set():
                return False
            self._callbacks.append(callback)
            return True

    def cancel(self) -> None:
        self.end(grpc.StatusCode.CANCELLED, "Cancelled")

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise _Aborted(details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    # -- the transport's side ----------------------------------------------------------------------------
    def finish(self, value: Any, error: BaseException | None) -> bool:
        """The handler returned `value` or raised `error` (ignored if the call has ended already)."""
        return self._close(value, error, None)

    def end(self, code: grpc.StatusCode, details: str) -> bool:
        """End the call for its caller with `code` (cancelled, deadline, closed); False if it had ended."""
        return self._close(None, None, (code, details))

    def _close(self, value: Any, error: BaseException | None, ended_as: tuple[grpc.StatusCode, str] | None) -> bool:
        with self._lock:
            if self._ended.is_set():
                return False
            self.value, self.error, self.ended_as = value, error, ended_as
            self._ended.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` for the call to end; True once it has. At its deadline it ends with
        DEADLINE_EXCEEDED (gRPC's client ends it so, and the servicer's context goes inactive)."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                return True
            limits = [t for t in (self.deadline, until) if t is not None]
            if self._ended.wait(min(limits) - now if limits else None):
                return True
            if until is not None and time.monotonic() >= until:
                return False

    def outcome(self) -> Any:
        """The handler's reply (serialized), or raise the error its caller gets. Once the call has ended."""
        if self.ended_as is not None:
            raise InMemoryRpcError(*self.ended_as)
        if self._code is not None and self._code != grpc.StatusCode.OK:  # abort(), or set_code() alone
            raise InMemoryRpcError(self._code, self._details)
        if self.error is not None:  # what gRPC answers for an exception that no handler turned into a status
            raise InMemoryRpcError(grpc.StatusCode.UNKNOWN, f"Exception calling application: {self.error}")
        return self.value


class _Unary:
    """`transport.Hello(request, timeout=...)`: one unary call of `name`."""

    def __init__(self, transport: InMemoryTransport, name: str) -> None:
        self.transport, self.name = transport, name

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> Any:
        data = request.SerializeToString()

        def serve(ctx: _Context, h: grpc.RpcMethodHandler) -> bytes:
            return h.response_serializer(h.unary_unary(h.request_deserializer(data), ctx))

        ctx = self.transport.start(self.name, metadata, timeout)
        self.transport.serve(ctx, serve)
        ctx.wait()
        return _REPLY[self.name].FromString(ctx.outcome())


class _UploadCall:
    """An Upload under way (a future, as gRPC's `Upload.future(...)`)."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def result(self, timeout: float | None = None) -> pb.UploadAck:
        if not self.ctx.wait(timeout):
            raise grpc.FutureTimeoutError()
        return pb.UploadAck.FromString(self.ctx.outcome())

    def cancel(self) -> bool:
        return self.ctx.end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")


def _requests(ctx: _Context, frames: Iterator[bytes]) -> Iterator[bytes]:
    """The frames as the servicer reads them: once the call has ended, reading raises grpc.RpcError (as gRPC's
    request iterator does); a client iterator that fails ends the call with UNKNOWN, as gRPC does."""
    it = iter(frames)
    while ctx.is_active():
        try:
            frame = next(it)
        except StopIteration:
            return
        except Exception:
            log.exception("Exception iterating requests!")
            ctx.end(grpc.StatusCode.UNKNOWN, "Exception iterating requests!")
            break
        if not ctx.is_active():
            break
        yield frame
    raise grpc.RpcError()


class _Pipe:
    """Download frames handed from the servicer's thread to the caller's: at most `depth` wait (gRPC's flow
    control, in small). Once the call has ended, `put` refuses and the caller takes no more frames unless the
    servicer finished (then it takes what is left, as a gRPC client reads the messages before the status)."""

    def __init__(self, ctx: _Context, depth: int = 4) -> None:
        self.ctx, self.depth = ctx, depth
        self._frames: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        ctx.add_callback(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def put(self, frame: bytes) -> bool:
        with self._cond:
            while len(self._frames) >= self.depth and self.ctx.is_active():
                self._cond.wait()
            if not self.ctx.is_active():
                return False
            self._frames.append(frame)
            self._cond.notify_all()
            return True

    def get(self) -> bytes | None:
        """The next frame; None once the call has ended (and, if the servicer finished, every frame is taken)."""
        while True:
            with self._cond:
                if self.ctx.ended_as is None and self._frames:
                    frame = self._frames.popleft()
                    self._cond.notify_all()
                    return frame
                if not self.ctx.is_active():
                    return None
                self._cond.wait(self.ctx.time_remaining())
            self.ctx.wait(0)  # past its deadline, the call ends with DEADLINE_EXCEEDED


class _DownloadCall:
    """A Download under way: iterate it for the frames."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def __iter__(self) -> _DownloadCall:
        return self

    def __next__(self) -> bytes:
        frame = self.pipe.get()
        if frame is None:
            self.pipe.ctx.outcome()  # raises how the call ended, unless the servicer finished it
            raise StopIteration
        return frame

    def cancel(self) -> bool:
        return self.pipe.ctx.end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    def __del__(self) -> None:  # a call dropped while under way is cancelled, as gRPC's is
        self.cancel()


class InMemoryTransport:
    """The aggregator service object `servicer` (fl_plugins.aggregator.service.Servicer) called in this process;
    see the module docstring. One per SiteClient (which closes it); many may share one servicer."""

    def __init__(self, servicer: Any) -> None:
        self._handlers = rpc.generic_handler(servicer)
        self._lock = threading.Lock()
        self._live: set[_Context] = set()
        self._closed = False
        self.Hello: UnaryCall[pb.HelloRequest, pb.HelloReply] = _Unary(self, "Hello")
        self.Heartbeat: UnaryCall[pb.HelloRequest, pb.Empty] = _Unary(self, "Heartbeat")
        self.GetTask: UnaryCall[pb.TaskRequest, pb.Task] = _Unary(self, "GetTask")
        self.BeginUpload: UnaryCall[pb.UploadBegin, pb.UploadState] = _Unary(self, "BeginUpload")
        self.CommitUpload: UnaryCall[pb.UploadCommit, pb.CommitReply] = _Unary(self, "CommitUpload")
        self.Log: UnaryCall[pb.LogRequest, pb.Empty] = _Unary(self, "Log")
        self.Status: UnaryCall[pb.StatusRequest, pb.StatusReply] = _Unary(self, "Status")
        self.SendResult: UnaryCall[pb.ResultRequest, pb.CommitReply] = _Unary(self, "SendResult")

    def start(self, name: str, metadata: Metadata | None, timeout: float | None) -> _Context:
        """A call of method `name` begins: its context (the transport ends it on close())."""
        md = tuple(metadata or ())
        handler = self._handlers.service(_CallDetails(f"/{rpc.SERVICE}/{name}", md))
        if handler is None:
            raise InMemoryRpcError(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {name}")
        ctx = _Context(handler, md, timeout)
        with self._lock:
            if self._closed:
                raise ValueError("Cannot invoke RPC on a closed in-memory transport")
            self._live.add(ctx)
        ctx.add_callback(lambda: self._forget(ctx))
        return ctx

    def serve(self, ctx: _Context, serve: Callable[[_Context, grpc.RpcMethodHandler], Any]) -> None:
        """Run `serve(ctx, handler)` on a thread of its own, as a server's worker would; its result or error
        ends the call."""

        def run() -> None:
            try:
                value = serve(ctx, ctx.handler)
            except Exception as e:
                ctx.finish(None, e)
            else:
                ctx.finish(value, None)

        threading.Thread(target=run, name="fl-in-memory", daemon=True).start()

    def _forget(self, ctx: _Context) -> None:
        with self._lock:
            self._live.discard(ctx)

    def Upload(
        self,
        frames: Iterator[bytes],
        *,
        metadata: Metadata,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> _UploadCall:
        def serve(ctx: _Context, h: grpc.RpcMethodHandler) -> bytes:
            return h.response_serializer(h.stream_unary(_requests(ctx, frames), ctx))

        ctx = self.start("Upload", metadata, timeout)
        self.serve(ctx, serve)
        return _UploadCall(ctx)

    def Download(
        self,
        request: pb.DownloadRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> _DownloadCall:
        data = request.SerializeToString()
        ctx = self.start("Download", metadata, timeout)
        pipe = _Pipe(ctx)  # the servicer's thread holds the pipe, not the call: a dropped call is collected

        def serve(ctx: _Context, h: grpc.RpcMethodHandler) -> None:
            replies = h.unary_stream(h.request_deserializer(data), ctx)
            try:
                for frame in replies:
                    if not pipe.put(h.response_serializer(frame)):
                        return
            finally:
                replies.close()  # the servicer's own clean-up (its call slot, the shard files) runs here

        self.serve(ctx, serve)
        return _DownloadCall(pipe)

    def close(self) -> None:
        """End every call under way (their callers get CANCELLED); later calls raise ValueError, as on a closed
        gRPC channel."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for ctx in live:
            ctx.end(grpc.StatusCode.CANCELLED, "Channel closed!")

    def __str__(self) -> str:
        return "in-memory"
