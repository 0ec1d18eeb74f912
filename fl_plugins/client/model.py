"""FLModel and ParamsType, with NVIDIA FLARE's fields and meaning."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ParamsType(str, enum.Enum):
    """FULL: the whole model. DIFF: local minus global; the aggregator adds the average DIFF to the global
    model. A plain string "FULL"/"DIFF" is accepted wherever a ParamsType is."""

    FULL = "FULL"
    DIFF = "DIFF"

    def __str__(self) -> str:
        return self.value


class MetaKey:
    """Well-known `FLModel.meta` keys (FLARE's names)."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"


@dataclass
class FLModel:
    params_type: ParamsType | str | None = None
    params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.params_type is not None:
            try:
                self.params_type = ParamsType(str(self.params_type).upper())
            except ValueError:
                from fl_plugins.errors import ConfigError

                raise ConfigError(f"params_type must be FULL or DIFF (got {self.params_type!r})") from None
        if self.meta is None:
            self.meta = {}

    def summary(self) -> dict[str, Any]:
        """A short description: shapes instead of values, like FLARE's."""
        def shapes(d):
            return None if d is None else {k: tuple(getattr(v, "shape", ())) for k, v in d.items()}

        return {
            "params_type": str(self.params_type) if self.params_type else None,
            "params": shapes(self.params) if self.params is not None else None,
            "num_params": None if self.params is None else len(self.params),
            "optimizer_params": shapes(self.optimizer_params),
            "metrics": self.metrics,
            "start_round": self.start_round,
            "current_round": self.current_round,
            "total_rounds": self.total_rounds,
            "meta": self.meta,
        }

    def __str__(self) -> str:
        return f"FLModel({self.summary()})"
