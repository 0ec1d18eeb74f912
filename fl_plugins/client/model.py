"""FLModel and ParamsType, with NVIDIA FLARE's fields and meaning."""

from __future__ import annotations

import enum
import json
import math
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
    NUM_EVAL_SAMPLES = "NUM_EVAL_SAMPLES"  # an evaluation's sample count: weights the sites' mean
    SUBMIT_MODEL_NAME = "submit_model_name"  # a SUBMIT_MODEL task's: "best_model"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"


@dataclass(repr=False)
class FLModel:
    """A model (or an update) with its round and metrics: NVIDIA FLARE's FLModel, field for field.

    params_type defaults to FULL when params are given (FLARE's rule); "FULL"/"DIFF" strings are accepted."""

    params_type: ParamsType | str | None = None
    params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.params_type is None and self.params is not None:
            self.params_type = ParamsType.FULL
        if self.params_type is not None:
            try:
                self.params_type = ParamsType(str(self.params_type).upper())
            except ValueError:
                from fl_plugins.errors import ConfigError

                raise ConfigError(f"params_type must be FULL or DIFF (got {self.params_type!r})") from None
        if self.meta is None:
            self.meta = {}

    def summary(self) -> dict[str, Any]:
        """FLARE's summary, key for key: each field that holds a value (FLARE tests truthiness, so 0, {} and ""
        are left out too) maps to the length of a dict (`params` -> the number of tensors), the value itself for
        an int or a ParamsType, and the value's type for anything else. Never the tensors themselves."""
        fields = {
            "params": self.params,
            "optimizer_params": self.optimizer_params,
            "metrics": self.metrics,
            "meta": self.meta,
            "params_type": self.params_type,
            "start_round": self.start_round,
            "current_round": self.current_round,
            "total_rounds": self.total_rounds,
        }
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if not value:
                continue
            if isinstance(value, dict):
                out[key] = len(value)
            elif isinstance(value, ParamsType | int):
                out[key] = value
            else:
                out[key] = type(value)
        return out

    def __str__(self) -> str:
        return f"FLModel({self.summary()})"

    __repr__ = __str__  # the summary, not every tensor of the model


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with every value JSON can carry: numpy/torch scalars as numbers, NaN/Inf and other objects as text."""

    def conv(v: Any) -> Any:
        if isinstance(v, (str, bool)) or v is None:
            return v
        if isinstance(v, (int, float)):
            return v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
        if hasattr(v, "item"):  # numpy / torch scalars and one-element tensors
            try:
                return conv(v.item())
            except (ValueError, RuntimeError):
                return str(v)
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return str(v)

    out = {str(k): conv(v) for k, v in d.items()}
    json.dumps(out)
    return out


def final_of(client: Any, task: Any, kept: Any, params_format: str, into: dict[str, Any] | None) -> FLModel | None:
    """The job's final global model as END (`task`) names it: read from a swarm site's kept final/ folder
    (`kept`), else downloaded (`client`: a SiteClient); None when END names none."""
    from fl_plugins import tensors

    if kept is not None:
        params = tensors.read_folder(kept, params_format)
    elif task.manifest_json:
        params = client.download(task, params_format, into=into)[1]
    else:
        return None
    meta = {"job_id": task.job_id, "current_round": task.round, "final": True}
    return FLModel(ParamsType.FULL, params, current_round=task.round, total_rounds=task.total_rounds, meta=meta)
