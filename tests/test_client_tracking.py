"""FLARE's client-side tracking writers (`from nvflare.client.tracking import SummaryWriter` becomes
`from fl_plugins.client.tracking import SummaryWriter`): each call reaches RUN_DIR/logs.jsonl through flare.log,
and the aggregator's trackers turn its numbers into points. Over the in-memory transport: no socket."""

from __future__ import annotations

import numpy as np
import pytest

import fl_plugins.client as flare
from fl_plugins.client.tracking import MLflowWriter, SummaryWriter, TBWriter, WandBWriter
from fl_plugins.errors import ConfigError
from fl_plugins.tracking import Converter

pytestmark = pytest.mark.usefixtures("no_sockets")


@pytest.fixture
def fed(in_memory):
    return in_memory(rounds=1, initial={"w": np.zeros(3, np.float32)})


def test_a_flare_script_that_tracks_runs_with_the_import_swapped(fed):
    fed.activate("site-1")
    tb, mlflow, wandb = SummaryWriter(), MLflowWriter(), WandBWriter()
    m = flare.receive()
    for step in range(2):
        tb.add_scalar("loss", 1.0 / (step + 1), global_step=step)
    tb.add_scalars("acc", {"train": 0.5, "val": 0.25}, global_step=1)
    mlflow.log_param("lr", 0.01)
    mlflow.log_params({"epochs": 2, "opt": "sgd"})
    mlflow.log_metric("mlflow_loss", 0.75, step=3)
    mlflow.log_metrics({"precision": 0.6, "recall": 0.4}, step=3)
    mlflow.set_tag("model", "mlp")
    mlflow.set_tags({"data": "toy"})
    mlflow.log_text("notes", "notes/run.txt")
    wandb.log({"wandb_loss": 0.5}, step=4)
    flare.send(flare.FLModel(params=m.params))
    logs = fed.logs()
    got = [(r["key"], r["data_type"], r.get("global_step"), r["value"]) for r in logs]
    assert got == [
        ("loss", "SCALAR", 0, 1.0),
        ("loss", "SCALAR", 1, 0.5),
        ("acc", "SCALARS", 1, {"train": 0.5, "val": 0.25}),
        ("lr", "PARAMETER", None, 0.01),
        ("params", "PARAMETERS", None, {"epochs": 2, "opt": "sgd"}),
        ("mlflow_loss", "METRIC", 3, 0.75),
        ("metrics", "METRICS", 3, {"precision": 0.6, "recall": 0.4}),
        ("model", "TAG", None, "mlp"),
        ("tags", "TAGS", None, {"data": "toy"}),
        ("text", "TEXT", None, "notes"),
        ("metrics", "METRICS", 4, {"wandb_loss": 0.5}),
    ]
    assert {r["writer"] for r in logs} == {"TORCH_TB", "MLFLOW", "WANDB"}
    assert all(r["site"] == "site-1" and r["round"] == 0 for r in logs)
    assert [r["path"] for r in logs if r["key"] == "text"] == ["notes/run.txt"]
    # the aggregator's trackers see the numbers, each at the site's own step
    conv = Converter()
    points = {(p.name, p.step, p.value) for r in logs for p in conv.log_record(r) if p.name != "round"}
    want = {("loss", 1, 0.5), ("acc/val", 1, 0.25), ("metrics/recall", 3, 0.4), ("metrics/wandb_loss", 4, 0.5)}
    assert {(f"site-1/{name}", step, v) for name, step, v in want} <= points, points
    assert TBWriter is SummaryWriter and MLflowWriter().get_writer_name() == "MLFLOW"


def test_a_writer_before_init_says_to_call_init_first():
    with pytest.raises(ConfigError, match="init"):
        SummaryWriter().add_scalar("loss", 1.0)
