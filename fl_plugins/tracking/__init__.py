"""Experiment tracking: stream a run's records to MLflow, TensorBoard and Weights & Biases.

The aggregator writes two files into the run directory, and this module only reads them (it never touches the
aggregator, so it works the same for `fl-plugins run` and a standalone `fl-plugins server`):

    RUN_DIR/metrics.jsonl   "update" records (site, round, bytes, seconds, the global model's metrics at the site)
                            and "round" records (round time, the weighted metrics of the round)
    RUN_DIR/logs.jsonl      what the sites send with `flare.log(key, value, "SCALAR", step=global_step)`, including
                            the trainers' own logs that the Lightning and HF integrations forward

`Tracking` tails both files in a background thread (record_files.JsonlTail: whole lines only, from where it stopped),
turns each record into `Point`s and hands them to every tracker of the recipe's `tracking:` key. Names
(TensorBoard tags, W&B keys; in MLflow the part after `SITE/` is the metric key of that site's nested run):

    global/<metric>                 the round's weighted metrics of the global model      step = round
    aggregator/round_seconds        round time; also checkpoint_seconds, sites (updates    step = round
    aggregator/bytes, gbps, ...     in the round), bytes uploaded, GB/s, peak_rss_mb
    SITE/global_model/<metric>      the global model evaluated at SITE (its update's metrics)  step = round
    SITE/update/bytes, seconds,     SITE's upload: bytes, seconds, GB/s (bytes / seconds)  step = round
      gbps, weight
    SITE/<key>                      SITE's `flare.log` records, e.g. SITE/train_loss        step = the record's
                                                                                            `step` (global step),
                                                                                            else the round
    SITE/round                      the round SITE was in at that global step              step = global step

- MLflow: one parent run for the job (global/ and aggregator/ figures, the job's parameters) and one nested run
  per site (tag `site`). Default store: `sqlite:///RUN_DIR/mlruns/mlflow.db`, artifacts in RUN_DIR/mlruns/artifacts
  (MLflow's plain-file store is deprecated: MLflow 3 refuses it unless MLFLOW_ALLOW_FILE_STORE is set); no server.
  `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlruns/mlflow.db` shows it. MLflow's usage telemetry is turned
  off (MLFLOW_DISABLE_TELEMETRY, unless the environment sets it).
- TensorBoard: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`), plain scalars
  written with tensorboard's own event writer (tensorboardX when tensorboard is not installed): no torch or
  TensorFlow in the aggregator.
- Weights & Biases: always offline, in RUN_DIR/wandb (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later);
  nothing is sent over the network.

A tracker that fails while the run goes on is logged and dropped; the federation never fails for it.

The package: _spec.py (the `tracking:` key), _points.py (records to Points, the Tracker protocol), one module per
tracker (_mlflow.py, _tensorboard.py, _wandb.py) and _tracking.py (the thread that tails the run directory through
fl_plugins.records and feeds the trackers).
"""

from __future__ import annotations

from fl_plugins.tracking._points import Converter, Point, Tracker
from fl_plugins.tracking._spec import TRACKERS, TrackerSpec, check_installed, parse_tracking
from fl_plugins.tracking._tracking import POLL, Tracking, peak_rss

__all__ = [
    "Converter",
    "POLL",
    "Point",
    "TRACKERS",
    "Tracker",
    "TrackerSpec",
    "Tracking",
    "check_installed",
    "parse_tracking",
    "peak_rss",
]
