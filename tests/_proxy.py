"""A loopback TCP proxy that injects faults into a gRPC (plaintext HTTP/2) connection.

    with FaultProxy(("127.0.0.1", port), flip_up_at=3 << 19) as proxy:
        SiteClient(proxy.address, "site-1")   # the site talks to the aggregator through the proxy

Faults, each fired once over the proxy's life (the connection the site makes after a fault is clean, unless
more cut points are left):

* `cut_up_after=N` / `cut_down_after=N`: forward N bytes client->server / server->client on a connection,
  then reset both sides of it. A list of N cuts the first connection after N[0] bytes, the next connection (the
  site's reconnection) after N[1] of its own bytes, and so on.
* `flip_up_at=N` / `flip_down_at=N`: invert one byte of the client->server / server->client stream: the N-th
  byte (0-based) of HTTP/2 DATA-frame payload on a connection. Counting DATA payload only (the proxy parses
  the 9-byte frame headers, and skips the client's 24-byte preface) keeps the flip off HTTP/2 framing,
  whatever the frame sizes and however many control frames (settings, pings, window updates, headers) went
  first, so a flip well past the first chunk lands inside a chunk's payload: corrupted data, intact framing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, PADDED = 0x0, 0x8


class _Http2Data:
    """Tracks which bytes of one direction of an HTTP/2 connection are DATA-frame payload."""

    def __init__(self, client_side: bool) -> None:
        self.skip = len(PREFACE) if client_side else 0
        self.hdr = bytearray()
        self.left = 0  # payload bytes left in the current frame
        self.in_data = False
        self.data_seen = 0  # DATA payload bytes seen so far

    def data_positions(self, buf: bytearray):
        """Yield (start, end, n0) for each run buf[start:end] of DATA payload; n0 numbers its first byte."""
        i, n = 0, len(buf)
        while i < n:
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
            elif self.left == 0:
                k = min(9 - len(self.hdr), n - i)
                self.hdr += buf[i : i + k]
                i += k
                if len(self.hdr) == 9:
                    length = int.from_bytes(self.hdr[:3], "big")
                    ftype, flags = self.hdr[3], self.hdr[4]
                    self.in_data = ftype == DATA and not flags & PADDED
                    self.left = length
                    self.hdr.clear()
            else:
                k = min(self.left, n - i)
                if self.in_data:
                    yield i, i + k, self.data_seen
                    self.data_seen += k
                self.left -= k
                i += k


class FaultProxy:
    def __init__(self, target: tuple[str, int] | str, *, cut_up_after: int | Sequence[int] | None = None,
                 cut_down_after: int | Sequence[int] | None = None, flip_up_at: int | None = None,
                 flip_down_at: int | None = None) -> None:  # fmt: skip
        if isinstance(target, str):
            host, _, port = target.rpartition(":")
            target = (host, int(port))
        self.target = target
        self._cuts = {d: [] if n is None else [n] if isinstance(n, int) else list(n)
                      for d, n in (("up", cut_up_after), ("down", cut_down_after))}  # fmt: skip
        self.flip_at = {"up": flip_up_at, "down": flip_down_at}
        self.fired = {"cut": False, "up": False, "down": False}  # faults that happened
        self.cuts = {"up": 0, "down": 0}  # connections cut, per direction
        self.connections = 0
        self.bytes = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fault-proxy")
        self._thread.start()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        _kill(self._listener)
        for s in socks:
            _kill(s)
        self._thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _kill(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    _kill(client), _kill(upstream)
                    return
                self._socks += [client, upstream]
                self.connections += 1
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, "up", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down", pair), daemon=True).start()

    # -- forwarding --------------------------------------------------------------------------------------
    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, pair) -> None:
        h2 = _Http2Data(client_side=direction == "up")
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                buf = bytearray(data)
                self._maybe_flip(direction, h2, buf)
                with self._lock:
                    cuts = self._cuts[direction]
                    at = cuts[0] if cuts and sent + len(buf) >= cuts[0] else None
                    if at is not None:
                        cuts.pop(0)
                        self.fired["cut"] = True
                        self.cuts[direction] += 1
                if at is not None:
                    dst.sendall(buf[: max(at - sent, 0)])
                    with self._lock:
                        self.bytes[direction] += max(at - sent, 0)
                    break
                dst.sendall(buf)
                sent += len(buf)
                with self._lock:
                    self.bytes[direction] += len(buf)
        except OSError:
            pass
        finally:
            for s in pair:  # one side gone (or a cut): the connection is over for both
                _kill(s)

    def _maybe_flip(self, direction: str, h2: _Http2Data, buf: bytearray) -> None:
        at = self.flip_at[direction]
        if at is None:
            return
        for start, end, n0 in h2.data_positions(buf):
            if n0 <= at < n0 + (end - start):
                with self._lock:
                    if self.fired[direction]:
                        continue
                    self.fired[direction] = True
                buf[start + at - n0] ^= 0xFF


def _kill(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
