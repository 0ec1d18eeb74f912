"""`fl-plugins report RUN_DIR` (fl_plugins/report.py): the table and the plots of a finished run, what it says
about an unfinished one, and the error for a directory that is not a run directory."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fl_plugins.errors import ConfigError
from fl_plugins.report import PLOTS, load_run, report

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

pytest.importorskip("matplotlib")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_plugins.cli", "report", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip


def _console():
    from rich.console import Console

    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


def _check_png(path: Path, min_bytes: int = 5_000) -> None:
    import matplotlib.image

    assert path.stat().st_size > min_bytes, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, (path, img.shape)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """recipes/quickstart.yaml run to its end (3 sites, 3 rounds, training loss logged at every step)."""
    from fl_plugins.recipe import load_recipe
    from fl_plugins.runner import run

    run_dir = tmp_path_factory.mktemp("report") / "run"
    assert run(load_recipe(QUICKSTART), run_dir, live=False) == 0
    return run_dir


@pytest.mark.integration
def test_the_run_writes_the_report_and_the_command_repeats_it(finished_run):
    written = {p.name: p.stat().st_mtime_ns for p in (finished_run / "report").glob("*.png")}
    assert sorted(written) == sorted(PLOTS)  # `fl-plugins run` wrote them at its end
    out = _cli(str(finished_run))
    assert out.returncode == 0, out.stderr
    assert "quickstart: per-round metrics" in out.stdout and "val_acc" in out.stdout
    assert "note:" not in out.stdout and "left out" not in out.stdout
    assert f"plots: validation.png, train_loss.png, bytes.png in {finished_run / 'report'}" in out.stdout
    for name in PLOTS:
        _check_png(finished_run / "report" / name)


@pytest.mark.integration
def test_an_unfinished_run_is_reported_as_far_as_it_got(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("global", "report"))
    (run_dir / "summary.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    first_round = next(i for i, ln in enumerate(lines) if json.loads(ln)["event"] == "round")
    (run_dir / "metrics.jsonl").write_text("".join(lines[: first_round + 2]) + lines[first_round + 2][:25])
    with pytest.raises(ConfigError, match="the run is not finished .*no summary.json.*pass --partial"):
        report(run_dir)  # `fl-plugins report` stops with a clear error ...
    console, buf = _console()
    rep = report(run_dir, console=console, partial=True)  # ... or, with --partial, reports what is there
    text = buf.getvalue()
    assert sorted(rep.run.rounds) == [0] and not rep.run.finished
    assert "note: no summary.json: the run is unfinished (still running, or stopped before its aggregator" in text
    assert "finished rounds: 0" in text
    assert sorted(p.name for p in rep.plots) == sorted(PLOTS)
    for p in rep.plots:
        _check_png(p)


def test_missing_rounds_and_a_failed_run_are_named(tmp_path):
    _synthetic(tmp_path, rounds=2)
    (tmp_path / "summary.json").write_text(json.dumps({"name": "job", "exit_code": 1, "rounds_planned": 5}))
    run = load_run(tmp_path)
    assert run.notes == ["unfinished: rounds 2..4 of 0..4 are missing", "the run failed (exit code 1)"]


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: None, "is not a run directory: it has no metrics.jsonl"),
    (lambda d: (d / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.3}\n'), "holds no fl-plugins records"),
    (lambda d: shutil.rmtree(d), "no such run directory"),
])  # fmt: skip
def test_a_foreign_directory_is_a_clear_error(tmp_path, make, expected):
    d = tmp_path / "somewhere"
    d.mkdir()
    make(d)
    with pytest.raises(ConfigError, match=expected):
        load_run(d)
    out = _cli(str(d))
    assert out.returncode == 2 and f"fl-plugins report: error: {d}" in out.stderr and expected in out.stderr
    assert not (d / "report").exists()


def _synthetic(run_dir: Path, rounds: int = 4, sites: tuple[str, ...] = ("site-1", "site-2"),
               baselines: bool = False) -> None:  # fmt: skip
    """A run directory as an HF task writes it: eval_loss / eval_accuracy, the trainer's loss per step."""
    recs, logs, step = [], [], 0
    for r in range(rounds):
        for i, s in enumerate(sites):
            m = {"eval_loss": 1.2 / (r + 1) + 0.1 * i, "eval_accuracy": 0.5 + 0.1 * r - 0.02 * i}
            recs.append({"event": "update", "round": r, "attempt": 0, "site": s, "weight": 8.0, "bytes": 3_000_000,
                         "seconds": 0.25, "metrics": m})  # fmt: skip
        recs.append({"event": "round", "round": r, "attempt": 0, "updates": len(sites), "weight": 16.0,
                     "seconds": 1.5, "metrics": {"eval_loss": 1.2 / (r + 1) + 0.05,
                                                 "eval_accuracy": 0.49 + 0.1 * r}})  # fmt: skip
        for _ in range(8):
            step += 1
            for s in sites:
                logs.append({"round": r, "key": "loss", "value": 1.5 / (1 + step / 8), "data_type": "SCALAR",
                             "step": step, "site": s})  # fmt: skip
                logs.append({"round": r, "key": "eval_loss", "value": 9.0, "step": step, "site": s})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    (run_dir / "logs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in logs))
    if baselines:
        local = {s: {"loss": 0.9 + 0.1 * i, "accuracy": 0.6 - 0.05 * i} for i, s in enumerate(sites)}
        (run_dir / "baselines.json").write_text(json.dumps({"round": rounds, "pooled_validation_rows": 480,
                                                            "global": {"loss": 0.35, "accuracy": 0.86},
                                                            "local_only": local}))  # fmt: skip


def test_baselines_beside_the_global_model(tmp_path):
    _synthetic(tmp_path, baselines=True)
    (tmp_path / "summary.json").write_text(json.dumps({"name": "hf-job", "exit_code": 0, "rounds_planned": 4}))
    console, buf = _console()
    rep = report(tmp_path, console=console)
    text = buf.getvalue()
    assert rep.run.finished and rep.skipped == []
    assert "hf-job: on the pooled validation set (480 rows)" in text and "site-2 alone" in text
    assert "eval_accuracy" in text and "upload rate" in text
    import matplotlib.image

    val = matplotlib.image.imread(tmp_path / "report" / "validation.png")
    assert val.shape[1] > 1.6 * val.shape[0]  # two panels side by side: loss and accuracy
    for name in PLOTS:
        _check_png(tmp_path / "report" / name)


def test_plots_without_data_are_left_out_with_the_reason(tmp_path):
    _synthetic(tmp_path, rounds=1)
    (tmp_path / "logs.jsonl").unlink()
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "train_loss.png").write_bytes(b"stale")
    console, buf = _console()
    rep = report(tmp_path, console=console, partial=True)  # (the synthetic run has no summary.json)
    assert [p.name for p in rep.plots] == ["validation.png", "bytes.png"]
    assert "plot left out: train_loss.png: no training loss in logs.jsonl" in buf.getvalue()
    assert not (tmp_path / "report" / "train_loss.png").exists()


