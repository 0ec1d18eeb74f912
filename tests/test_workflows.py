"""Workflows beyond FedAvg's training rounds (issue 12): evaluation every k rounds, an evaluation-only job, and
cross-site evaluation (SUBMIT_MODEL, then every site evaluates every model), against the real service.

- NVIDIA FLARE's hello-numpy-cross-val client pattern (no branching on the task: every task trains +1, evaluates
  the mean and sends params with metrics) runs with the import swapped under `fedavg,cross-site-eval`, and its
  matrix holds the values that pattern implies.
- The hello-pt pattern (a torch loop that branches on is_evaluate / is_submit_model and submits its best model)
  gives a full matrix whose submitted models are the sites' own.
- A site that leaves, refuses by policy, sends no metrics or never answers leaves an empty cell with the reason;
  the job ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import load_round

from fl_plugins.config import AggregatorConfig

KEY = "numpy_key"
INIT = {KEY: np.arange(1, 10, dtype=np.float32).reshape(3, 3)}  # hello-numpy's initial weights: mean 5

# The hello-numpy-cross-val client's pattern, written here: only the import names fl_plugins.
NUMPY_CSE_CLIENT = r"""
import argparse
import numpy as np
import fl_plugins.client as flare

KEY = "numpy_key"

parser = argparse.ArgumentParser()
parser.add_argument("--update_type", choices=["full", "diff"], default="full")
args = parser.parse_args()
flare.init()
site = flare.system_info()["site_name"]
while flare.is_running():
    model = flare.receive()
    arr = model.params[KEY]
    new = arr + 1                                   # "training"
    metrics = {"weight_mean": float(np.mean(new))}  # "evaluation"
    print(site, flare.get_task_name(), model.current_round, metrics, flush=True)
    out, kind = (new - arr, flare.ParamsType.DIFF) if args.update_type == "diff" else (new, flare.ParamsType.FULL)
    flare.send(flare.FLModel(params={KEY: out}, params_type=kind, metrics=metrics,
                             current_round=model.current_round))
"""

# The hello-pt pattern: a torch loop that evaluates what it receives, sends metrics alone for an evaluation,
# submits its best local model when asked, and trains otherwise (keeping its best model on disk).
PT_CLIENT = r"""
import sys
import torch
from torch import nn
import fl_plugins.client as flare

best_path = sys.argv[1]
torch.manual_seed(0)
g = torch.Generator().manual_seed(int(sys.argv[2]))
x = torch.randn(64, 4, generator=g)
y = (x[:, 0] + x[:, 1] > float(sys.argv[3])).long()
net = nn.Linear(4, 2)

def accuracy(weights):
    m = nn.Linear(4, 2)
    m.load_state_dict(weights)
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())

flare.init()
best = -1.0
while flare.is_running():
    model = flare.receive()
    acc = accuracy(model.params)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": acc}, meta={"NUM_EVAL_SAMPLES": len(y)}))
        continue
    if flare.is_submit_model():
        assert model.meta["submit_model_name"] == "best_model"
        flare.send(flare.FLModel(params=torch.load(best_path)))
        continue
    net.load_state_dict(model.params)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    local = accuracy(net.state_dict())
    if local > best:
        best = local
        torch.save({k: v.clone() for k, v in net.state_dict().items()}, best_path)
    flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": acc}, meta={"NUM_STEPS_CURRENT_ROUND": 20}))
"""


def _sites(tmp_path: Path, srv: Any, script: str, args: dict[str, list[str]], env: dict[str, str] | None = None):
    path = tmp_path / "client.py"
    path.write_text(script)
    procs = {}
    for site, extra in args.items():
        e = {**os.environ, "FL_SERVER": srv.address, "FL_SITE": site, **(env or {})}
        procs[site] = subprocess.Popen([sys.executable, str(path), *extra], env=e, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return procs


def _wait(procs: dict[str, subprocess.Popen], srv: Any, timeout: float = 120) -> dict[str, str]:
    out = {}
    for site, p in procs.items():
        try:
            out[site] = p.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            out[site] = p.communicate()[0]
        assert p.returncode == 0, f"{site} exited {p.returncode}:\n{out[site][-3000:]}"
    deadline = time.monotonic() + 30
    while not srv.aggregator.finished():  # (the sites end on END; the job is over once its files are written)
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
    assert srv.aggregator.error is None
    return out


def _report(run_dir: Path) -> tuple[str, list[Path]]:
    """`fl-plugins report --partial RUN_DIR` (a server's run has no summary.json): its text, and the plots."""
    import io

    from rich.console import Console

    from fl_plugins.report import report

    out = io.StringIO()
    rep = report(run_dir, console=Console(file=out, width=250), partial=True)
    return out.getvalue(), rep.plots


def _matrix(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "cross_site_eval.json").read_text())


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


