"""The Lightning callback: translates trainer hooks into the round driver's calls (fl_plugins.integrations.driver).

    on_fit_start          move max_epochs / max_steps one round's budget forward; load the global model
    on_train_start        restore optimizer, LR scheduler and AMP scaler state (Lightning re-creates them per fit)
    on_train_end          keep that state for the next round; send the update (before Lightning moves the
                          module to CPU in its teardown)
    on_fit_end            send the update if Lightning skipped the training loop (nothing to train)
    on_validation_start   an explicit trainer.validate(): load the global model
    on_validation_end     an explicit trainer.validate(): its metrics go with the update (sanity checks and
                          validation inside fit do not count)

Multi-process training (DDP, any launcher): only global rank 0 connects, loads the global model and sends.
When a fit or an explicit validate starts, every rank takes rank 0's round info (the strategy's broadcast)
and rank 0's weights (torch.distributed.broadcast of each tensor, in place); when a fit ends, rank 0 asks the
aggregator whether the job goes on and broadcasts the answer, which the other ranks' is_running() returns.
The process group's timeout (DDPStrategy(timeout=...)) must cover rank 0's wait for the next round.

Works with trainers from `lightning` and from `pytorch_lightning`: the callback class derives from the
Callback of the trainer's own package.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.integrations import driver as _driver
from fl_plugins.integrations.budget import RoundBudget

logger = logging.getLogger(__name__)

_PACKAGES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


class _FLCallbackMixin:
    """Hooks of the federated callback; mixed into the trainer package's own `Callback`."""

    def __init__(self, driver: _driver.RoundDriver, restore_state: bool = True, update_fit_loop: bool = True) -> None:
        super().__init__()
        self.driver = driver
        self.restore_state = restore_state
        self.update_fit_loop = update_fit_loop
        self.carry: dict[str, Any] | None = None  # optimizer, LR scheduler and AMP scaler state between fits
        self.stepped = -1  # the global step FedProx last pulled at (one pull per optimizer step)

    @property
    def state_key(self) -> str:
        return "FLCallback"

    # -- fit ---------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        loop = trainer.fit_loop
        if self.update_fit_loop:
            budget = self.driver.budget
            if budget is None:  # the trainer's limits as constructed: one round's budget
                budget = RoundBudget(loop.max_epochs, loop.epoch_loop.max_steps)
                self.driver.plan(budget)
            epochs, steps = budget.limits(loop.epoch_progress.current.processed, trainer.global_step)
            loop.max_epochs, loop.epoch_loop.max_steps = epochs, steps
        self.driver.open_round(_target(pl_module), step=trainer.global_step, collective=_collective(trainer))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.restore_state and self.carry is not None:
            _restore(trainer, self.carry)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.restore_state:
            self.carry = _save(trainer)
        self.driver.end_round(step=trainer.global_step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # Lightning skipped the training loop (its limits were already reached, or limit_train_batches=0): send
        # the round anyway, or the script's `while flare.is_running()` would never see the next round.
        self.driver.end_round(step=trainer.global_step)
        collective = _collective(trainer)
        if collective is not None:  # rank 0 tells the others whether the job goes on (their is_running())
            self.driver.agree_running(collective)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """What the module logs with self.log (train_loss, ...) goes to the aggregator as flare.log records, with
        the global step, at the trainer's log_every_n_steps. With FedProx, every rank pulls its weights toward the
        round's global model once per optimizer step."""
        if trainer.global_step != self.stepped:
            self.stepped = trainer.global_step
            opts = trainer.optimizers
            self.driver.proximal_step(opts[0].param_groups[0]["lr"] if opts else None)
        if trainer.global_rank != 0 or not self.driver.in_round:
            return
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if trainer.global_step % every != 0:
            return
        values = {k: _scalar(v) for k, v in trainer.logged_metrics.items()}
        scalars = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.driver.log_scalars(scalars, int(trainer.global_step))

    # -- explicit validation -----------------------------------------------------------------------------
    def _explicit_validation(self, trainer: Any) -> bool:
        return trainer.state.fn == "validate" and not trainer.sanity_checking

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._explicit_validation(trainer):
            self.driver.open_round(_target(pl_module), collective=_collective(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._explicit_validation(trainer) and trainer.global_rank == 0:
            self.driver.record_metrics({k: _scalar(v) for k, v in trainer.callback_metrics.items()})


class _StrategyCollective:
    """The round driver's `Collective` through the trainer's strategy (its broadcast from rank 0) and
    torch.distributed (the weights, tensor by tensor, in place)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def broadcast(self, value: Any) -> Any:
        return self.trainer.strategy.broadcast(value, src=0)

    def broadcast_tensors(self, tensors: Iterable[Any]) -> None:
        from fl_plugins.integrations._torch import broadcast_tensors

        broadcast_tensors(tensors, src=0)


def _collective(trainer: Any) -> _StrategyCollective | None:
    """Multi-process training with a process group: every rank takes rank 0's round info and weights."""
    if trainer.world_size <= 1:
        return None
    import torch.distributed as dist

    return _StrategyCollective(trainer) if dist.is_available() and dist.is_initialized() else None


def _target(pl_module: Any) -> Any:
    from fl_plugins.integrations._torch import ModuleTarget

    return ModuleTarget(pl_module)


def _scalar(v: Any) -> Any:
    try:
        return v.item() if hasattr(v, "item") else v
    except (ValueError, RuntimeError):
        return v


def _save(trainer: Any) -> dict[str, Any]:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "optimizers": [o.state_dict() for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def _restore(trainer: Any, carry: dict[str, Any]) -> None:
    opts, scheds = trainer.optimizers, trainer.lr_scheduler_configs
    if len(opts) != len(carry["optimizers"]) or len(scheds) != len(carry["schedulers"]):
        logger.warning(
            "configure_optimizers() returned another number of optimizers or schedulers than last round; their "
            "state starts afresh"
        )
        return
    for opt, sd in zip(opts, carry["optimizers"], strict=True):
        opt.load_state_dict(sd)
    for cfg, sd in zip(scheds, carry["schedulers"], strict=True):
        cfg.scheduler.load_state_dict(sd)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and carry["scaler"] is not None:
        scaler.load_state_dict(carry["scaler"])


@functools.cache
def callback_class(package: str) -> type:
    """The federated callback class for trainers of `package` ("lightning" or "pytorch_lightning")."""
    try:
        mod = importlib.import_module(_PACKAGES[package])
    except ImportError as e:
        raise MissingDependencyError(
            f"{package!r} is not installed; install it with: pip install 'fl-plugins[lightning]'"
        ) from e
    return type("FLCallback", (_FLCallbackMixin, mod.Callback), {"__module__": __name__})


def trainer_package(trainer: Any) -> str:
    for cls in type(trainer).__mro__:
        root = cls.__module__.split(".")[0]
        if root in _PACKAGES and cls.__name__ == "Trainer":
            return root
    raise ConfigError(
        f"patch() takes a Lightning Trainer from `lightning` or `pytorch_lightning` (got {type(trainer).__name__} "
        f"from {type(trainer).__module__})"
    )


def global_rank(trainer: Any) -> int:
    """This process's global rank, known before the trainer sets up its process group: $RANK (torchrun), else
    Lightning's own launcher's $NODE_RANK / $LOCAL_RANK (set in the processes it starts), else the trainer's."""
    env = os.environ
    try:
        if env.get("RANK"):
            return int(env["RANK"])
        if env.get("LOCAL_RANK"):
            node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
            return node * max(1, int(getattr(trainer, "num_devices", 1) or 1)) + int(env["LOCAL_RANK"])
    except ValueError:
        raise ConfigError(
            f"RANK / LOCAL_RANK / NODE_RANK must be integers (got RANK={env.get('RANK')!r}, "
            f"LOCAL_RANK={env.get('LOCAL_RANK')!r}, NODE_RANK={env.get('NODE_RANK')!r})"
        ) from None
    return int(getattr(trainer, "global_rank", 0) or 0)


def patch(
    trainer: Any,
    restore_state: bool = True,
    load_state_dict_strict: bool = True,
    update_fit_loop: bool = True,
    *,
    proximal_mu: float = 0.0,
) -> None:
    """Federate `trainer`: connect from the launcher's environment and add the federated callback.

    restore_state: carry optimizer, LR scheduler and AMP scaler state from round to round.
    load_state_dict_strict: the global model must match the module key for key and shape for shape.
    update_fit_loop: each fit() trains the trainer's max_epochs / max_steps anew (one round's budget).
    proximal_mu (ours, keyword only; 0: off): FedProx, as FLTrainerCallback's: after each optimizer step the
    weights move toward the round's global model by lr * mu * (w - w_global) (integrations/fedprox.py)."""
    if not proximal_mu >= 0:
        raise ConfigError(f"patch(): proximal_mu must be >= 0 (got {proximal_mu!r}); 0 turns FedProx off")
    cls = callback_class(trainer_package(trainer))
    drv = _driver.get(strict=load_state_dict_strict)
    drv.use_fedprox(proximal_mu)
    drv.start(rank=global_rank(trainer))  # only global rank 0 connects
    if any(isinstance(c, _FLCallbackMixin) for c in trainer.callbacks):
        return
    trainer.callbacks.append(cls(drv, restore_state=restore_state, update_fit_loop=update_fit_loop))
