"""Experiment tracking (fl_plugins/tracking/): the `tracking:` key, records to points, the tailer, and a real
federation streamed to MLflow, TensorBoard and W&B (offline), each read back with the tracker's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fl_plugins.errors import ConfigError, MissingDependencyError
from fl_plugins.recipe import load_recipe
from fl_plugins.tracking import Converter, TrackerSpec, Tracking, check_installed, parse_tracking

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "client_api_train.py"
INITIAL = ROOT / "recipes" / "quickstart-initial.safetensors"
SITES = ("site-1", "site-2", "site-3")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No tracker may reach the network or write outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


# -- the `tracking:` key ---------------------------------------------------------------------------------------


def test_tracking_forms():
    assert parse_tracking(None) == () and parse_tracking([]) == ()
    assert parse_tracking("mlflow, tensorboard") == (TrackerSpec("mlflow"), TrackerSpec("tensorboard"))
    assert parse_tracking(["wandb"]) == (TrackerSpec("wandb"),)
    specs = parse_tracking({"mlflow": None, "wandb": {"project": "p", "tags": ["a", "b"]}})
    assert specs == (TrackerSpec("mlflow"), TrackerSpec("wandb", {"project": "p", "tags": ("a", "b")}))


def _recipe(tmp_path: Path, tracking: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(f"script: {SCRIPT}\nsites: 2\nrounds: 1\n{tracking}\n")
    return p


@pytest.mark.parametrize(("text", "expected"), [
    ("tracking: [mlflow, tensorbord]",
     "`tracking[1]` must be one of mlflow, tensorboard, wandb (got 'tensorbord'); did you mean `tensorboard`?"),
    ("tracking: mlfow", "`tracking` must be one of mlflow, tensorboard, wandb (got 'mlfow'); did you mean `mlflow`?"),
    ("tracking: {wandb: {projct: x}}", "unknown key `tracking.wandb.projct`; did you mean `tracking.wandb.project`?"),
    ("tracking: {mlflow: {experiment: ''}}", "`tracking.mlflow.experiment` must be a non-empty string (got '')"),
    ("tracking: {wandb: {tags: a}}", "`tracking.wandb.tags` must be a list of strings (got 'a')"),
    ("tracking: [mlflow, mlflow]", "`tracking` names mlflow twice"),
    ("tracking: 3", "`tracking` must be a tracker name, a list of them or a mapping"),
    ("trackng: [mlflow]", "unknown key `trackng`; did you mean `tracking`?"),
])  # fmt: skip
def test_tracking_errors_name_the_file_and_key(tmp_path, text, expected):
    p = _recipe(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: ") and expected in str(e.value)


def test_default_is_no_tracking(tmp_path):
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml").tracking == ()
    assert load_recipe(_recipe(tmp_path, "tracking: {tensorboard: {log_dir: tb}}")).tracking == (
        TrackerSpec("tensorboard", {"log_dir": "tb"}),)  # fmt: skip


def test_a_missing_library_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MissingDependencyError) as e:
        check_installed(parse_tracking("tensorboard,mlflow"))
    assert "install it with: pip install 'fl-plugins[tracking]' (or: pip install mlflow)" in str(e.value)


def test_server_flag_is_validated(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["server", "--run-dir", str(run_dir), "--rounds", "1", "--tracking", "mlflow,tensorbord"]
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", *cmd], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "`--tracking` must be one of mlflow, tensorboard, wandb (got 'tensorbord')" in out.stderr
    assert not run_dir.exists()  # refused before anything was made


# -- records to points -----------------------------------------------------------------------------------------


def test_records_become_points():
    c = Converter()
    up = c.metrics_record({"event": "update", "round": 1, "attempt": 0, "site": "site-1", "weight": 19.0,
                           "bytes": 2_000_000, "seconds": 0.5, "metrics": {"val_acc": 0.9, "bad": float("nan")},
                           "time": 100.0})  # fmt: skip
    got = {(p.name, p.step, p.axis): p.value for p in up}
    assert got == {("site-1/global_model/val_acc", 1, "round"): 0.9, ("site-1/update/bytes", 1, "round"): 2e6,
                   ("site-1/update/seconds", 1, "round"): 0.5, ("site-1/update/gbps", 1, "round"): 0.004,
                   ("site-1/update/weight", 1, "round"): 19.0}  # fmt: skip
    rnd = c.metrics_record({"event": "round", "round": 1, "attempt": 0, "updates": 1, "seconds": 2.0,
                            "checkpoint_seconds": 0.1, "metrics": {"val_acc": 0.9}}, peak_rss=2**30)  # fmt: skip
    got = {p.name: p.value for p in rnd}
    assert got == {"global/val_acc": 0.9, "aggregator/round_seconds": 2.0, "aggregator/checkpoint_seconds": 0.1,
                   "aggregator/sites": 1.0, "aggregator/bytes": 2e6, "aggregator/gbps": 0.001,
                   "aggregator/peak_rss_mb": 1024.0}  # fmt: skip
    logs = [c.log_record({"round": 2, "key": "train_loss", "value": 0.41, "data_type": "SCALAR", "step": s,
                          "site": "site-1"}) for s in (37, 38)]  # fmt: skip
    assert [(p.name, p.step, p.axis, p.value) for p in logs[0]] == [("site-1/round", 37, "step", 2.0),
                                                                    ("site-1/train_loss", 37, "step", 0.41)]
    assert [p.name for p in logs[1]] == ["site-1/train_loss"]  # the round marker only where the round changes
    no_step = c.log_record({"round": 3, "key": "lr", "value": {"g0": 0.1, "g1": "x"}, "site": "site-2"})
    assert [(p.name, p.step, p.axis) for p in no_step] == [("site-2/lr/g0", 3, "round")]
    assert c.log_record({"round": 3, "key": "note", "value": "text", "site": "site-2"}) == []


def test_tracking_tails_whole_lines_as_they_are_written(tmp_path):
    """The background thread reads only complete lines, from where it stopped, and a tracker that breaks is
    dropped without stopping the others."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = tmp_path / "metrics.jsonl"
    rec = {"event": "update", "round": 0, "attempt": 0, "site": "a", "bytes": 10, "seconds": 1.0, "metrics": {}}
    tr = Tracking(tmp_path, parse_tracking("tensorboard"), name="t", interval=0.05).start()
    try:
        line = json.dumps(rec) + "\n"
        with metrics.open("a") as f:
            f.write(line[:20])  # half a line: not read yet
            f.flush()
            time.sleep(0.3)
            f.write(line[20:])
            f.write(json.dumps({**rec, "round": 1}) + "\n")
        deadline = time.monotonic() + 10
        while tr._metrics.offset < metrics.stat().st_size and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        tr.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("a/update/bytes")] == [(0, 10.0), (1, 10.0)]


