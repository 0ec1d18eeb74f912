"""How the counted updates of a round become the next global model: the `Strategy` protocol.

A strategy folds each verified chunk of an update as it arrives (`check` then `fold`, on the stream's thread,
concurrently for different sites), learns an update's weight once it is counted (`add_weight`), and at the
close yields the new global model tensor by tensor, in blocks (`finalize`, then `checked`). `reset` starts a
round's (or a refold's) accumulation again; whatever the strategy keeps between rounds (a server optimizer's
moments) lives on the object and survives `reset`. The coordinator (core.py) never looks inside: FedAvg
(fedavg.py's `Accumulator`, folding in bounded memory) is the one strategy today, and server-side optimizers
plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from fl_plugins.aggregator.fedavg import Accumulator
from fl_plugins.errors import ConfigError
from fl_plugins.wire.layout import TensorInfo


class Strategy(Protocol):
    @property
    def weight(self) -> float:
        """The total weight of the updates counted since `reset`."""
        ...

    @property
    def nbytes(self) -> int:
        """The memory it holds for the round (its accumulators), in bytes."""
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

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """Blocks of the new global value of `tensor`; `read_global(e0, n)` reads the current global model."""
        ...

    def checked(self, tensor: TensorInfo, blocks: Iterator[np.ndarray], round_: int) -> Iterator[np.ndarray]:
        """`blocks` of `finalize`, each checked for NaN/Inf before it is written (ModelMismatchError)."""
        ...


STRATEGIES: dict[str, Callable[[list[TensorInfo]], Strategy]] = {"fedavg": Accumulator}


def make_strategy(name: str, tensors: list[TensorInfo]) -> Strategy:
    """The strategy called `name`, for a global model of `tensors`."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    return factory(tensors)
