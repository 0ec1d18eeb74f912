"""The Lightning callback: translates trainer hooks into the round driver's calls (fl_plugins.integrations.driver).

    on_fit_start          move max_epochs / max_steps one round's budget forward; open the task at hand: a TRAIN
                          task's global model is loaded; any other task skips the training loop (EVALUATE:
                          patch()'s fit wrapper then validates instead; SUBMIT_MODEL: the weights are sent)
    on_train_start        restore optimizer, LR scheduler and AMP scaler state (Lightning re-creates them per fit)
    on_train_end          keep that state for the next round; send the update (before Lightning moves the
                          module to CPU in its teardown)
    on_fit_end            send the update if Lightning skipped the training loop (nothing to train)
    on_before_optimizer_step / on_train_batch_end
                          after each optimizer step, at the learning rate it used: FedProx's pull and SCAFFOLD's
                          correction (corrections.py; SCAFFOLD when the aggregator runs --strategy scaffold)
    on_validation_start   an explicit trainer.validate(): load the global model (TRAIN), or keep the module's
                          weights and load the model to evaluate (EVALUATE), or send the weights (SUBMIT_MODEL)
    on_validation_end     an explicit trainer.validate(): its metrics go with the update (TRAIN), or are the
                          EVALUATE task's answer, and the module gets its own weights back (sanity checks and
                          validation inside fit do not count)

FLARE's loop, per task (`while flare.is_running(): flare.receive(); trainer.validate(...); trainer.fit(...)`):

    task           validate(model)                               fit(model)
    TRAIN          the global model's metrics, sent with ...     ... the update: one round's training
    EVALUATE       the received model's metrics are the answer   nothing (answered); without a validate first, it
                   (NUM_EVAL_SAMPLES: the validation set's       validates with the fit's validation data instead
                   size); the module's weights are put back      of training
    SUBMIT_MODEL   sends the module's weights first, then        nothing (answered), or sends them if validate did
                   validates them (no answer)                    not; the final global model is never loaded

Neither an evaluation nor a submission trains, or touches the optimizer and LR-scheduler state carried between
rounds: a skipped fit's fresh optimizer is neither restored nor kept.

Multi-process training (DDP, any launcher): only global rank 0 connects, loads the global model and sends.
When a fit or an explicit validate starts, every rank takes rank 0's round info (the strategy's broadcast)
and rank 0's weights (torch.distributed.broadcast of each tensor, in place); when a fit ends, rank 0 asks the
aggregator whether the job goes on and broadcasts the answer, which the other ranks' is_running() returns.
The process group's timeout (DDPStrategy(timeout=...)) must cover rank 0's wait for the next round.
Sharded training (FSDPStrategy; ModelParallelStrategy, whose configure_model() calls fully_shard; runs on CPU
too): the module's full state is gathered on rank 0 where it is read (to send, to check the global model against)
and rank 0's loaded weights are scattered to every rank's shards (integrations/sharded.py). FedProx and SCAFFOLD
are refused there: they correct each rank's whole weights.

Works with trainers from `lightning` and from `pytorch_lightning`: the callback class derives from the
Callback of the trainer's own package.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any

from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.integrations import driver as _driver
from fl_plugins.integrations.budget import RoundBudget
from fl_plugins.integrations.tasks import TaskKind

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
        self.stepped = -1  # the global step FedProx and SCAFFOLD last acted at (once per optimizer step)
        self.step_lr: float | None = None  # the learning rate of the optimizer step being taken
        self.skipped: tuple[Any, Any] | None = None  # a fit that trains nothing: the limits it had
        self.evaluate_instead = False  # a fit met an unanswered EVALUATE task: validate once it returns

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
        target = _target(trainer, pl_module)
        kind = self.driver.open_task(target, step=trainer.global_step, collective=_collective(trainer))
        if kind in (TaskKind.TRAIN, None):  # None: the job is over, and the fit trains as a plain one would
            return
        if kind is TaskKind.SUBMIT_MODEL:
            self.driver.submit(target)
        self.evaluate_instead = kind is TaskKind.EVALUATE
        self.skipped = (loop.max_epochs, loop.epoch_loop.max_steps)
        loop.epoch_loop.max_steps = trainer.global_step  # reached: Lightning skips the training loop

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.restore_state and self.carry is not None:
            _restore(trainer, self.carry)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.restore_state:
            self.carry = _save(trainer)
        self.driver.end_round(step=trainer.global_step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._unskip(trainer)
        # Lightning skipped the training loop (its limits were already reached, or limit_train_batches=0): send
        # the round anyway, or the script's `while flare.is_running()` would never see the next round.
        self.driver.end_round(step=trainer.global_step)
        collective = _collective(trainer)
        if collective is not None:  # rank 0 tells the others whether the job goes on (their is_running())
            self.driver.agree_running(collective)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.step_lr = float(optimizer.param_groups[0]["lr"])  # (a step-interval LR scheduler steps before batch end)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """What the module logs with self.log (train_loss, ...) goes to the aggregator as flare.log records, with
        the global step, at the trainer's log_every_n_steps. With FedProx or SCAFFOLD, every rank corrects its
        weights once per optimizer step, at that step's learning rate."""
        if trainer.global_step != self.stepped:
            self.stepped = trainer.global_step
            self.driver.after_step(self.step_lr)
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
        if not self._explicit_validation(trainer):
            return
        target, collective = _target(trainer, pl_module), _collective(trainer)
        kind = self.driver.open_task(target, collective=collective)
        if kind is TaskKind.EVALUATE:
            self.driver.begin_evaluation(target, collective)
        elif kind is TaskKind.SUBMIT_MODEL:
            self.driver.submit(target)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._explicit_validation(trainer):
            return
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        if self.driver.evaluating:
            self.driver.end_evaluation(_target(trainer, pl_module), metrics, _val_samples(trainer))
        elif trainer.global_rank == 0:
            self.driver.record_metrics(metrics)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._unskip(trainer)
        if self.driver.evaluating:  # the evaluation failed: the module gets its own weights back
            self.driver.abort_evaluation(_target(trainer, pl_module))

    def _unskip(self, trainer: Any) -> None:
        """A fit that answered another task than TRAIN is over: the trainer's limits back."""
        if self.skipped is not None:
            loop = trainer.fit_loop
            (loop.max_epochs, loop.epoch_loop.max_steps), self.skipped = self.skipped, None


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


