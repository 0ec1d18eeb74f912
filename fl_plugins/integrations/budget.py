"""How much one round trains, and how much the round at hand has trained: the same for every trainer integration.

A `RoundBudget` is `epochs` or `steps` (optimizer steps) per round; None or a negative number: no limit of that kind
(Lightning's -1). Its three uses:

    limits(epochs_done, steps_done)   a trainer that runs one fit per round (Lightning's fit loop): the absolute
                                      limits of the next fit, one round's budget past what it has done
    over(rounds)                      a trainer that runs every round in one fit (the HF callback): that fit's
                                      budget, rounds x one round's
    spent(steps=n) / spent(epochs=n)  ... and whether the round at hand, n steps or epochs in, has trained its
                                      budget: a round boundary

`RoundBudget.checked(who, steps, epochs)` validates a user's `local_steps` / `local_epochs` (one or neither).
`RoundProgress` is what the round at hand has done; the round driver keeps one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fl_plugins.errors import ConfigError


@dataclass(frozen=True)
class RoundBudget:
    """One round's budget: `epochs` or `steps` (None or -1: no limit of that kind)."""

    epochs: float | None
    steps: int | None

    @classmethod
    def checked(cls, who: str, steps: Any = None, epochs: Any = None) -> RoundBudget | None:
        """The budget of a user's `local_steps` / `local_epochs` (None when neither is given); ConfigError, naming
        `who`, unless one at most is given, > 0 and finite, and the steps a whole number."""
        if steps is not None and epochs is not None:
            raise ConfigError(
                f"{who}: give local_steps or local_epochs, not both (got local_steps={steps!r}, "
                f"local_epochs={epochs!r}); one round trains either that many optimizer steps or that many epochs"
            )
        for name, v in (("local_steps", steps), ("local_epochs", epochs)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf):
                raise ConfigError(f"{who}: {name} must be > 0 and finite (got {v!r})")
        if steps is not None and not float(steps).is_integer():
            raise ConfigError(
                f"{who}: local_steps must be a whole number of optimizer steps (got {steps!r}); use local_epochs "
                "for fractions of an epoch"
            )
        if steps is None and epochs is None:
            return None
        return cls(epochs=None if epochs is None else float(epochs), steps=None if steps is None else int(steps))

    def limits(self, epochs_done: int, steps_done: int) -> tuple[float | None, int | None]:
        """The absolute limits for the next fit, given what the trainer has done so far."""
        e = self.epochs if self.epochs is None or self.epochs < 0 else epochs_done + self.epochs
        s = self.steps if self.steps is None or self.steps < 0 else steps_done + self.steps
        return e, s

    def over(self, rounds: int) -> RoundBudget:
        """The budget of one fit that trains `rounds` rounds. Rounds that end at an epoch's end need whole epochs."""
        if self.steps is not None and self.steps > 0:
            return RoundBudget(epochs=None, steps=rounds * self.steps)
        if self.epochs is not None and float(self.epochs) != int(self.epochs):
            raise ConfigError(
                f"local_epochs must be a whole number of epochs (got {self.epochs}); use local_steps for fractions "
                "of an epoch"
            )
        return RoundBudget(epochs=None if self.epochs is None else rounds * float(self.epochs), steps=None)

    def spent(self, *, steps: int | None = None, epochs: int | None = None) -> bool:
        """Whether a round `steps` optimizer steps (or `epochs` epochs) in has trained this budget; only the count
        given is compared, and only against a limit of its own kind."""
        if steps is not None and self.steps is not None and self.steps > 0:
            return steps >= self.steps
        if epochs is not None and self.epochs is not None and self.epochs > 0:
            return epochs >= self.epochs
        return False

    def __str__(self) -> str:
        return f"{self.steps} steps" if self.steps else f"{self.epochs:g} epochs"


@dataclass
class RoundProgress:
    """The round at hand: `open` (its global model is loaded and its update not yet sent), `fresh` (no training
    step has begun on that global model), the steps and epochs it has trained, the trainer's global step when it
    opened, and the round of the step being trained (a step's logs may come after the boundary moved on)."""

    open: bool = False
    fresh: bool = False
    steps: int = 0
    epochs: int = 0
    start_step: int = 0
    step_round: int | None = None

    def restart(self, opened: bool, step: int) -> None:
        self.open, self.fresh, self.steps, self.epochs, self.start_step = opened, opened, 0, 0, step