@pytest.mark.parametrize("update_type", ["full", "diff"])
def test_hello_numpy_cross_val_client_runs_unchanged(server_factory, tmp_path, update_type):
    """Both of the script's --update_type: a DIFF answer to SUBMIT_MODEL is sent as the received model plus it."""
    srv = server_factory(rounds=2, min_sites=2, initial=INIT, workflow="fedavg,cross-site-eval")
    args = ["--update_type", update_type]
    procs = _sites(tmp_path, srv, NUMPY_CSE_CLIENT, {"site-1": args, "site-2": args}, {"FL_PARAMS_FORMAT": "numpy"})
    out = _wait(procs, srv)
    assert "submit_model" in out["site-1"] and "validate" in out["site-2"]
    run = srv.aggregator.config.run_dir
    final = load_round(run, 2)[KEY]
    np.testing.assert_array_equal(final, INIT[KEY] + 2)  # two rounds of +1
    m = _matrix(run)
    assert m["round"] == 2 and m["models"] == ["global", "site-1", "site-2"] and m["sites"] == ["site-1", "site-2"]
    # every site evaluates model + 1: the global model's mean is 7 (+1 = 8); each site submitted global + 1
    # (the script trains on what SUBMIT_MODEL hands it, the final global model), whose evaluation gives 9
    for site in ("site-1", "site-2"):
        assert m["results"]["global"][site] == {"metrics": {"weight_mean": 8.0}}
        assert m["results"]["site-1"][site] == {"metrics": {"weight_mean": 9.0}}
        assert m["results"]["site-2"][site] == {"metrics": {"weight_mean": 9.0}}
    assert m["submissions"] == {} and m["means"]["global"] == {"weight_mean": 8.0}
    np.testing.assert_array_equal(load_round_dir(run / "cross_site" / "site-1")[KEY], INIT[KEY] + 3)
    assert [e["means"] for e in _events(run, "cross_site_eval")] == [m["means"]]
    srv.stop(0)  # a restart of the finished job has nothing left to do and leaves the matrix as it is
    from fl_plugins.aggregator.core import Aggregator

    again = Aggregator(srv.aggregator.config)
    assert again.done and _matrix(run) == m


def load_round_dir(d: Path) -> dict[str, np.ndarray]:
    """A model folder's tensors; a site's submitted model is named by cross_site/models.json."""
    from safetensors.numpy import load_file

    if d.parent.name == "cross_site":
        d = d.parent / json.loads((d.parent / "models.json").read_text())[d.name]
    shards = json.loads((d / "manifest.json").read_text())["shards"]
    out: dict[str, np.ndarray] = {}
    for s in shards:
        out.update(load_file(str(d / s["name"])))
    return out


def test_hello_pt_loop_submits_its_best_model_and_fills_the_matrix(server_factory, tmp_path):
    torch = pytest.importorskip("torch")
    init = {"weight": np.zeros((2, 4), np.float32), "bias": np.zeros(2, np.float32)}
    srv = server_factory(rounds=2, min_sites=2, initial=init, workflow="fedavg,cross-site-eval")
    args = {"site-1": [str(tmp_path / "best-1.pt"), "1", "0.5"], "site-2": [str(tmp_path / "best-2.pt"), "2", "-0.5"]}
    _wait(_sites(tmp_path, srv, PT_CLIENT, args), srv)
    run = srv.aggregator.config.run_dir
    m = _matrix(run)
    assert m["models"] == ["global", "site-1", "site-2"]
    for owner in m["models"]:
        for site in ("site-1", "site-2"):
            cell = m["results"][owner][site]
            assert set(cell) == {"metrics", "num_samples"} and 0.0 <= cell["metrics"]["accuracy"] <= 1.0
    for i in (1, 2):  # the model each site submitted is its own best local model, bit for bit
        best = torch.load(tmp_path / f"best-{i}.pt")
        got = load_round_dir(run / "cross_site" / f"site-{i}")
        for k, v in best.items():
            np.testing.assert_array_equal(got[k], v.numpy())
    # a site's own model on its own data beats the other site's model there (opposite label thresholds)
    assert m["results"]["site-1"]["site-1"]["metrics"]["accuracy"] > m["results"]["site-2"]["site-1"]["metrics"][
        "accuracy"
    ]


