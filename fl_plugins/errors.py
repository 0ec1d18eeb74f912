"""Every error fl-plugins raises on purpose.

    FLError                                   base of all of them
    ├── ConfigError(FLError, ValueError)      bad argument, CLI flag, recipe key or environment variable
    ├── ProtocolError(FLError, ValueError)    a peer sent something malformed: manifest, frame, header
    │   └── IntegrityError                    bytes whose hash does not match (corrupted chunk or shard)
    ├── ModelMismatchError(FLError, ValueError)  tensor names/shapes/dtypes disagree with the global model
    ├── RoundError(FLError, RuntimeError)     an update for a closed round, a duplicate, an unknown upload
    ├── TransportError(FLError, ConnectionError)  the aggregator cannot be reached (after retries)
    ├── AuthError(FLError, PermissionError)   mTLS: a certificate not in the project, or a site claiming another's name
    ├── BusyError(FLError, RuntimeError)      a site over a call or rate limit (wire/limits.py); the client retries
    └── MissingDependencyError(FLError, ImportError)  an optional extra is not installed

Errors subclass the stdlib type they resemble, so `except ValueError` keeps working for callers that do
not know fl-plugins. Every message says what was wrong, the value involved, and the fix.
"""

from __future__ import annotations

from types import ModuleType


class FLError(Exception):
    """Base class of every error fl-plugins raises on purpose."""


class ConfigError(FLError, ValueError):
    """A configuration value (argument, flag, environment variable, recipe key) is wrong."""


class ProtocolError(FLError, ValueError):
    """A peer sent a malformed message: manifest, chunk frame or safetensors header."""


class IntegrityError(ProtocolError):
    """Bytes did not match their hash: a corrupted or truncated chunk or shard."""


class ModelMismatchError(FLError, ValueError):
    """An update's tensors disagree with the global model (names, shapes or dtypes)."""


class BusyError(FLError, RuntimeError):
    """A call refused because its site (or all sites together) already hold as many calls of its kind as the
    aggregator allows, or log faster than it allows (RESOURCE_EXHAUSTED; the client retries it)."""


class RoundError(FLError, RuntimeError):
    """An update arrived for a round that is closed, twice, or for an unknown upload."""


class TransportError(FLError, ConnectionError):
    """The aggregator could not be reached, or the connection failed for good."""


class AuthError(FLError, PermissionError):
    """The aggregator refused who is calling: a certificate of a site not in the project, or a request that
    claims another site's name than its certificate's."""


class PolicyError(FLError, PermissionError):
    """This site's policy (policy.yaml in its kit) does not allow the job or the task it was handed."""


class MissingDependencyError(FLError, ImportError):
    """An optional dependency is missing; the message carries the exact install command."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming `pip install 'fl-plugins[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module!r} is not installed; install it with: pip install 'fl-plugins[{extra}]'"
        ) from e