def _target(trainer: Any, pl_module: Any) -> Any:
    """The module's weights; sharded across the ranks (FSDPStrategy, ModelParallelStrategy's fully_shard): gathered
    on rank 0 where they are read, through the strategy's root module (sharded.py)."""
    from fl_plugins.integrations._torch import ModuleTarget
    from fl_plugins.integrations.sharded import ShardedTarget, is_sharded

    root = getattr(trainer.strategy, "model", None)  # FSDPStrategy: the FSDP unit around the module
    root = pl_module if root is None else root
    return ShardedTarget(root) if is_sharded(root) else ModuleTarget(pl_module)


def _val_samples(trainer: Any) -> int | None:
    """How many samples an explicit validate() scored: the validation sets' sizes, when each was scored whole."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, list | tuple):
        loaders = [loaders] if loaders is not None else []
    total = 0
    for loader, batches in zip(loaders, trainer.num_val_batches, strict=False):
        try:
            if batches != len(loader):  # limit_val_batches scored part of it
                return None
            total += len(loader.dataset)
        except (TypeError, AttributeError):  # an iterable without a length
            return None
    return total or None


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


class ValidatingFit:
    """patch() in place of the trainer's `fit`: a fit that met an EVALUATE task nobody answered (no validate()
    came first in the loop iteration) trains nothing, and once it returns the task's model is validated instead,
    with the fit's validation data (its val_dataloaders, else its datamodule, else the module's own)."""

    def __init__(self, trainer: Any, callback: _FLCallbackMixin, datamodule_type: type) -> None:
        self.trainer, self.callback, self.fit = trainer, callback, trainer.fit
        self.datamodule_type = datamodule_type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.callback.evaluate_instead = False
        out = self.fit(*args, **kwargs)
        if self.callback.evaluate_instead:
            self.callback.evaluate_instead = False
            self.trainer.validate(**self.validate_args(args, kwargs))
            if not self.callback.driver.answered:  # else the loop would meet the same task forever
                raise ConfigError(
                    "the aggregator asked this site to evaluate a model (an EVALUATE task) and fit() validated "
                    "instead of training, but validate() scored nothing: give fit() val_dataloaders (or a "
                    "datamodule with val_dataloader()), and keep limit_val_batches > 0"
                )
        return out

    def validate_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        given = inspect.signature(self.fit).bind_partial(*args, **kwargs).arguments
        datamodule, train = given.get("datamodule"), given.get("train_dataloaders")
        if datamodule is None and isinstance(train, self.datamodule_type):  # fit(model, datamodule) positionally
            datamodule = train
        if datamodule is not None:
            return {"model": given.get("model"), "datamodule": datamodule}
        return {"model": given.get("model"), "dataloaders": given.get("val_dataloaders")}


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
    """Federate `trainer`: connect from the launcher's environment, add the federated callback, and wrap its `fit`
    (ValidatingFit: a fit that meets an EVALUATE task nobody answered validates instead of training).

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
    callback = cls(drv, restore_state=restore_state, update_fit_loop=update_fit_loop)
    trainer.callbacks.append(callback)
    package = importlib.import_module(_PACKAGES[trainer_package(trainer)])
    trainer.fit = ValidatingFit(trainer, callback, package.LightningDataModule)
