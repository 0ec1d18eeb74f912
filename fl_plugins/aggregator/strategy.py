"""How the counted updates of a round become the next global model: the `Strategy` protocol and its registry.

A strategy folds each verified chunk of an update as it arrives (`check` then `fold`, on the stream's thread,
concurrently for different sites), learns an update's weight once it is counted (`add_weight`), and at the
close yields the new global model tensor by tensor, in blocks (`stage`, then `finalize` and `checked`). `reset`
starts a round's (or a refold's) accumulation again. The coordinator (core.py) never looks inside.

    name        class (module)                   state between rounds (global/round-R/strategy/)
    fedavg      FedAvg (optimizers.py, over      none
                fedavg.py's Accumulator)
    fedavgm     FedAvgM (optimizers.py)          m.npy: server momentum
    fedadam     FedAdam (optimizers.py)          m.npy, v.npy
    fedyogi     FedYogi (optimizers.py)          m.npy, v.npy
    fedadagrad  FedAdagrad (optimizers.py)       m.npy, v.npy
    scaffold    Scaffold (scaffold.py)           none (its control variates are tensors of the global model)
    hetlora     HetLoRA (lora.py)                none (LoRA factors of smaller ranks, zero-padded)
    flexlora    FlexLoRA (lora_flex.py)          none (LoRA factors of smaller ranks, SVD of the average product;
                                                 it keeps each update's factors until the close: `KeepsUpdates`)

config.py's `strategy` setting names one (checks.py's STRATEGIES lists the same names), `server_lr`,
`server_momentum`, `beta2` and `tau` its hyper-parameters; optimizers.py's docstring has the rules, scaffold.py
SCAFFOLD's. Round 0's global model gets what a strategy needs beside the initial model's tensors from
`extra_shards` (SCAFFOLD: zero control variates).

Memory: every strategy folds into fedavg.py's one float32 accumulator (resident, `nbytes`); a server
optimizer's state, one or two float32 buffers of the model's floating-point elements (`state_nbytes`), is
kept in files and read and written a block at a time through memmaps of that block (optimizers.py), so the
aggregator's resident memory is the accumulator plus a few MiB whichever strategy runs (flexlora also keeps the
counted updates' LoRA factors until the close: lora.py). Only floating-point
tensors get an optimizer; integer and BOOL tensors keep FedAvg's rules (fedavg.py).

State that must survive a restart is not kept on the object: the state after producing round R's model is
written with it into round R+1's staging directory (`stage`) and published with it (store.py), and the next
close reads it from there. A start that will train on (`check_resume`) checks the state of the round it
resumes was made by the configured strategy with the same hyper-parameters: another is a ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from fl_plugins.aggregator.lora import HetLoRA
from fl_plugins.aggregator.lora_flex import FlexLoRA
from fl_plugins.aggregator.optimizers import OPTIMIZERS, FedAvg, check_made_by, read_state
from fl_plugins.aggregator.scaffold import Scaffold, check_control_variates, control_variate_shards
from fl_plugins.aggregator.store import ExtraShards
from fl_plugins.errors import ConfigError
from fl_plugins.wire.layout import TensorInfo

if TYPE_CHECKING:
    from fl_plugins.config import AggregatorConfig


class Strategy(Protocol):
    @property
    def weight(self) -> float:
        """The total weight of the updates counted since `reset`."""
        ...

    @property
    def nbytes(self) -> int:
        """The memory it holds for the round (its accumulators), in bytes."""
        ...

    @property
    def state_nbytes(self) -> int:
        """The bytes of its state between rounds, on disk (0 for FedAvg)."""
        ...

    def check(self, tensor: TensorInfo, lo: int, payload: memoryview, *, finite: bool, weight: float) -> None:
        """Raise ModelMismatchError if bytes [lo, lo + len) of `tensor` must not be folded (NaN, overflow)."""
        ...

    def fold(self, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False) -> None:
        """Fold bytes [lo, lo + len) of an update's `tensor` (a DIFF update's when `diff`) with `weight`."""
        ...

    def add_weight(self, weight: float, params_type: str) -> None:
        """An update whose chunks were all folded is counted with `weight` ("FULL" or "DIFF")."""
        ...

    def reset(self) -> None:
        """Forget what was folded since the last reset (a new round, or a refold)."""
        ...

    def stage(self, previous: Path, staging: Path) -> None:
        """Before the close's `finalize` calls: read the state checkpointed with `previous` (global/round-R, the
        model being stepped from) and write the next into `staging` (round R+1's staging directory)."""
        ...

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """Blocks of the new global value of `tensor`; `read_global(e0, n)` reads the current global model."""
        ...

    def checked(self, tensor: TensorInfo, blocks: Iterator[np.ndarray], round_: int) -> Iterator[np.ndarray]:
        """`blocks` of `finalize`, each checked for NaN/Inf before it is written (ModelMismatchError)."""
        ...


@runtime_checkable
class KeepsUpdates(Protocol):
    """A strategy that needs each update's tensors together at the close (flexlora: a module's A and B): uploads.py's
    FoldSink hands it every chunk with the upload it belongs to, instead of `fold`."""

    def fold_update(
        self, key: str, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False
    ) -> None:
        """`fold` of the update `key` (its upload's id)."""
        ...


STRATEGIES: dict[str, type[FedAvg]] = {
    FedAvg.name: FedAvg,
    **OPTIMIZERS,
    Scaffold.name: Scaffold,
    HetLoRA.name: HetLoRA,
    FlexLoRA.name: FlexLoRA,
}


def _strategy_class(config: AggregatorConfig) -> type[FedAvg]:
    try:
        return STRATEGIES[config.strategy]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"unknown aggregation strategy {config.strategy!r}; known: {known}") from None


def make_strategy(config: AggregatorConfig, tensors: list[TensorInfo]) -> Strategy:
    """The strategy `config` names, with its hyper-parameters, for a global model of `tensors` (ConfigError if
    their control variates do not fit it: scaffold.py `check_control_variates`)."""
    cls = _strategy_class(config)
    check_control_variates(cls.name, tensors)
    return cls.from_config(config, tensors)


def extra_shards(config: AggregatorConfig) -> ExtraShards | None:
    """What round 0's global model gets beside an initial model's own shards (store.py `ExtraShards`, for
    `import_initial` and offer.py): SCAFFOLD's zero control variates; None for the other strategies."""
    return control_variate_shards if config.strategy == Scaffold.name else None


def check_resume(config: AggregatorConfig, checkpoint: Path | None) -> None:
    """At a start: ConfigError if `config`'s strategy settings do not hold together (a momentum of 1), or if
    `checkpoint` (global/round-R with R > 0, the round a start resumes and trains on; None: none) holds the state
    of another strategy or other hyper-parameters than `config`'s (none there: FedAvg made it)."""
    cls = _strategy_class(config)
    hyper = cls.hyper_parameters(config)
    if checkpoint is not None:
        check_made_by(read_state(checkpoint), cls.name, hyper, checkpoint)
