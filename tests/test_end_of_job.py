"""The end of a job (issue 17): the final global model is evaluated at the sites that report metrics, RUN_DIR/final
holds it under a stable name, the aggregator writes summary.json itself (so `fl-plugins report` reads a run of a
standalone `fl-plugins server`), a finished run is not run again, and SIGTERM exits 143 (SIGINT 130).

Real aggregators on 127.0.0.1 with sites over the real gRPC client, the in-memory federation where a test needs no
socket, and the CLI as subprocesses where the process's exit code is the point."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SiteThread, load_round

import fl_plugins.client as flare
from fl_plugins.aggregator import ending
from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer

ROOT = Path(__file__).resolve().parents[1]
INIT = {"w": np.arange(4, dtype=np.float32)}


class Site(threading.Thread):
    """A site over a real SiteClient: trains +1 and sends the global model's mean as its metric (`metrics`), answers
    an evaluation with the evaluated model's mean; `leave_after_train`: its process ends after its last update.
    Records the kinds of the tasks it got."""

    def __init__(self, address: str, name: str, *, metrics: bool = True, leave_after_train: bool = False) -> None:
        super().__init__(daemon=True, name=name)
        self.address, self.site, self.metrics, self.leave = address, name, metrics, leave_after_train
        self.kinds: list[tuple[str, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        c = SiteClient(self.address, self.site)
        try:
            c.connect()
            while (task := c.next_task(poll=2.0)).kind != pb.Task.END:
                _, params = c.download(task, "numpy")
                mean = {"mean": float(np.mean(params["w"]))}
                if task.kind == pb.Task.EVALUATE:
                    self.kinds.append(("evaluate", task.round))
                    c.send_result(task.round, task.task_id, {"metrics": mean, "meta": {"NUM_EVAL_SAMPLES": 10}})
                    continue
                self.kinds.append(("train", task.round))
                env = {"params_type": "FULL", "metrics": mean if self.metrics else {}}
                c.upload(task.round, task.attempt, {"w": params["w"] + 1}, env)
                if self.leave and task.round == task.total_rounds - 1:
                    return
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            c.close()


def run_sites(*sites: threading.Thread, within: float) -> None:
    for s in sites:
        s.start()
    for s in sites:
        s.join(within)
        assert not s.is_alive(), f"{s.name} did not finish within {within} s"
        assert getattr(s, "error", None) is None, f"{s.name}: {s.error!r}"  # type: ignore[attr-defined]


def events(run: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


def finished(agg: Any, within: float) -> bool:
    """Whether the aggregator's job ends (its linger included) within `within` seconds."""
    deadline = time.monotonic() + within
    while not agg.finished() and time.monotonic() < deadline:
        time.sleep(0.02)
    return agg.finished() and agg.error is None


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the final evaluation, RUN_DIR/final and summary.json ---------------------------------------------------------


