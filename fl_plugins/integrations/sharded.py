"""A model sharded across processes (FSDP) as the round driver's model target: its state travels gathered.

Under FSDP each rank holds a shard of every weight (FSDP2's `fully_shard`: DTensor parameters; FSDP1's
FullyShardedDataParallel: flat shards), so no rank's `state_dict()` is the model. `ShardedTarget` holds the whole
state on global rank 0 only, between two collective calls that every rank makes at the same points:

    gather()     every rank: the full state (or only its trainable part) is gathered into CPU memory on rank 0
                 (torch.distributed.checkpoint's get_model_state_dict, full_state_dict + cpu_offload)
    state()      rank 0: that copy, under the wire names (the other ranks hold nothing: {})
    load(p)      rank 0: the tensors to put into the model, kept until scatter()
    scatter()    every rank: rank 0's tensors go into every rank's shards (set_model_state_dict with
                 broadcast_from_rank0); the gathered copy is dropped

The round driver calls them through `targets.gather` / `targets.spread` / `targets.release`: where a task opens
(before rank 0 receives and loads: the copy is what the global model is received into and checked against), where
a round ends (before rank 0 sends), around an evaluation and a submission, and for the final model. Rank 0's
host memory holds one copy of what travels at those points (the adapter, or the whole model for a full
fine-tune), never the GPU.

Which tensors travel (`scope`, as hf_model.py resolves it): "model" (every tensor of the state dict), "trainable"
(the parameters that require a gradient; frozen ones are not even gathered), "peft" (a PEFT model's adapter,
named as peft's `get_peft_model_state_dict` names it, which is what an unsharded site sends).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from fl_plugins.errors import ConfigError
from fl_plugins.lora_ranks import fit_ranks

_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def is_sharded(model: Any) -> bool:
    """Whether `model` is sharded across processes: FSDP1 units in it, or FSDP2 (DTensor) parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedTarget:
    """The round driver's target over a sharded `module` (see the module docstring). `peft_model`: the PEFT model
    inside `module` (scope "peft"), whose adapter names the wire uses; `adapter`: its active adapter."""

    sharded = True

    def __init__(self, module: Any, scope: str = "model", peft_model: Any = None, adapter: str = "default") -> None:
        if scope not in ("model", "trainable", "peft"):
            raise ConfigError(
                f"a sharded (FSDP) model exchanges its whole state, its trainable parameters or a LoRA-style "
                f"adapter; {scope!r} is not supported sharded: train it with DDP"
            )
        self.module, self.scope, self.peft_model, self.adapter = module, scope, peft_model, adapter
        from torch.distributed.fsdp import FullyShardedDataParallel

        flat = [
            m
            for m in module.modules()
            if isinstance(m, FullyShardedDataParallel) and not getattr(m, "_use_orig_params", True)
        ]
        if flat and scope != "model":
            raise ConfigError(
                "FSDP with use_orig_params=False flattens the parameters, so the trainable ones (or an adapter) "
                "cannot be told apart: set use_orig_params=True (the Trainer's fsdp_config: use_orig_params: true, "
                "its default) or exchange the whole model"
            )
        self.kind = scope
        self.full: dict[str, Any] | None = None  # rank 0, between gather() and scatter(): wire name -> tensor
        self.names: dict[str, str] = {}  # wire name -> the module's state-dict name (rank 0, from gather())
        self.pending: dict[str, Any] = {}  # rank 0: what scatter() puts into the shards, by state-dict name
        self.size = (0, 0)  # rank 0: (tensors, bytes) of the last gathered state

    @staticmethod
    def _rank() -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def gather(self) -> None:
        """Collective: rank 0 gets the state that travels, in CPU memory."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._reshard()
        frozen_out = self.scope != "model"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen_out)
        full = get_model_state_dict(self.module, options=options)
        if self._rank() != 0:
            return
        self.names = self._wire_names(full)
        self.full = {w: full[k] for w, k in self.names.items()}
        self.size = (len(self.full), sum(t.numel() * t.element_size() for t in self.full.values()))

    def _wire_names(self, full: Mapping[str, Any]) -> dict[str, str]:
        if self.scope == "model":
            return {k: k for k in full}
        if self.scope == "trainable":
            params = {_WRAPPERS.sub("", n) for n, p in self.module.named_parameters() if p.requires_grad}
            return {k: k for k in full if k in params}
        from peft import get_peft_model_state_dict

        wire = get_peft_model_state_dict(self.peft_model, state_dict=dict(full), adapter_name=self.adapter)
        by_id = {id(t): k for k, t in full.items()}  # peft renames, and hands back the same tensors
        names = {w: by_id.get(id(t)) for w, t in wire.items()}
        lost = [w for w, k in names.items() if k is None]
        if lost:
            raise ConfigError(f"the sharded PEFT model's adapter tensors {lost[:3]} are not in its state dict")
        return {w: k for w, k in names.items() if k is not None}

    def state(self) -> dict[str, Any]:
        if self._rank() != 0:
            return {}
        if self.full is None:
            raise RuntimeError("a sharded model's state is read only between gather() and scatter() (round driver)")
        return self.full

    def trainable(self) -> set[str]:
        if self.scope != "model":
            return set(self.names)
        params = {_WRAPPERS.sub("", n) for n, p in self.module.named_parameters() if p.requires_grad}
        return {w for w, k in self.names.items() if k in params}

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        """Rank 0: keep `params` (wire names) for the next scatter(); names the model lacks are left out (the
        driver's strict check has named them)."""
        if self._rank() != 0:
            return
        params = fit_ranks(params, self.full) if self.full is not None else params
        if not self.names and self.scope != "peft":  # not gathered by this target: the names are the module's
            self.names = {k: k for k in params}
        for w, v in params.items():
            if w in self.names:
                self.pending[self.names[w]] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)

    def scatter(self) -> None:
        """Collective: rank 0's loaded tensors into every rank's shards; the gathered copy is dropped."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self._reshard()
        pending, self.pending = (self.pending if self._rank() == 0 else {}), {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.module, pending, options=options)
        self.release()

    def _reshard(self) -> None:
        """FSDP2 leaves the root's parameters unsharded after a forward without backward (an evaluation): shard
        them again, so that the state dict holds the shards (DTensors) that a load writes into."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - torch < 2.6
            return
        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def release(self) -> None:
        self.full = None

    def nbytes(self) -> int:
        return self.size[1]
