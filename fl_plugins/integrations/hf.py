"""The Hugging Face `Trainer` callback: translates trainer events into the round driver's calls (driver.py).

Two ways to use it, both with one LR schedule over all rounds and the optimizer's state carried over:

- `Trainer(..., callbacks=[FLTrainerCallback()])`, then one `trainer.train()` runs the whole federation. When
  the trainer is created the callback connects (FL_SERVER / FL_SITE) and multiplies the trainer's budget by
  the number of rounds: each round is the TrainingArguments' `max_steps` (or `num_train_epochs`), unless
  `local_steps=` / `local_epochs=` say otherwise. One train() call means one optimizer, one scheduler (its
  warmup and decay span rounds x per-round steps) and one data order, exactly as in plain training. At each
  round boundary (`on_step_end` / `on_epoch_end`: the driver says where) the update is sent, the next global
  model is received straight into the model's tensors, and, when the trainer evaluates (`eval_strategy` is not
  "no"), the new global model is evaluated before its first step; those metrics travel with the round's update.
  Tasks between rounds are answered there too: an EVALUATE task's model is loaded, the trainer evaluates it
  right after the event (`control.should_evaluate`), `on_evaluate` sends the metrics and puts the model's own
  weights back; SUBMIT_MODEL sends the weights at once. After the last round train() answers what it still can
  (it evaluates after its last step and at its last epoch's end): the final evaluation of the global model, which
  the aggregator asks of the sites that sent the global model's metrics with their updates (so of a trainer that
  evaluates; one that does not is not asked), is answered there, and one train() is the whole job. The rest of a
  cross-site evaluation needs the trainer: `callback.finish(trainer)` after train() answers it with
  `trainer.evaluate()` (train() warns at its end when the job still asks this site for something).
- `flare.patch(trainer)` then FLARE's loop, one `train()` per round:
      while flare.is_running():
          input_model = flare.receive()      # loaded into trainer.model
          trainer.evaluate()                 # the global model's metrics go with the update
          trainer.train()                    # one round of the trainer's budget; the update is sent at its end
  On an EVALUATE task evaluate() scores the received model and sends its metrics, and train() does nothing; on
  SUBMIT_MODEL the model's weights are sent (hf_wrappers.py has the table).
  The trainer keeps its optimizer between train() calls; `patch` makes it keep its LR scheduler too, created
  once for rounds x per-round steps (again whenever the optimizer is new: `Trainer(model_init=...)` builds one
  per train(); a scheduler assigned to `trainer.lr_scheduler` between rounds is kept from then on). Each
  train() call still starts a new TrainerState: step counters and the shuffling seed restart per call. Use the
  callback form when the data order must match plain training.

What is exchanged (`params_scope`: "auto", "model", "adapter", "trainable"): hf_model.py. `server_key_prefix`
("model." in FLARE's LLM example) is put before every name that travels and taken off what arrives.

patch() takes NVIDIA FLARE's signature with its meaning: `restore_state` (one optimizer and one LR schedule
over all rounds; False: the trainer re-creates its LR scheduler for each train() call, as a plain Trainer does),
`load_state_dict_strict`, `params_scope`, `server_key_prefix`, `local_epochs` / `local_steps` (one round's
budget, in place of the TrainingArguments'), `stream_metrics` (send the trainer's logs to the aggregator as
flare.log records; the callback always does). It refuses DeepSpeed (not supported yet), `load_best_model_at_end=
True`, and a second patched Trainer in one process. It changes the trainer only through public means: its
callbacks, TrainingArguments, `lr_scheduler`, and wrappers of `create_scheduler`, `train`, `evaluate` (hf_wrappers.py).

FedProx: `FLTrainerCallback(proximal_mu=mu)` moves the exchanged weights toward the round's global model by
lr * mu * (w - w_global) after every optimizer step (fedprox.py, through the driver): the proximal term's gradient
step, decoupled from the optimizer, so it works the same under Adam or SGD. SCAFFOLD needs no argument: against an
aggregator started with `--strategy scaffold` the driver corrects the exchanged weights after every optimizer step
and sends the site's control variates with each update (integrations/scaffold.py). Both act in `on_optimizer_step`,
right after the optimizer's step and before the LR scheduler's, at the learning rate that step used.

The trainer's own resume logic (`train(resume_from_checkpoint=...)`) loads its checkpoint before
`on_train_begin`, where the global model is loaded, so that wins.

Multi-process training (torchrun / accelerate): only the main process (`args.process_index == 0`) talks to the
aggregator; at each round start it broadcasts the round info and the weights (torch.distributed; under FSDP the
state is gathered on it and scattered: sharded.py) to the others, and at each round end whether the job goes on.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from fl_plugins.client import session
from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.integrations import driver as _driver
from fl_plugins.integrations import hf_take_home as take_home
from fl_plugins.integrations.budget import RoundBudget
from fl_plugins.integrations.hf_args import (
    INSTALL,
    begun_budget,
    check_patch,
    check_prefix,
    refuse_deepspeed,
    set_budget,
    trainer_budget,
)
from fl_plugins.integrations.hf_model import PARAMS_SCOPES, resolve_scope, sharded_hf, unwrap
from fl_plugins.integrations.hf_model import HFTarget as HFTarget  # fl_plugins.tasks uses it from here
from fl_plugins.integrations.hf_wrappers import eval_samples, scores, wrap_methods
from fl_plugins.integrations.tasks import TaskKind

logger = logging.getLogger(__name__)


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the face raises a clear error instead

    class TrainerCallback:  # type: ignore[no-redef]
        def __init__(self, *a: Any, **k: Any) -> None:
            raise MissingDependencyError(INSTALL)


class FLTrainerCallback(TrainerCallback):
    """Federates a `transformers.Trainer` (see the module docstring).

    local_steps / local_epochs: one round's budget (default: the TrainingArguments' max_steps, or else
    num_train_epochs). evaluate: evaluate each round's global model before training on it (default: when the
    trainer evaluates at all, i.e. eval_strategy is not "no"). strict: the global model must match the
    exchanged tensors key for key and shape for shape. proximal_mu > 0: FedProx (decoupled), each step pulls
    the exchanged weights toward the round's global model by lr * mu * (w - w_global). params_scope: what travels
    ("trainable", "auto", "model", "adapter"); server_key_prefix: put before every name that travels, taken off
    what arrives. stream_metrics: send the trainer's logs to the aggregator as flare.log records. At the end of the
    job the final global model is loaded into the trainer's model and, with save_final, saved to args.output_dir
    (hf_take_home.py). offer_initial=False: never offer it as round 0's model (mixed LoRA ranks: the largest's)."""

    def __init__(
        self,
        local_steps: int | None = None,
        local_epochs: float | None = None,
        evaluate: bool | None = None,
        strict: bool = True,
        proximal_mu: float = 0.0,
        params_scope: str = "trainable",
        server_key_prefix: str | None = None,
        stream_metrics: bool = True,
        save_final: bool = True,
        offer_initial: bool = True,
    ) -> None:
        if not proximal_mu >= 0:
            raise ConfigError(f"FLTrainerCallback: proximal_mu must be >= 0 (got {proximal_mu!r}); 0 turns it off")
        self.budget = RoundBudget.checked("FLTrainerCallback", local_steps, local_epochs)
        if params_scope not in PARAMS_SCOPES:  # checked against the model when the trainer is built
            resolve_scope(None, params_scope, "FLTrainerCallback")
        check_prefix("FLTrainerCallback", server_key_prefix)
        self.local_steps, self.local_epochs = local_steps, local_epochs
        self.evaluate = evaluate
        self.strict = strict
        self.proximal_mu = float(proximal_mu)
        self.params_scope = params_scope
        self.server_key_prefix = server_key_prefix
        self.stream_metrics = bool(stream_metrics)
        self.save_final, self.offer_initial = bool(save_final), bool(offer_initial)
        self.scope: str | None = None  # params_scope resolved against the model
        self.per_call = False  # patch(): each train() call is one round
        self.settings: dict[str, Any] = {}  # patch()'s arguments, to compare with a second patch() call
        self.run_budget: RoundBudget | None = None  # the callback form: the one train()'s budget, all rounds
        self.evaluate_rounds = False  # the callback form: evaluate each new global model before its first step
        self.driver: _driver.RoundDriver | None = None
        self.collective: _driver.Collective | None = None  # multi-process training: torch.distributed
        self.bytes_per_round = 0
        self.described, self.kept_final = False, cast(int | None, None)  # (hf_take_home.py) sent; the final round

    # -- set-up ----------------------------------------------------------------------------------------------
    def start(self, args: Any) -> _driver.RoundDriver:
        """The round driver, connected (main process) on first use."""
        if self.driver is None:
            self.driver = _driver.get(strict=self.strict)
            if int(args.world_size) > 1:
                from fl_plugins.integrations._torch import TorchCollective

                self.collective = TorchCollective()
            self.driver.start(rank=int(args.process_index), offer=self.offer_initial)
            session.get().wants_final = True  # END's final model is fetched at once (keep_final loads it)
            self.driver.use_fedprox(self.proximal_mu)
            if self.per_call:
                self.driver.plan(self.budget)
        return self.driver

    def target(self, model: Any) -> Any:
        """What travels for `model` (its own tensors; under FSDP gathered on rank 0: sharded.py), by wire names."""
        root, model = model, unwrap(model)
        if self.scope is None:
            self.scope = resolve_scope(model, self.params_scope, "FLTrainerCallback")
        target = HFTarget(model, self.scope)
        target = sharded_hf(root, model, target.kind) or target  # the Trainer's FSDP: gathered on rank 0
        return _driver.PrefixedTarget(target, self.server_key_prefix) if self.server_key_prefix else target

    def attach(self, trainer: Any) -> None:
        """patch(): connect, let receive() write straight into the trainer's model, and remember that this process
        federates `trainer`."""
        driver = self.start(trainer.args)
        if driver.rank == 0:
            driver.attach(self.target(trainer.model))
            self.describe(trainer.model, getattr(trainer, "processing_class", None))
        driver.bind(trainer)

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.prepare(args, model)
        self.describe(model, _tokenizer(kwargs))

    def describe(self, model: Any, tokenizer: Any) -> None:
        """Tell the aggregator what the exchanged tensors belong to (for `fl-plugins export`), once."""
        driver = self.driver
        if model is not None and driver is not None and driver.rank == 0 and not self.described:
            self.described = True
            take_home.describe(model, tokenizer, self.scope or "", self.server_key_prefix or "")

    def prepare(self, args: Any, model: Any, begun: Any = None) -> None:
        """Check the trainer, connect and (the callback form) plan the whole run, once: when the trainer is built,
        or, for a callback added later (trainer.add_callback), when train() begins with the state `begun`."""
        refuse_deepspeed(args, None, "FLTrainerCallback")
        if model is not None and self.scope is None:  # a wrong params_scope fails here, before connecting
            self.scope = resolve_scope(unwrap(model), self.params_scope, "FLTrainerCallback")
        driver = self.start(args)
        if not self.per_call and self.run_budget is None:
            self._plan_whole_run(args, driver, begun)

    def _plan_whole_run(self, args: Any, driver: _driver.RoundDriver, begun: Any = None) -> None:
        """One train() for every round: the trainer's budget becomes rounds x one round's (unless train() has
        begun: then its budget is fixed, and rounds end where one round's is spent all the same)."""
        rounds = driver.total_rounds(self.collective)
        if rounds < 1:
            raise ConfigError("the aggregator reports no rounds to run")
        budget = self.budget or trainer_budget(args)
        self.run_budget = budget.over(rounds)  # checked before the trainer's args change
        if begun is None:
            set_budget(args, self.run_budget)
        elif (fixed := begun_budget(begun, self.run_budget)) != self.run_budget:
            logger.warning(
                "FLTrainerCallback was added after the Trainer was built: this train() keeps its own budget (%s), "
                "not %d rounds x %s; pass it in Trainer(callbacks=[...]) to have the budget set",
                fixed,
                rounds,
                budget,
            )
        driver.plan(budget, whole_run=True)
        self.evaluate_rounds = self.evaluate if self.evaluate is not None else args.eval_strategy != "no"
        if self.evaluate_rounds:
            args.eval_on_start = True  # round 0's global model, before its first step
        logger.info("federated training: %d rounds of %s", rounds, budget)

    # -- rounds ----------------------------------------------------------------------------------------------
    def open_task(self, args: Any, model: Any) -> TaskKind | None:
        """Open the task at hand (driver.open_task: a TRAIN task's global model is loaded on the main process and
        broadcast to the others). None: the job is over."""
        target = self.target(model)
        kind = self.start(args).open_task(target, collective=self.collective)
        if kind is TaskKind.TRAIN and not self.bytes_per_round:
            self.bytes_per_round = target.nbytes()
            mb = self.bytes_per_round / 1e6
            logger.info("each round exchanges %.2f MB (%s)", mb, target.kind)
        return kind

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.prepare(args, model, state)  # a no-op after on_init_end
        self.describe(model, _tokenizer(kwargs))
        kind = self.open_task(args, model)
        if self.per_call:  # patch(): train() trains a TRAIN task only (hf_wrappers.TaskTrain)
            control.should_training_stop = kind is not TaskKind.TRAIN
        elif self.take(args, control, model, kind) is TaskKind.EVALUATE:
            args.eval_on_start = True  # the trainer evaluates before its first step

    def take(self, args: Any, control: Any, model: Any, kind: TaskKind | None) -> TaskKind | None:
        """The callback form: act on the task that opened inside train(). TRAIN: train on (its global model is
        evaluated first when the trainer evaluates). SUBMIT_MODEL: answered at once, and the next task taken.
        EVALUATE: its model is loaded and the trainer asked to evaluate (on_evaluate answers). None: stop."""
        driver, target = self.start(args), self.target(model)
        while kind is TaskKind.SUBMIT_MODEL:
            driver.submit(target)
            kind = driver.next_task(target, self.collective)
        if kind is TaskKind.EVALUATE:
            driver.begin_evaluation(target, self.collective)
            control.should_evaluate = True  # runs right after this event
        elif kind is TaskKind.TRAIN and self.evaluate_rounds:
            control.should_evaluate = True  # the new global model's metrics, sent with its round's update
        elif kind is not TaskKind.TRAIN:
            control.should_training_stop = True
        return kind

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start(args).step_began()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:  # the scheduler has not stepped yet: this is the step's learning rate
            self.start(args).after_step(float(optimizer.param_groups[0]["lr"]))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.start(args).step_ended():
            self._boundary(args, control, model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.start(args).epoch_ended():
            self._boundary(args, control, model)

    def _boundary(self, args: Any, control: Any, model: Any) -> None:
        driver = self.start(args)
        driver.end_round()
        self.take(args, control, model, driver.next_task(self.target(model), self.collective))

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, model: Any = None, **kwargs: Any
    ) -> None:
        driver = self.driver
        if driver is None:
            return
        values = scores(metrics or {})
        if driver.evaluating and not self.per_call:  # patch(): TaskEvaluate answers, with every data set's metrics
            self._answer(args, control, model, values, eval_samples(kwargs.get("eval_dataloader")))
        elif driver.fresh and values:
            driver.record_metrics(values)

    def _answer(self, args: Any, control: Any, model: Any, values: dict[str, Any], samples: int | None) -> None:
        """The callback form: an EVALUATE task's model is evaluated: answer, then take the next task. When that is
        TRAIN on the very model just evaluated (evaluate_every: the round's global model), the metrics go with
        its update too, as an evaluation of its own would."""
        driver, target = self.start(args), self.target(model)
        done = driver.model
        evaluated = (done.current_round, done.meta.get("model_owner")) if done is not None else None
        driver.end_evaluation(target, values, samples)
        if self.take(args, control, model, driver.next_task(target, self.collective)) is TaskKind.TRAIN:
            now = driver.model
            if self.evaluate_rounds and now is not None and evaluated == (now.current_round, "global"):
                driver.record_metrics(values)

    def finish(self, trainer: Any) -> None:
        """The callback form, once `trainer.train()` has returned: answer what the job still asks of this site
        (cross-site evaluation after training: SUBMIT_MODEL, then an EVALUATE of the global model and of every
        submitted one), evaluating with `trainer.evaluate()`. Returns when the job is over. train() answers every
        task that comes between its rounds itself, and those after its last round as long as it evaluates. An
        evaluation-only job (workflow "evaluate" or "cross-site-eval") needs no train(): finish() answers it all."""
        driver = self.start(trainer.args)
        self.take(trainer.args, trainer.control, trainer.model, self.open_task(trainer.args, trainer.model))
        while driver.evaluating:
            trainer.evaluate()
        self.keep_final(trainer.args, trainer.model, trainer.processing_class)
        if driver.in_round:
            logger.warning("the job asks this site to train again (train() ended early): call trainer.train()")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """The trainer's own logs (loss, learning rate, ...) go to the aggregator as flare.log records, with the
        global step and the round the step was trained in, so the run's tracker shows every site's curve."""
        driver = self.driver
        if not self.stream_metrics or not logs or driver is None or driver.rank != 0 or not driver.started:
            return
        driver.log_scalars(scores(logs), int(state.global_step), driver.step_round)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # patch(): the round ends with train(); the callback form: a budget that did not divide the run's
        driver = self.driver
        if driver is not None and driver.in_round:
            driver.end_round()
            driver.agree_running(self.collective)
        if driver is None:
            return
        evaluating = driver.evaluating
        if evaluating:  # the callback form: an evaluation train() can no longer run
            driver.abort_evaluation(self.target(model))
        at_hand = not self.per_call and driver.rank == 0 and driver.started  # a task fetched, not answered
        if not self.per_call and not evaluating:
            self.keep_final(args, model, _tokenizer(kwargs))
        if evaluating or (at_hand and session.get().pending_round()[0] is not None):
            logger.warning(
                "the job still asks this site for a task after training (an evaluation, a submission): call "
                "FLTrainerCallback.finish(trainer) after trainer.train() to answer it; until then the aggregator "
                "waits for this site (at most --site-timeout once its process has ended)"
            )

    def keep_final(self, args: Any, model: Any, tokenizer: Any) -> None:
        """The callback form, once the job is over: the final global model into `model`, saved to output_dir."""
        driver = self.driver
        ended = driver is not None and driver.rank == 0 and bool(getattr(session.current(), "finished", False))
        if driver is None or self.kept_final is not None or model is None:
            return
        if self.collective is not None:
            ended = bool(self.collective.broadcast(ended if driver.rank == 0 else None))
        if ended:
            out = args if self.save_final else None
            self.kept_final = take_home.take_home(driver, self.target(model), model, out, tokenizer, self.collective)


def _tokenizer(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("processing_class") or kwargs.get("tokenizer")


# -- patch(): one train() per round ----------------------------------------------------------------------------


def patch(
    trainer: Any,
    restore_state: bool = True,
    load_state_dict_strict: bool = True,
    params_scope: str = "auto",
    server_key_prefix: str | None = None,
    local_epochs: float | None = None,
    local_steps: int | None = None,
    stream_metrics: bool = False,
) -> Any:
    """Federate `trainer` for FLARE's loop (one `train()` per round); returns the trainer, as FLARE's does.

    restore_state: one optimizer and one LR schedule over all rounds (False: the trainer re-creates its LR
    scheduler for each train() call). load_state_dict_strict: the global model must match what travels key for
    key and shape for shape. params_scope: "auto" (a PEFT model's adapter, else the whole state_dict), "model",
    "adapter", "trainable". server_key_prefix: put before every name sent, taken off every name received.
    local_epochs / local_steps (one or neither): one round's budget, set in the trainer's TrainingArguments
    (default: their max_steps, else num_train_epochs). stream_metrics: send the trainer's logs to the aggregator."""
    settings: dict[str, Any] = {
        "restore_state": bool(restore_state),
        "load_state_dict_strict": bool(load_state_dict_strict),
        "params_scope": params_scope,
        "server_key_prefix": server_key_prefix,
        "local_epochs": local_epochs,
        "local_steps": local_steps,
        "stream_metrics": bool(stream_metrics),
    }
    settings["params_scope"] = scope = check_patch(trainer, settings)
    existing = _patched_callback(trainer, settings)
    if existing is not None:
        if existing.driver is not _driver.current():  # patched again after flare.shutdown(): connect anew
            existing.driver = None
            existing.attach(trainer)
        return trainer
    driver = _driver.current()
    other = driver.bound() if driver is not None else None
    if other is not None and other is not trainer:
        raise ConfigError(
            f"patch(): another Trainer ({type(other).__name__} at {id(other):#x}) is already patched in this "
            "process, and one process federates one Trainer; patch that one only, or call flare.shutdown() before "
            "patching this one"
        )
    cb = FLTrainerCallback(
        strict=load_state_dict_strict,
        local_steps=local_steps,
        local_epochs=local_epochs,
        params_scope=scope,
        server_key_prefix=server_key_prefix,
        stream_metrics=stream_metrics,
    )
    cb.per_call, cb.settings, cb.scope = True, settings, scope
    cb.start(trainer.args)
    if cb.budget is not None:
        set_budget(trainer.args, cb.budget)
    trainer.add_callback(cb)
    wrap_methods(trainer, cb, restore_state)
    cb.attach(trainer)
    return trainer


def _patched_callback(trainer: Any, settings: dict[str, Any]) -> FLTrainerCallback | None:
    """The callback of an earlier patch() of `trainer` with the same settings; ConfigError for other settings or
    for the callback form."""
    for cb in trainer.callback_handler.callbacks:
        if not isinstance(cb, FLTrainerCallback):
            continue
        if not cb.per_call:
            raise ConfigError(
                "this trainer already has an FLTrainerCallback, which runs every round in one train() call; use "
                "either the callback or patch(), not both"
            )
        if cb.settings != settings:
            diff = ", ".join(f"{k}={cb.settings[k]!r}, now {v!r}" for k, v in settings.items() if cb.settings[k] != v)
            raise ConfigError(
                f"patch(): this trainer is already patched with other settings ({diff}); patch it once, with the "
                "settings you want"
            )
        return cb
    return None