# -- the in-process site loops: SiteClient answering each kind of task ---------------------------------------------

Answer = Callable[[Any, dict[str, np.ndarray]], dict[str, Any] | None]


class Site(threading.Thread):
    """A site over a real SiteClient: trains +1, answers evaluations with `evaluate(task, params)` (None: never
    answers, its process stays connected), submits its last update for SUBMIT_MODEL. `leave_after_train`: its
    process ends after its last update. Records the kinds of the tasks it got, in order."""

    def __init__(
        self, address: str, name: str, evaluate: Answer, leave_after_train: bool = False, policy: Any = None
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.policy = policy
        self.address, self.site, self.evaluate, self.leave = address, name, evaluate, leave_after_train
        self.kinds: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self.replies: list[str] = []
        self.hung: Any = None  # the client of a site that stopped answering (closed by the test)

    def run(self) -> None:
        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        names = {pb.Task.TRAIN: "train", pb.Task.EVALUATE: "evaluate", pb.Task.SUBMIT_MODEL: "submit"}
        c = SiteClient(self.address, self.site)
        c.policy = self.policy  # (a kit's policy.yaml, given directly: the test speaks plaintext)
        try:
            c.connect()
            last: dict[str, np.ndarray] = {}
            while True:
                task = c.next_task(poll=2.0)
                if task.kind == pb.Task.END:
                    break
                self.kinds.append((names[task.kind], task.round))
                _, params = c.download(task, "numpy")
                if task.kind == pb.Task.EVALUATE:
                    env = self.evaluate(task, params)
                    if env is None:
                        self.hung, c = c, None
                        return
                    self.replies.append(c.send_result(task.round, task.task_id, env).message)
                elif task.kind == pb.Task.SUBMIT_MODEL:
                    c.upload(task.round, 0, last or params, {"params_type": "FULL"}, task_id=task.task_id)
                else:
                    last = {k: v + 1 for k, v in params.items()}
                    c.upload(task.round, task.attempt, last, {"params_type": "FULL"})
                    if self.leave and task.round == task.total_rounds - 1:
                        return
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            if c is not None:
                c.close()


def _mean_eval(samples: int) -> Answer:
    return lambda task, params: {
        "metrics": {"mean": float(np.mean(params[KEY]))},
        "meta": {"NUM_EVAL_SAMPLES": samples},
    }


def _run(*sites: Site, srv: Any, timeout: float = 60) -> None:
    for s in sites:
        s.start()
    for s in sites:
        s.join(timeout)
        assert not s.is_alive(), f"{s.site} did not finish"
        assert s.error is None, f"{s.site}: {s.error!r}"
    assert srv.aggregator.error is None


def test_evaluate_every_k_rounds_is_a_barrier_and_weights_by_samples(server_factory):
    srv = server_factory(rounds=3, min_sites=2, initial=INIT, evaluate_every=2)
    a = Site(srv.address, "site-1", _mean_eval(100))
    b = Site(srv.address, "site-2", lambda t, p: {"metrics": {"mean": 0.0}, "meta": {"NUM_EVAL_SAMPLES": 300}})
    _run(a, b, srv=srv)
    # after round 2 (k = 2) and after the last round (3): each site evaluates before it trains again
    want = [("train", 0), ("train", 1), ("evaluate", 2), ("train", 2), ("evaluate", 3)]
    assert a.kinds == want and b.kinds == want
    evals = _events(srv.aggregator.config.run_dir, "evaluation")
    assert [e["round"] for e in evals] == [2, 3]
    # site-1 sees mean 7 (5 + 2) after round 2 with 100 samples, site-2 says 0 with 300: (700 + 0) / 400
    assert evals[0]["metrics"] == {"mean": 1.75}
    assert evals[0]["sites"]["site-1"] == {"metrics": {"mean": 7.0}, "num_samples": 100.0}
    assert evals[1]["metrics"] == {"mean": 2.0}
    assert a.replies == ["result accepted"] * 2
    text, _ = _report(srv.aggregator.config.run_dir)
    assert "evaluations of the global model" in text and "mean=1.75" in text and "site-1: mean=7" in text
    srv.stop(0)  # a restart of the finished job does not evaluate the final model again: it is done at once
    from fl_plugins.aggregator.core import Aggregator

    assert Aggregator(srv.aggregator.config).done


def test_an_evaluation_only_job_evaluates_the_initial_model(server_factory):
    srv = server_factory(rounds=1, min_sites=2, initial=INIT, workflow="evaluate")
    a, b = (Site(srv.address, f"site-{i}", _mean_eval(10)) for i in (1, 2))
    _run(a, b, srv=srv)
    assert a.kinds == b.kinds == [("evaluate", 0)]
    (ev,) = _events(srv.aggregator.config.run_dir, "evaluation")
    assert ev["round"] == 0 and ev["metrics"] == {"mean": 5.0} and set(ev["sites"]) == {"site-1", "site-2"}
    assert not (srv.aggregator.config.run_dir / "global" / "round-00001").exists()  # nothing was trained


def test_cells_say_why_they_are_empty_and_the_job_ends(server_factory):
    """site-2 sends no metrics for the global model and never answers for site-1's model (evaluate_timeout: its
    next cell times out one timeout later); site-3's process ends after training and never submits."""
    srv = server_factory(rounds=1, min_sites=3, initial=INIT, workflow="fedavg,cross-site-eval",
                         evaluate_timeout=1.0, site_timeout=60.0)  # fmt: skip

    def picky(task: Any, params: dict[str, np.ndarray]) -> dict[str, Any] | None:
        return {"metrics": {}} if task.model == "global" else None

    a = Site(srv.address, "site-1", _mean_eval(1))
    b = Site(srv.address, "site-2", picky)
    c = Site(srv.address, "site-3", _mean_eval(1), leave_after_train=True)
    try:
        _run(a, b, c, srv=srv)
        m = _matrix(srv.aggregator.config.run_dir)
    finally:
        if b.hung is not None:
            b.hung.close()
    assert m["models"] == ["global", "site-1", "site-2"] and m["sites"] == ["site-1", "site-2", "site-3"]
    assert "evaluate_timeout" in m["submissions"]["site-3"]["error"]
    assert m["results"]["global"]["site-1"] == {"metrics": {"mean": 6.0}, "num_samples": 1.0}
    assert m["results"]["site-2"]["site-1"] == {"metrics": {"mean": 6.0}, "num_samples": 1.0}  # its last update
    assert "sent no metrics" in m["results"]["global"]["site-2"]["error"]
    assert "evaluate_timeout" in m["results"]["site-1"]["site-2"]["error"]
    assert "evaluate_timeout" in m["results"]["site-2"]["site-2"]["error"]
    assert all("evaluate_timeout" in m["results"][x]["site-3"]["error"] for x in m["models"])
    text, written = _report(srv.aggregator.config.run_dir)  # the matrix, its reasons, and the heat-map
    assert "cross-site evaluation of round 1" in text and "sent no metrics" in text and "evaluate_timeout" in text
    assert any(p.name == "cross_site_eval.png" and p.stat().st_size > 0 for p in written)


def test_a_site_that_left_leaves_its_cells_empty(server_factory):
    # (3 s: a staying site, silent for a moment on a loaded machine, may be dropped and come back; the phase then
    # starts with nobody connected and must still end with the site that comes back)
    srv = server_factory(rounds=1, min_sites=2, initial=INIT, workflow="fedavg,cross-site-eval", site_timeout=3.0)
    a = Site(srv.address, "site-1", _mean_eval(1))
    c = Site(srv.address, "site-2", _mean_eval(1), leave_after_train=True)
    _run(a, c, srv=srv)
    m = _matrix(srv.aggregator.config.run_dir)
    assert m["models"] == ["global", "site-1"]
    assert "left before it answered" in m["submissions"]["site-2"]["error"]
    assert m["results"]["site-1"]["site-1"] == {"metrics": {"mean": 6.0}, "num_samples": 1.0}
    assert m["sites"] == ["site-1"]  # it had left when the evaluations began: no row of its own


def test_a_policy_refusal_leaves_the_cells_of_that_site_empty_with_the_reason(server_factory, tmp_path):
    from fl_plugins.errors import PolicyError
    from fl_plugins.security.policy import parse_policy

    policy = parse_policy({"tasks": ["train", "submit_model"]}, tmp_path / "policy.yaml")
    srv = server_factory(rounds=1, min_sites=2, initial=INIT, workflow="fedavg,cross-site-eval")
    a = Site(srv.address, "site-1", _mean_eval(1))
    b = Site(srv.address, "site-2", _mean_eval(1), policy=policy)
    with pytest.raises(AssertionError, match="PolicyError"):
        _run(a, b, srv=srv)
    assert isinstance(b.error, PolicyError) and "does not run 'evaluate' tasks" in str(b.error)
    a.join(30)
    assert a.error is None
    m = _matrix(srv.aggregator.config.run_dir)
    assert m["models"] == ["global", "site-1", "site-2"]  # site-2 submitted its model: its policy allows that
    assert all("refused by the site's policy" in m["results"][x]["site-2"]["error"] for x in m["models"])
    assert m["results"]["site-2"]["site-1"] == {"metrics": {"mean": 6.0}, "num_samples": 1.0}


def test_the_workflow_and_strategy_sections_of_a_recipe_name_their_keys(tmp_path):
    from fl_plugins.errors import ConfigError
    from fl_plugins.recipe import load_recipe

    script = tmp_path / "train.py"
    script.write_text("")

    def recipe(extra: str) -> Path:
        p = tmp_path / "r.yaml"
        p.write_text(f"script: train.py\nsites: 2\nrounds: 2\n{extra}\n")
        return p

    r = load_recipe(recipe("workflow: {type: [fedavg, cross-site-eval], evaluate_every: 2, sample_sites: 0.5}"))
    cfg = r.federation.aggregator_config(tmp_path / "run")
    assert (cfg.workflow, cfg.evaluate_every, cfg.sample_sites) == ("fedavg,cross-site-eval", 2, 0.5)
    with pytest.raises(ConfigError, match=r"`workflow.type` must be fedavg or cyclic"):
        load_recipe(recipe("workflow: {type: [evaluate, fedavg]}"))
    with pytest.raises(ConfigError, match=r"workflow.evaluate_evry.*evaluate_every"):
        load_recipe(recipe("workflow: {evaluate_evry: 2}"))
    with pytest.raises(ConfigError, match=r"`strategy.type` must be one of"):
        load_recipe(recipe("strategy: {type: fedsgd}"))
    with pytest.raises(ConfigError, match=r"`workflow.sample_sites` must be a fraction"):
        load_recipe(recipe("workflow: {sample_sites: 1.5}"))


def test_an_evaluation_job_needs_no_rounds_on_the_command_line(tmp_path):
    from safetensors.numpy import save_file

    from fl_plugins.cli import server_config
    from fl_plugins.errors import ConfigError

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "m.safetensors"))  # read at config time: it must be one
    cfg = server_config(
        {"run_dir": tmp_path / "r", "workflow": "evaluate", "initial_model": tmp_path / "m.safetensors"}, None
    )
    assert cfg.workflow == "evaluate"
    with pytest.raises(ConfigError, match="--rounds"):
        server_config({"run_dir": tmp_path / "r", "workflow": "fedavg"}, None)
    assert AggregatorConfig(run_dir=tmp_path, rounds=1, workflow=["cyclic", "cross-site-eval"]).workflow == (
        "cyclic,cross-site-eval"
    )


