"""The Hugging Face `Trainer` callback: translates trainer events into the round driver's calls.

Two ways to use it, both with one LR schedule over all rounds and the optimizer's state carried over:

- `Trainer(..., callbacks=[FLTrainerCallback()])`, then one `trainer.train()` runs the whole federation. When
  the trainer is created the callback connects (FL_SERVER / FL_SITE) and multiplies the trainer's budget by
  the number of rounds: each round is the TrainingArguments' `max_steps` (or `num_train_epochs`), unless
  `local_steps=` / `local_epochs=` say otherwise. One train() call means one optimizer, one scheduler (its
  warmup and decay span rounds x per-round steps) and one data order, exactly as in plain training. At each
  round boundary (`on_step_end` / `on_epoch_end`) the update is sent, the next global model is received
  straight into the model's tensors, and, when the trainer evaluates (`eval_strategy` is not "no"), the new
  global model is evaluated before its first step; those metrics travel with the round's update.
- `flare.patch(trainer)` then FLARE's loop, one `train()` per round:
      while flare.is_running():
          input_model = flare.receive()      # loaded into trainer.model
          trainer.evaluate()                 # the global model's metrics go with the update
          trainer.train()                    # one round of the trainer's budget; the update is sent at its end
  The trainer keeps its optimizer between train() calls; `patch` makes it keep its LR scheduler too, created
  once for rounds x per-round steps. (Each train() call still starts a new TrainerState: step counters and
  the shuffling seed restart per call. Use the callback form when the data order must match plain training.)

What is exchanged: a PEFT model's adapter weights only (peft's `get_peft_model_state_dict` /
`set_peft_model_state_dict`; for prompt learning such as p-tuning, the prompt encoder's trainable parameters,
since peft's own state dict of those is the encoder's output, which cannot be trained further), a plain model's
trainable parameters (frozen ones stay local). Either way the tensors share storage with the model, so the
global model is received in place, on the model's device.

FedProx: `FLTrainerCallback(proximal_mu=mu)` moves the exchanged weights toward the round's global model by
lr * mu * (w - w_global) after every optimizer step: the proximal term's gradient step, decoupled from the
optimizer (as AdamW decouples weight decay), so it works the same under Adam or SGD and costs one copy of what
travels (the adapter, for PEFT).

The trainer's own resume logic (`train(resume_from_checkpoint=...)`) loads its checkpoint before
`on_train_begin`; the global model is loaded at `on_train_begin`, so it wins.

Multi-process training (torchrun / accelerate): only the main process (`args.process_index == 0`) talks to the
aggregator; at each round start it broadcasts the round info and the weights (torch.distributed) to the others,
and at each round end whether the job goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.integrations import driver as _driver

logger = logging.getLogger(__name__)

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the face raises a clear error instead

    class TrainerCallback:  # type: ignore[no-redef]
        def __init__(self, *a: Any, **k: Any) -> None:
            raise MissingDependencyError(
                "transformers is not installed; install it with: pip install 'fl-plugins[hf]'"
            )


# -- what is exchanged ---------------------------------------------------------------------------------------


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _prompt_learning(model: Any) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


class HFTarget:
    """The part of a transformers (or PEFT) model that travels; `state()` shares storage with the model."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kind = ("peft-prompt" if _prompt_learning(model) else "peft") if _is_peft(model) else "trainable"

    def state(self) -> dict[str, Any]:
        if self.kind == "peft":
            from peft import get_peft_model_state_dict

            return dict(get_peft_model_state_dict(self.model))
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        import torch

        from fl_plugins.integrations._torch import _same_storage

        local = self.state()
        todo = {k: v for k, v in params.items() if not _same_storage(v, local.get(k))}
        if not todo:
            return
        if self.kind == "peft":
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, {k: torch.as_tensor(v) for k, v in todo.items()})
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "prompt" in k]
            if strict and bad:
                raise ConfigError(f"the global adapter has keys this model's adapter lacks: {bad[:5]}")
            return
        with torch.no_grad():
            for k, v in todo.items():
                if k in local:
                    local[k].copy_(torch.as_tensor(v), non_blocking=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


def exchanged_state(model: Any) -> dict[str, Any]:
    """What a round exchanges for `model` (for reports and tests)."""
    return HFTarget(_unwrap(model)).state()


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and not _is_peft(model):  # DDP / DataParallel wrappers
        model = model.module
    return model


# -- the callback --------------------------------------------------------------------------------------------


class FLTrainerCallback(TrainerCallback):
    """Federates a `transformers.Trainer` (see the module docstring).

    local_steps / local_epochs: one round's budget (default: the TrainingArguments' max_steps, or else
    num_train_epochs). evaluate: evaluate each round's global model before training on it (default: when the
    trainer evaluates at all, i.e. eval_strategy is not "no"). strict: the global model must match the
    exchanged tensors key for key and shape for shape. proximal_mu > 0: FedProx (decoupled), each step pulls
    the exchanged weights toward the round's global model by lr * mu * (w - w_global)."""

    def __init__(self, local_steps: int | None = None, local_epochs: float | None = None,
                 evaluate: bool | None = None, strict: bool = True, proximal_mu: float = 0.0) -> None:  # fmt: skip
        if not proximal_mu >= 0:
            raise ConfigError(f"FLTrainerCallback: proximal_mu must be >= 0 (got {proximal_mu!r}); 0 turns it off")
        if local_steps is not None and local_epochs is not None:
            raise ConfigError("FLTrainerCallback: give local_steps or local_epochs, not both")
        for name, v in (("local_steps", local_steps), ("local_epochs", local_epochs)):
            if v is not None and not v > 0:
                raise ConfigError(f"FLTrainerCallback: {name} must be > 0 (got {v!r})")
        self.local_steps = local_steps
        self.local_epochs = local_epochs
        self.evaluate = evaluate
        self.strict = strict
        # FedProx, decoupled: after every optimizer step the exchanged weights move toward the round's global
        # model by lr * mu * (w - w_global), the step the proximal term mu/2 |w - w_global|^2 adds (as AdamW
        # decouples weight decay); it keeps label-skewed sites from drifting apart within a round
        self.proximal_mu = float(proximal_mu)
        # (live views of what travels, the round's global model: a copy of them)
        self._anchor: tuple[list[Any], list[Any]] | None = None
        self.per_call = False  # patch(): each train() call is one round
        self.driver: _driver.RoundDriver | None = None
        self.rank = 0
        self.world = 1
        self._configured = False
        self._in_round = False  # a round's global model is loaded and not yet sent
        self._fresh = False  # ... and no training step has run on it yet
        self._steps = 0  # optimizer steps in the current round
        self._epochs = 0  # epochs ended in the current round
        self._eval = False
        self.bytes_per_round = 0
        self._step_round: int | None = None  # the round of the step being trained (for its log records)

    # -- set-up ----------------------------------------------------------------------------------------------
    def _start(self, args: Any) -> None:
        if self.driver is None:
            self.driver = _driver.get(strict=self.strict)
            self.rank, self.world = int(args.process_index), int(args.world_size)
            self.driver.start(rank=self.rank)

    def _total_rounds(self) -> int:
        if self.rank == 0:
            from fl_plugins.client import api

            total = api._runtime().total_rounds
        else:
            total = 0
        return int(_broadcast(total, self.world))

    def on_init_end(self, args, state, control, **kwargs):
        self._start(args)
        if not self.per_call:
            self._configure_whole_run(args)

    def _configure_whole_run(self, args: Any) -> None:
        """One train() for every round: the trainer's budget becomes rounds x one round's."""
        if self._configured:
            return
        self._configured = True
        rounds = self._total_rounds()
        if rounds < 1:
            raise ConfigError("the aggregator reports no rounds to run")
        if self.local_steps is None and self.local_epochs is None:
            if args.max_steps and args.max_steps > 0:
                self.local_steps = int(args.max_steps)
            else:
                self.local_epochs = float(args.num_train_epochs)
        if self.local_steps is not None:
            args.max_steps = rounds * int(self.local_steps)
        else:
            if float(self.local_epochs) != int(self.local_epochs):  # checked before the trainer's args change
                raise ConfigError(f"local_epochs must be a whole number of epochs (got {self.local_epochs}); "
                                  "use local_steps for fractions of an epoch")  # fmt: skip
            args.max_steps = -1
            args.num_train_epochs = rounds * float(self.local_epochs)
        self._eval = self.evaluate if self.evaluate is not None else args.eval_strategy != "no"
        if self._eval:
            args.eval_on_start = True  # round 0's global model, before its first step
        logger.info("federated training: %d rounds of %s", rounds,
                    f"{self.local_steps} steps" if self.local_steps else f"{self.local_epochs:g} epochs")  # fmt: skip

    # -- rounds ----------------------------------------------------------------------------------------------
    def _begin_round(self, model: Any) -> bool:
        """Load the round's global model (main process; broadcast to the others). False: the job is over."""
        target = HFTarget(_unwrap(model))
        ok = self.driver.begin(target) if self.rank == 0 else True
        if self.world > 1:
            info = _broadcast(self.driver.round_info() if self.rank == 0 else None, self.world)
            ok = _broadcast(ok, self.world)
            if ok and dist_ready():
                from fl_plugins.integrations._torch import broadcast_tensors

                broadcast_tensors(target.state().values())
                if self.rank != 0:
                    self.driver.follow(info, target)
        self._in_round, self._fresh, self._steps, self._epochs = ok, ok, 0, 0
        if ok and self.proximal_mu > 0:
            live = [w for w in target.state().values() if w.is_floating_point()]
            self._anchor = (live, [w.detach().clone() for w in live])
        if ok and not self.bytes_per_round:
            self.bytes_per_round = target.nbytes()
            logger.info("each round exchanges %d tensors, %.2f MB (%s)", len(target.state()),
                        self.bytes_per_round / 1e6, target.kind)  # fmt: skip
        return ok

    def _end_round(self) -> bool:
        """Send the update (main process). Returns whether the job goes on (agreed by every process)."""
        if self._in_round:
            self._in_round = False
            if self.rank == 0:
                self.driver.finish_round(self._steps)
        running = self.driver.is_running() if self.rank == 0 else None
        running = bool(_broadcast(running, self.world))
        if self.rank != 0:
            self.driver.follow({"running": running})
        return running

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start(args)
        if not self._begin_round(model):
            control.should_training_stop = True

    def on_step_begin(self, args, state, control, **kwargs):
        self._fresh = False
        # the trainer logs a step after on_step_end, where a round boundary may already have moved on
        model = self.driver.model if self.driver is not None else None
        self._step_round = model.current_round if model is not None else None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._steps += 1
        if self._anchor is not None and self._in_round and optimizer is not None:
            self._proximal_step(float(optimizer.param_groups[0]["lr"]))
        if not self.per_call and self.local_steps is not None and self._steps >= self.local_steps:
            self._boundary(control, model)

    def _proximal_step(self, lr: float) -> None:
        """w <- w - lr * mu * (w - w_global) for every tensor that travels: one fused lerp, no temporaries."""
        import torch

        live, anchor = self._anchor
        with torch.no_grad():
            torch._foreach_lerp_(live, anchor, lr * self.proximal_mu)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._epochs += 1
        if not self.per_call and self.local_epochs is not None and self._epochs >= self.local_epochs:
            self._boundary(control, model)

    def _boundary(self, control: Any, model: Any) -> None:
        if not self._end_round():
            control.should_training_stop = True
            return
        if self._begin_round(model):
            if self._eval:
                control.should_evaluate = True  # runs right after this event: the new global model's metrics
        else:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._fresh and metrics and self.rank == 0:
            self.driver.record_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)
                                        and not k.endswith(_TIMINGS)})  # fmt: skip

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The trainer's own logs (loss, learning rate, ...) go to the aggregator as flare.log records, with the
        global step, so the run's tracker shows every site's training curve."""
        if self.rank != 0 or not logs or self.driver is None or not self.driver.started:
            return
        from fl_plugins.client import api

        api._log_scalars({k: v for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)
                          and not k.endswith(_TIMINGS)}, int(state.global_step), self._step_round)  # fmt: skip

    def on_train_end(self, args, state, control, **kwargs):
        if self._in_round:  # patch(): the round ends with train(); callback form: a budget that did not divide
            self._end_round()


_TIMINGS = ("_runtime", "_per_second", "epoch")  # evaluate()'s timings are not the model's metrics


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _broadcast(value: Any, world: int) -> Any:
    if world <= 1 or not dist_ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- patch(): one train() per round ----------------------------------------------------------------------------


def patch(trainer: Any, load_state_dict_strict: bool = True) -> FLTrainerCallback:
    """Federate `trainer` for FLARE's loop (one `train()` per round); returns the callback it added."""
    try:
        from transformers import Trainer
    except ImportError as e:
        raise MissingDependencyError(
            "transformers is not installed; install it with: pip install 'fl-plugins[hf]'"
        ) from e
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"patch() takes a transformers.Trainer (got {type(trainer).__name__}); for Lightning use "
                          "fl_plugins.lightning.patch")  # fmt: skip
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, FLTrainerCallback):
            if not cb.per_call:
                raise ConfigError("this trainer already has an FLTrainerCallback, which runs every round in one "
                                  "train() call; use either the callback or patch(), not both")  # fmt: skip
            return cb
    cb = FLTrainerCallback(strict=load_state_dict_strict)
    cb.per_call = True
    cb._start(trainer.args)
    trainer.add_callback(cb)
    _keep_scheduler(trainer, cb)
    _load_before_evaluate(trainer, cb)
    if cb.rank == 0:
        cb.driver.target = HFTarget(_unwrap(trainer.model))  # receive() writes straight into the model
    return cb


def _keep_scheduler(trainer: Any, cb: FLTrainerCallback) -> None:
    """The first train() creates the LR scheduler for rounds x its steps; later calls keep it (the trainer
    re-creates a scheduler it made itself on every call)."""
    original = trainer.create_scheduler

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        if trainer.lr_scheduler is None:
            rounds = max(1, cb._total_rounds())
            original(num_training_steps=num_training_steps * rounds, optimizer=optimizer)
        trainer._created_lr_scheduler = False  # ours: the trainer must not reset it on the next train()
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def _load_before_evaluate(trainer: Any, cb: FLTrainerCallback) -> None:
    """An evaluate() between receive() and train() scores the round's global model: make sure it is loaded."""
    original = trainer.evaluate

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        if not cb._in_round and cb.driver.is_running():
            cb._begin_round(trainer.model)
        return original(*args, **kwargs)

    trainer.evaluate = evaluate