def test_a_failing_tracker_is_dropped(tmp_path, caplog):
    tr = Tracking(tmp_path, (), name="t")

    class Broken:
        name = "broken"

        def write(self, points):
            raise RuntimeError("disk full")

        def close(self, code):
            pass

    tr.trackers = [Broken()]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "round", "round": 0, "seconds": 1.0}) + "\n")
    assert tr.poll() == 1 and tr.trackers == []
    assert "broken failed (RuntimeError: disk full)" in caplog.text


# -- a real federation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """recipes/quickstart.yaml (3 sites, 3 rounds) with every tracker, run once for the tests below."""
    for lib in ("mlflow", "tensorboard", "wandb"):
        pytest.importorskip(lib)
    from fl_plugins.runner import run

    tmp = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           **{v: str(tmp / "wandb-home") for v in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                    "WANDB_DATA_DIR")}}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    recipe = tmp / "quickstart.yaml"
    recipe.write_text(f"name: tracked\nscript: {SCRIPT}\nsites: 3\nrounds: 3\ninitial_model: {INITIAL}\n"
                      "tracking: {mlflow: {}, tensorboard: {}, wandb: {project: fl-test}}\n")  # fmt: skip
    try:
        code = run(load_recipe(recipe), tmp / "run", live=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0, (tmp / "run" / "aggregator.log").read_text()[-3000:]
    return tmp / "run"


@pytest.mark.integration
def test_mlflow_holds_every_site_and_round(tracked_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "site" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.params["rounds"] == "3"
    hist = client.get_metric_history(parent.info.run_id, "global/val_acc")
    assert [m.step for m in hist] == [0, 1, 2] and hist[-1].value > 0.8
    for key in ("aggregator/round_seconds", "aggregator/peak_rss_mb", "aggregator/gbps"):
        assert [m.step for m in client.get_metric_history(parent.info.run_id, key)] == [0, 1, 2], key
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "aggregator/sites")] == [3, 3, 3]
    by_site = {r.data.tags["site"]: r for r in runs if "site" in r.data.tags}
    assert sorted(by_site) == list(SITES)
    for site, r in by_site.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        evals = client.get_metric_history(r.info.run_id, "global_model/val_acc")
        assert sorted(m.step for m in evals) == [0, 1, 2], site
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "update/gbps")) == [0, 1, 2]
        loss = client.get_metric_history(r.info.run_id, "train_loss")  # flare.log at every global step
        assert sorted(m.step for m in loss) == list(range(1, 58)), site  # 19 steps x 3 rounds
        marks = client.get_metric_history(r.info.run_id, "round")
        assert sorted((m.step, m.value) for m in marks) == [(1, 0.0), (20, 1.0), (39, 2.0)]


