"""Every task kind through the trainer integrations: an EVALUATE task runs the trainer's validation (Lightning) or
evaluation (HF) on the received model, trains nothing, and leaves the model's weights and its optimizer and
LR-scheduler state as they were; SUBMIT_MODEL sends what a TRAIN update would (a PEFT model's adapter only);
cross-site evaluation of two HF sites (FLARE's patch() loop and the one-train() callback) fills its whole matrix.

Lightning runs in the test's own thread against a real aggregator on loopback; the HF sites of a cross-site job
are subprocesses (one client session per process); the PEFT submission uses the in-memory federation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import load_round  # noqa: E402
from test_driver import ArrayTarget, Scripted  # noqa: E402
from test_hf import Rows, args, state_np, tiny_bert  # noqa: E402
from test_lightning import N, Tiny, data, numpy_state, trainer  # noqa: E402
from transformers import Trainer  # noqa: E402

import fl_plugins.hf as hf_flare  # noqa: E402
import fl_plugins.lightning as flare  # noqa: E402
from fl_plugins.client import session  # noqa: E402
from fl_plugins.client.session import ClientSession  # noqa: E402
from fl_plugins.errors import ConfigError  # noqa: E402
from fl_plugins.integrations.driver import RoundDriver, TaskKind  # noqa: E402

TESTS = Path(__file__).resolve().parent


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


class EvaluatingAnchor(threading.Thread):
    """A second site over a real SiteClient: each TRAIN task's global model goes back with an overwhelming weight
    (the aggregate stays the initial model, never the Lightning site's), each EVALUATE task gets val_loss -1."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True, name="anchor")
        self.address, self.error = address, None

    def run(self) -> None:
        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        c = SiteClient(self.address, "anchor")
        try:
            c.connect()
            while (task := c.next_task(poll=2.0)).kind != pb.Task.END:
                if task.kind == pb.Task.EVALUATE:
                    c.send_result(task.round, task.task_id, {"metrics": {"val_loss": -1.0}, "meta": {}})
                    continue
                _, params = c.download(task, "numpy")
                c.upload(task.round, task.attempt, params,
                         {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1e11}})  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            c.close()


class OptimizerStates(L.Callback):
    """The optimizer's and LR schedulers' state when each fit's training begins (after the federated callback
    restored it) and when it ends."""

    def __init__(self) -> None:
        self.began: list[dict] = []
        self.ended: list[dict] = []

    @staticmethod
    def state(trainer) -> dict:
        import copy

        schedulers = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        return copy.deepcopy({"optimizer": trainer.optimizers[0].state_dict(), "schedulers": schedulers})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and len(self.began) == len(self.ended):
            self.began.append(self.state(trainer))

    def on_train_end(self, trainer, pl_module):
        self.ended.append(self.state(trainer))


def same(a, b) -> bool:
    """Equal state dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def val_loss(params: dict[str, np.ndarray], loader) -> float:
    """Tiny's validation loss with `params`, computed here (Lightning's val_loss: the mean over equal batches)."""
    module = Tiny()
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    with torch.no_grad():
        return float(np.mean([torch.nn.functional.mse_loss(module.net(x), y).item() for x, y in loader]))


@pytest.mark.integration
def test_lightning_evaluates_each_global_model_without_training_or_moving_its_optimizer(server_factory, site):
    """evaluate_every=1: after each round every site evaluates the new global model. FLARE's loop (validate, then
    fit) answers that EVALUATE task with validate's metrics on the global model, the fit trains nothing, and the
    next TRAIN round starts from the module's own optimizer and LR-scheduler state where the last one ended."""
    srv = server_factory(rounds=2, min_sites=2, initial=numpy_state(Tiny(seed=0)), evaluate_every=1)
    anchor = EvaluatingAnchor(srv.address)
    anchor.start()
    site(srv, "lightning")
    module, states = Tiny(seed=1), OptimizerStates()
    tr = trainer(max_epochs=1, callbacks=[states])
    flare.patch(tr)
    seen = []
    while flare.is_running():
        flare.receive()
        task, before = flare.get_task_name(), numpy_state(module)
        loss = tr.validate(module, dataloaders=data(seed=9), verbose=False)[0]["val_loss"]
        validated = numpy_state(module)
        tr.fit(module, train_dataloaders=data())
        seen.append((task, loss, before, validated, numpy_state(module)))
    anchor.join(30)
    assert not anchor.is_alive() and anchor.error is None
    assert srv.wait() == 0
    assert [s[0] for s in seen] == ["train", "validate", "train", "validate"]
    assert len(module.first_losses) == 2  # only the TRAIN tasks trained
    run = srv.aggregator.config.run_dir
    evaluations = events(run, "evaluation")
    assert [e["round"] for e in evaluations] == [1, 2]
    for record, (_, loss, before, validated, after) in zip(evaluations, seen[1::2], strict=True):
        cell = record["sites"]["lightning"]
        assert cell["metrics"]["val_loss"] == pytest.approx(loss) and cell["num_samples"] == N
        assert record["sites"]["anchor"]["metrics"]["val_loss"] == -1.0
        scored = val_loss(load_round(run, record["round"]), data(seed=9))
        assert loss == pytest.approx(scored, abs=1e-6)  # the global model was validated ...
        assert val_loss(before, data(seed=9)) != pytest.approx(scored, abs=1e-3)  # ... not the module's own
        for k, v in before.items():  # and the module got its own weights back; the fit trained nothing
            np.testing.assert_array_equal(validated[k], v, err_msg=k)
            np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert len(states.began) == len(states.ended) == 2
    assert states.began[0]["optimizer"]["state"] == {}  # round 0 starts afresh ...
    assert same(states.began[1], states.ended[0])  # ... round 1 where round 0 ended: the evaluation moved nothing


