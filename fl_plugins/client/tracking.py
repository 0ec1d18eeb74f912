"""NVIDIA FLARE's client-side tracking writers, name for name: `from fl_plugins.client.tracking import
SummaryWriter` where a FLARE script imports it from `nvflare.client.tracking`.

Each call becomes one `flare.log` record (fl_plugins/client/api.py): the site sends it to the aggregator, which
appends it to RUN_DIR/logs.jsonl, and the job's trackers (a recipe's `tracking:`, fl_plugins/tracking/) turn its
numbers into points at the site's `global_step`. A record carries the FLARE data type (`SCALAR`, `SCALARS`,
`METRIC`, `METRICS`, `PARAMETER`, `PARAMETERS`, `TAG`, `TAGS`, `TEXT`) and the writer it came from (`TORCH_TB`,
`MLFLOW`, `WANDB`). Parameters, tags and text are kept in logs.jsonl; the trackers chart numbers only. A writer
used before `flare.init()` raises a ConfigError saying so, as `flare.log` does.
"""

from __future__ import annotations

from typing import Any

from fl_plugins.client import api

TORCH_TB, MLFLOW, WANDB = "TORCH_TB", "MLFLOW", "WANDB"


class SummaryWriter:
    """TensorBoard's `SummaryWriter` calls, sent to the aggregator."""

    def add_scalar(self, tag: str, scalar: float, global_step: int | None = None, **kwargs: Any) -> None:
        api.log(tag, scalar, "SCALAR", global_step=global_step, writer=TORCH_TB, **kwargs)

    def add_scalars(self, tag: str, scalars: dict[str, float], global_step: int | None = None, **kwargs: Any) -> None:
        """Several scalars under one parent tag (charted as `tag/name`)."""
        api.log(tag, scalars, "SCALARS", global_step=global_step, writer=TORCH_TB, **kwargs)


TBWriter = SummaryWriter  # FLARE's older name


class WandBWriter:
    """Weights & Biases' `wandb.log`, sent to the aggregator."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        api.log("metrics", metrics, "METRICS", global_step=step, writer=WANDB)


class MLflowWriter:
    """MLflow's fluent calls (`log_metric`, `log_params`, `set_tag`, ...), sent to the aggregator."""

    def get_writer_name(self) -> str:
        return MLFLOW

    def log_param(self, key: str, value: Any) -> None:
        api.log(key, value, "PARAMETER", writer=MLFLOW)

    def log_params(self, values: dict[str, Any]) -> None:
        api.log("params", values, "PARAMETERS", writer=MLFLOW)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        api.log(key, value, "METRIC", global_step=step, writer=MLFLOW)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        api.log("metrics", metrics, "METRICS", global_step=step, writer=MLFLOW)

    def log_text(self, text: str, artifact_file_path: str) -> None:
        api.log("text", text, "TEXT", path=artifact_file_path, writer=MLFLOW)

    def set_tag(self, key: str, tag: Any) -> None:
        api.log(key, tag, "TAG", writer=MLFLOW)

    def set_tags(self, tags: dict[str, Any]) -> None:
        api.log("tags", tags, "TAGS", writer=MLFLOW)
