"""gRPC's failed TLS handshakes, told to the aggregator's operator as rate-limited WARNINGs that say what was wrong.

With mTLS, a caller the handshake refuses (plaintext, no client certificate, a certificate of another project's CA,
an expired one) never reaches Python: gRPC's C core prints one raw line per attempt to fd 2, naming nobody, and a
client that retries makes dozens of them. Python gRPC has no hook for a failed handshake, so `HandshakeLog` takes
those lines where they are printed:

    aggregator process                        filter process (stderr_filter.py)
    fd 2 ──► pipe ──────────────────────────► stdin ──► every other byte, unchanged ──► the real stderr
                                              handshake lines ──► stdout (JSON lines) ──┐
    "fl-handshake-log" thread ◄── pipe ◄─────────────────────────────────────────────┘
      └─► reason() ──► RefusalLog (refusals.py) ──► WARNING "refused a TLS connection: ..."

The filter is a process, not a thread, so that nothing written to stderr is lost: what the aggregator prints just
before it dies (an abort in the C core, faulthandler's trace) is copied out after it is gone (stderr_filter.py says
how it never blocks a writer). Installed only by the aggregator's process entry (`fl-plugins server --kit`, through
`installed()`), never on import: it takes over the process's fd 2. `stop()` puts the real stderr back, lets the
filter copy what is left and end, and tells the refusals still counted.

Limits, measured with grpcio 1.85: gRPC prints the line at INFO ("I1205 ... ssl_transport_security.cc:2563]
Handshake failed with error SSL_ERROR_SSL: ...:WRONG_VERSION_NUMBER: ..."), so GRPC_VERBOSITY=ERROR (or NONE) hides
it from the filter too. The caller's address is not in that line; gRPC's handshaker trace (GRPC_TRACE=handshaker)
has it, on other lines, spread over several lines each and in a format that changes between versions, so it is
not used: these WARNINGs name the reason, not the caller (refusals past the handshake name both, refusals.py).
A caller whose own side refuses the aggregator's certificate (it trusts another CA) leaves no line here: the site
is told. POSIX only; elsewhere `install` returns None and gRPC's lines print as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from fl_plugins.security.refusals import EVERY, RefusalLog

log = logging.getLogger(__name__)

FILTER = Path(__file__).with_name("stderr_filter.py")
STOP_WAIT = 5.0  # seconds `stop` waits for the filter to copy what is left (longer: a child of ours holds fd 2)
KIT = "`fl-plugins client --kit kits/SITE`, FL_KIT or init(kit=...)"

# (what gRPC's error text holds, what it means, what to do): the first that matches names the refusal
REASONS = (
    (
        "WRONG_VERSION_NUMBER",
        "a caller spoke plaintext to this mTLS port",
        f"a site started without its startup kit? give it its kit ({KIT})",
    ),
    (
        "HTTP_REQUEST",
        "a caller sent a plain HTTP request to this mTLS port",
        "a browser or a health check? sites connect with their startup kits",
    ),
    (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "a caller presented no client certificate",
        f"this aggregator serves mTLS only: connect with the site's startup kit ({KIT})",
    ),
    (
        "certificate has expired",
        "a caller's certificate has expired",
        "ask the project's admin for a new kit for that site (`fl-plugins provision` again)",
    ),
    (
        "certificate is not yet valid",
        "a caller's certificate is not valid yet",
        "check the clock of the caller's machine",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "a caller's certificate is not signed by this project's CA",
        "it holds another project's kit, or one from before the CA was made again: give it this project's kit "
        "(`fl-plugins provision` writes one per site)",
    ),
)


def reason(error: str) -> tuple[str, str]:
    """(kind, message) of the WARNING for gRPC's error text of a failed handshake; the kind keys the rate limit."""
    code = re.search(r"OPENSSL_internal:([A-Z0-9_]+)", error)
    for marker, what, fix in REASONS:
        if marker in error:
            return marker, f"refused a TLS connection: {what} ({code[1] if code else marker}); {fix}"
    short = error if len(error) <= 300 else error[:300] + "..."
    return "other", f"refused a TLS connection: the handshake failed ({short}); check the caller's startup kit"