@pytest.mark.integration
def test_a_lightning_fit_on_an_evaluate_task_validates_instead_of_training(server_factory, site):
    """A loop without validate(): the fit that meets an EVALUATE task trains nothing and validates the received
    model with the fit's validation data instead, so the task is answered and the job goes on."""
    srv = server_factory(rounds=2, initial=numpy_state(Tiny(seed=0)), evaluate_every=1)
    site(srv)
    module, tr = Tiny(seed=1), trainer(max_epochs=1)
    flare.patch(tr)
    tasks = []
    while flare.is_running():
        flare.receive()
        tasks.append(flare.get_task_name())
        tr.fit(module, train_dataloaders=data(), val_dataloaders=data(seed=9))
    assert srv.wait() == 0
    assert tasks == ["train", "validate", "train", "validate"] and len(module.first_losses) == 2
    run = srv.aggregator.config.run_dir
    for record in events(run, "evaluation"):
        scored = val_loss(load_round(run, record["round"]), data(seed=9))
        assert record["sites"]["site-1"]["metrics"]["val_loss"] == pytest.approx(scored, abs=1e-6)
    assert [e["round"] for e in events(run, "evaluation")] == [1, 2]


@pytest.mark.integration
def test_a_fit_that_cannot_validate_an_evaluate_task_says_so_instead_of_looping(server_factory, site):
    srv = server_factory(rounds=1, initial=numpy_state(Tiny(seed=0)), workflow="evaluate")
    site(srv)
    module, tr = Tiny(seed=1), trainer(max_epochs=1, limit_val_batches=0)
    own = numpy_state(module)
    flare.patch(tr)
    assert flare.is_running() and flare.receive() is not None and flare.is_evaluate()
    with pytest.raises(ConfigError, match=r"validate\(\) scored nothing: give fit\(\) val_dataloaders"):
        tr.fit(module, train_dataloaders=data(), val_dataloaders=data(seed=9))
    assert module.first_losses == [] and all(np.array_equal(v, own[k]) for k, v in numpy_state(module).items())


HF_SITE = r"""
import json, sys
from test_hf import Rows, args, tiny_bert
from transformers import Trainer
import fl_plugins.hf as flare

form, site, out = sys.argv[1:4]
k = int(site[-1])
a = args(__import__("pathlib").Path(out) / site, max_steps=4, per_device_eval_batch_size=16)
model = tiny_bert(seed=k)
if form == "patch":   # FLARE's loop, one train() per round
    tr = Trainer(model=model, args=a, train_dataset=Rows(64, seed=k), eval_dataset=Rows(32, seed=10 + k))
    flare.patch(tr)
    tasks = []
    while flare.is_running():
        flare.receive()
        tasks.append(flare.get_task_name())
        tr.evaluate()
        tr.train()
else:                 # one train() for every round, then the tasks that come after training
    cb = flare.FLTrainerCallback()
    tr = Trainer(model=model, args=a, train_dataset=Rows(64, seed=k), eval_dataset=Rows(32, seed=10 + k),
                 callbacks=[cb])
    tr.train()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}  # what SUBMIT_MODEL sends
    cb.finish(tr)
    tasks = None
    final = tr.evaluate()["eval_loss"]   # at the end the callback leaves the job's final global model in the model
    model.load_state_dict(trained)
local = tr.evaluate()["eval_loss"]   # the site's own model, after every task
with open(f"{out}/{site}.json", "w") as f:
    json.dump({"tasks": tasks, "local_eval_loss": local, "steps": tr.state.global_step,
               "final_eval_loss": final if form == "callback" else None}, f)
flare.shutdown()
"""


