"""`fl-plugins run RECIPE.yaml`: recipe validation, a whole federation on 127.0.0.1, a crashing site."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_plugins.errors import ConfigError
from fl_plugins.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_plugins.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)  # fmt: skip


def _recipe(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


# -- recipe validation ---------------------------------------------------------------------------------------


def test_quickstart_recipe_loads():
    r = load_recipe(QUICKSTART)
    assert [s.name for s in r.sites] == ["site-1", "site-2", "site-3"]
    assert r.federation.rounds == 3 and r.federation.min_sites == 3
    assert r.script.path == (ROOT / "examples" / "client_api_train.py").resolve()
    assert r.federation.initial_model is not None and r.federation.initial_model.is_file()


def test_defaults_and_site_args(tmp_path):
    p = _recipe(tmp_path, "script: train.py\nsites: [a, b]\nrounds: 2\nargs: ['--epochs', 1]\n"
                          "site_args: {b: ['--shard', '1']}\nenv: {SEED: 3, DEBUG: true}\n")  # fmt: skip
    r = load_recipe(p)
    assert r.name == "job" and r.federation.min_sites == 2 and r.federation.initial_model is None
    assert r.script.args == ("--epochs", "1") and r.script.env == {"SEED": "3", "DEBUG": "1"}
    assert [(s.name, s.args) for s in r.sites] == [("a", ()), ("b", ("--shard", "1"))]


@pytest.mark.parametrize(("text", "expected"), [
    ("script: train.py\nsites: 3\nround: 3\n", "unknown key `round`; did you mean `rounds`?"),
    ("script: train.py\nsites: 3\nrounds: 3\nmin_site: 2\n", "did you mean `min_sites`?"),
    ("script: train.py\nsites: 2\nrounds: 3\nsite_args: {site_1: []}\n",
     "unknown key `site_args.site_1`; did you mean `site_args.site-1`?"),
    ("script: train.py\nsites: 3\nrounds: 3\ntransfer: {chunk_mb: 1}\n",
     "unknown key `transfer.chunk_mb`; did you mean `transfer.chunk_mib`?"),
    ("script: train.py\nsites: 3\nrounds: 3\naggregation: {min_updates: 4}\n",
     "`aggregation.min_updates` must be an integer in 1..3 (got 4)"),
    ("script: train.py\nsites: 3\nrounds: 3\naggregation: {reject_nonfinite: maybe}\n",
     "`aggregation.reject_nonfinite` must be true or false"),
    ("script: train.py\nsites: 3\nrounds: three\n", "`rounds` must be an integer >= 1 (got 'three')"),
    ("script: train.py\nsites: 3\nrounds: 0\n", "`rounds` must be an integer >= 1 (got 0)"),
    ("script: train.py\nsites: 3\nrounds: true\n", "`rounds` must be an integer >= 1 (got True)"),
    ("script: train.py\nsites: 3\nrounds: 2\nmin_sites: 4\n", "`min_sites` must be an integer in 1..3 (got 4)"),
    ("script: train.py\nsites: [a, a/b]\nrounds: 2\n", "`sites[1]` must be a name"),
    ("script: train.py\nsites: 2\nrounds: 2\nargs: ['--x', {a: 1}]\n", "`args[1]` must be a string"),
    ("script: train.py\nsites: 2\nrounds: 2\nsite_args: {site-1: '--x'}\n", "`site_args.site-1` must be a list"),
    ("script: train.py\nsites: 2\nrounds: 2\nround_deadline: -1\n", "`round_deadline` must be a number"),
    ("script: train.py\nsites: 2\nrounds: 2\nenv: {FL_SITE: x}\n", "`env.FL_SITE` is set by the runner"),
    ("sites: 2\nrounds: 2\n", "`script` is required"),
    ("- a\n- b\n", "a recipe must be a mapping"),
])  # fmt: skip
def test_validation_errors_name_the_file_and_key(tmp_path, text, expected):
    p = _recipe(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: ")
    assert expected in str(e.value)


def test_aggregation_and_transfer_settings_reach_the_aggregator(tmp_path):
    p = _recipe(tmp_path, "script: train.py\nsites: 3\nrounds: 2\nround_deadline: 30\n"
                          "aggregation: {min_updates: 2, reject_nonfinite: false, site_timeout: 20}\n"
                          "transfer: {chunk_mib: 0.5, idle_timeout: 15}\n")  # fmt: skip
    cfg = load_recipe(p).federation.aggregator_config(tmp_path / "run")
    assert (cfg.rounds, cfg.min_sites, cfg.round_deadline, cfg.min_updates) == (2, 3, 30.0, 2)
    assert (cfg.reject_nonfinite, cfg.site_timeout, cfg.chunk_bytes, cfg.idle_timeout) == (False, 20.0, 1 << 19, 15.0)
    default = load_recipe(_recipe(tmp_path, "script: train.py\nsites: 2\nrounds: 1\n")).federation
    from fl_plugins.aggregator.core import AggregatorConfig

    assert default.aggregator_config(tmp_path) == AggregatorConfig(run_dir=tmp_path, rounds=1, min_sites=2)


def test_missing_script_says_where_it_looked(tmp_path):
    p = tmp_path / "sub" / "job.yaml"
    p.parent.mkdir()
    p.write_text("script: nope/train.py\nsites: 2\nrounds: 1\n")
    with pytest.raises(ConfigError, match=r"`script`: 'nope/train.py' does not exist \(looked for .*sub/nope/train"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="`initial_model`: 'missing.safetensors' does not exist"):
        parse_recipe({"script": str(QUICKSTART), "sites": 1, "rounds": 1, "initial_model": "missing.safetensors"},
                     p)  # fmt: skip


def test_cli_reports_a_bad_recipe(tmp_path):
    p = _recipe(tmp_path, "script: train.py\nsites: 3\nrounds: 3\nenvv: {}\n")
    out = _cli("run", str(p), "--run-dir", str(tmp_path / "run"), timeout=60)
    assert out.returncode == 2
    assert "unknown key `envv`; did you mean `env`?" in out.stderr
    assert not (tmp_path / "run").exists()


# -- whole federations ---------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_quickstart_runs_to_completion(tmp_path):
    run = tmp_path / "run"
    out = _cli("run", str(QUICKSTART.relative_to(ROOT)), "--run-dir", str(run))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in (run / "sites").glob("*.log")) == ["site-1.log", "site-2.log", "site-3.log"]
    assert (run / "aggregator.log").read_text().count("update from") == 9
    assert (run / "global" / "round-00003" / "manifest.json").is_file()
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("update") == 9 and events.count("round") == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 0 and [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert all(r["updates"] == 3 and "val_acc" in r["metrics"] for r in summary["rounds"])
    assert summary["rounds"][-1]["metrics"]["val_acc"] > 0.8  # federated training works
    assert "round 2 done (3 of 3)" in out.stdout and "per-round metrics" in out.stdout
    assert "round 1: global model val_acc" in (run / "sites" / "site-2.log").read_text()


CRASHING_SITE = """
import os, sys, time
import fl_plugins.client as flare

