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

What is exchanged (`params_scope`): "adapter", a PEFT model's adapter weights only (peft's
`get_peft_model_state_dict` / `set_peft_model_state_dict`; for prompt learning such as p-tuning, the prompt
encoder's trainable parameters, since peft's own state dict of those is the encoder's output, which cannot be
trained further); "model", the model's whole state_dict (frozen weights and persistent buffers too); "auto"
(FLARE's default, and patch()'s), the adapter of a PEFT model and the whole model otherwise; "trainable" (the
callback's default), the adapter of a PEFT model and a plain model's trainable parameters otherwise (frozen ones
stay local). Either way the tensors share storage with the model, so the global model is received in place, on
the model's device. `server_key_prefix` ("model." in FLARE's LLM example) is put before every name that travels
and taken off what arrives: the global model's names are the site's with that prefix.

patch() takes NVIDIA FLARE's signature with its meaning: `restore_state` (one optimizer and one LR schedule
over all rounds; False: the trainer re-creates its LR scheduler for each train() call, as a plain Trainer does),
`load_state_dict_strict`, `params_scope`, `server_key_prefix`, `local_epochs` / `local_steps` (one round's
budget, in place of the TrainingArguments'), `stream_metrics` (send the trainer's logs to the aggregator as
flare.log records; the callback always does). It refuses what FLARE refuses: DeepSpeed and FSDP (not supported
yet), `load_best_model_at_end=True`, and a second patched Trainer in one process.

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
import math
import weakref
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


PARAMS_SCOPES = ("auto", "model", "adapter", "trainable")


def resolve_scope(model: Any, params_scope: Any, who: str) -> str:
    """`params_scope` for `model`, resolved to "model", "adapter" or "trainable" (see the module docstring)."""
    scope = params_scope.lower() if isinstance(params_scope, str) else params_scope
    if scope not in PARAMS_SCOPES:
        raise ConfigError(f"{who}: params_scope must be one of {', '.join(map(repr, PARAMS_SCOPES))} (got "
                          f"{params_scope!r}); 'auto' exchanges a PEFT model's adapter and any other model's whole "
                          "state_dict")  # fmt: skip
    peft = _is_peft(model)
    if scope == "adapter" and not peft:
        raise ConfigError(f"{who}: params_scope='adapter' needs a PEFT model (got {type(model).__name__}); wrap the "
                          "model with peft.get_peft_model(...), or use params_scope='auto' or 'model'")  # fmt: skip
    if scope == "auto":
        return "adapter" if peft else "model"
    if scope == "model" and peft:
        logger.warning("params_scope='model' on a PEFT model exchanges its whole state_dict, base weights included; "
                       "params_scope='auto' exchanges only the adapter")  # fmt: skip
    return scope


class HFTarget:
    """The part of a transformers (or PEFT) model that travels; `state()` shares storage with the model.

    scope: "trainable" (default), "adapter" or "model", as `resolve_scope` returns it."""

    def __init__(self, model: Any, scope: str = "trainable") -> None:
        self.model = model
        if scope == "model":
            self.kind = "model"
        elif _is_peft(model):
            self.kind = "peft-prompt" if _prompt_learning(model) else "peft"
        else:
            self.kind = "trainable"

    def state(self) -> dict[str, Any]:
        if self.kind == "peft":
            from peft import get_peft_model_state_dict

            return dict(get_peft_model_state_dict(self.model))
        if self.kind == "model":
            return dict(self.model.state_dict())
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


def exchanged_state(model: Any, params_scope: str = "trainable") -> dict[str, Any]:
    """What a round exchanges for `model` under `params_scope` (for reports and tests)."""
    model = _unwrap(model)
    return HFTarget(model, resolve_scope(model, params_scope, "exchanged_state()")).state()


