"""patch()'s wrappers of a Hugging Face `Trainer`'s methods (hf.py installs them; nothing else of the trainer
is changed but its callback list, its TrainingArguments and its `lr_scheduler`):

    create_scheduler, train   KeptScheduler (restore_state=True): one LR schedule over all rounds
    evaluate                  LoadingEvaluate: the round's global model is loaded before it is scored
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_plugins.integrations.hf import FLTrainerCallback


class KeptScheduler:
    """patch(restore_state=True) in place of the trainer's `create_scheduler` (and around its `train`): a train()
    gets back the LR scheduler the trainer had when train() was called (the one an earlier round created, or one
    the user assigned since) as long as it drives the trainer's optimizer; otherwise (the first round, or a
    `Trainer(model_init=...)`, which builds a new optimizer in every train()) the trainer creates one for rounds x
    the call's steps. The trainer drops a scheduler it created itself as train() starts: hence the look before."""

    def __init__(self, trainer: Any, cb: FLTrainerCallback) -> None:
        self.trainer, self.cb = trainer, cb
        self.create = trainer.create_scheduler
        self.run = trainer.train
        self.held: Any = None  # the trainer's scheduler when train() was called

    def install(self) -> None:
        self.trainer.create_scheduler, self.trainer.train = self, self.train

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.held = self.trainer.lr_scheduler
        return self.run(*args, **kwargs)

    def __call__(self, num_training_steps: int, optimizer: Any = None) -> Any:
        trainer = self.trainer
        scheduler = trainer.lr_scheduler if trainer.lr_scheduler is not None else self.held
        if scheduler is None or not drives(scheduler, optimizer if optimizer is not None else trainer.optimizer):
            trainer.lr_scheduler = None
            rounds = max(1, self.cb.start(trainer.args).total_rounds(self.cb.collective))
            self.create(num_training_steps=num_training_steps * rounds, optimizer=optimizer)
            scheduler = trainer.lr_scheduler
        trainer.lr_scheduler = scheduler
        return scheduler


def drives(scheduler: Any, optimizer: Any) -> bool:
    """Whether `scheduler` sets `optimizer`'s learning rate (either may be wrapped, e.g. by accelerate); a scheduler
    that does not say which optimizer it drives is trusted."""
    driven = getattr(getattr(scheduler, "scheduler", scheduler), "optimizer", None)
    return driven is None or innermost(driven) is innermost(optimizer)


def innermost(optimizer: Any) -> Any:
    """The optimizer inside wrappers that keep it as `.optimizer` (accelerate's AcceleratedOptimizer)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class LoadingEvaluate:
    """patch() in place of the trainer's `evaluate`: an evaluate() between receive() and train() scores the
    round's global model, so the round opens (the model is loaded) first."""

    def __init__(self, trainer: Any, cb: FLTrainerCallback) -> None:
        self.trainer, self.cb = trainer, cb
        self.evaluate = trainer.evaluate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        driver = self.cb.start(self.trainer.args)
        if not driver.in_round and driver.is_running():
            self.cb.open_round(self.trainer.args, self.trainer.model)
        return self.evaluate(*args, **kwargs)
