"""Refused callers, told to the aggregator's operator: one WARNING per refusal, naming who (the peer's address and
certificate name, where known) and why, with repeats of the same refusal rate-limited.

Two sources feed it:

* `SiteAuth` (tls.py), for a call past the TLS handshake whose certificate is refused: a site not in the project,
  a revoked certificate, a request that claims another site's name, a call without a client certificate. Its
  checks carry `@logs_refusals`: the AuthError is logged here (the peer's address from gRPC's `context.peer()`),
  then goes on to the caller as PERMISSION_DENIED.
* handshake_log.py, for a connection refused by the TLS handshake inside gRPC's C core (plaintext, no client
  certificate, another project's CA, an expired certificate): the reason only, as gRPC does not say whose
  connection it was.

The rate limit: a refusal is keyed by who and why (for a call: the peer's host, not its port, since a client that
retries dials from a new port each time; its certificate's name; the reason). The first refusal of a key is logged
at once; the same key again within `every` seconds is counted, not logged; the count is told with the next line
logged for that key, or by `flush` once the interval is over (every refusal flushes the keys that are due; the
handshake log also flushes every `every` seconds and at its stop):

    refused a call from 10.0.0.7:51234 (certificate 'site-9'): site 'site-9' is not in project 'demo' (...)
    refused a call from 10.0.0.7:51240 (certificate 'site-9'): site 'site-9' is not in project 'demo' (...)
        [refused 12 more times in the last 60 s]
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from fl_plugins.errors import AuthError

log = logging.getLogger(__name__)

EVERY = 60.0  # seconds: a refusal of the same kind from the same caller is logged at most once per interval
MAX_KEYS = 1024  # refusal kinds remembered (the oldest is forgotten first): the memory a flood of callers can take


@dataclass
class Seen:
    """One key's refusals: when a line was last logged for it, the last refusal's message, and the refusals since
    that line (counted, not logged)."""

    logged: float
    message: str
    more: int = 0


class RefusalLog:
    """Rate-limited WARNINGs for refused callers (this module's docstring). Thread-safe; `clock` is injected so
    tests drive the intervals."""

    def __init__(
        self, every: float = EVERY, *, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS
    ) -> None:
        self.every, self.clock, self.max_keys = every, clock, max_keys
        self._lock = threading.Lock()
        self._seen: OrderedDict[Hashable, Seen] = OrderedDict()

    def refused(self, key: Hashable, message: str) -> bool:
        """A refusal: logged now (True), or counted (False) when one of `key` was logged less than `every` seconds
        ago. Counted refusals of other keys whose interval is over are told first."""
        with self._lock:
            now = self.clock()
            lines = self._due(now, skip=key)
            seen = self._seen.get(key)
            logged = seen is None or now - seen.logged >= self.every
            if not logged and seen is not None:
                seen.more, seen.message = seen.more + 1, message
            else:
                lines.append(message + (_more(seen.more, now - seen.logged) if seen is not None else ""))
                self._seen[key] = Seen(now, message)
                self._seen.move_to_end(key)
                while len(self._seen) > self.max_keys:
                    self._seen.popitem(last=False)
        for line in lines:
            log.warning("%s", line)
        return logged

    def flush(self, *, final: bool = False) -> None:
        """Tell the refusals counted and not logged: of the keys whose interval is over, or (`final`) of all."""
        with self._lock:
            lines = self._due(self.clock(), final=final)
        for line in lines:
            log.warning("%s", line)

    def _due(self, now: float, *, skip: Hashable = None, final: bool = False) -> list[str]:
        """Lock held. The lines of the counted refusals that are due to be told; their counts start again."""
        lines = []
        for key, seen in self._seen.items():
            if seen.more and key != skip and (final or now - seen.logged >= self.every):
                lines.append(seen.message + _more(seen.more, now - seen.logged))
                seen.more, seen.logged = 0, now
        return lines

    def call_refused(self, context: Any, error: BaseException) -> None:
        """A call refused past the TLS handshake (`error`, an AuthError): logged with the caller's address and its
        certificate's common name."""
        peer = peer_address(context)
        cn = _common_name(context)
        who = f"certificate {cn!r}" if cn is not None else "no client certificate"
        self.refused((peer.rpartition(":")[0] or peer, cn, str(error)), f"refused a call from {peer} ({who}): {error}")


def _more(n: int, seconds: float) -> str:
    return f" [refused {n} more time{'s' if n != 1 else ''} in the last {seconds:.0f} s]" if n else ""


def peer_address(context: Any) -> str:
    """The caller's address from gRPC's peer string: "ipv4:10.0.0.7:51234" -> "10.0.0.7:51234",
    "ipv6:%5B::1%5D:51234" -> "[::1]:51234", a Unix socket as gRPC names it; "an unknown address" without one."""
    try:
        peer = context.peer()
    except Exception:  # noqa: BLE001 - a context without a peer (in-process transports): still log the refusal
        peer = ""
    if not isinstance(peer, str) or not peer:
        return "an unknown address"
    scheme, sep, rest = urllib.parse.unquote(peer).partition(":")
    return rest if sep and scheme in ("ipv4", "ipv6") else peer


def _common_name(context: Any) -> str | None:
    try:
        names = (context.auth_context() or {}).get("x509_common_name")
    except Exception:  # noqa: BLE001 - a context without TLS details: no certificate to name
        return None
    return names[0].decode("utf-8", "replace") if names else None


class Refuses(Protocol):
    """What `logs_refusals` decorates the methods of: a checker with a RefusalLog."""

    @property
    def refusals(self) -> RefusalLog: ...


S = TypeVar("S", bound=Refuses)
P = ParamSpec("P")
R = TypeVar("R")


def logs_refusals(check: Callable[Concatenate[S, Any, P], R]) -> Callable[Concatenate[S, Any, P], R]:
    """Decorate a method `check(self, context, ...)` of a gRPC caller check: each AuthError it raises is logged
    (`self.refusals.call_refused`) before it goes on."""

    @functools.wraps(check)
    def checked(self: S, context: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return check(self, context, *args, **kwargs)
        except AuthError as e:
            self.refusals.call_refused(context, e)
            raise

    return checked
