"""What the Hugging Face integration reads from and sets in a Trainer's `TrainingArguments`: one round's budget,
the whole run's (the callback form), and the refusals of what cannot be federated (DeepSpeed, FSDP, a bad
`server_key_prefix`)."""

from __future__ import annotations

from typing import Any

from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.integrations.budget import RoundBudget
from fl_plugins.integrations.hf_model import resolve_scope, unwrap

INSTALL = "transformers is not installed; install it with: pip install 'fl-plugins[hf]'"


def trainer_budget(args: Any) -> RoundBudget:
    """One round's budget from the TrainingArguments: their max_steps, or else num_train_epochs."""
    if args.max_steps and args.max_steps > 0:
        return RoundBudget(epochs=None, steps=int(args.max_steps))
    return RoundBudget(epochs=float(args.num_train_epochs), steps=None)


def begun_budget(state: Any, like: RoundBudget) -> RoundBudget:
    """The budget a train() that has begun (its TrainerState) runs, in `like`'s kind (steps or epochs)."""
    if like.steps is not None:
        return RoundBudget(epochs=None, steps=int(state.max_steps))
    return RoundBudget(epochs=float(state.num_train_epochs), steps=None)


def set_budget(args: Any, budget: RoundBudget) -> None:
    """Make `budget` the TrainingArguments' own (max_steps > 0 would take precedence over the epochs)."""
    if budget.steps is not None:
        args.max_steps = budget.steps
    else:
        args.max_steps = -1
        args.num_train_epochs = budget.epochs


def check_prefix(who: str, server_key_prefix: Any) -> None:
    if server_key_prefix is not None and not (isinstance(server_key_prefix, str) and server_key_prefix):
        raise ConfigError(
            f"{who}: server_key_prefix must be a non-empty string such as 'model.' (got {server_key_prefix!r}); "
            "None sends the model's own names"
        )


def refuse_deepspeed(args: Any, trainer: Any, who: str) -> None:
    """DeepSpeed shards the weights across processes its own way (FSDP is supported: sharded.py)."""
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed or getattr(trainer, "is_deepspeed_enabled", False):
        raise ConfigError(
            f"{who}: DeepSpeed is not supported yet (TrainingArguments.deepspeed={deepspeed!r}): each process "
            "holds only a shard of the weights. Train with DDP instead (torchrun, or accelerate without a "
            "DeepSpeed config) and drop the deepspeed argument"
        )


def check_patch(trainer: Any, settings: dict[str, Any]) -> str:
    """patch()'s refusals, before connecting; returns params_scope resolved against the trainer's model."""
    try:
        from transformers import Trainer
    except ImportError as e:
        raise MissingDependencyError(INSTALL) from e
    if not isinstance(trainer, Trainer):
        raise ConfigError(
            f"patch() takes a transformers.Trainer (got {type(trainer).__name__}); for Lightning use "
            "fl_plugins.lightning.patch"
        )
    RoundBudget.checked("patch()", settings["local_steps"], settings["local_epochs"])
    refuse_deepspeed(trainer.args, trainer, "patch()")
    if getattr(trainer.args, "fsdp", None) or getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError(
            f"patch() under FSDP (TrainingArguments.fsdp={trainer.args.fsdp!r}) is not supported: the Trainer shards "
            "the model inside evaluate() and train(), after FLARE's loop received the round. Add "
            "FLTrainerCallback() to the Trainer's callbacks instead (one train() for every round)"
        )
    if getattr(trainer.args, "load_best_model_at_end", False):
        raise ConfigError(
            "patch(): TrainingArguments.load_best_model_at_end=True cannot be federated: train() would reload its "
            "best checkpoint before the round's update is sent, so the aggregator would get that checkpoint "
            "instead of the round's training (choosing the best model is the aggregator's job). Set "
            "load_best_model_at_end=False"
        )
    check_prefix("patch()", settings["server_key_prefix"])
    return resolve_scope(unwrap(trainer.model), settings["params_scope"], "patch()")