@pytest.mark.integration
def test_a_standalone_servers_run_is_scored_kept_in_final_and_reported(server_factory):
    from rich.console import Console
    from safetensors.numpy import load_file

    from fl_plugins.report import report

    srv = server_factory(rounds=2, min_sites=2, initial=INIT)
    a, b = Site(srv.address, "site-1"), Site(srv.address, "site-2")
    run_sites(a, b, within=120)
    assert srv.wait() == 0
    run = srv.aggregator.config.run_dir
    assert a.kinds == b.kinds == [("train", 0), ("train", 1), ("evaluate", 2)]
    final_w = load_round(run, 2)["w"]
    (evaluation,) = events(run, "evaluation")  # the final global model's, at both sites
    assert evaluation["round"] == 2 and evaluation["metrics"] == {"mean": float(np.mean(final_w))}
    assert sorted(evaluation["sites"]) == ["site-1", "site-2"]
    # RUN_DIR/final: round 2's files, linked, readable by safetensors as they are
    final, last = run / "final", run / "global" / "round-00002"
    assert files(final) == files(last)
    assert all(os.path.samefile(p, last / p.name) for p in final.iterdir())
    shard = next(p for p in final.iterdir() if p.suffix == ".safetensors")
    np.testing.assert_array_equal(load_file(str(shard))["w"], final_w)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["job_id"] == srv.aggregator.job_id
    assert summary["rounds_planned"] == 2 and [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["sites"] == {"site-1": {"updates": 2}, "site-2": {"updates": 2}}
    assert summary["final_model"] == str(final)
    assert summary["final_evaluation"] == {k: evaluation[k] for k in ("round", "metrics", "sites")}
    out = io.StringIO()
    rep = report(run, console=Console(file=out, width=120), plots=False)  # not "the run is not finished"
    assert rep.run.finished, rep.run.notes


def test_only_the_sites_that_report_metrics_are_asked_and_the_others_get_end(server_factory):
    srv = server_factory(rounds=2, min_sites=2, initial=INIT)
    scorer = Site(srv.address, "scorer")
    silent = SiteThread(srv.address, "silent", lambda r, p: ({"w": p["w"] + 1}, "FULL", 1.0))  # sends no metrics
    run_sites(scorer, silent, within=120)
    assert srv.wait() == 0
    assert sorted(silent.received) == [0, 1]  # never given the final model
    assert scorer.kinds[-1] == ("evaluate", 2)
    (evaluation,) = events(srv.aggregator.config.run_dir, "evaluation")
    assert sorted(evaluation["sites"]) == ["scorer"]


def test_no_evaluate_final_skips_the_evaluation_and_still_keeps_the_final_model(in_memory):
    fed = in_memory(rounds=1, initial=INIT, evaluate_final=False)
    fed.activate("site-1")
    while flare.is_running():
        m = flare.receive()
        flare.send(flare.FLModel(params={"w": m.params["w"] + 1}, metrics={"mean": float(np.mean(m.params["w"]))}))
    fed.wait()
    assert fed.events("evaluation") == []
    summary = json.loads((fed.run_dir / "summary.json").read_text())
    assert summary["final_model"] == str(fed.run_dir / "final") and "final_evaluation" not in summary
    assert files(fed.run_dir / "final") == files(fed.run_dir / "global" / "round-00001")


@pytest.mark.parametrize("checks_is_evaluate", [True, False])
def test_a_flare_style_loop_answers_the_final_evaluation(in_memory, checks_is_evaluate):
    """FLARE's loop gets one more task after the last round: a script that checks is_evaluate() sends metrics; one
    that does not trains once more and sends params with metrics, and only its metrics count (no update)."""
    fed = in_memory(rounds=2, initial=INIT)
    fed.activate("site-1")
    tasks = []
    while flare.is_running():
        m = flare.receive()
        tasks.append((flare.get_task_name(), m.current_round))
        score = {"mean": float(np.mean(m.params["w"]))}
        if checks_is_evaluate and flare.is_evaluate():
            flare.send(flare.FLModel(metrics=score))
            continue
        flare.send(flare.FLModel(params={"w": m.params["w"] + 1}, metrics=score))
    fed.wait()
    assert tasks == [("train", 0), ("train", 1), ("validate", 2)]
    (evaluation,) = fed.events("evaluation")
    assert evaluation["sites"]["site-1"] == {"metrics": {"mean": float(np.mean(INIT["w"] + 2))}}
    assert [(u["round"], u["site"]) for u in fed.events("update")] == [(0, "site-1"), (1, "site-1")]


@pytest.mark.integration
def test_a_site_that_exits_after_its_last_update_does_not_hold_the_job(server_factory):
    srv = server_factory(rounds=1, min_sites=2, initial=INIT, site_timeout=2.0)
    stays, leaves = Site(srv.address, "site-1"), Site(srv.address, "site-2", leave_after_train=True)
    cfg = srv.aggregator.config
    run_sites(stays, leaves, within=20 * cfg.site_timeout)
    assert finished(srv.aggregator, within=5 * cfg.site_timeout + cfg.linger)  # its cell closes: it is gone
    (evaluation,) = events(cfg.run_dir, "evaluation")
    assert evaluation["sites"]["site-1"]["metrics"] == {"mean": 2.5}
    assert "left before it answered" in evaluation["sites"]["site-2"]["error"]


def both_train_one_round(a: Any, b: Any) -> None:
    """Two in-memory sites connect and send their round-0 update, with metrics (so the final evaluation asks them)."""
    for c in (a, b):
        c.connect()
    for c in (a, b):
        t = c.next_task(poll=5.0)
        _, p = c.download(t, "numpy")
        c.upload(t.round, t.attempt, {"w": p["w"] + 1}, {"params_type": "FULL", "metrics": {"m": 1.0}})


def test_a_site_whose_process_ended_is_gone_at_once_for_the_final_evaluation(in_memory):
    """What `fl-plugins run` does when a site's process exits 0 after training (ending.site_exited): its cell
    closes now, long before `site_timeout`."""
    fed = in_memory(rounds=1, min_sites=2, initial=INIT)
    a, b = fed.client("site-1"), fed.client("site-2")
    both_train_one_round(a, b)
    t = a.next_task(poll=5.0)  # the final evaluation: site-1 answers, site-2's process "ended"
    a.send_result(t.round, t.task_id, {"metrics": {"m": 2.0}})
    ending.site_exited(fed.aggregator, "site-2")
    fed.wait(timeout=fed.config.site_timeout / 2)
    (evaluation,) = fed.events("evaluation")
    assert evaluation["sites"]["site-1"] == {"metrics": {"m": 2.0}}
    assert "left before it answered" in evaluation["sites"]["site-2"]["error"]


def test_a_final_evaluation_whose_reporting_sites_are_all_gone_ends_after_the_site_timeout(in_memory):
    """The only site that sent metrics dies in the last round; the one left sends none. The final evaluation has
    nobody to ask: it must not wait for ever (it ends once no reporting site came back within site_timeout)."""
    fed = in_memory(rounds=2, min_sites=2, min_updates=1, initial=INIT, site_timeout=2.0)
    scorer, quiet = fed.client("scorer", heartbeat=0.3), fed.client("quiet", heartbeat=0.3)
    for c in (scorer, quiet):
        c.connect()
    for c, metrics in ((scorer, {"m": 1.0}), (quiet, {})):
        t = c.next_task(poll=5.0)
        _, p = c.download(t, "numpy")
        c.upload(t.round, t.attempt, {"w": p["w"] + 1}, {"params_type": "FULL", "metrics": metrics})
    assert scorer.next_task(poll=5.0).round == 1
    scorer.close()  # its process dies in the last round
    t = quiet.next_task(poll=5.0)
    _, p = quiet.download(t, "numpy")
    quiet.upload(t.round, t.attempt, {"w": p["w"] + 1}, {"params_type": "FULL", "metrics": {}})
    ended = threading.Thread(target=quiet.next_task, kwargs={"poll": 1.0}, daemon=True)
    ended.start()  # the site left waits for END
    fed.wait(timeout=10 * fed.config.site_timeout + fed.config.linger)
    assert fed.events("evaluation") == [] and (fed.run_dir / "final" / "manifest.json").exists()


def test_a_training_jobs_cross_site_evaluation_is_the_final_evaluation(in_memory):
    fed = in_memory(rounds=1, initial=INIT, workflow="fedavg,cross-site-eval")
    fed.activate("site-1")
    while flare.is_running():
        m = flare.receive()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"mean": float(np.mean(m.params["w"]))}))
        else:  # train, and submit the local model
            flare.send(flare.FLModel(params={"w": m.params["w"] + 1}, metrics={"mean": 0.0}))
    fed.wait()
    (evaluation,) = fed.events("evaluation")  # the global column of the matrix; no separate evaluation phase
    matrix = json.loads((fed.run_dir / "cross_site_eval.json").read_text())
    assert evaluation["round"] == 1 and evaluation["sites"] == matrix["results"]["global"]