flare.init()
if os.environ["FL_SITE"] == "bad":
    model = flare.receive()
    print(f"got round {model.current_round}", flush=True)
    t0 = time.monotonic()  # crash only once the others are up, so the test can check they were stopped
    while not all(os.path.exists(os.path.join(sys.argv[1], f"good-{i}.pid")) for i in (1, 2)):
        if time.monotonic() - t0 > 30:
            break
        time.sleep(0.05)
    raise RuntimeError(f"boom in round {model.current_round}")
open(os.path.join(sys.argv[1], os.environ["FL_SITE"] + ".pid"), "w").write(str(os.getpid()))
time.sleep(120)  # a site that would hold the job up: the runner must stop it
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_crashing_site_stops_the_run(tmp_path):
    (tmp_path / "site.py").write_text(CRASHING_SITE)
    init = (ROOT / "recipes" / "quickstart-initial.safetensors").resolve()
    (tmp_path / "job.yaml").write_text(f"script: site.py\nsites: [good-1, bad, good-2]\nrounds: 3\nmin_sites: 1\n"
                                       f"initial_model: {init}\nargs: [{str(tmp_path)!r}]\n")  # fmt: skip
    t0 = time.monotonic()
    out = _cli("run", str(tmp_path / "job.yaml"), "--run-dir", str(tmp_path / "run"), timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stdout + out.stderr
    assert took < 30
    assert "site bad exited with code 1 before the job finished" in out.stderr
    assert "RuntimeError: boom in round 0" in out.stderr  # the tail of its log
    for name in ("good-1", "good-2"):
        with pytest.raises(ProcessLookupError):  # stopped and reaped
            os.kill(int((tmp_path / f"{name}.pid").read_text()), 0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["sites"]["bad"]["exit_code"] == 1


def test_live_view_renders(tmp_path):
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.runner import _Metrics, _View

    recipe = load_recipe(QUICKSTART)
    config = AggregatorConfig(run_dir=tmp_path, rounds=3, min_sites=3, initial_model=recipe.federation.initial_model)
    with AggregatorServer(config) as server:
        server.aggregator.hello("site-1", False)
        sites = [SimpleNamespace(name="site-1", rc=None), SimpleNamespace(name="site-2", rc=None),
                 SimpleNamespace(name="site-3", rc=2)]  # fmt: skip
        view = _View(recipe, server, sites, _Metrics(tmp_path / "metrics.jsonl"), time.monotonic())
        buf = io.StringIO()
        Console(file=buf, width=100, force_terminal=True, color_system=None).print(view.render())
        # a virtual site between its turns (backends/virtual.py: no process running) says so
        from fl_plugins.backends.virtual import VirtualSite

        virtual = VirtualSite("site-2", tmp_path / "site-2.log")
        states = view.site_states(server.aggregator.status())
        virtual_states = _View(recipe, server, [virtual], _Metrics(tmp_path / "metrics.jsonl"), 0.0).site_states(
            server.aggregator.status())  # fmt: skip
    text = buf.getvalue()
    assert "0 of 3 rounds done" in text and "round 0 running: 0 B uploaded" in text
    assert "site-1  waiting" in text and "site-2  starting" in text and "crashed (exit 2)" in text
    assert states["site-2"] == "starting" and virtual_states == {"site-2": "waiting for its turn"}


@pytest.mark.integration
def test_quickstart_over_mtls(tmp_path):
    """`fl-plugins run --tls`: a CA and kits in RUN_DIR/kits, every site speaks mTLS with its own certificate."""
    run = tmp_path / "run"
    out = _cli("run", str(QUICKSTART), "--run-dir", str(run), "--tls")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(mTLS)" in out.stdout
    assert {p.name for p in (run / "kits").iterdir()} >= {"ca", "server", "site-1", "site-2", "site-3"}
    summary = json.loads((run / "summary.json").read_text())
    assert [r["updates"] for r in summary["rounds"]] == [3, 3, 3]
    assert "FL_KIT" not in os.environ  # the kits went to the sites' environments only
    for site in ("site-1", "site-2", "site-3"):
        assert f"site '{site}' connected" in (run / "aggregator.log").read_text()