def hf_eval_loss(params: dict[str, np.ndarray], rows: Rows) -> float:
    """The eval_loss HF's evaluate() reports (the mean over equal batches), computed here with one forward pass."""
    model = tiny_bert()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    batch = [rows[i] for i in range(len(rows))]
    with torch.no_grad():
        out = model(**{k: torch.stack([b[k] for b in batch]) for k in batch[0]})
    return float(out.loss)


@pytest.mark.integration
@pytest.mark.slow
def test_cross_site_evaluation_of_two_hf_sites_fills_the_matrix_with_eval_losses(server_factory, tmp_path):
    """fedavg with evaluate_every=1, then cross-site evaluation: site-1 runs FLARE's patch() loop, site-2 the
    callback form (one train() for both rounds, then FLTrainerCallback.finish for what comes after training).
    Every cell of cross_site_eval.json holds the evaluating site's eval_loss of that model: a site's own cell is
    its local model's (the evaluations put its weights back), the global cells are the final global model's."""
    srv = server_factory(rounds=2, min_sites=2, initial=state_np(tiny_bert()), evaluate_every=1,
                         workflow="fedavg,cross-site-eval")  # fmt: skip
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])  # the site imports test_hf's model
    env = {**os.environ, "FL_SERVER": srv.address, "PYTHONPATH": path}
    procs = [subprocess.Popen([sys.executable, "-c", HF_SITE, form, name, str(tmp_path)], env={**env, "FL_SITE": name},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for form, name in (("patch", "site-1"), ("callback", "site-2"))]  # fmt: skip
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    assert srv.wait() == 0
    run = srv.aggregator.config.run_dir
    sites = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in ("site-1", "site-2")}
    assert sites["site-1"]["tasks"] == ["train", "validate", "train", "validate", "submit_model"] + ["validate"] * 3
    assert sites["site-2"]["steps"] == 8  # the callback form trained 2 rounds x 4 steps in one train()
    matrix = json.loads((run / "cross_site_eval.json").read_text())
    want = hf_eval_loss(load_round(run, 2), Rows(32, seed=12))  # the callback site ends with the final model
    assert sites["site-2"]["final_eval_loss"] == pytest.approx(want, abs=1e-5)
    assert sorted(matrix["results"]) == ["global", "site-1", "site-2"]
    final = load_round(run, 2)
    for model, row in matrix["results"].items():
        assert sorted(row) == ["site-1", "site-2"], row
        for name, cell in row.items():
            loss = cell["metrics"]["eval_loss"]
            assert math.isfinite(loss) and cell["num_samples"] == 32, cell
            if model == name:
                assert loss == pytest.approx(sites[name]["local_eval_loss"], abs=1e-6)
            if model == "global":
                assert loss == pytest.approx(hf_eval_loss(final, Rows(32, seed=10 + int(name[-1]))), abs=1e-5)
    assert matrix["results"]["site-1"]["site-2"]["metrics"] != matrix["results"]["site-2"]["site-2"]["metrics"]
    evaluations = events(run, "evaluation")
    assert [e["round"] for e in evaluations] == [1, 2]
    for e in evaluations:
        for name in ("site-1", "site-2"):
            rows = Rows(32, seed=10 + int(name[-1]))
            want = hf_eval_loss(load_round(run, e["round"]), rows)
            assert e["sites"][name]["metrics"]["eval_loss"] == pytest.approx(want, abs=1e-5)