class HandshakeLog:
    """The bridge of this module's docstring, on `fd` (the process's stderr; tests give another). `start` installs
    it; `stop` (idempotent) takes it away."""

    def __init__(self, *, fd: int = 2, refusals: RefusalLog | None = None) -> None:
        self.fd = fd
        self.refusals = refusals if refusals is not None else RefusalLog(EVERY)
        self._real: int | None = None  # a duplicate of what `fd` was: the real stderr
        self._events: int | None = None  # the read end of the filter's events
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> HandshakeLog:
        """Put the filter between `fd` and where it led; OSError if that cannot be done (nothing is changed)."""
        real = os.dup(self.fd)
        src_r, src_w = os.pipe()
        ev_r, ev_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(FILTER)],
                stdin=src_r,
                stdout=ev_w,
                stderr=real,
                close_fds=True,
                start_new_session=True,  # Ctrl-C to the aggregator's process group does not reach it
            )
        except BaseException:
            for fd in (real, src_r, src_w, ev_r, ev_w):
                os.close(fd)
            raise
        os.close(src_r)
        os.close(ev_w)
        self._real, self._events = real, ev_r
        _flush_python(self.fd)
        os.dup2(src_w, self.fd)  # from here on, whatever this process writes to `fd` goes through the filter
        os.close(src_w)
        self._thread = threading.Thread(target=self._read_events, name="fl-handshake-log", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Give `fd` back to the real stderr; the filter copies what it still holds and ends; the refusals still
        counted are told."""
        if not self._restore():
            return
        assert self._proc is not None and self._thread is not None
        try:
            self._proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:  # a child of ours inherited fd 2: the filter ends when it closes it
            log.debug("the stderr filter still runs: another process holds the aggregator's old stderr")
            return
        self._thread.join(STOP_WAIT)

    def _restore(self) -> bool:
        """`fd` leads to the real stderr again (False: it did already)."""
        with self._lock:
            if self._stopping or self._real is None:
                return False
            self._stopping = True
            _flush_python(self.fd)
            os.dup2(self._real, self.fd)  # the pipe's last write end of ours closes: the filter sees its end
            return True

    def _read_events(self) -> None:
        """The events thread: each failed handshake becomes a refusal; the counted ones are told every interval."""
        assert self._events is not None
        poller = select.poll()
        poller.register(self._events, select.POLLIN)
        pending = b""
        try:
            while True:
                if not poller.poll(int(max(self.refusals.every, 0.1) * 1000)):
                    self.refusals.flush()
                    continue
                data = os.read(self._events, 1 << 16)
                if not data:
                    break  # the filter ended
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    self._event(line)
        finally:
            os.close(self._events)
            self._filter_ended()
            self.refusals.flush(final=True)
            with self._lock:
                if self._real is not None:
                    os.close(self._real)
                    self._real = None

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            error, dropped = str(event["error"]), int(event.get("dropped", 0))
        except (ValueError, KeyError, TypeError):
            return  # not the filter's (it writes nothing else): nothing to tell
        kind, message = reason(error)
        for _ in range(dropped):  # failed handshakes the filter could not hand over in time: counted as this one
            self.refusals.refused(("tls", kind), message)
        self.refusals.refused(("tls", kind), message)

    def _filter_ended(self) -> None:
        """The filter ended. On its own (not by `stop`: it was killed), `fd` must not stay on a pipe nobody reads."""
        if self._restore():
            code = self._proc.poll() if self._proc is not None else None
            log.warning(
                "the aggregator's stderr filter ended on its own (exit code %s): gRPC's failed TLS handshakes print "
                "as raw lines again until the aggregator restarts",
                code,
            )


def _flush_python(fd: int) -> None:
    """Python's buffered stderr goes out before `fd` changes, so its text lands where it was written."""
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None and stream.fileno() == fd:
                stream.flush()


def install() -> HandshakeLog | None:
    """The bridge on this process's stderr, or None where it cannot be (not POSIX, no stderr, no filter file):
    gRPC's lines then print as they are."""
    if os.name != "posix" or not hasattr(select, "poll") or not FILTER.is_file():
        return None
    try:
        return HandshakeLog().start()
    except OSError as e:
        log.warning("gRPC's failed TLS handshakes will print as raw lines: the stderr filter cannot start (%s)", e)
        return None


@contextlib.contextmanager
def installed(enabled: bool = True) -> Iterator[HandshakeLog | None]:
    """`install()` for the duration of the block (`enabled`: the aggregator serves mTLS); stopped at its end."""
    bridge = install() if enabled else None
    try:
        yield bridge
    finally:
        if bridge is not None:
            bridge.stop()
