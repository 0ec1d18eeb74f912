"""What moves a site's weights after each optimizer step besides the optimizer: FedProx's pull toward the round's
global model (fedprox.py) and SCAFFOLD's drift correction (scaffold.py). The round driver holds one `Corrections`,
anchors it when a TRAIN round opens, and calls `step(lr)` after every optimizer step while the round is open;
torch is imported only when one of them is on.

    FedProx     on with `use_fedprox(mu)` (patch(..., proximal_mu=mu), FLTrainerCallback(proximal_mu=mu))
    SCAFFOLD    on for a round whose global model holds control variates (`scaffold.c.*`: an aggregator started
                with --strategy scaffold); the site's c_i lives as long as the process
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fl_plugins.errors import ConfigError
from fl_plugins.integrations.targets import ModelTarget, is_sharded_target, trainable_names
from fl_plugins.integrations.tasks import Collective

if TYPE_CHECKING:
    from fl_plugins.integrations.fedprox import Proximal
    from fl_plugins.integrations.scaffold import ControlVariates


class Corrections:
    def __init__(self) -> None:
        self.proximal: Proximal | None = None
        self.scaffold: ControlVariates | None = None  # SCAFFOLD's state: the site's c_i, the round's correction

    def use_fedprox(self, mu: float) -> None:
        """FedProx with weight `mu` (0: off)."""
        if mu > 0:
            from fl_plugins.integrations.fedprox import Proximal

            self.proximal = Proximal(mu)
        else:
            self.proximal = None

    def anchor(
        self, target: ModelTarget, scaffold: bool, variates: Mapping[str, Any] | None, collective: Collective | None
    ) -> None:
        """A TRAIN round opened with its global model in `target`, on every rank: FedProx anchors at it; with
        `scaffold`, SCAFFOLD takes the round's control variates c (`variates`, received by rank 0; the other ranks
        get rank 0's correction through `collective`)."""
        if is_sharded_target(target) and (self.proximal is not None or scaffold):
            raise ConfigError(
                "FedProx and SCAFFOLD correct each rank's whole weights after every step, and a sharded (FSDP) "
                "model's rank holds a shard: drop proximal_mu / the scaffold strategy, or train this site with DDP"
            )
        if self.proximal is not None:
            self.proximal.anchor(target.state())
        if not scaffold:
            self.scaffold = None
            return
        from fl_plugins.integrations.scaffold import ControlVariates

        self.scaffold = self.scaffold or ControlVariates()
        self.scaffold.open(target.state(), trainable_names(target), variates, collective)

    def step(self, lr: float | None) -> None:
        """After an optimizer step at learning rate `lr` (None: not known, nothing moves)."""
        if lr is None:
            return
        if self.proximal is not None:
            self.proximal.pull(lr)
        if self.scaffold is not None:
            self.scaffold.step(lr)

    def update(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """At the round's end (rank 0): what travels with the weights in `state` (SCAFFOLD's c_i⁺; else nothing)."""
        return self.scaffold.update(state) if self.scaffold is not None else {}
