"""What a newcomer trips on (issue 17): a busy port in one line, `--log-level` checked and explained, initial-model
errors that say what is wrong and name the recipe key, a live view and a report that say which model each number
scores (the final model's evaluation last) and count bytes per round as the plots do, plots with per-site round
boundaries, labelled axes and legends off the data, and docs that name what `make demo` runs."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.cli import main
from fl_plugins.errors import ConfigError
from fl_plugins.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
KEY = "w"
INIT = {KEY: np.arange(1, 10, dtype=np.float32).reshape(3, 3)}  # mean 5; each round adds 1 at every site


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_plugins.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)  # fmt: skip


def _model(path: Path) -> Path:
    from conftest import save_numpy

    return save_numpy(path, INIT)


# -- a port already in use -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_port_in_use_is_one_line_naming_the_fix(tmp_path):
    """A second aggregator on a running one's port: one line on stderr (not gRPC's native `Failed to add port`),
    exit 2, and no run directory left behind."""
    cfg = AggregatorConfig(run_dir=tmp_path / "first", rounds=1, initial_model=_model(tmp_path / "m.safetensors"))
    with AggregatorServer(cfg, "127.0.0.1:0") as first:
        run = tmp_path / "second"
        out = _cli("server", "--address", first.address, "--run-dir", str(run), "--rounds", "1")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"fl-plugins server: error: {first.address} is in use (another aggregator?): choose another --address, "
        "or port 0 (HOST:0 picks a free one)"
    ]
    assert not run.exists()


def test_an_address_of_another_machine_is_named_as_such(tmp_path):
    """192.0.2.1 (TEST-NET-1) is no address of this machine: the error says so instead of guessing "in use"."""
    cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=1)
    with pytest.raises(ConfigError, match=r"^--address 192\.0\.2\.1:0: the host is not an address of this machine"):
        AggregatorServer(cfg, "192.0.2.1:0", insecure=True)
    with socket.socket() as busy:  # a plain listener (no aggregator) on a port reads the same as another aggregator
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^127\.0\.0\.1:{port} is in use \(another aggregator\?\)"):
            AggregatorServer(cfg, f"127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()


# -- --log-level -----------------------------------------------------------------------------------------------

COMMANDS = {"server": [], "run": ["r.yaml"], "provision": ["p.yaml"], "client": ["--", "true"], "report": ["d"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_log_level_is_explained_and_an_unknown_one_is_one_line(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--log-level LEVEL the console's log level" in help_text, help_text
    assert "debug, info, warning, error, critical (default:" in help_text
    with pytest.raises(SystemExit) as exit_:
        main([command, "--log-level", "verbose", *COMMANDS[command]])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fl-plugins {command}: error: --log-level verbose: unknown level; choose one of debug, info, warning, "
        "error, critical (any case)"
    ]


def test_log_level_takes_any_case():
    import argparse

    from fl_plugins.cli.levels import add_log_level

    p = argparse.ArgumentParser()
    add_log_level(p, "warning")
    assert p.parse_args([]).log_level == "WARNING"
    assert p.parse_args(["--log-level", "DeBuG"]).log_level == "DEBUG"


# -- initial-model errors --------------------------------------------------------------------------------------


def _bad_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad initial model, and what its error must say."""
    good = _model(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just words in a file\n")
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle in a zip")
    return {
        "missing": (tmp_path / "nowhere.safetensors", "does not exist"),
        "truncated": (truncated, "is not a safetensors file (truncated or padded: its header lists 36 bytes"),
        "text": (text, "is not a safetensors file (its first 8 bytes give a header of"),
        "folder": (hf, "holds no safetensors weights (a folder without model.safetensors or "
                       "model.safetensors.index.json; it has config.json, pytorch_model.bin)"),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "folder"])
def test_an_initial_model_flag_error_says_what_is_wrong_and_names_the_flag(tmp_path, kind, capsys):
    path, says = _bad_models(tmp_path)[kind]
    code = main(["server", "--address", "127.0.0.1:0", "--run-dir", str(tmp_path / "run"), "--rounds", "1",
                 "--initial-model", str(path)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"fl-plugins server: error: --initial-model: {path}"), err
    assert says in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["truncated", "text", "folder"])
