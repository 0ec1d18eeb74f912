"""The client API: module-level functions over one site runtime, name for name NVIDIA FLARE's.

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from typing import Any

from fl_plugins import tensors
from fl_plugins.client.model import FLModel, ParamsType
from fl_plugins.errors import ConfigError, IntegrityError, RoundError

logger = logging.getLogger(__name__)

_ENV_SERVER = "FL_SERVER"
_ENV_SITE = "FL_SITE"
_ENV_KIT = "FL_KIT"


class _Runtime:
    def __init__(self, server: str, site: str, rank: int, params_format: str, connect_timeout: float,
                 retry_timeout: float, kit: Any = None, insecure: bool = False) -> None:  # fmt: skip
        from fl_plugins.client._site import SiteClient

        self.rank = rank
        self.params_format = params_format
        self.site = site
        self.task: Any = None  # the task being worked on (received, not yet sent)
        self.model: FLModel | None = None
        self.finished = False
        self.last_round = -1
        self.can_offer = False  # set by the Lightning/HF integrations: they can offer the module's weights
        self.offer_pending = False  # the aggregator asked this site for round 0's weights
        self.lock = threading.RLock()
        self.client = SiteClient(server or None, site, kit=kit, connect_timeout=connect_timeout,
                                 retry_timeout=retry_timeout, insecure=insecure) if rank == 0 else None  # fmt: skip
        if self.client is not None:
            self.client.connect()

    @property
    def total_rounds(self) -> int:
        return self.client.total_rounds if self.client else 0

    def _fetch(self) -> None:
        """Make sure a task is at hand, or mark the job finished."""
        from fl_plugins.wire.proto import fl_pb2 as pb

        if self.task is not None or self.finished or self.offer_pending or self.client is None:
            return
        # After the last round the aggregator may already be gone: then a short wait is enough.
        last = self.total_rounds and self.last_round >= self.total_rounds - 1
        try:
            task = self.client.next_task(give_up_after=15.0 if last else None)
        except ConnectionError:
            if last:
                self.finished = True
                return
            raise
        if task.kind == pb.Task.END:
            self.finished = True
        elif task.kind == pb.Task.OFFER_INITIAL and self.can_offer:
            self.offer_pending = True  # an integration uploads the weights when it has the model (_offer_initial)
        elif task.kind == pb.Task.OFFER_INITIAL:
            raise ConfigError(
                "the aggregator asked this site for its initial weights, but the client API has none to offer: "
                "start the aggregator with --initial-model PATH"
            )
        else:
            self.task = task


_rt: _Runtime | None = None
_rt_lock = threading.Lock()


def _runtime() -> _Runtime:
    if _rt is None:
        raise ConfigError("call flare.init() first (fl_plugins.client.init)")
    return _rt


def init(server: str | None = None, site: str | None = None, *, kit: str | os.PathLike | None = None,
         rank: int | str | None = None, params_format: str | None = None, connect_timeout: float = 60.0,
         retry_timeout: float = 120.0, config_file: str | None = None,
         insecure: bool | None = None) -> None:  # fmt: skip
    """Connect this site to the aggregator.

    server: "host:port" (default: $FL_SERVER, else the kit's). site: this site's name (default: $FL_SITE, else
    the kit's). kit: this site's startup kit folder from `fl-plugins provision` (default: $FL_KIT): connect with
    mTLS; the site is the one the kit's certificate names, and a different `site` is an error.
    insecure: without a kit the site speaks plaintext, to loopback addresses only; True (default: $FL_INSECURE=1)
    allows a non-loopback aggregator anyway, with a warning.
    rank: this process's rank (default: $RANK, else 0); only rank 0 talks to the aggregator.
    params_format: "torch" or "numpy" for received params (default: $FL_PARAMS_FORMAT, else torch when the
    script imported torch). connect_timeout: how long to wait for an aggregator that is still starting.
    config_file: accepted for NVIDIA FLARE compatibility and ignored.
    """
    global _rt
    with _rt_lock:
        if _rt is not None:
            return
        site_given = bool(site)
        server = server or os.environ.get(_ENV_SERVER)
        site = site or os.environ.get(_ENV_SITE)
        if rank is None:
            rank = os.environ.get("RANK", "0")
        try:
            rank = int(rank)
        except ValueError:
            raise ConfigError(f"rank must be an integer (got {rank!r})") from None
        if insecure is None:
            raw = os.environ.get("FL_INSECURE", "")
            flag = raw.strip().lower()
            if flag not in ("", "0", "false", "no", "1", "true", "yes"):
                raise ConfigError(f"$FL_INSECURE must be 1 (allow plaintext to a non-loopback aggregator) or 0 (got "
                                  f"{raw!r}); set it to 1 or unset it")  # fmt: skip
            insecure = flag in ("1", "true", "yes")
        kit_path = kit or os.environ.get(_ENV_KIT) or None
        site_kit = None
        if rank == 0 and kit_path:
            from fl_plugins.security.tls import load_site_kit

            site_kit = load_site_kit(kit_path)
            if site and site != site_kit.site:
                given = f"init(site={site!r})" if site_given else f"${_ENV_SITE}={site}"
                raise ConfigError(f"{given} differs from the site of the kit {site_kit.path} ({site_kit.site!r}); the "
                                  "aggregator knows a site by its certificate: drop the site name, or use that site's "
                                  "kit")  # fmt: skip
            server, site = server or site_kit.server, site_kit.site
        if rank == 0 and not server:
            raise ConfigError(f"no aggregator address: pass init(server='host:port') or set ${_ENV_SERVER}")
        if rank == 0 and not site:
            raise ConfigError(f"no site name: pass init(site='site-1') or set ${_ENV_SITE} (or ${_ENV_KIT})")
        _rt = _Runtime(server or "", site or f"rank-{rank}", rank, tensors.resolve_params_format(params_format),
                       connect_timeout, retry_timeout, site_kit, insecure=insecure)  # fmt: skip


def is_running() -> bool:
    """True while the job runs: rank 0 asks the aggregator (and fetches the next task). Like NVIDIA FLARE's, it
    issues no torch.distributed collective: on ranks other than 0 it is always True, since they never talk to
    the aggregator; the script tells them when to stop (rank 0's answer through
    `dist.broadcast_object_list`), as FLARE's multi-GPU example does. The Lightning and HF integrations sync
    their ranks themselves."""
    return _is_running_local()


def _is_running_local() -> bool:
    """is_running() of this process alone (no collective): rank 0's answer from the aggregator, True elsewhere."""
    rt = _runtime()
    with rt.lock:
        if rt.client is None:
            return True
        rt._fetch()
        return not rt.finished


def receive(timeout: float | None = None, *, into: dict[str, Any] | None = None) -> FLModel | None:
    """This round's global model (cached until send()); None once the job is over or on ranks other than 0.

    into: tensors to receive into in place (e.g. `net.state_dict()`, or last round's `model.params`): those
    that match by name, dtype and shape are overwritten instead of allocating a new model every round."""
    rt = _runtime()
    with rt.lock:
        if rt.client is None:
            return None
        rt._fetch()
        if rt.finished:
            return None
        if rt.offer_pending:  # only with an integration: params stay None until it offers the model's weights
            if rt.model is None:
                rt.model = FLModel(params_type=ParamsType.FULL, params=None, current_round=0,
                                   total_rounds=rt.total_rounds, start_round=0,
                                   meta={"job_id": rt.client.job_id, "site_name": rt.site, "attempt": 0,
                                         "current_round": 0, "total_rounds": rt.total_rounds})  # fmt: skip
            return rt.model
        if rt.model is None:
            task = rt.task
            manifest, params = rt.client.download(task, rt.params_format, into=into)
            env = manifest.envelope
            rt.model = FLModel(params_type=ParamsType.FULL, params=params, current_round=task.round,
                               total_rounds=task.total_rounds, start_round=task.start_round,
                               metrics=env.get("metrics") or None,
                               meta={"job_id": task.job_id, "site_name": rt.site, "attempt": task.attempt,
                                     "current_round": task.round, "total_rounds": task.total_rounds})  # fmt: skip
        return rt.model


def _pending_round() -> tuple[int | None, int]:
    """Internal hook: (the round of the task at hand or None, the job's total rounds)."""
    rt = _runtime()
    with rt.lock:
        return (rt.task.round if rt.task is not None else 0 if rt.offer_pending else None), rt.total_rounds


def _allow_offer_initial() -> None:
    """Internal hook for the integrations: this site can offer its model's weights as round 0's global model.

    An aggregator without an initial model then answers OFFER_INITIAL; `receive()` returns round 0's FLModel
    with params None until the integration calls `_offer_initial()` with the model's weights."""
    rt = _runtime()
    with rt.lock:
        rt.can_offer = True
        if rt.client is not None:
            rt.client.can_offer_initial = True


def _offer_initial(params: dict[str, Any], into: dict[str, Any] | None = None) -> FLModel | None:
    """Internal hook: upload `params` as round 0's global model if the aggregator asked for it, then receive
    round 0 (into `into`). The FLModel that receive() returned while the offer was pending gets the params and
    stays the one cached until send(). Returns the round's model; a no-op (returns receive()) otherwise."""
    rt = _runtime()
    with rt.lock:
        if rt.client is None:
            return None
        for _ in range(3):  # the aggregator asks again only if the offer failed its final check
            if not rt.offer_pending:
                break
            pending = rt.model
            rt.client.upload(0, 0, params, {"params_type": str(ParamsType.FULL), "current_round": 0}, initial=True)
            logger.info("offered this site's weights as round 0's global model")
            rt.offer_pending = False
            rt.model = None
            got = receive(into=into)
            if pending is not None and got is not None and not rt.offer_pending:
                pending.params, pending.metrics, pending.meta = got.params, got.metrics, got.meta
                pending.current_round, pending.total_rounds = got.current_round, got.total_rounds
                pending.start_round = got.start_round
                rt.model = pending
        return receive(into=into)


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Upload this round's update; returns once the aggregator has verified and counted it."""
    rt = _runtime()
    with rt.lock:
        if rt.client is None:
            return
        if rt.task is None and rt.offer_pending:
            raise RoundError("send() before round 0's global model exists: the aggregator is waiting for this site's "
                             "initial weights (the integration offers them as fit/validate starts)")  # fmt: skip
        if rt.task is None:
            raise RoundError("send() without a received task: call flare.receive() first")
        if not isinstance(model, FLModel):
            raise ConfigError(f"send() takes an FLModel (got {type(model).__name__})")
        if model.params is None:
            raise ConfigError("send(): FLModel.params is None; put the model's state_dict in params")
        task = rt.task
        env = {"params_type": str(model.params_type or ParamsType.FULL), "current_round": task.round,
               "metrics": _jsonable(model.metrics or {}), "meta": _jsonable(model.meta or {})}  # fmt: skip
        try:
            rt.client.upload(task.round, task.attempt, model.params, env)
        except (RoundError, IntegrityError) as e:  # late, duplicate, or a round that will run again
            logger.warning("round %d: the aggregator refused this update: %s", task.round, e)
        rt.last_round = max(rt.last_round, task.round)
        if clear_cache:
            rt.task = None
            rt.model = None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, (str, bool)) or v is None:
            return v
        if isinstance(v, (int, float)):
            return v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
        if hasattr(v, "item"):  # numpy / torch scalars and one-element tensors
            try:
                return conv(v.item())
            except (ValueError, RuntimeError):
                return str(v)
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return str(v)

    out = {str(k): conv(v) for k, v in d.items()}
    json.dumps(out)
    return out


def get_site_name() -> str:
    return _runtime().site


def get_job_id() -> str:
    rt = _runtime()
    return rt.client.job_id if rt.client else ""


def get_task_name() -> str:
    rt = _runtime()
    return rt.task.task_name if rt.task is not None else "train"


def system_info() -> dict[str, Any]:
    return {"site_name": get_site_name(), "job_id": get_job_id()}


def is_train() -> bool:
    return get_task_name() == "train"


def is_evaluate() -> bool:
    return get_task_name() == "evaluate"


def is_submit_model() -> bool:
    return get_task_name() == "submit_model"


def log(key: str, value: Any, data_type: Any = "SCALAR", **kwargs: Any) -> None:
    """Send a metric to the aggregator (lands in RUN_DIR/logs.jsonl with site and round). The record must keep
    within the aggregator's bounds (fl_plugins/wire/limits.py: a `key` of up to 128 characters, a number, a string
    of up to 4096 characters or a flat dict/list of up to 64 of those, at most 16 fields): checked here first, so
    a record it would refuse raises ProtocolError in the script at once, on every rank."""
    from fl_plugins.wire import limits

    rt = _runtime()
    dt = getattr(data_type, "name", str(data_type))
    record = _jsonable({"key": key, "value": value, "data_type": dt, **kwargs})
    limits.check_log_records(f"flare.log({key!r:.60})", [record])
    if rt.client is None:
        return
    rnd = rt.task.round if rt.task is not None else rt.last_round
    rt.client.log(rnd, [record])


def _log_scalars(values: dict[str, float], step: int, round_: int | None = None) -> None:
    """Several scalars of one training step in one call (the trainer integrations forward their logs so);
    `round_`: the round the step belongs to (default: the current one)."""
    rt = _runtime()
    if rt.client is None or not values:
        return
    rnd = round_ if round_ is not None else rt.task.round if rt.task is not None else rt.last_round
    rt.client.log(rnd, [{"key": k, "value": float(v), "data_type": "SCALAR", "step": int(step)}
                        for k, v in values.items()])  # fmt: skip


def shutdown() -> None:
    """Close the connection. Safe to call twice; init() may be called again afterwards."""
    global _rt
    with _rt_lock:
        if _rt is not None and _rt.client is not None:
            _rt.client.close()
        _rt = None