def test_a_failure_to_plot_does_not_fail_the_run(tmp_path, monkeypatch):
    import fl_plugins.report
    from fl_plugins.runner import _write_report

    _synthetic(tmp_path, rounds=1)

    def broken(run, out_dir=None):
        raise RuntimeError("no space left")

    monkeypatch.setattr(fl_plugins.report, "write_plots", broken)
    console, buf = _console()
    _write_report(tmp_path, console, console)
    assert "report: the plots were not written (RuntimeError: no space left)" in buf.getvalue()


def test_a_sampled_run_reads_past_its_sample_records(tmp_path):
    """With `sample_sites` the aggregator writes a "sample" record as each attempt starts: the report reads past
    it, and a run that stopped after its first draw is an unfinished run, not a foreign directory."""
    plain, sampled, began = tmp_path / "plain", tmp_path / "sampled", tmp_path / "began"
    _synthetic(plain, rounds=2)
    _synthetic(sampled, rounds=2)
    draw = {"event": "sample", "round": 0, "attempt": 0, "sites": ["site-1", "site-2"], "alive": 3, "seed": 0}
    lines = (sampled / "metrics.jsonl").read_text().splitlines(keepends=True)
    (sampled / "metrics.jsonl").write_text(json.dumps(draw) + "\n" + "".join(lines))
    with_draws, without = load_run(sampled), load_run(plain)
    assert (with_draws.rounds, with_draws.updates) == (without.rounds, without.updates) and len(without.rounds) == 2
    console, buf = _console()
    rep = report(sampled, console=console, partial=True)
    assert sorted(rep.run.rounds) == [0, 1] and "eval_accuracy" in buf.getvalue()
    began.mkdir()
    (began / "metrics.jsonl").write_text(json.dumps(draw) + "\n")
    run = load_run(began)
    assert not run.rounds and not run.updates and any("no round has finished yet" in n for n in run.notes)