def _check_budget(who: str, local_steps: Any, local_epochs: Any) -> None:
    if local_steps is not None and local_epochs is not None:
        raise ConfigError(f"{who}: give local_steps or local_epochs, not both (got local_steps={local_steps!r}, "
                          f"local_epochs={local_epochs!r}); one round trains either that many optimizer steps or "
                          "that many epochs")  # fmt: skip
    for name, v in (("local_steps", local_steps), ("local_epochs", local_epochs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf):
            raise ConfigError(f"{who}: {name} must be > 0 and finite (got {v!r})")
    if local_steps is not None and not float(local_steps).is_integer():
        raise ConfigError(f"{who}: local_steps must be a whole number of optimizer steps (got {local_steps!r}); use "
                          "local_epochs for fractions of an epoch")  # fmt: skip


def _refuse_sharded(args: Any, trainer: Any, who: str) -> None:
    """DeepSpeed and FSDP shard the weights across processes: what one process holds is not the model."""
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed or getattr(trainer, "is_deepspeed_enabled", False):
        raise ConfigError(f"{who}: DeepSpeed is not supported yet (TrainingArguments.deepspeed={deepspeed!r}): each "
                          "process holds only a shard of the weights. Train with DDP instead (torchrun, or "
                          "accelerate without a DeepSpeed config) and drop the deepspeed argument")  # fmt: skip
    fsdp = getattr(args, "fsdp", None)
    if fsdp or getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError(f"{who}: FSDP is not supported yet (TrainingArguments.fsdp={fsdp!r}): each process holds "
                          "only a shard of the weights. Train with DDP instead (torchrun) and drop the fsdp "
                          "argument")  # fmt: skip


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
    the exchanged weights toward the round's global model by lr * mu * (w - w_global). params_scope: what travels
    ("trainable", "auto", "model", "adapter"); server_key_prefix: put before every name that travels, taken off
    what arrives. stream_metrics: send the trainer's logs to the aggregator as flare.log records."""

    def __init__(self, local_steps: int | None = None, local_epochs: float | None = None,
                 evaluate: bool | None = None, strict: bool = True, proximal_mu: float = 0.0,
                 params_scope: str = "trainable", server_key_prefix: str | None = None,
                 stream_metrics: bool = True) -> None:  # fmt: skip
        if not proximal_mu >= 0:
            raise ConfigError(f"FLTrainerCallback: proximal_mu must be >= 0 (got {proximal_mu!r}); 0 turns it off")
        _check_budget("FLTrainerCallback", local_steps, local_epochs)
        if params_scope not in PARAMS_SCOPES:  # checked against the model when the trainer is built
            resolve_scope(None, params_scope, "FLTrainerCallback")
        if server_key_prefix is not None and not (isinstance(server_key_prefix, str) and server_key_prefix):
            raise ConfigError(f"FLTrainerCallback: server_key_prefix must be a non-empty string such as 'model.' "
                              f"(got {server_key_prefix!r}); None sends the model's own names")  # fmt: skip
        self.params_scope = params_scope
        self.server_key_prefix = server_key_prefix
        self.stream_metrics = bool(stream_metrics)
        self._scope: str | None = None  # params_scope resolved against the model
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
        self.settings: dict[str, Any] = {}  # patch()'s arguments, to compare with a second patch() call
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
            total = self.driver.total_rounds()
        else:
            total = 0
        return int(_broadcast(total, self.world))

    def _target(self, model: Any) -> Any:
        """What travels for `model` (the model's own tensors), under the wire names."""
        model = _unwrap(model)
        if self._scope is None:
            self._scope = resolve_scope(model, self.params_scope, "FLTrainerCallback")
        target = HFTarget(model, self._scope)
        return _driver.PrefixedTarget(target, self.server_key_prefix) if self.server_key_prefix else target

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _refuse_sharded(args, None, "FLTrainerCallback")
        if model is not None and self._scope is None:  # a wrong params_scope fails here, before connecting
            self._scope = resolve_scope(_unwrap(model), self.params_scope, "FLTrainerCallback")
        self._start(args)
        if not self.per_call:
            self._configure_whole_run(args)

    def _configure_per_call(self, args: Any) -> None:
        """patch(): each train() call is one round of local_steps / local_epochs (if given) in the trainer's
        TrainingArguments."""
        if self.local_steps is not None:
            args.max_steps = int(self.local_steps)
        elif self.local_epochs is not None:
            args.max_steps = -1  # max_steps > 0 would take precedence over the epochs
            args.num_train_epochs = float(self.local_epochs)

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
        target = self._target(model)
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
        if not self.stream_metrics or self.rank != 0 or not logs or self.driver is None or not self.driver.started:
            return
        scalars = {k: v for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        scalars = {k: v for k, v in scalars.items() if not k.endswith(_TIMINGS)}
        self.driver.log_scalars(scalars, int(state.global_step), self._step_round)

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


_patched: tuple[Any, Any] | None = None  # (weakref to the patched Trainer, the round driver it was patched under)


def patch(trainer: Any, restore_state: bool = True, load_state_dict_strict: bool = True, params_scope: str = "auto",
          server_key_prefix: str | None = None, local_epochs: float | None = None, local_steps: int | None = None,
          stream_metrics: bool = False) -> Any:  # fmt: skip
    """Federate `trainer` for FLARE's loop (one `train()` per round); returns the trainer, as FLARE's does.

    restore_state: one optimizer and one LR schedule over all rounds (False: the trainer re-creates its LR
    scheduler for each train() call). load_state_dict_strict: the global model must match what travels key for
    key and shape for shape. params_scope: "auto" (a PEFT model's adapter, else the whole state_dict), "model",
    "adapter", "trainable". server_key_prefix: put before every name sent, taken off every name received.
    local_epochs / local_steps (one or neither): one round's budget, set in the trainer's TrainingArguments
    (default: their max_steps, else num_train_epochs). stream_metrics: send the trainer's logs to the aggregator."""
    global _patched
    try:
        from transformers import Trainer
    except ImportError as e:
        raise MissingDependencyError(
            "transformers is not installed; install it with: pip install 'fl-plugins[hf]'"
        ) from e
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"patch() takes a transformers.Trainer (got {type(trainer).__name__}); for Lightning use "
                          "fl_plugins.lightning.patch")  # fmt: skip
    args = trainer.args
    _check_budget("patch()", local_steps, local_epochs)
    _refuse_sharded(args, trainer, "patch()")
    if getattr(args, "load_best_model_at_end", False):
        raise ConfigError("patch(): TrainingArguments.load_best_model_at_end=True cannot be federated: train() would "
                          "reload its best checkpoint before the round's update is sent, so the aggregator would get "
                          "that checkpoint instead of the round's training (choosing the best model is the "
                          "aggregator's job). Set load_best_model_at_end=False")  # fmt: skip
    if server_key_prefix is not None and not (isinstance(server_key_prefix, str) and server_key_prefix):
        raise ConfigError(f"patch(): server_key_prefix must be a non-empty string such as 'model.' (got "
                          f"{server_key_prefix!r}); None sends the model's own names")  # fmt: skip
    scope = resolve_scope(_unwrap(trainer.model), params_scope, "patch()")
    settings = {"restore_state": bool(restore_state), "load_state_dict_strict": bool(load_state_dict_strict),
                "params_scope": scope, "server_key_prefix": server_key_prefix, "local_epochs": local_epochs,
                "local_steps": local_steps, "stream_metrics": bool(stream_metrics)}  # fmt: skip
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, FLTrainerCallback):
            if not cb.per_call:
                raise ConfigError("this trainer already has an FLTrainerCallback, which runs every round in one "
                                  "train() call; use either the callback or patch(), not both")  # fmt: skip
            if cb.settings != settings:
                diff = {k: (cb.settings[k], v) for k, v in settings.items() if cb.settings[k] != v}
                raise ConfigError("patch(): this trainer is already patched with other settings ("
                                  + ", ".join(f"{k}={a!r}, now {b!r}" for k, (a, b) in diff.items())
                                  + "); patch it once, with the settings you want")  # fmt: skip
            if cb.driver is not _driver.current():  # patched again after flare.shutdown(): connect anew
                cb.driver = None
                cb._start(args)
                if cb.rank == 0:
                    cb.driver.target = cb._target(trainer.model)
                _patched = (weakref.ref(trainer), cb.driver)
            return trainer
    if _patched is not None:
        ref, drv = _patched
        other = ref()
        if other is not None and other is not trainer and drv is _driver.current():
            raise ConfigError(f"patch(): another Trainer ({type(other).__name__} at {id(other):#x}) is already patched "
                              "in this process, and one process federates one Trainer; patch that one only, or call "
                              "flare.shutdown() before patching this one")  # fmt: skip
    cb = FLTrainerCallback(strict=load_state_dict_strict, local_steps=local_steps, local_epochs=local_epochs,
                           params_scope=scope, server_key_prefix=server_key_prefix,
                           stream_metrics=stream_metrics)  # fmt: skip
    cb.per_call = True
    cb.settings = settings
    cb._scope = scope
    cb._start(args)
    cb._configure_per_call(args)
    trainer.add_callback(cb)
    if restore_state:
        _keep_scheduler(trainer, cb)
    _load_before_evaluate(trainer, cb)
    if cb.rank == 0:
        cb.driver.target = cb._target(trainer.model)  # receive() writes straight into the model
    _patched = (weakref.ref(trainer), cb.driver)
    return trainer


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
