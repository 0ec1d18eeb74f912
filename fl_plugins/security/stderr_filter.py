"""The filter process between the aggregator's stderr and the real one (started by handshake_log.py).

Its stdin is the read end of a pipe that is the aggregator's fd 2; its stderr is the real stderr. It copies every
byte it reads to its stderr unchanged, except the lines gRPC's C core prints for a failed TLS handshake:

    I1205 21:33:35.365701   11530 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL:
    error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context

(one line), whose error text it writes to its stdout as one JSON line, {"error": TEXT, "dropped": N}, for the
aggregator to turn into a WARNING (handshake_log.py). Output that is not such a line passes as it came.

Why a process and not a thread of the aggregator: what the aggregator writes just before it dies (a C-level
abort, faulthandler's trace of a crash) is still in the pipe then; this process outlives it, copies it out and
ends at the end of file, once no writer is left. For the same reason it ignores SIGINT, SIGTERM and SIGHUP
(Ctrl-C reaches the whole process group): only the end of file ends it.

Never blocking the writers: a complete line goes out at once; a partial line goes out after PARTIAL_WAIT
seconds with nothing more, or once it holds MAX_LINE bytes. The events pipe is written without blocking: an
event the aggregator does not take in time is counted ("dropped") and the count travels with the next one, so
this process never waits for the aggregator (whose own log lines come back through this process's stdin).

Standard library only: it runs by path (`python -I stderr_filter.py`) and imports nothing of fl_plugins.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal

HANDSHAKE = re.compile(
    rb"^[IWEF]\d{4} [\d:.]+\s+\d+ ssl_transport_security\.cc:\d+\] Handshake failed with error (?P<error>.*?)\r?$"
)
PARTIAL_WAIT = 0.05  # seconds a partial line waits for its end before it goes out as it is
MAX_LINE = 1 << 16  # a partial line this long goes out at once
MAX_EVENT = 3000  # bytes of error text per event (an event line stays under PIPE_BUF: written whole or not at all)
SOURCE, EVENTS, OUT = 0, 1, 2


class Filter:
    """Split what is read into lines; copy the lines that are not failed handshakes to `out`, and report those
    that are to `events`."""

    def __init__(self, out: int, events: int) -> None:
        self.out, self.events = out, events
        self.dropped = 0
        self.pending = b""

    def feed(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        copy = bytearray()
        for line in lines:
            m = HANDSHAKE.match(line)
            if m is None:
                copy += line + b"\n"
                continue
            self.write(copy)
            copy.clear()
            self.report(m.group("error").decode("utf-8", "replace"))
        self.write(copy)
        if len(self.pending) >= MAX_LINE:
            self.flush()

    def flush(self) -> None:
        """The partial line goes out as it is (its end was slow to come, or it is too long to hold)."""
        self.write(self.pending)
        self.pending = b""

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.out, view) :]
            except InterruptedError:
                continue
            except BlockingIOError:  # a stderr left non-blocking by someone: wait until it takes more
                select.select([], [self.out], [])
            except OSError:
                return  # the real stderr is gone: nothing can be shown, but the writers must not block

    def report(self, error: str) -> None:
        line = json.dumps({"error": error[:MAX_EVENT], "dropped": self.dropped}).encode() + b"\n"
        try:
            os.write(self.events, line)
            self.dropped = 0
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # the aggregator is behind: count it, never wait
        except OSError:
            self.dropped += 1  # the aggregator stopped reading events: the other output still goes through


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    os.set_blocking(EVENTS, False)
    f = Filter(OUT, EVENTS)
    poller = select.poll()
    poller.register(SOURCE, select.POLLIN)
    while True:
        if f.pending and not poller.poll(int(PARTIAL_WAIT * 1000)):
            f.flush()
            continue
        try:
            data = os.read(SOURCE, 1 << 16)
        except InterruptedError:
            continue
        except OSError:
            break  # the pipe cannot be read any more: nothing is left to copy
        if not data:
            break  # end of file: every writer is gone
        f.feed(data)
    f.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
