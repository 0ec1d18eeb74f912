"""patch()'s wrappers of a Hugging Face `Trainer`'s methods (hf.py installs them; nothing else of the trainer
is changed but its callback list, its TrainingArguments and its `lr_scheduler`):

    create_scheduler, train   KeptScheduler (restore_state=True): one LR schedule over all rounds
    train                     TaskTrain: train() trains a TRAIN task only (see below)
    evaluate                  TaskEvaluate: the task's model is loaded before it is scored (see below)

FLARE's loop, per task (`while flare.is_running(): flare.receive(); trainer.evaluate(); trainer.train()`):

    task           evaluate()                                    train()
    TRAIN          the global model's metrics, sent with ...     ... the update: one round's training
    EVALUATE       the received model's metrics are the answer   nothing (answered); without an evaluate() first, it
                   (NUM_EVAL_SAMPLES: the eval set's size); the  evaluates instead of training
                   model's weights are put back afterwards
    SUBMIT_MODEL   sends the model's weights first, then         nothing (answered), or sends them if evaluate()
                   scores them (no answer)                       did not; the final global model is never loaded

A train() that trains nothing returns a TrainOutput with the trainer's global step, a NaN loss and no metrics;
neither the optimizer nor the LR scheduler is touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from typing import TYPE_CHECKING, Any

from fl_plugins.integrations.tasks import TaskKind

if TYPE_CHECKING:
    from fl_plugins.integrations.hf import FLTrainerCallback

_TIMINGS = ("_runtime", "_per_second", "epoch")  # evaluate()'s timings are not the model's metrics


def wrap_methods(trainer: Any, cb: FLTrainerCallback, restore_state: bool) -> None:
    """patch(): wrap `trainer`'s methods (restore_state: keep one LR schedule over all rounds)."""
    if restore_state:
        KeptScheduler(trainer, cb).install()
    trainer.train = TaskTrain(trainer, cb)  # around KeptScheduler's train: a train() that trains nothing keeps all
    trainer.evaluate = TaskEvaluate(trainer, cb)


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


class TaskEvaluate:
    """patch() in place of the trainer's `evaluate`: an evaluate() between receive() and train() scores the task's
    model, so the task opens first: a TRAIN round's global model is loaded (its metrics go with the update), an
    EVALUATE task's model is loaded for the evaluation only (its metrics are the answer), a SUBMIT_MODEL task is
    answered with the model's weights before they are scored."""

    def __init__(self, trainer: Any, cb: FLTrainerCallback) -> None:
        self.trainer, self.cb = trainer, cb
        self.evaluate = trainer.evaluate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer, cb = self.trainer, self.cb
        driver = cb.start(trainer.args)
        kind = TaskKind.TRAIN if driver.in_round else cb.open_task(trainer.args, trainer.model)
        target = cb.target(trainer.model)
        if kind is TaskKind.SUBMIT_MODEL:
            driver.submit(target)
        if kind is not TaskKind.EVALUATE:
            return self.evaluate(*args, **kwargs)
        driver.begin_evaluation(target, cb.collective)
        try:
            metrics = self.evaluate(*args, **kwargs)
        except BaseException:
            driver.abort_evaluation(target)
            raise
        dataset = kwargs.get("eval_dataset", args[0] if args else None)
        driver.end_evaluation(
            target, scores(metrics), eval_samples(trainer.eval_dataset if dataset is None else dataset)
        )
        return metrics


class TaskTrain:
    """patch() in place of the trainer's `train`: train() trains a TRAIN task (or, once the job is over, as a
    plain Trainer would); on an EVALUATE task nobody answered it evaluates instead, on a SUBMIT_MODEL task it sends
    the model's weights, and after an answered one it does nothing."""

    def __init__(self, trainer: Any, cb: FLTrainerCallback) -> None:
        self.trainer, self.cb = trainer, cb
        self.train = trainer.train

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer, cb = self.trainer, self.cb
        driver = cb.start(trainer.args)
        kind = TaskKind.TRAIN if driver.in_round else driver.task_kind(cb.collective)
        if kind in (TaskKind.TRAIN, None):
            return self.train(*args, **kwargs)
        if kind is TaskKind.EVALUATE:
            trainer.evaluate()
        elif kind is TaskKind.SUBMIT_MODEL:
            driver.submit(cb.target(trainer.model))
        from transformers.trainer_utils import TrainOutput

        return TrainOutput(trainer.state.global_step, math.nan, {})


def scores(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation's metrics or of the trainer's logs, without evaluate()'s timings."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not k.endswith(_TIMINGS)
    }


def eval_samples(data: Any) -> int | None:
    """How many samples an evaluation scores: the size of its data set (a dataloader's), or of several (a dict);
    None when one has no length."""
    data = getattr(data, "dataset", data)  # a dataloader: its data set
    if isinstance(data, str):  # evaluate(eval_dataset="name"): one of the trainer's, by name
        return None
    parts = list(data.values()) if isinstance(data, Mapping) else [data]
    if not parts or not all(isinstance(p, Sized) for p in parts):
        return None
    return sum(len(p) for p in parts) or None