def test_an_initial_model_from_a_recipe_names_the_recipe_key(tmp_path, kind):
    """`fl-plugins server RECIPE` and `fl-plugins run RECIPE` name the recipe's `initial_model`, not the flag; a
    flag given beside the recipe is named as the flag. (A missing path is the recipe reader's: "does not exist".)"""
    from fl_plugins.cli.server import server_config

    path, says = _bad_models(tmp_path)[kind]
    recipe_file = tmp_path / "job.yaml"
    recipe_file.write_text(f"script: {ROOT / 'examples' / 'client_api_train.py'}\nsites: 1\nrounds: 1\n"
                           f"initial_model: {path}\n")  # fmt: skip
    recipe = load_recipe(recipe_file)
    expected = f"{recipe_file}: `initial_model`: {path.resolve()}"
    with pytest.raises(ConfigError) as server:
        server_config({}, recipe)
    with pytest.raises(ConfigError) as run:  # what `fl-plugins run` builds
        recipe.federation.aggregator_config(tmp_path / "run", recipe=recipe.identity())
    for e in (server, run):
        assert str(e.value).startswith(expected) and says in str(e.value) and "--initial-model" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--initial-model: .*nowhere\.safetensors does not exist"):
        server_config({"initial_model": tmp_path / "nowhere.safetensors"}, recipe)


# -- the live view, the table, the plots -----------------------------------------------------------------------


class _Site(threading.Thread):
    """A site over the real gRPC client: trains +1 and sends the received model's mean as its `val_acc`; answers an
    evaluation with the same score."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.address, self.site, self.error = address, name, None

    def run(self) -> None:
        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        c = SiteClient(self.address, self.site)
        try:
            c.connect()
            while (task := c.next_task(poll=2.0)).kind != pb.Task.END:
                _, params = c.download(task, "numpy")
                score = {"val_acc": float(np.mean(params[KEY]))}
                if task.kind == pb.Task.EVALUATE:
                    c.send_result(task.round, task.task_id, {"metrics": score})
                else:
                    env = {"params_type": "FULL", "metrics": score}
                    c.upload(task.round, task.attempt, {KEY: params[KEY] + 1}, env)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            c.close()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real job of 2 rounds on 2 sites, the final model evaluated at every site: (server, run dir, recipe)."""
    tmp = tmp_path_factory.mktemp("newcomer")
    cfg = AggregatorConfig(run_dir=tmp / "run", rounds=2, min_sites=2, initial_model=_model(tmp / "m.safetensors"),
                           evaluate_every=2, linger=0.5)  # fmt: skip
    (tmp / "job.yaml").write_text(f"name: job\nscript: {ROOT / 'examples' / 'client_api_train.py'}\nsites: 2\n"
                                  "rounds: 2\n")  # fmt: skip
    with AggregatorServer(cfg) as srv:
        sites = [_Site(srv.address, f"site-{i}") for i in (1, 2)]
        for s in sites:
            s.start()
        for s in sites:
            s.join(60)
            assert not s.is_alive() and s.error is None, (s.site, s.error)
        assert srv.aggregator.error is None
        yield srv, cfg.run_dir, load_recipe(tmp / "job.yaml")


def _metrics(run_dir: Path) -> Any:
    from fl_plugins.record_files import RunMetrics, read_records

    m = RunMetrics()
    m.add(read_records(run_dir / "metrics.jsonl"))
    return m


@pytest.mark.integration
def test_the_live_lines_name_the_scored_model_and_count_bytes_per_round(finished, capsys):
    from rich.console import Console

    from fl_plugins._run_view import View
    from fl_plugins.report import load_run, round_rows
    from fl_plugins.report_plots import uploaded

    srv, run_dir, recipe = finished
    metrics = _metrics(run_dir)
    view = View(recipe, srv, [SimpleNamespace(name="site-1", rc=0), SimpleNamespace(name="site-2", rc=0)], metrics,
                0.0)  # fmt: skip
    view.print_progress()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    # the initial model's mean is 5, +1 a round: round 1's updates score the model after round 0 (6), and the
    # final evaluation the model after round 1 (7)
    assert re.fullmatch(r"round 0 done \(1 of 2\): 2 updates in [\d.]+ s, [\d.]+ [KM]?B uploaded; the sites "
                        r"scored the initial model: val_acc=5", lines[0]), lines[0]  # fmt: skip
    assert lines[1].endswith("the sites scored the global model after round 0: val_acc=6"), lines[1]
    assert lines[2] == "every site evaluated the global model after round 1 (final): val_acc=7 (mean over 2 sites)"
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(view.render())
    text = buf.getvalue()
    assert "2 of 2 rounds done  finished  network " in text and "B/s" in text
    assert "0..1" not in text and "attempt" not in text and "moved" not in text
    # bytes per round: the live line, the table and bytes.png count the same bytes
    run = load_run(run_dir)
    per_round = {r: sum(u.bytes or 0 for u in metrics.updates if u.round == r) for r in (0, 1)}
    assert all(per_round.values())
    assert {r: view.uploaded(r) for r in (0, 1)} == per_round
    assert {row.round: row.bytes for row in round_rows(run)} == per_round
    assert {r: sum(v.values()) for r, v in uploaded(run).items()} == per_round


