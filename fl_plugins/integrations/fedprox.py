"""FedProx for any torch model: the proximal term over the tensors that travel, and its anchor (the round's global
model). The round driver anchors it when a round's global model is loaded; the integrations use it through the driver.

FedProx adds  mu/2 * sum_k |w_k - g_k|^2  to a site's loss (w: the weights that travel, g: the round's global
model), whose gradient is  mu * (w - g).  Two ways to apply it:

    term(params)   the term itself, for a training step to add to its loss: autograd then adds mu * (w - g)
                   to each weight's gradient, and the optimizer (Adam's moments included) sees it
    pull(lr)       the term's gradient step on its own, after each optimizer step:  w <- w - lr * mu * (w - g),
                   decoupled from the optimizer (as AdamW decouples weight decay), so it acts the same under Adam
                   or SGD. One fused lerp over every tensor (w + lr*mu * (g - w)), no temporaries; the HF
                   callback's `proximal_mu` uses this

The anchor costs one copy of what travels (the adapter only, for PEFT). Only floating-point tensors are anchored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class Proximal:
    """FedProx's proximal term with weight `mu` (> 0), anchored at a round's global model."""

    def __init__(self, mu: float) -> None:
        if not mu > 0:
            raise ValueError(f"the proximal term's mu must be > 0 (got {mu!r})")
        self.mu = float(mu)
        self.names: list[str] = []
        self.live: list[torch.Tensor] = []  # views of the model's own tensors (they share its storage)
        self.global_model: list[torch.Tensor] = []  # copies of them: the round's global model

    def anchor(self, state: Mapping[str, Any]) -> None:
        """The round's global model is loaded in `state` (live tensors, sharing the model's storage): keep them,
        and a copy of them as the anchor."""
        named = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        self.names = [k for k, _ in named]
        self.live = [v for _, v in named]
        self.global_model = [v.detach().clone() for v in self.live]

    def term(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """mu/2 * sum |w - g|^2 over the anchored tensors, with `params` (name -> parameter, e.g.
        `dict(model.named_parameters())`, under the anchored names) as w: differentiable in them."""
        total: Any = 0.0
        for name, g in zip(self.names, self.global_model, strict=True):
            w = params.get(name)
            if w is not None:
                total = total + (w - g.to(w.device, w.dtype)).pow(2).sum()
        if not isinstance(total, torch.Tensor):
            return torch.zeros(())
        return 0.5 * self.mu * total

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        """w <- w - lr * mu * (w - g) for every anchored tensor, in place."""
        if self.live:
            torch._foreach_lerp_(self.live, self.global_model, lr * self.mu)
