"""The evaluation workflows' edges, each found by a review of issue 12's first version (each test failed then):
site names that are paths or the global model's, a submission's chunk size, a commit racing its cell's timeout,
answers sent twice, the barrier after a restart, hostile sample counts, a DIFF submission, the gate on the
submitted models' downloads, the site's give-up after the last round, and a cyclic job's evaluate_every."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import ConfigError, ProtocolError, RoundError
from fl_plugins.wire.proto import fl_pb2 as pb

pytestmark = pytest.mark.usefixtures("no_sockets")

INIT = {"w": np.zeros(4, dtype=np.float32)}


def _until(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _submit(c: Any, value: float) -> Any:
    t = c.next_task(poll=2.0)
    assert t.kind == pb.Task.SUBMIT_MODEL
    return t, c.upload(t.round, 0, {"w": np.full(4, value, np.float32)}, {"params_type": "FULL"}, task_id=t.task_id)


def test_a_site_name_never_becomes_a_path_and_global_is_reserved(in_memory):
    f = in_memory(rounds=1, initial=INIT, workflow="cross-site-eval", min_sites=2)
    for bad in ("..", ".", "global"):
        with pytest.raises(ConfigError, match="reserved"):
            f.client(bad).connect()
    a, b = f.client("x"), f.client("x.tmp")  # once folder names: x.tmp's model was deleted by x's submission
    a.connect()
    b.connect()
    _submit(a, 1.0)
    _submit(b, 2.0)
    with f.aggregator.lock:
        served = dict(f.aggregator.models.served)
    assert set(served) == {"x", "x.tmp"} and all(path.is_dir() for _, path, _ in served.values())
    index = json.loads((f.run_dir / "cross_site" / "models.json").read_text())
    assert set(index) == {"x", "x.tmp"} and all(v.startswith("model-") for v in index.values())
    assert (f.run_dir / "global" / "round-00000").is_dir() and (f.run_dir / "run.json").is_file()


def test_a_submission_must_use_the_aggregators_chunk_size(in_memory):
    f = in_memory(rounds=1, initial={"w": np.zeros(1 << 14, np.float32)}, workflow="cross-site-eval")
    c = f.client("site-1")
    c.connect()
    t = c.next_task(poll=2.0)
    c.chunk_bytes = 8  # 16 bytes of digest kept per 8 bytes of model, and 8-byte frames for every evaluator
    with pytest.raises(ProtocolError, match="chunk_bytes is 8"):
        c.upload(t.round, 0, {"w": np.ones(1 << 14, np.float32)}, {"params_type": "FULL"}, task_id=t.task_id)
    _until(lambda: f.aggregator.job.submissions is not None, "the submissions did not end")  # (its only cell)
    assert "chunk_bytes" in f.aggregator.job.submissions.cells["site-1"]["global"].error


def test_a_commit_after_its_cell_closed_is_refused_and_stays_refused(in_memory):
    """The commit's window is widened until the cell's evaluate_timeout has closed it (site-2 never asks, so the
    phase goes on)."""
    f = in_memory(rounds=1, initial=INIT, workflow="cross-site-eval", min_sites=2, evaluate_timeout=0.3)
    c = f.client("site-1")
    c.connect()
    t = c.next_task(poll=2.0)
    agg, commits = f.aggregator, []
    real = c.transport.CommitUpload

    def late_commit(req: Any, **kw: Any) -> Any:
        commits.append(req)
        _until(lambda: bool(agg.job.sweep.cells["site-1"]["global"].error), "the cell did not time out")
        return real(req, **kw)

    c.transport.CommitUpload = late_commit
    with pytest.raises(RoundError, match="not open"):
        c.upload(t.round, 0, {"w": np.ones(4, np.float32)}, {"params_type": "FULL"}, task_id=t.task_id)
    with pytest.raises(Exception, match="unknown or its round ended"):  # a retry is not "already committed"
        real(commits[0], timeout=5)
    with agg.lock:
        assert not agg.uploads.live and not agg.job.submitted


def test_answers_sent_twice_count_once_and_are_accepted_twice(in_memory):
    f = in_memory(rounds=1, initial=INIT, workflow="cross-site-eval")
    c = f.client("site-1")
    c.connect()
    real, commits = c.transport.CommitUpload, []
    c.transport.CommitUpload = lambda req, **kw: commits.append(req) or real(req, **kw)
    t, reply = _submit(c, 3.0)
    assert reply.message == "model accepted for cross-site evaluation"
    _until(lambda: f.aggregator.job.phase == "cross-site", "the submissions did not end")
    again = real(commits[0], timeout=5)  # its reply lost, the site commits again after the phase ended
    assert again.message == "already committed"
    t = c.next_task(poll=2.0)
    env = {"metrics": {"acc": 0.5}}
    assert [c.send_result(t.round, t.task_id, env).message for _ in range(2)] == ["result accepted"] * 2


def test_updates_wait_for_an_evaluation_also_after_a_restart(in_memory, tmp_path):
    f = in_memory(rounds=3, initial=INIT, evaluate_every=1)
    c = f.client("site-1")
    c.connect()
    t = c.next_task(poll=2.0)
    c.upload(t.round, t.attempt, {"w": np.ones(4, np.float32)}, {"params_type": "FULL"})
    assert c.next_task(poll=5.0).kind == pb.Task.EVALUATE
    f.close()  # the aggregator stops while round 1's model is being evaluated
    g = in_memory(rounds=3, initial=INIT, evaluate_every=1)
    assert g.aggregator.job.phase == "evaluate"
    c = g.client("site-1")
    c.connect()
    with pytest.raises(RoundError, match="being evaluated"):  # the restart's resume window does not open it
        c.upload(1, 0, {"w": np.full(4, 2, np.float32)}, {"params_type": "FULL"})
    assert g.aggregator.round == 1


def test_a_hostile_sample_count_is_refused_and_says_why(in_memory):
    f = in_memory(rounds=1, initial=INIT, workflow="evaluate")
    c = f.client("site-1")
    c.connect()
    t = c.next_task(poll=2.0)
    reply = c.send_result(t.round, t.task_id, {"metrics": {"acc": 0.0}, "meta": {"NUM_EVAL_SAMPLES": 1e300}})
    assert "NUM_EVAL_SAMPLES must be in (0, 1e+12]" in reply.message
    f.wait()
    (ev,) = f.events("evaluation")
    assert "NUM_EVAL_SAMPLES" in ev["sites"]["site-1"]["error"]


def test_a_diff_submission_is_sent_as_full_params(in_memory):
    """FLARE's DIFF semantics: the received model plus the difference (hello-numpy-cross-val --update_type diff)."""
    import fl_plugins.client as flare

    f = in_memory(rounds=1, initial={"w": np.arange(4, dtype=np.float32)}, workflow="cross-site-eval")
    f.activate("site-1")
    while flare.is_running():
        model = flare.receive()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"mean": float(np.mean(model.params["w"]))}))
        else:
            flare.send(flare.FLModel(params={"w": np.ones(4, np.float32)}, params_type=flare.ParamsType.DIFF))
    f.wait()
    m = json.loads((f.run_dir / "cross_site_eval.json").read_text())
    assert m["results"]["site-1"]["site-1"] == {"metrics": {"mean": 2.5}}  # mean(arange(4) + 1)


