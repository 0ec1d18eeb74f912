"""Why the aggregator cannot listen on an address, found with plain sockets before gRPC tries.

gRPC's own bind failure is a native log line (`E... add_port.cc] Failed to add port to server ... Address already
in use`) printed to stderr whatever Python's logging says, and a return value that does not say why. So
`AggregatorServer` asks `check_bindable` first: it binds a plain socket the way gRPC binds its listener
(SO_REUSEADDR, every address the host resolves to, none of them SO_REUSEPORT: wire/rpc.py turns that off) and
turns the errno into one line that names the address and the fix. A port taken between this check and gRPC's bind
still fails, with `bind_error`'s message.
"""

from __future__ import annotations

import errno
import socket

from fl_plugins.errors import ConfigError

_FIX = "choose another --address, or port 0 (HOST:0 picks a free one)"


def check_bindable(host: str, port: int, *, given: str = "--address") -> None:
    """ConfigError naming why `host:port` cannot be listened on: in use, not this machine's address, a host that
    does not resolve, a privileged port. `given`: where the address came from ("--address", "the kit's address").
    Port 0 binds unless the host is wrong; an address where any resolved IP binds passes (gRPC listens on those
    it can)."""
    address = f"{host}:{port}"
    name = host.strip("[]")
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(
            f"{given} {address}: the host {name!r} does not resolve ({e.strerror}); give an IP address or a name "
            "of this machine (127.0.0.1: this machine only, 0.0.0.0: every interface)"
        ) from None
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
            return
        except OSError as e:
            errors.append(e)
    if errors:
        raise ConfigError(bind_error(address, errors[0], given=given))


def bind_error(address: str, error: OSError | None, *, given: str = "--address") -> str:
    """The one-line message for an address that could not be bound (`error`: the plain socket's, when known)."""
    code = error.errno if error is not None else None
    if code == errno.EADDRINUSE:
        return f"{address} is in use (another aggregator?): {_FIX}"
    if code == errno.EADDRNOTAVAIL:
        return (
            f"{given} {address}: the host is not an address of this machine; choose another --address, one of "
            "this machine's (127.0.0.1: this machine only, 0.0.0.0: every interface)"
        )
    if code == errno.EACCES:
        return f"{given} {address}: permission denied (ports below 1024 need root): choose a port from 1024 up, or 0"
    why = f" ({error.strerror})" if error is not None and error.strerror else ""
    return f"could not bind {given} {address}{why}: is the port in use, or the host not this machine's? {_FIX}"
