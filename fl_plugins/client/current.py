"""The process's current client session (session.py): what the client API's module functions act on."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from fl_plugins.errors import ConfigError

if TYPE_CHECKING:
    from fl_plugins.client.session import ClientSession

_current: ClientSession | None = None
_lock = threading.Lock()


def current() -> ClientSession | None:
    """The current session, or None before init()."""
    return _current


def get() -> ClientSession:
    """The current session; ConfigError before init()."""
    s = _current
    if s is None:
        raise ConfigError("call flare.init() first (fl_plugins.client.init)")
    return s


def activate(session: ClientSession) -> ClientSession:
    """Make `session` the current one (the module functions of fl_plugins.client act on it). ConfigError if
    another one is: flare.shutdown() first."""
    global _current
    with _lock:
        if _current is not None and _current is not session:
            raise ConfigError("a client session is already open in this process: call flare.shutdown() first")
        _current = session
        return session


def deactivate() -> None:
    """Close the current session, if any, and forget it. Safe to call twice; init() may open another."""
    global _current
    with _lock:
        s, _current = _current, None
    if s is not None:
        s.close()
