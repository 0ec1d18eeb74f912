"""SCAFFOLD at a site (Karimireddy et al., ICML 2020): the site's control variate c_i, the correction applied after
every optimizer step, and the new c_i⁺ sent with the round's update. The round driver uses it when the global
model it receives holds control variates (`scaffold.c.NAME`, aggregator/scaffold.py: an aggregator started with
`--strategy scaffold`); the integrations apply it through the driver, as FedProx.

With x the round's global model, c its control variates (received beside it, never loaded into the model) and y
the site's weights, for the tensors the optimizer trains:

    open        the correction is c - c_i (c_i: zeros in the process's first round, then the last c_i⁺)
    each step   y <- y - lr (c - c_i)  after the optimizer's step at learning rate lr (the lr the step used):
                with SGD, exactly the paper's y <- y - lr (g(y) - c_i + c); with momentum or Adam the correction
                is decoupled from the optimizer (the usual practice), as FedProx's pull is
    round end   c_i⁺ = c_i - c + (x - y) / Σ_k lr_k  (the paper's option II; Σ_k lr_k over the round's steps,
                K lr for a constant rate), sent as `scaffold.c.NAME` with the FULL update; then c_i <- c_i⁺

Other floating-point tensors that travel (a BatchNorm's running statistics, a frozen weight of the "model" scope)
are not corrected and send a zero control variate. c_i lives in this process's memory (CPU, float32) for its life:
a site that restarts starts again from zeros. Memory: c_i on the CPU, and the correction and a copy of x beside
the model on its device, each the size of what travels (for a PEFT model, the adapter).

Multi-process training (DDP): every rank corrects its weights; rank 0 computes c - c_i and broadcasts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fl_plugins.errors import ModelMismatchError
from fl_plugins.integrations.tasks import Collective
from fl_plugins.wire.layout import CONTROL_VARIATE


class ControlVariates:
    """A site's SCAFFOLD state: its control variate c_i, and the round at hand's correction."""

    def __init__(self) -> None:
        self.own: dict[str, torch.Tensor] = {}  # c_i by name (CPU, float32); absent: zero
        self.sent: list[str] = []  # every floating-point tensor that travels: each sends a control variate
        self.names: list[str] = []  # those the optimizer trains, corrected after every step
        self.live: list[torch.Tensor] = []  # ... their tensors (sharing the model's storage)
        self.correction: list[torch.Tensor] = []  # ... c - c_i, float32, on each tensor's device
        self.start: list[torch.Tensor] = []  # ... x, the round's global model (rank 0)
        self.lr_sum = 0.0

    def open(
        self,
        state: Mapping[str, Any],
        trainable: set[str] | None,
        received: Mapping[str, Any] | None,
        collective: Collective | None = None,
    ) -> None:
        """A round opens with its global model loaded in `state` (the live tensors): `received` holds its control
        variates c by wire name (rank 0; None on the other ranks, which get rank 0's correction through
        `collective`). `trainable`: the names in `state` the optimizer trains (None: every floating-point one)."""
        floats = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if received is not None:
            missing = [k for k in floats if CONTROL_VARIATE + k not in received]
            if missing:
                raise ModelMismatchError(
                    f"the global model holds SCAFFOLD control variates, but none for {missing[:5]}: the aggregator "
                    "gives every floating-point tensor of its model one; load the model it sends (strict)"
                )
        self.sent = floats
        self.names = [k for k in floats if trainable is None or k in trainable]
        self.live = [state[k] for k in self.names]
        self.correction = [self._correction(k, v, received) for k, v in zip(self.names, self.live, strict=True)]
        if collective is not None:
            collective.broadcast_tensors(self.correction)
        self.start = [v.detach().clone() for v in self.live] if received is not None else []
        self.lr_sum = 0.0

    def _correction(self, name: str, live: torch.Tensor, received: Mapping[str, Any] | None) -> torch.Tensor:
        if received is None:  # another rank: filled by rank 0's broadcast
            return torch.empty(live.shape, dtype=torch.float32, device=live.device)
        c = torch.as_tensor(received[CONTROL_VARIATE + name]).to(torch.float32)
        mine = self.own.get(name)
        return (c - mine if mine is not None else c.clone()).to(live.device)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """After an optimizer step at learning rate `lr`: y <- y - lr (c - c_i)."""
        if self.live:
            torch._foreach_add_(self.live, self.correction, alpha=-lr)
        self.lr_sum += lr

    @torch.no_grad()
    def update(self, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Rank 0, at the round's end (the weights y in `state`): c_i⁺ = (x - y) / Σ lr - (c - c_i) for each trained
        tensor (c_i again when no step was taken), zero for the other floating-point ones; c_i <- c_i⁺. Returns
        them under their wire names, to send with the update."""
        for name, x, corr in zip(self.names, self.start, self.correction, strict=True):
            if self.lr_sum > 0:
                new = (x.float() - state[name].float()).div_(self.lr_sum).sub_(corr).cpu()
            else:  # no step: c_i stays
                new = self.own.get(name, torch.zeros(x.shape, dtype=torch.float32))
            self.own[name] = new
        trained = set(self.names)
        return {
            CONTROL_VARIATE + k: self.own[k] if k in trained else torch.zeros(state[k].shape, dtype=torch.float32)
            for k in self.sent
        }