# -- a restart of a finished run --------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_aggregator_started_on_a_finished_run_rewrites_nothing_and_more_rounds_train_on(tmp_path):
    from safetensors.numpy import save_file

    save_file(INIT, str(tmp_path / "initial.safetensors"))
    cfg = AggregatorConfig(
        run_dir=tmp_path / "run", rounds=1, initial_model=tmp_path / "initial.safetensors", linger=0.2
    )
    with AggregatorServer(cfg) as srv:
        run_sites(Site(srv.address, "site-1"), within=60)
        assert srv.wait() == 0
    run = cfg.run_dir
    summary = json.loads((run / "summary.json").read_text())
    richer = {**summary, "baselines": {"round": 1}}  # what `fl-plugins run` writes over the aggregator's
    (run / "summary.json").write_text(json.dumps(richer))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert ending.finished(cfg) is not None
    with AggregatorServer(cfg) as srv:
        assert srv.wait() == 0  # complete at once: nothing is asked of anyone
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert {p: v for p, v in after.items() if p.name != "aggregator.log"} == before
    # two rounds now: round 1 trains, and final/ and summary.json become round 2's
    more = AggregatorConfig(run_dir=run, rounds=2, linger=0.2)
    assert ending.finished(more) is None
    with AggregatorServer(more) as srv:
        run_sites(Site(srv.address, "site-1"), within=60)
        assert srv.wait() == 0
    assert files(run / "final") == files(run / "global" / "round-00002")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_planned"] == 2 and summary["final_evaluation"]["round"] == 2