# -- cyclic ------------------------------------------------------------------------------------------------------


def _cyclic(server_factory, order: str) -> tuple[str, list[dict[str, Any]]]:
    from conftest import run_sites

    srv = server_factory(rounds=2, min_sites=3, initial={"t": np.zeros(1, np.float64)}, workflow="cyclic",
                         cyclic_order=order, seed=3)  # fmt: skip

    def step(i: int) -> Any:  # each visit appends the site's digit: the final model spells the visiting order
        return lambda r, p: ({"t": p["t"] * 10 + i}, "FULL", 1.0)

    run_sites(srv.address, {f"site-{i}": step(i) for i in (1, 2, 3)})
    run = srv.aggregator.config.run_dir
    return str(int(load_round(run, 6)["t"][0])), _events(run, "sample")


def test_cyclic_visits_every_site_in_turn_each_cycle(server_factory):
    trace, samples = _cyclic(server_factory, "fixed")
    assert trace == "123123"  # 2 cycles x 3 visits, each site trained on the one before's model
    assert [s["sites"] for s in samples] == [[f"site-{int(d)}"] for d in trace]


def test_cyclic_shuffles_the_order_per_cycle_with_the_seed(server_factory):
    trace, samples = _cyclic(server_factory, "shuffle")
    assert sorted(trace[:3]) == sorted(trace[3:]) == ["1", "2", "3"]  # every site once a cycle
    assert [s["sites"] for s in samples] == [[f"site-{int(d)}"] for d in trace]
    import random

    order = [f"site-{i}" for i in (1, 2, 3)]
    want = ""
    for cycle in (0, 1):  # the documented seed: "seed:cycle:C"
        o = list(order)
        random.Random(f"3:cycle:{cycle}").shuffle(o)
        want += "".join(n[-1] for n in o)
    assert trace == want
