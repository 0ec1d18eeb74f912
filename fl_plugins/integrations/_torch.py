"""torch for the trainer integrations: a torch module as the round driver's model target, and torch.distributed as
its `Collective` (rank 0's values and weights to every rank)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fl_plugins.lora_ranks import fit_ranks


class ModuleTarget:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state(self) -> dict[str, Any]:
        return self.module.state_dict()

    def trainable(self) -> set[str]:
        """The state's names that an optimizer trains: the parameters that require a gradient."""
        return {n for n, p in self.module.named_parameters() if p.requires_grad}

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        """Copy `params` into the module in place (on its device). Tensors received straight into the module's
        own storage are already there and are skipped."""
        local = self.module.state_dict()
        params = fit_ranks(params, local)  # a global LoRA adapter of a larger rank, cut to this module's (hetlora)
        params = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in params.items()}
        todo = {k: v for k, v in params.items() if not same_storage(v, local.get(k))}
        if not todo:
            return
        if strict and len(todo) == len(local):
            self.module.load_state_dict(todo, strict=True)
        else:  # keys were checked by the driver; the rest are already in place
            self.module.load_state_dict(todo, strict=False)


def same_storage(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are the same tensor memory (a tensor received in place into the model's own)."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    )


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast_tensors(tensors: Iterable[Any], src: int = 0) -> None:
    """Overwrite each tensor with rank `src`'s, in place (collective: every rank passes the same tensors)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if t.is_contiguous():
                dist.broadcast(t, src=src)
            else:
                buf = t.contiguous()
                dist.broadcast(buf, src=src)
                t.copy_(buf)


class TorchCollective:
    """The round driver's `Collective` over torch.distributed's default process group, from rank 0. Until that
    group exists, values and tensors stay as they are."""

    def broadcast(self, value: Any) -> Any:
        if not dist_ready():
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Iterable[Any]) -> None:
        if dist_ready():
            broadcast_tensors(tensors, src=0)