def test_submitted_models_are_served_only_to_the_cross_site_evaluation(in_memory):
    f = in_memory(rounds=1, initial=INIT, workflow="cross-site-eval", min_sites=2)
    a, b = f.client("site-1"), f.client("site-2")
    a.connect()
    b.connect()
    _submit(a, 1.0)  # site-2 has not submitted: the submit phase goes on
    with pytest.raises(RoundError, match="served during the cross-site evaluation"):
        f.aggregator.global_source(0, "site-1", "site-2")
    _submit(b, 2.0)
    _until(lambda: f.aggregator.job.phase == "cross-site", "the cross-site phase did not start")
    with pytest.raises(RoundError, match="to the sites that take part"):
        f.aggregator.global_source(0, "site-1", "site-3")
    manifest, source, _ = f.aggregator.global_source(0, "site-1", "site-2")
    source.close()
    assert manifest.shards


def test_hello_says_whether_evaluations_follow_the_last_round(in_memory):
    for kw, after in (({}, False), ({"evaluate_every": 2}, True), ({"workflow": "fedavg,cross-site-eval"}, True)):
        f = in_memory(rounds=1, initial=INIT, **kw)
        c = f.client("site-1")
        c.connect()
        assert c.evaluates_after is after, kw
        f.close()


def test_an_evaluation_job_needs_its_model():
    with pytest.raises(ConfigError, match="--initial-model"):
        AggregatorConfig(run_dir="/tmp/x", rounds=1, workflow="evaluate")


def test_a_cyclic_jobs_evaluate_every_counts_cycles(in_memory):
    f = in_memory(rounds=2, initial=INIT, workflow="cyclic", min_sites=2, evaluate_every=1)
    clients = [f.client(f"site-{i}") for i in (1, 2)]
    for c in clients:
        c.connect()
    kinds: list[tuple[str, int]] = []

    def serve(c: Any) -> None:
        while True:
            t = c.next_task(poll=0.5)
            if t.kind == pb.Task.END:
                return
            if t.kind == pb.Task.WAIT:
                continue
            kinds.append((pb.Task.Kind.Name(t.kind), t.round))
            _, params = c.download(t, "numpy")
            if t.kind == pb.Task.EVALUATE:
                c.send_result(t.round, t.task_id, {"metrics": {"m": 1.0}})
            else:
                c.upload(t.round, t.attempt, {"w": params["w"] + 1}, {"params_type": "FULL"})

    import threading

    threads = [threading.Thread(target=serve, args=(c,), daemon=True) for c in clients]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    f.wait()
    assert [e["round"] for e in f.events("evaluation")] == [2, 4]  # after each cycle of 2 visits, not each visit
