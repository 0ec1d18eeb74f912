"""The federation logic the trainer integrations share, free of any trainer (and of torch).

One `RoundDriver` per process (`get()`), over the client API (`fl_plugins.client.api` and its current session,
`fl_plugins.client.session`):

    start()                      connect from the launcher's environment (FL_SERVER, FL_SITE) and allow
                                 offering the model's weights when the aggregator has no initial model
    receive(into=...)            this round's FLModel at once; straight into the model's tensors when known
    begin(target)                a fit/validate starts: offer round 0's weights if asked, then load the global
                                 model into the target (strict key and shape check), once per round
    record_metrics(metrics)      an explicit validation's metrics, sent with the update
    finish_round(steps)          the update: the target's state, NUM_STEPS_CURRENT_ROUND, the metrics

Multi-process training (DDP): only global rank 0 connects and sends (`start(rank)`). The integration broadcasts
rank 0's `round_info()` and weights when a fit/validate starts and `after_fit_info()` when a fit ends; the other
ranks take them with `follow()`, so their `is_running()` and `receive()` agree with rank 0's without ever
talking to the aggregator or needing a process group outside fit/validate.

A model target is anything with `state() -> Mapping[str, tensor]` (the live state, sharing storage) and
`load(params, strict)`: see `_torch.ModuleTarget`. `PrefixedTarget` puts a prefix on every name that travels
(FLARE's `server_key_prefix`), so the global model's names can differ from the model's own by that prefix.

Round 0 without an initial model: `receive()` returns an FLModel with `current_round=0` and `params=None`;
when the first fit/validate starts, the target's weights are uploaded as round 0's global model, received
back (into the target's own tensors), and that same FLModel object gets its `params`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fl_plugins.client import api, session
from fl_plugins.client.model import FLModel, MetaKey, ParamsType
from fl_plugins.errors import ConfigError, ModelMismatchError

logger = logging.getLogger(__name__)


class ModelTarget(Protocol):
    def state(self) -> Mapping[str, Any]: ...

    def load(self, params: Mapping[str, Any], strict: bool) -> None: ...


class PrefixedTarget:
    """A model target whose tensor names carry `prefix` on the wire (FLARE's `server_key_prefix`): the server's
    model wraps the site's one level down (`model.` + the site's names). `state()` adds the prefix, so the driver
    checks, receives into, offers and sends the wire names; `load()` strips it before the inner target loads."""

    def __init__(self, inner: ModelTarget, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def state(self) -> dict[str, Any]:
        return {self.prefix + k: v for k, v in self.inner.state().items()}

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        n = len(self.prefix)
        self.inner.load({k[n:] if k.startswith(self.prefix) else k: v for k, v in params.items()}, strict)

    def __getattr__(self, name: str) -> Any:  # the inner target's other attributes (kind, nbytes, ...)
        return getattr(self.inner, name)


def check_params(received: Mapping[str, Any], local: Mapping[str, Any], what: str = "the global model") -> None:
    """Raise ModelMismatchError listing missing, unexpected and mis-shaped keys of `received` vs `local`."""
    missing = [k for k in local if k not in received]
    unexpected = [k for k in received if k not in local]
    shapes = [
        f"{k}: {tuple(received[k].shape)} vs local {tuple(local[k].shape)}"
        for k in local
        if k in received and tuple(received[k].shape) != tuple(local[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing}" if missing else "",
            f"unexpected {unexpected}" if unexpected else "",
            f"mis-shaped [{'; '.join(shapes)}]" if shapes else "",
        ]
        raise ModelMismatchError(
            f"{what} does not fit this site's model: {', '.join(p for p in parts if p)}. Build the same "
            "architecture on every site as the aggregator's initial model (or pass patch(..., "
            "load_state_dict_strict=False) to load only the tensors that match)"
        )


def matching(received: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """The received tensors whose name and shape match the local model (non-strict loading)."""
    out = {k: v for k, v in received.items() if k in local and tuple(v.shape) == tuple(local[k].shape)}
    if len(out) != len(received) or len(out) != len(local):
        logger.warning(
            "loading %d of %d received tensors into a model with %d (non-strict)", len(out), len(received), len(local)
        )
    return out


@dataclass
class RoundBudget:
    """Each fit trains one round's budget: the trainer's own max_epochs / max_steps (None or -1: no limit)."""

    epochs: int | None
    steps: int | None

    def limits(self, epochs_done: int, steps_done: int) -> tuple[int | None, int | None]:
        """The absolute limits for the next fit, given what the trainer has done so far."""
        e = self.epochs if self.epochs is None or self.epochs < 0 else epochs_done + self.epochs
        s = self.steps if self.steps is None or self.steps < 0 else steps_done + self.steps
        return e, s


class RoundDriver:
    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.target: ModelTarget | None = None
        self.model: FLModel | None = None  # the round being worked on (received, not yet sent)
        self.loaded = False
        self.metrics: dict[str, Any] = {}
        self.lock = threading.RLock()
        self.rank = 0  # global rank of this process
        self.started = False
        # ranks != 0 (multi-process training): what rank 0 broadcast
        self.peer_running = True
        self.peer_round: int | None = None
        self.peer_total: int | None = None
        self.peer: FLModel | None = None

    def start(self, rank: int = 0) -> None:
        """Connect (global rank 0 only; other ranks never talk to the aggregator)."""
        api.init(rank=rank)  # a no-op when the script called init() itself
        if rank != 0 and session.get().rank == 0:
            raise ConfigError(
                f"this process is global rank {rank} of a multi-process run, but init() was called here as rank "
                "0: let patch() connect (drop the init() call), or pass init(rank=...) on every rank"
            )
        self.rank = rank
        self.started = True
        session.get().allow_offer_initial()

    # -- multi-process training: global rank 0 talks to the aggregator, the others follow it ------------------
    def is_running(self) -> bool:
        """Rank 0: asks the aggregator. Other ranks: what rank 0 said at the end of the last fit (True before)."""
        if self.rank != 0:
            return self.peer_running
        return session.get().is_running()

    def round_info(self) -> dict[str, Any]:
        """Rank 0: what the other ranks learn of the round (sent with the strategy's broadcast)."""
        with self.lock:
            model = self.model if self.loaded else None
            if model is not None:
                return {"round": model.current_round, "total_rounds": model.total_rounds}
            return {"round": None, "total_rounds": None}

    def after_fit_info(self) -> dict[str, Any]:
        """Rank 0, when a fit has ended (its update sent): is the job still running, and which round is next."""
        sess = session.get()
        running = sess.is_running()
        nxt, total = sess.pending_round() if running else (None, None)
        return {"running": running, "round": nxt, "total_rounds": total}

    def total_rounds(self) -> int:
        """Rank 0: the job's rounds, as the aggregator said when this site connected."""
        return session.get().total_rounds

    def log_scalars(self, values: dict[str, float], step: int, round_: int | None = None) -> None:
        """Rank 0: a training step's scalars (the trainer's own logs) go to the aggregator as flare.log records;
        `round_`: the round the step belongs to (default: the one at hand)."""
        session.get().log_scalars(values, step, round_)

    def follow(self, info: Mapping[str, Any], target: ModelTarget | None = None) -> None:
        """Rank != 0: take what rank 0 broadcast (round info at fit/validate start with the weights in `target`,
        or the running flag when a fit ended)."""
        with self.lock:
            if "running" in info:
                self.peer_running = bool(info["running"])
                self.peer = None
            if info.get("round") is not None:
                self.peer_round = info["round"]
            if info.get("total_rounds") is not None:
                self.peer_total = info["total_rounds"]
            if target is not None:
                self.target = target
                peer = self._peer_model()
                if peer is not None:
                    peer.current_round, peer.total_rounds = self.peer_round, self.peer_total
                    peer.meta.update({"current_round": self.peer_round, "total_rounds": self.peer_total})
                    peer.params = dict(target.state())

    def _peer_model(self) -> FLModel | None:
        if not self.peer_running:
            return None
        if self.peer is None:
            self.peer = FLModel(
                params_type=ParamsType.FULL,
                params=None,
                current_round=self.peer_round,
                total_rounds=self.peer_total,
                meta={"rank": self.rank, "current_round": self.peer_round, "total_rounds": self.peer_total},
            )
        return self.peer

    def receive(self, timeout: float | None = None, *, into: Mapping[str, Any] | None = None) -> FLModel | None:
        with self.lock:
            if self.rank != 0:  # the round's weights reach this rank when validate/fit starts
                return self._peer_model()
            if into is None and self.target is not None:
                into = self._into()
            model = api.receive(timeout, into=into)  # type: ignore[arg-type]
            if model is not self.model:
                self.model, self.loaded, self.metrics = model, False, {}
            return model

    def _into(self) -> dict[str, Any] | None:
        return dict(self.target.state()) if self.target is not None else None

    def begin(self, target: ModelTarget) -> bool:
        """A fit or an explicit validate starts: make sure the round's global model is in `target`.

        Receives the round if the script has not, offers the target's weights as round 0's model if the
        aggregator asked. Returns False when there is no round to work on (the job is over, or rank != 0)."""
        with self.lock:
            self.target = target
            if self.model is None:
                if self.rank != 0 or not session.get().is_running():
                    return False
                if self.receive() is None:
                    return False
            model = self.model
            if model is None:
                return False
            if model.params is None:
                state = dict(target.state())
                session.get().offer_initial(state, into=state)
                if model.params is None:
                    return False
            if not self.loaded:
                local = target.state()
                if self.strict:
                    check_params(model.params, local, f"round {model.current_round}'s global model")
                    target.load(model.params, strict=True)
                else:
                    target.load(matching(model.params, local), strict=False)
                self.loaded = True
            return True

    def record_metrics(self, metrics: Mapping[str, Any]) -> None:
        """An explicit validation of the global model: its metrics travel with this round's update."""
        with self.lock:
            if self.model is not None and self.loaded:
                self.metrics.update(metrics)

    def finish_round(self, steps: int) -> None:
        """Send the target's weights as this round's update."""
        with self.lock:
            if self.rank != 0 or self.model is None or self.target is None or not self.loaded:
                return
            if steps < 1:
                logger.warning(
                    "round %s: no optimizer step was taken; sending the update with weight 1", self.model.current_round
                )
            meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: max(1, int(steps))}
            api.send(
                FLModel(
                    params_type=ParamsType.FULL, params=dict(self.target.state()), metrics=dict(self.metrics), meta=meta
                )
            )
            self.model, self.loaded, self.metrics = None, False, {}


_driver: RoundDriver | None = None
_driver_lock = threading.Lock()


def get(strict: bool | None = None) -> RoundDriver:
    """The process's driver (created on first use)."""
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = RoundDriver()
        if strict is not None:
            _driver.strict = strict
        return _driver


def current() -> RoundDriver | None:
    return _driver


def reset() -> None:
    global _driver
    with _driver_lock:
        _driver = None