@pytest.mark.integration
def test_tensorboard_event_files(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for site in SITES:
        assert [e.step for e in ea.Scalars(f"{site}/global_model/val_acc")] == [0, 1, 2]
        assert len(ea.Scalars(f"{site}/train_loss")) == 57
    assert [e.step for e in ea.Scalars("global/val_acc")] == [0, 1, 2]
    assert {"aggregator/round_seconds", "aggregator/bytes", "aggregator/sites", "site-1/update/bytes"} <= tags


@pytest.mark.integration
def test_wandb_offline_files(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("run-*.wandb")
    raw = data.read_bytes()
    assert raw.startswith(b":W&B") and len(raw) > 10_000
    for key in (b"global/val_acc", b"aggregator/round_seconds", b"site-2/global_model/val_acc", b"site-3/train_loss"):
        assert key in raw, key
    assert (runs[0] / "files").is_dir() and (runs[0] / "logs").is_dir()


@pytest.mark.integration
def test_the_run_writes_its_report(tracked_run):
    assert sorted(p.name for p in (tracked_run / "report").glob("*.png")) == ["bytes.png", "train_loss.png",
                                                                                "validation.png"]  # fmt: skip


@pytest.mark.integration
def test_standalone_server_with_tracking(tmp_path):
    """`fl-plugins server --tracking tensorboard`: the records of a one-site job reach TensorBoard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    server = subprocess.Popen([sys.executable, "-m", "fl_plugins.cli", "server", "--address", "127.0.0.1:0",
                               "--run-dir", str(run_dir), "--rounds", "2", "--initial-model", str(INITIAL),
                               "--tracking", "tensorboard", "--job-id", "solo"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
    try:
        seen = []
        while not (seen and "listening on" in seen[-1]):  # its log lines come first (to stderr, here merged)
            seen.append(server.stdout.readline())
            assert seen[-1], "the server exited:\n" + "".join(seen)
        address = seen[-1].split("listening on ")[1].split()[0]
        threading.Thread(target=lambda: seen.extend(server.stdout), daemon=True).start()  # keep the pipe drained
        site = subprocess.run([sys.executable, str(SCRIPT)], env={**os.environ, "FL_SERVER": address,
                              "FL_SITE": "site-1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert site.returncode == 0, site.stdout + site.stderr
        assert server.wait(timeout=60) == 0, "".join(seen)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("global/val_acc")] == [0, 1]
    assert [e.step for e in ea.Scalars("site-1/train_loss")] == list(range(1, 39))