# -- the CLI: already finished, SIGTERM ---------------------------------------------------------------------------

SITE = textwrap.dedent(
    """
    import numpy as np
    import fl_plugins.client as flare

    flare.init()
    while flare.is_running():
        m = flare.receive()
        score = {"mean": float(np.mean(m.params["w"]))}
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics=score))
        else:
            flare.send(flare.FLModel(params={"w": m.params["w"] + np.float32(1)}, metrics=score))
    """
)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_plugins.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _recipe(tmp_path: Path, script: str, rounds: int = 1) -> Path:
    from safetensors.numpy import save_file

    save_file(INIT, str(tmp_path / "initial.safetensors"))
    (tmp_path / "site.py").write_text(script)
    recipe = tmp_path / "job.yaml"
    recipe.write_text(
        f"name: job\nscript: site.py\nsites: 1\nrounds: {rounds}\ninitial_model: initial.safetensors\n"
        "env: {FL_PARAMS_FORMAT: numpy}\n"
    )
    return recipe


def _snapshot(run: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


@pytest.mark.integration
@pytest.mark.slow
def test_fl_plugins_run_then_server_on_the_finished_run_say_already_finished(tmp_path):
    recipe, run = _recipe(tmp_path, SITE, rounds=2), tmp_path / "run"
    out = _cli("run", str(recipe), "--run-dir", str(run))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"the final model is in {run / 'final'}" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_evaluation"]["round"] == 2 and summary["sites"]["site-1"]["exit_code"] == 0
    before = _snapshot(run)
    for args in (["run", str(recipe), "--run-dir", str(run)], ["server", str(recipe), "--run-dir", str(run)]):
        again = _cli(*args, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        text = " ".join(again.stdout.split())
        assert f"{run}: this run is already finished (job job, 2 rounds); the final model is in {run / 'final'}" in text
        assert "to start a new run, pass another --run-dir" in text, text
        assert _snapshot(run) == before, "a finished run was run again"


def _started(proc: subprocess.Popen, marker: str, within: float) -> str:
    """stdout up to the line holding `marker` (the process is up), read within `within` seconds."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                done.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(within), "".join(lines)
    return "".join(lines)


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_fl_plugins_server_exits_143_on_sigterm_and_130_on_ctrl_c(tmp_path, sig, code):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fl_plugins.cli", "server", "--address", "127.0.0.1:0", "--run-dir", str(run)]
    out = subprocess.PIPE
    proc = subprocess.Popen(
        [*cmd, "--rounds", "2"], cwd=ROOT, stdout=out, stderr=out, text=True, stdin=subprocess.DEVNULL
    )
    try:
        _started(proc, "listening on", within=60)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        proc.kill()
        proc.communicate()
    assert json.loads((run / "summary.json").read_text())["exit_code"] == code  # (a restart resumes the run)


@pytest.mark.integration
def test_fl_plugins_run_exits_143_on_sigterm(tmp_path):
    recipe = _recipe(tmp_path, "import time\ntime.sleep(600)\n")  # a site that never connects
    cmd = [sys.executable, "-m", "fl_plugins.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run")]
    out = subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "sites" / "site-1.log").exists():  # the aggregator is up, the site started
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
        proc.communicate()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["exit_code"] == 143


# -- the trainer integrations answer the final evaluation ---------------------------------------------------------


def _hf_eval_loss(params: dict[str, np.ndarray], rows: Any) -> float:
    """The eval_loss HF's evaluate() reports for `params` on `rows` (one batch), computed with one forward pass."""
    import torch
    from test_hf import tiny_bert

    model = tiny_bert()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    batch = [rows[i] for i in range(len(rows))]
    with torch.no_grad():
        return float(model(**{k: torch.stack([b[k] for b in batch]) for k in batch[0]}).loss)


@pytest.mark.integration
def test_the_hf_callback_form_answers_the_final_evaluation_inside_train(server_factory, site, tmp_path):
    """One train() with FLTrainerCallback and no finish(): a trainer that evaluates (eval_strategy "epoch") sends
    the global model's metrics with its updates, is asked for the final evaluation, and answers it after its last
    step with the final global model loaded."""
    pytest.importorskip("transformers")
    from test_hf import Rows, args, state_np, tiny_bert
    from transformers import Trainer

    import fl_plugins.hf as hf

    srv = server_factory(rounds=2, initial=state_np(tiny_bert()))
    site(srv)
    val = Rows(32, seed=9)
    a = args(tmp_path, eval_strategy="epoch", per_device_eval_batch_size=32)
    tr = Trainer(model=tiny_bert(seed=1), args=a, train_dataset=Rows(), eval_dataset=val,
                 callbacks=[hf.FLTrainerCallback()])  # fmt: skip
    tr.train()
    cfg = srv.aggregator.config
    assert finished(srv.aggregator, within=cfg.site_timeout)  # no site left waiting for: the job ended on its own
    (evaluation,) = events(cfg.run_dir, "evaluation")
    got = evaluation["sites"]["site-1"]
    assert evaluation["round"] == 2 and got["num_samples"] == 32
    assert got["metrics"]["eval_loss"] == pytest.approx(_hf_eval_loss(load_round(cfg.run_dir, 2), val), abs=1e-5)


@pytest.mark.integration
def test_the_hf_patch_loop_answers_the_final_evaluation(server_factory, site, tmp_path):
    pytest.importorskip("transformers")
    from test_hf import Rows, args, state_np, tiny_bert
    from transformers import Trainer

    import fl_plugins.hf as hf

    srv = server_factory(rounds=1, initial=state_np(tiny_bert()))
    site(srv)
    val = Rows(32, seed=9)
    a = args(tmp_path, max_steps=2, per_device_eval_batch_size=32)
    tr = Trainer(model=tiny_bert(seed=1), args=a, train_dataset=Rows(), eval_dataset=val)
    hf.patch(tr)
    tasks = []
    while hf.is_running():
        hf.receive()
        tasks.append(hf.get_task_name())
        tr.evaluate()
        tr.train()
    assert srv.wait() == 0
    assert tasks == ["train", "validate"]
    (evaluation,) = events(srv.aggregator.config.run_dir, "evaluation")
    want = _hf_eval_loss(load_round(srv.aggregator.config.run_dir, 1), val)
    assert evaluation["sites"]["site-1"]["metrics"]["eval_loss"] == pytest.approx(want, abs=1e-5)


@pytest.mark.integration
def test_a_lightning_loop_answers_the_final_evaluation(server_factory, site):
    pytest.importorskip("lightning.pytorch")
    import torch
    from test_lightning import Tiny, data, numpy_state, trainer

    import fl_plugins.lightning as lf

    srv = server_factory(rounds=1, initial=numpy_state(Tiny(seed=0)))
    site(srv)
    module, tr = Tiny(seed=1), trainer(max_epochs=1)
    lf.patch(tr)
    tasks = []
    while lf.is_running():
        lf.receive()
        tasks.append(lf.get_task_name())
        tr.validate(module, dataloaders=data(seed=9))
        tr.fit(module, train_dataloaders=data())
    assert srv.wait() == 0
    assert tasks == ["train", "validate"]
    final = Tiny()
    final.load_state_dict({k: torch.from_numpy(v) for k, v in load_round(srv.aggregator.config.run_dir, 1).items()})
    x, y = data(seed=9).dataset.tensors
    with torch.no_grad():
        want = float(torch.nn.functional.mse_loss(final.net(x), y))
    (evaluation,) = events(srv.aggregator.config.run_dir, "evaluation")
    assert evaluation["sites"]["site-1"]["metrics"]["val_loss"] == pytest.approx(want, abs=1e-5)


def test_a_phase_after_training_that_starts_with_nobody_connected_ends_with_the_site_that_comes_back(in_memory):
    """Both sites go silent past site_timeout as training ends (a loaded machine, a network blip): the phases after
    training start with nobody connected. They must not wait for `min_sites` sites that may be gone: the first site
    that comes back is enough (before: the cross-site phase waited for 2 and the job never ended)."""
    fed = in_memory(rounds=1, min_sites=2, initial=INIT, workflow="fedavg,cross-site-eval", site_timeout=1.0)
    a, b = fed.client("site-1", heartbeat=3600.0), fed.client("site-2", heartbeat=3600.0)  # (no heartbeats)
    both_train_one_round(a, b)
    b.close()
    time.sleep(2 * fed.config.site_timeout)  # both silent past the timeout: the submissions close, the next phase
    # starts with nobody connected (a sleep that only has to outlast a timeout, not win a race)
    from fl_plugins.wire.proto import fl_pb2 as pb

    for _ in range(20):  # site-1 comes back and answers what it is asked, until END (before: WAIT for ever)
        if (t := a.next_task(poll=2.0, give_up_after=10 * fed.config.site_timeout)).kind == pb.Task.END:
            break
        if t.kind == pb.Task.WAIT:
            continue
        _, p = a.download(t, "numpy")
        if t.kind == pb.Task.EVALUATE:
            a.send_result(t.round, t.task_id, {"metrics": {"m": float(np.mean(p["w"]))}})
        else:  # SUBMIT_MODEL, if it still gets one
            a.upload(t.round, t.attempt, {"w": p["w"]}, {"params_type": "FULL"}, task_id=t.task_id)
    assert t.kind == pb.Task.END, "the job did not end"
    fed.wait(timeout=10 * fed.config.site_timeout + fed.config.linger)
    matrix = json.loads((fed.run_dir / "cross_site_eval.json").read_text())
    assert matrix["results"]["global"]["site-1"] == {"metrics": {"m": 2.5}}