@pytest.mark.integration
def test_a_peft_sites_submit_model_sends_its_adapter_only(in_memory, tmp_path):
    """An evaluation-only cross-site job on an initial adapter: SUBMIT_MODEL sends the site's own adapter (the
    tensors a TRAIN update would send, none of the frozen base), never loading the global adapter that comes with
    the task; both evaluations leave the adapter as it was."""
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    initial = {k: v.numpy().copy() for k, v in hf_flare.exchanged_state(peft.get_peft_model(tiny_bert(0), cfg)).items()}
    fed = in_memory(rounds=1, initial=initial, workflow="cross-site-eval", min_sites=1)
    fed.activate("site-1", params_format="torch")
    model = peft.get_peft_model(tiny_bert(seed=1), cfg)
    own = {k: v.clone() for k, v in hf_flare.exchanged_state(model).items()}
    assert sorted(own) == sorted(initial) and len(own) < len(model.state_dict())
    assert not all(torch.equal(v, torch.from_numpy(initial[k])) for k, v in own.items())  # not the global adapter
    tr = Trainer(model=model, args=args(tmp_path, max_steps=4), train_dataset=Rows(), eval_dataset=Rows(32, seed=9))
    hf_flare.patch(tr)
    tasks = []
    while hf_flare.is_running():
        hf_flare.receive()
        tasks.append(hf_flare.get_task_name())
        tr.evaluate()
        tr.train()
        now = hf_flare.exchanged_state(model)
        assert all(torch.equal(now[k], v) for k, v in own.items()), tasks  # nothing trained, loaded or left behind
    fed.wait()
    assert tasks == ["submit_model", "validate", "validate"]
    from safetensors.torch import load_file

    folder = json.loads((fed.run_dir / "cross_site" / "models.json").read_text())["site-1"]
    shards = sorted((fed.run_dir / "cross_site" / folder).glob("*.safetensors"))
    submitted = {k: v for p in shards for k, v in load_file(str(p)).items()}
    assert sorted(submitted) == sorted(own)  # the adapter (and the classifier peft trains), nothing else
    for k, v in own.items():
        assert torch.equal(submitted[k], v), k
    matrix = json.loads((fed.run_dir / "cross_site_eval.json").read_text())
    local = tr.evaluate()["eval_loss"]
    assert matrix["results"]["site-1"]["site-1"]["metrics"]["eval_loss"] == pytest.approx(local, abs=1e-6)
    assert matrix["results"]["global"]["site-1"]["metrics"]["eval_loss"] != pytest.approx(local, abs=1e-4)


# -- the round driver under multi-process training: rank 0 tells the others the task; only a TRAIN task's
# -- weights, and an EVALUATE task's model once its evaluation begins, are broadcast ------------------------------
def test_rank_zero_evaluates_broadcasts_the_model_to_evaluate_and_gets_its_weights_back(in_memory):
    fed = in_memory(rounds=1, initial={"w": np.full(2, 5, np.float32)}, workflow="evaluate")
    fed.activate("site-1")
    target, coll = ArrayTarget(w=np.zeros(2, np.float32)), Scripted()
    drv = RoundDriver()
    drv.start()
    assert drv.open_task(target, collective=coll) is TaskKind.EVALUATE
    assert coll.sent == [{"round": 0, "total_rounds": 1, "kind": "evaluate"}] and coll.tensors == []
    assert not drv.in_round and not drv.evaluating and target.loads == []  # nothing loaded yet
    drv.begin_evaluation(target, coll)
    np.testing.assert_array_equal(target.arrays["w"], np.full(2, 5, np.float32))
    assert coll.tensors == [[target.arrays["w"]]]
    drv.end_evaluation(target, {"loss": 0.25}, num_samples=8)
    np.testing.assert_array_equal(target.arrays["w"], np.zeros(2, np.float32))  # its own weights back
    assert drv.open_task(target, collective=coll) is TaskKind.ANSWERED and len(coll.sent) == 1  # no broadcast
    drv.next_iteration()
    assert not drv.is_running()
    fed.wait()
    (record,) = fed.events("evaluation")
    assert record["sites"]["site-1"] == {"metrics": {"loss": 0.25}, "num_samples": 8}


@pytest.fixture
def rank_one():
    session.activate(ClientSession(None, rank=1))
    yield
    hf_flare.shutdown()


def test_other_ranks_evaluate_and_submit_as_rank_zero_says(rank_one):
    drv = RoundDriver()
    drv.start(rank=1)
    target = ArrayTarget(w=np.full(2, 3, np.float32))
    coll = Scripted({"round": 2, "total_rounds": 3, "kind": "evaluate"}, {"round": 3, "total_rounds": 3,
                    "kind": "submit_model"})  # fmt: skip
    assert drv.open_task(target, collective=coll) is TaskKind.EVALUATE and coll.tensors == []
    drv.begin_evaluation(target, coll)  # rank 0's model arrives through the broadcast (here: none)
    target.arrays["w"][:] = 9.0
    drv.end_evaluation(target, {}, None)  # no metrics to send on this rank: only rank 0 answers
    np.testing.assert_array_equal(target.arrays["w"], np.full(2, 3, np.float32))
    assert drv.open_task(target, collective=coll) is TaskKind.ANSWERED
    drv.next_iteration()
    assert drv.open_task(target, collective=coll) is TaskKind.SUBMIT_MODEL and coll.tensors == [[target.arrays["w"]]]
    drv.submit(target)
    assert drv.task_kind(coll) is TaskKind.ANSWERED and coll.sent == [None, None]