@pytest.mark.integration
def test_the_report_ends_with_the_final_model(finished, tmp_path):
    import shutil

    from fl_plugins.report import report

    _, run_dir, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("global"))
    (copy / "summary.json").write_text(json.dumps({"name": "job", "exit_code": 0, "rounds_planned": 2}))
    from rich.console import Console

    buf = io.StringIO()
    rep = report(copy, console=Console(file=buf, width=220, color_system=None))
    rows = [" ".join(line.replace("│", " ").split()) for line in buf.getvalue().splitlines()]
    assert "0 2" in "".join(rows) and any(r.startswith("0 2 ") and r.endswith("initial model 5") for r in rows)
    assert any(r.startswith("1 2 ") and r.endswith("global model after round 0 6") for r in rows), rows
    assert "final global model after round 1 (final) 7" in rows, rows
    assert rep.run.last_evaluation is not None and rep.run.last_evaluation.round == 2
    assert "validation.png" in [p.name for p in rep.plots]


def _synthetic_steps(run_dir: Path) -> None:
    """Two sites that take different numbers of steps a round (3 and 5), over 3 rounds."""
    recs, logs = [], []
    for r in range(3):
        for s in ("site-1", "site-2"):
            recs.append({"event": "update", "round": r, "site": s, "bytes": 2_500_000, "seconds": 0.5,
                         "metrics": {"val_loss": 1.0 / (r + 1), "val_acc": 0.5 + 0.1 * r}})  # fmt: skip
        recs.append({"event": "round", "round": r, "updates": 2, "metrics": {"val_loss": 1.0 / (r + 1),
                     "val_acc": 0.5 + 0.1 * r}})  # fmt: skip
    for s, per in (("site-1", 3), ("site-2", 5)):
        for step in range(1, 3 * per + 1):
            logs.append({"round": (step - 1) // per, "key": "train_loss", "value": 2.0 / step, "step": step, "site": s})
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    (run_dir / "logs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in logs))


def test_plots_mark_each_sites_rounds_label_their_axes_and_keep_legends_off_the_data(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex

    from fl_plugins import report_plots
    from fl_plugins.report import load_run

    _synthetic_steps(tmp_path / "run")
    run = load_run(tmp_path / "run")
    colors = report_plots.colors(["site-1", "site-2"])
    loss = report_plots.train_loss(run, colors)
    ax = loss.axes[0]
    # each site's boundaries in its colour, halfway between its last step of a round and its first of the next
    boundaries: dict[str, list[float]] = {}
    for line in ax.get_lines():
        xs = list(line.get_xdata())
        if len(xs) == 2 and xs[0] == xs[1] and line.get_linestyle() == ":":
            boundaries.setdefault(to_hex(line.get_color()), []).append(float(xs[0]))
    assert boundaries == {to_hex(colors["site-1"]): [3.5, 6.5], to_hex(colors["site-2"]): [5.5, 10.5]}
    figures = [loss, report_plots.validation(run, colors), report_plots.bytes_plot(run, colors)]
    for fig in figures:
        assert not isinstance(fig, str), fig
        FigureCanvasAgg(fig).draw()
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
            legend = ax.get_legend()
            assert legend is not None
            box, frame = legend.get_window_extent(), ax.get_window_extent()
            assert not box.overlaps(frame), (ax.get_ylabel(), box, frame)  # outside the axes: it hides no data
    assert figures[2].axes[0].get_ylabel() == "updates uploaded in the round (MB)"
    assert figures[1].axes[0].get_xlabel() == "rounds of training behind the global model (0: the initial model)"


# -- the examples and the docs ---------------------------------------------------------------------------------


def test_the_lightning_example_logs_a_training_curve():
    """The trainer logs every few steps, so each site's training loss is a curve, not a point or two: at least
    4 logged steps per epoch on the smallest site."""
    pytest.importorskip("lightning")
    sys.path.insert(0, str(ROOT / "examples" / "lightning"))
    try:
        import blobs
    finally:
        sys.path.remove(str(ROOT / "examples" / "lightning"))
    steps = min(-(-len(blobs.site_data(f"site-{i}")[0]) // 64) for i in (1, 2, 3))  # batches of 64
    for name in ("train.py", "train_fl.py"):
        every = re.findall(r"log_every_n_steps=(\d+)", (ROOT / "examples" / "lightning" / name).read_text())
        assert len(every) == 1 and steps // int(every[0]) >= 4, (name, every, steps)


def test_the_recipes_readme_names_what_make_demo_runs():
    demo = re.search(r"^demo:.*\n\t.*fl-plugins run (recipes/\S+\.yaml)", (ROOT / "Makefile").read_text(), re.M)
    assert demo is not None
    readme = (ROOT / "recipes" / "README.md").read_text()
    bullets = re.split(r"\n- ", readme)
    said = [b.split("`")[1] for b in bullets if "`make demo` runs it" in b]
    assert said == [Path(demo.group(1)).name], said
