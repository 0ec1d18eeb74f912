"""A torch module as the round driver's model target."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


class ModuleTarget:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        """Copy `params` into the module in place (on its device). Tensors received straight into the module's
        own storage are already there and are skipped."""
        local = self.module.state_dict()
        params = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in params.items()}
        todo = {k: v for k, v in params.items() if not _same_storage(v, local.get(k))}
        if not todo:
            return
        if strict and len(todo) == len(local):
            self.module.load_state_dict(todo, strict=True)
        else:  # keys were checked by the driver; the rest are already in place
            self.module.load_state_dict(todo, strict=False)


def _same_storage(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    )


def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every rank's module state with rank `src`'s, tensor by tensor and in place (collective: every
    rank of the default process group calls it, with the same architecture)."""
    broadcast_tensors(module.state_dict().values(), src)


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
