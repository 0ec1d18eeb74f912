"""The client API: module-level functions over this process's client session, name for name NVIDIA FLARE's.

    flare.init()                      # FL_SERVER / FL_SITE (/ FL_KIT) from the launcher, or init(server, site)
    while flare.is_running():
        model = flare.receive()       # this round's global model: verified, writable, yours
        ...train...
        flare.send(flare.FLModel(params=..., metrics={...}, meta={"NUM_STEPS_CURRENT_ROUND": n}))

`receive()` returns once the model is in memory and verified; `send()` once the aggregator has
acknowledged the verified update (it does not wait for other sites). After the last round `is_running()`
is False and `receive()` returns None, also when the aggregator has already exited.
On ranks other than 0 (init(rank=...) or torchrun's RANK) nothing talks to the aggregator: `receive()`
returns None, `send()` does nothing and `is_running()` stays True, as in NVIDIA FLARE: the client API runs no
collective of its own, so a script that broadcasts rank 0's `is_running()` itself keeps its collectives paired
(the Lightning and HF integrations sync their ranks explicitly).

Each function is a method of the current `ClientSession` (session.py), which init() opens and shutdown() closes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fl_plugins.client import session
from fl_plugins.client.model import FLModel
from fl_plugins.client.retry import check_timeout
from fl_plugins.client.session import ClientSession
from fl_plugins.errors import AuthError, ConfigError, PolicyError, TransportError

if TYPE_CHECKING:
    from fl_plugins.security.tls import SiteKit

_ENV_SERVER = "FL_SERVER"
_ENV_SITE = "FL_SITE"
_ENV_KIT = "FL_KIT"
_ENV_CONNECT_TIMEOUT = "FL_CONNECT_TIMEOUT"
_ENV_RETRY_TIMEOUT = "FL_RETRY_TIMEOUT"
_init_lock = threading.Lock()


def init(
    server: str | None = None,
    site: str | None = None,
    *,
    kit: str | os.PathLike | None = None,
    rank: int | str | None = None,
    params_format: str | None = None,
    connect_timeout: float | None = None,
    retry_timeout: float | None = None,
    config_file: str | None = None,
    insecure: bool | None = None,
) -> None:
    """Connect this site to the aggregator (a no-op when this process is connected already).

    server: "host:port" (default: $FL_SERVER, else the kit's). site: this site's name (default: $FL_SITE, else
    the kit's). kit: this site's startup kit folder from `fl-plugins provision` (default: $FL_KIT): connect with
    mTLS; the site is the one the kit's certificate names, and a different `site` is an error.
    insecure: without a kit the site speaks plaintext, to loopback addresses only; True (default: $FL_INSECURE=1)
    allows a non-loopback aggregator anyway, with a warning.
    rank: this process's rank (default: $RANK, else 0); only rank 0 talks to the aggregator.
    params_format: "torch" or "numpy" for received params (default: $FL_PARAMS_FORMAT, else torch when the
    script imported torch).
    connect_timeout: seconds to wait for an aggregator that is not up yet (default: $FL_CONNECT_TIMEOUT, else 60),
    saying so on the site's log every few seconds; a TLS handshake that cannot succeed fails at once.
    retry_timeout: seconds the aggregator may be silent mid-job before a call gives up (default: $FL_RETRY_TIMEOUT,
    else 60, the aggregator's default site timeout). config_file: for NVIDIA FLARE compatibility, ignored.

    From here on, an uncaught TransportError, AuthError or PolicyError ends the script with one line on stderr,
    `fl-plugins: MESSAGE`, and exit status 1; other exceptions keep their traceback (`OneLineErrors`).
    """
    with _init_lock:
        if session.current() is not None:
            return
        install_one_line_errors()
        site_given = bool(site)
        server = server or os.environ.get(_ENV_SERVER)
        site = site or os.environ.get(_ENV_SITE)
        rank = _rank(rank)
        insecure = _insecure(insecure)
        kit_path = kit or os.environ.get(_ENV_KIT) or None
        site_kit = None
        if rank == 0 and kit_path:
            site_kit = _site_kit(kit_path, site, site_given)
            server, site = server or site_kit.server, site_kit.site
        if rank == 0 and not server:
            raise ConfigError(f"no aggregator address: pass init(server='host:port') or set ${_ENV_SERVER}")
        if rank == 0 and not site:
            raise ConfigError(f"no site name: pass init(site='site-1') or set ${_ENV_SITE} (or ${_ENV_KIT})")
        opened = ClientSession.open(
            server or "",
            site or f"rank-{rank}",
            rank=rank,
            params_format=params_format,
            connect_timeout=_seconds(connect_timeout, "connect_timeout", _ENV_CONNECT_TIMEOUT, 60.0),
            retry_timeout=_seconds(retry_timeout, "retry_timeout", _ENV_RETRY_TIMEOUT, 60.0),
            kit=site_kit,
            insecure=insecure,
        )
        session.activate(opened)


def _seconds(value: float | None, name: str, variable: str, default: float) -> float:
    """init()'s `name` argument, else $`variable`, else `default`; ConfigError naming where a bad value came from."""
    if value is not None:
        return check_timeout(value, f"init({name}=...)")
    raw = os.environ.get(variable, "")
    return check_timeout(raw.strip(), f"${variable}") if raw.strip() else default


class OneLineErrors:
    """sys.excepthook once init() ran: an uncaught TransportError (the aggregator gone, or a connection that cannot
    succeed), AuthError (the aggregator refuses this site) or PolicyError (this site's policy refuses the job) is
    printed as one line, `fl-plugins: MESSAGE`, on stderr: the message says what happened and what to do, and a
    traceback through the user's training loop would only bury it. Every other exception goes to `previous`, the
    hook installed before (Python's traceback). Either way the interpreter then exits with status 1."""

    REPORTED = (TransportError, AuthError, PolicyError)

    def __init__(self, previous: Callable[[type[BaseException], BaseException, TracebackType | None], Any]) -> None:
        self.previous = previous

    def __call__(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if isinstance(value, self.REPORTED):
            print("fl-plugins: " + " ".join(str(value).split()), file=sys.stderr, flush=True)
        else:
            self.previous(kind, value, tb)


def install_one_line_errors() -> None:
    """Make sys.excepthook a `OneLineErrors` over the hook in place (once: a no-op when it is one already)."""
    if not isinstance(sys.excepthook, OneLineErrors):
        sys.excepthook = OneLineErrors(sys.excepthook)


def _rank(rank: int | str | None) -> int:
    if rank is None:
        rank = os.environ.get("RANK", "0")
    try:
        return int(rank)
    except ValueError:
        raise ConfigError(f"rank must be an integer (got {rank!r})") from None


def _insecure(insecure: bool | None) -> bool:
    if insecure is not None:
        return insecure
    raw = os.environ.get("FL_INSECURE", "")
    flag = raw.strip().lower()
    if flag not in ("", "0", "false", "no", "1", "true", "yes"):
        raise ConfigError(
            f"$FL_INSECURE must be 1 (allow plaintext to a non-loopback aggregator) or 0 (got {raw!r}); set it to 1 "
            "or unset it"
        )
    return flag in ("1", "true", "yes")


def _site_kit(path: str | os.PathLike, site: str | None, site_given: bool) -> SiteKit:
    from fl_plugins.security.tls import load_site_kit

    site_kit = load_site_kit(path)
    if site and site != site_kit.site:
        given = f"init(site={site!r})" if site_given else f"${_ENV_SITE}={site}"
        raise ConfigError(
            f"{given} differs from the site of the kit {site_kit.path} ({site_kit.site!r}); the aggregator knows a "
            "site by its certificate: drop the site name, or use that site's kit"
        )
    return site_kit


def is_running() -> bool:
    """True while the job runs: rank 0 asks the aggregator (and fetches the next task). Like NVIDIA FLARE's, it
    issues no torch.distributed collective: on ranks other than 0 it is always True, since they never talk to
    the aggregator; the script tells them when to stop (rank 0's answer through
    `dist.broadcast_object_list`), as FLARE's multi-GPU example does. The Lightning and HF integrations sync
    their ranks themselves."""
    return session.get().is_running()


def receive(timeout: float | None = None, *, into: dict[str, Any] | None = None) -> FLModel | None:
    """This round's global model (cached until send()); None once the job is over or on ranks other than 0.

    into: tensors to receive into in place (e.g. `net.state_dict()`, or last round's `model.params`): those
    that match by name, dtype and shape are overwritten instead of allocating a new model every round.
    timeout: accepted for NVIDIA FLARE compatibility; receive() waits for the round's model."""
    return session.get().receive(into=into)


def receive_final(*, into: dict[str, Any] | None = None) -> FLModel | None:
    """The job's final global model once `is_running()` is False (not a FLARE function: FLARE's sites keep their
    last local model). Fetched from the aggregator once and cached; None before the end, on ranks other than 0,
    or when the job ended without one (a warning says why). `into` as for receive()."""
    return session.get().final_model(into=into)


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Answer the task at hand: a TRAIN task's update (returns once the aggregator has verified and counted it),
    an EVALUATE task's metrics (`FLModel(metrics=..., meta={"NUM_EVAL_SAMPLES": n})`; params stay here), a
    SUBMIT_MODEL task's local model (`FLModel(params=...)`, FULL)."""
    session.get().send(model, clear_cache)


def get_site_name() -> str:
    return session.get().site


def get_job_id() -> str:
    return session.get().job_id


def get_task_name() -> str:
    return session.get().task_name


def system_info() -> dict[str, Any]:
    return session.get().system_info()


def is_train() -> bool:
    return get_task_name() == "train"


def is_evaluate() -> bool:
    return get_task_name() == "validate"  # FLARE's evaluation task name


def is_submit_model() -> bool:
    return get_task_name() == "submit_model"


def log(key: str, value: Any, data_type: Any = "SCALAR", **kwargs: Any) -> None:
    """Send a metric to the aggregator (lands in RUN_DIR/logs.jsonl with site and round). The record must keep
    within the aggregator's bounds (fl_plugins/wire/limits.py: a `key` of up to 128 characters, a number, a string
    of up to 4096 characters or a flat dict/list of up to 64 of those, at most 16 fields): checked here first, so
    a record it would refuse raises ProtocolError in the script at once, on every rank."""
    session.get().log(key, value, data_type, **kwargs)


def shutdown() -> None:
    """Close the connection. Safe to call twice; init() may be called again afterwards."""
    with _init_lock:
        session.deactivate()
