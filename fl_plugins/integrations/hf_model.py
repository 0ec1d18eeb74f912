"""What of a transformers (or PEFT) model travels each round: `params_scope`, resolved against the model, and
`HFTarget`, the round driver's model target over it.

    "adapter"    a PEFT model's adapter weights only (peft's `get_peft_model_state_dict` /
                 `set_peft_model_state_dict`; for prompt learning such as p-tuning, the prompt encoder's trainable
                 parameters, since peft's own state dict of those is the encoder's output, which cannot be trained
                 further)
    "model"      the model's whole state_dict (frozen weights and persistent buffers too)
    "auto"       (FLARE's default, and patch()'s) the adapter of a PEFT model, the whole model otherwise
    "trainable"  (the callback's default) the adapter of a PEFT model, a plain model's trainable parameters
                 otherwise (frozen ones stay local)

Either way the tensors share storage with the model, so the global model is received in place, on the model's
device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fl_plugins.errors import ConfigError

logger = logging.getLogger(__name__)

PARAMS_SCOPES = ("auto", "model", "adapter", "trainable")


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap(model: Any) -> Any:
    """The model inside DDP / DataParallel wrappers (a PEFT model is kept whole)."""
    while hasattr(model, "module") and not is_peft(model):
        model = model.module
    return model


def resolve_scope(model: Any, params_scope: Any, who: str) -> str:
    """`params_scope` for `model`, resolved to "model", "adapter" or "trainable" (see the module docstring)."""
    scope = params_scope.lower() if isinstance(params_scope, str) else params_scope
    if scope not in PARAMS_SCOPES:
        raise ConfigError(
            f"{who}: params_scope must be one of {', '.join(map(repr, PARAMS_SCOPES))} (got {params_scope!r}); "
            "'auto' exchanges a PEFT model's adapter and any other model's whole state_dict"
        )
    peft = is_peft(model)
    if scope == "adapter" and not peft:
        raise ConfigError(
            f"{who}: params_scope='adapter' needs a PEFT model (got {type(model).__name__}); wrap the model with "
            "peft.get_peft_model(...), or use params_scope='auto' or 'model'"
        )
    if scope == "auto":
        return "adapter" if peft else "model"
    if scope == "model" and peft:
        logger.warning(
            "params_scope='model' on a PEFT model exchanges its whole state_dict, base weights included; "
            "params_scope='auto' exchanges only the adapter"
        )
    return scope


class HFTarget:
    """The part of a transformers (or PEFT) model that travels; `state()` shares storage with the model.

    scope: "trainable" (default), "adapter" or "model", as `resolve_scope` returns it."""

    def __init__(self, model: Any, scope: str = "trainable") -> None:
        self.model = model
        if scope == "model":
            self.kind = "model"
        elif is_peft(model):
            prompt = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
            self.kind = "peft-prompt" if prompt else "peft"
        else:
            self.kind = "trainable"

    def state(self) -> dict[str, Any]:
        if self.kind == "peft":
            from peft import get_peft_model_state_dict

            return dict(get_peft_model_state_dict(self.model, adapter_name=_adapter(self.model)))
        if self.kind == "model":
            return dict(self.model.state_dict())
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable(self) -> set[str]:
        """The state's names that an optimizer trains: all of them but the "model" scope's frozen ones and buffers."""
        if self.kind == "model":
            return {n for n, p in self.model.named_parameters() if p.requires_grad}
        return set(self.state())

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        import torch

        from fl_plugins.integrations._torch import same_storage
        from fl_plugins.lora_ranks import fit_ranks

        local = self.state()
        params = fit_ranks(params, local)  # a global adapter of a larger rank: cut to this model's (targets.py)
        todo = {k: v for k, v in params.items() if not same_storage(v, local.get(k))}
        if not todo:
            return
        if self.kind == "peft":
            from peft import set_peft_model_state_dict

            whole = {**local, **todo}  # peft looks up every adapter key (modules_to_save too): the rest as it is
            result = set_peft_model_state_dict(
                self.model, {k: torch.as_tensor(v) for k, v in whole.items()}, adapter_name=_adapter(self.model)
            )
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


def sharded_hf(root: Any, model: Any, kind: str) -> Any:
    """The target of a model the Trainer's FSDP shards (None: `root` is not sharded): `root` as the Trainer holds it
    (FSDP1's wrapper, or the model itself under FSDP2), `model` the transformers or PEFT model in it, `kind` what
    HFTarget would exchange."""
    from fl_plugins.integrations.sharded import ShardedTarget, is_sharded

    if not is_sharded(root):
        return None
    if kind == "peft-prompt":
        raise ConfigError(
            "a prompt-learning PEFT model (p-tuning, prefix tuning) under FSDP is not supported: its prompt "
            "encoder is small, train it with DDP (torchrun) and drop the fsdp argument"
        )
    scope = "peft" if kind == "peft" else kind
    return ShardedTarget(root, scope, model if kind == "peft" else None, _adapter(model))


def exchanged_state(model: Any, params_scope: str = "trainable") -> dict[str, Any]:
    """What a round exchanges for `model` under `params_scope` (for reports and tests)."""
    model = unwrap(model)
    return HFTarget(model, resolve_scope(model, params_scope, "exchanged_state()")).state()


def _adapter(model: Any) -> str:
    """The PEFT model's active adapter (the one that trains and travels; "default" unless named)."""
    name = getattr(model, "active_adapter", "default")
    return name if isinstance(name, str) else "default"
