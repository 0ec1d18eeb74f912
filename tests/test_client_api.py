"""The client API against a real aggregator: FLARE-style scripts, refusals, errors that say what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import SiteThread, free_port, load_round

import fl_plugins.client as flare
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import ConfigError, ModelMismatchError, RoundError, TransportError
from fl_plugins.wire.proto import fl_pb2 as pb

FLARE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import fl_plugins.client as flare   # the only line that differs from an NVIDIA FLARE script

    site = int(sys.argv[1])
    torch.manual_seed(site)
    x = torch.randn(64, 4)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    flare.init()
    rounds = []
    while flare.is_running():
        input_model = flare.receive()
        assert isinstance(input_model.params["0.weight"], torch.Tensor)
        input_model.params["0.weight"].add_(0)  # writable, ours
        net.load_state_dict(input_model.params)
        rounds.append(input_model.current_round)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        steps = 0
        for _ in range(5):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); steps += 1
        acc = ((net(x) > 0).float() == y).float().mean()
        flare.log("train_loss", loss.item(), "SCALAR")
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": acc},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))
    assert flare.receive() is None and not flare.is_running()
    print("ROUNDS", rounds, "SITE", flare.get_site_name(), "JOB", flare.get_job_id(), flush=True)
    """
)


def _torch_initial(tmp_path):
    import torch
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    path = tmp_path / "init.safetensors"
    save_file(net.state_dict(), str(path))
    return path


@pytest.mark.integration
@pytest.mark.slow
def test_flare_style_script_two_sites_two_rounds(tmp_path):
    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer

    script = tmp_path / "train.py"
    script.write_text(FLARE_SCRIPT)
    cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=2, min_sites=2, initial_model=_torch_initial(tmp_path),
                           linger=1.0, evaluate_final=False)  # fmt: skip
    with AggregatorServer(cfg) as srv:
        procs = [subprocess.Popen([sys.executable, str(script), str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "FL_SERVER": srv.address, "FL_SITE": f"site-{i}"})
                 for i in (1, 2)]  # fmt: skip
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert srv.wait() == 0
    for i, out in zip((1, 2), outs, strict=True):
        assert f"ROUNDS [0, 1] SITE site-{i} JOB {srv.aggregator.job_id}" in out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [x for x in lines if x["event"] == "update"]
    assert sorted((u["round"], u["site"]) for u in updates) == [(0, "site-1"), (0, "site-2"), (1, "site-1"),
                                                                 (1, "site-2")]  # fmt: skip
    assert all(u["weight"] == 5 and 0 <= u["metrics"]["accuracy"] <= 1 for u in updates)
    rounds = [x for x in lines if x["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1] and "accuracy" in rounds[0]["metrics"]
    logs = [json.loads(x) for x in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    got = {(x["site"], x["round"], x["key"]) for x in logs}
    assert got >= {("site-1", 0, "train_loss"), ("site-2", 1, "train_loss")}


@pytest.fixture
def api():
    yield flare
    flare.shutdown()


@pytest.mark.integration
def test_client_api_in_process_numpy(server_factory, api):
    srv = server_factory(rounds=2, initial={"w": np.ones(10, np.float32)})
    api.init(srv.address, "solo", params_format="numpy")
    seen = []
    while api.is_running():
        m = api.receive()
        assert api.receive() is m  # cached until send
        assert isinstance(m.params["w"], np.ndarray) and m.params["w"].flags.writeable
        assert m.total_rounds == 2 and api.get_task_name() == "train" and api.is_train()
        seen.append(m.current_round)
        m.params["w"] += 1
        api.send(api.FLModel(params=m.params, params_type="FULL"))
    assert seen == [0, 1]
    assert api.receive() is None
    assert api.system_info() == {"site_name": "solo", "job_id": srv.aggregator.job_id}
    assert "params_type" in api.FLModel(params={"w": np.ones(3)}).summary()


@pytest.mark.integration
def test_a_plain_site_that_connects_before_the_offering_one_waits_for_it(server_factory):
    """No initial model, 2 sites: the plain one (cannot offer) connects first; it must wait for the site that
    offers round 0's weights, not fail with "no site offered one" (it did, before)."""
    srv = server_factory(rounds=1, min_sites=2)
    plain = SiteThread(srv.address, "plain", lambda r, p: (p, "FULL", 1.0))
    plain.start()
    time.sleep(1.0)  # the plain site polls alone for a while
    c = SiteClient(srv.address, "offers", can_offer_initial=True)
    c.connect()
    try:
        assert c.next_task().kind == pb.Task.OFFER_INITIAL
        c.upload(0, 0, {"w": np.ones(3, np.float32)}, {"params_type": "FULL"}, initial=True)
        task = c.next_task()
        assert task.kind == pb.Task.TRAIN
        meta = {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1}}
        c.upload(0, 0, {"w": np.full(3, 3, np.float32)}, meta)
        assert c.next_task().kind == pb.Task.END
    finally:
        c.close()
    plain.join(30)
    assert plain.error is None and not plain.is_alive()
    assert srv.wait() == 0
    np.testing.assert_allclose(load_round(srv.aggregator.config.run_dir, 1)["w"], [2, 2, 2])


@pytest.mark.integration
def test_a_site_can_offer_round_zero_weights(server_factory):
    srv = server_factory(rounds=1)
    c = SiteClient(srv.address, "s1", can_offer_initial=True)
    c.connect()
    try:
        task = c.next_task()
        assert task.kind == pb.Task.OFFER_INITIAL
        mine = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float16)}
        c.upload(0, 0, mine, {"params_type": "FULL"}, initial=True)
        task = c.next_task()
        assert task.kind == pb.Task.TRAIN and task.round == 0
        _, got = c.download(task, "numpy")
        for k in mine:
            np.testing.assert_array_equal(got[k], mine[k])
    finally:
        c.close()


@pytest.mark.integration
def test_duplicate_late_and_mismatched_updates_are_refused(server_factory):
    srv = server_factory(rounds=2, min_sites=2, initial={"w": np.zeros(4, np.float32)})
    a, b = SiteClient(srv.address, "a"), SiteClient(srv.address, "b")
    try:
        a.connect()
        b.connect()
        ta, tb = a.next_task(), b.next_task()
        with pytest.raises(ModelMismatchError, match=r"missing \['w'\].*unexpected \['v'\]"):
            a.upload(0, 0, {"v": np.zeros(4, np.float32)}, {})
        with pytest.raises(ModelMismatchError, match="mismatched"):
            a.upload(0, 0, {"w": np.zeros(5, np.float32)}, {})
        a.upload(ta.round, ta.attempt, {"w": np.ones(4, np.float32)}, {})
        with pytest.raises(RoundError, match="duplicate"):
            a.upload(ta.round, ta.attempt, {"w": np.ones(4, np.float32)}, {})
        b.upload(tb.round, tb.attempt, {"w": np.ones(4, np.float32)}, {})
        deadline = time.monotonic() + 20
        while srv.aggregator.round == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RoundError, match="late"):
            b.upload(0, 0, {"w": np.ones(4, np.float32)}, {})
        assert srv.aggregator.stats["updates_refused"] == 2
    finally:
        a.close()
        b.close()


def test_init_waits_for_an_aggregator_that_is_still_starting(tmp_path, api):
    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer

    port = free_port()
    servers = []

    def start_later():
        time.sleep(1.5)
        cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=1, linger=0.2)
        servers.append(AggregatorServer(cfg, f"127.0.0.1:{port}").start())

    t = threading.Thread(target=start_later)
    t.start()
    try:
        api.init(f"127.0.0.1:{port}", "late-starter", connect_timeout=30)
        assert api.get_job_id()
    finally:
        t.join()
        for s in servers:
            s.stop(0)


def test_init_names_the_address_when_nothing_answers(api):
    port = free_port()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        api.init(f"127.0.0.1:{port}", "nobody", connect_timeout=1)


def test_init_without_address_says_which_variable(monkeypatch, api):
    monkeypatch.delenv("FL_SERVER", raising=False)
    with pytest.raises(ConfigError, match="FL_SERVER"):
        api.init(site="x")


def test_non_loopback_address_needs_insecure(tmp_path):
    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer

    with pytest.raises(ConfigError, match="--insecure"):
        AggregatorServer(AggregatorConfig(run_dir=tmp_path, rounds=1), "0.0.0.0:0")


def test_params_type_accepts_strings_and_enum():
    assert flare.FLModel(params_type="diff").params_type is flare.ParamsType.DIFF
    assert flare.FLModel(params_type=flare.ParamsType.FULL).params_type == "FULL"
    with pytest.raises(ConfigError, match="FULL or DIFF"):
        flare.FLModel(params_type="HALF")


PER_ROUND_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import fl_plugins.client as flare
    flare.init(params_format="numpy")
    m = flare.receive()
    print("ROUND", m.current_round, flush=True)
    flare.send(flare.FLModel(params={"w": m.params["w"] + 1}, meta={"NUM_STEPS_CURRENT_ROUND": 2}))
    """
)


@pytest.mark.integration
@pytest.mark.slow
def test_one_process_per_round(server_factory, tmp_path):
    """A site may receive once, send once and exit; the aggregator takes it back for the next round."""
    srv = server_factory(rounds=2, initial={"w": np.zeros(3, np.float32)})
    script = tmp_path / "once.py"
    script.write_text(PER_ROUND_SCRIPT)
    env = {**os.environ, "FL_SERVER": srv.address, "FL_SITE": "site-1"}
    outs = [subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
            for _ in range(2)]  # fmt: skip
    assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
    assert ["ROUND 0" in outs[0].stdout, "ROUND 1" in outs[1].stdout] == [True, True]
    assert srv.wait() == 0
    from conftest import load_round

    np.testing.assert_array_equal(load_round(srv.aggregator.config.run_dir, 2)["w"], np.full(3, 2, np.float32))


@pytest.mark.integration
def test_a_checkpoint_corrupted_on_disk_is_caught_by_the_site(server_factory):
    """Chunks are served with the digests computed when the checkpoint was written, so bytes that changed on
    the aggregator's disk fail the site's check instead of being re-hashed and passed on."""
    srv = server_factory(rounds=1, initial={"w": np.zeros(1 << 16, np.float32)})
    m = srv.aggregator.store.load(0)
    path = srv.aggregator.store.shard_paths(0, m)[0]
    assert path.with_name(path.name + ".chunks").stat().st_size == 16 * -(-m.shards[0].size // m.chunk_bytes)
    with open(path, "r+b") as f:
        f.seek(m.shards[0].data_start + 1000)
        f.write(b"\x7f")
    c = SiteClient(srv.address, "s", retry_timeout=1.0)
    c.connect()
    try:
        with pytest.raises(TransportError, match="xxh3"):
            c.download(c.next_task(), "numpy")
        assert c.stats["corrupted_chunks"] >= 1
    finally:
        c.close()


@pytest.mark.integration
def test_initial_model_from_a_hugging_face_sharded_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer

    folder = tmp_path / "hf_model"
    folder.mkdir()
    parts = {"model-00001-of-00002.safetensors": {"embed.weight": torch.arange(12.0).reshape(3, 4)},
             "model-00002-of-00002.safetensors": {"head.weight": torch.ones(2, 4, dtype=torch.bfloat16),
                                                  "head.bias": torch.zeros(2, dtype=torch.bfloat16)}}  # fmt: skip
    weight_map = {}
    for fname, tensors_ in parts.items():
        save_file(tensors_, str(folder / fname))
        weight_map.update(dict.fromkeys(tensors_, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=1, initial_model=folder, linger=0.2)
    with AggregatorServer(cfg) as srv:
        c = SiteClient(srv.address, "s")
        c.connect()
        try:
            manifest, got = c.download(c.next_task(), "torch")
        finally:
            c.close()
    assert [s.name for s in manifest.shards] == list(parts)
    for tensors_ in parts.values():
        for k, v in tensors_.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v)


def test_initial_model_that_is_not_a_model_says_what_to_pass(tmp_path):
    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.safetensors.index.json"):
        AggregatorServer(AggregatorConfig(run_dir=tmp_path / "run", rounds=1, initial_model=tmp_path / "empty"))


@pytest.mark.integration
def test_an_upload_that_stalls_is_cancelled_after_the_idle_timeout(server_factory):
    """A site that opens an upload and then sends nothing is cut off; the round runs again without it."""
    from fl_plugins.wire import frames, rpc
    from fl_plugins.wire.layout import Manifest, plan_shards

    srv = server_factory(rounds=1, min_sites=1, initial={"w": np.zeros(1 << 18, np.float32)}, idle_timeout=1.0,
                         chunk_bytes=64 << 10)  # fmt: skip
    c = SiteClient(srv.address, "staller")
    c.connect()
    task = c.next_task()
    m = Manifest(plan_shards([("w", "F32", (1 << 18,))]), 64 << 10, {"params_type": "FULL"})
    stub = rpc.Stub(rpc.insecure_channel(srv.address))
    st = stub.BeginUpload(pb.UploadBegin(site="staller", round=task.round, attempt=task.attempt,
                                         manifest_json=m.to_json(), nonce="n1"), timeout=10)  # fmt: skip
    payload = m.shards[0].header + bytes((64 << 10) - len(m.shards[0].header))
    stall = threading.Event()

    def frames_then_stall():
        yield frames.encode(0, [payload])
        stall.wait(30)  # a site that hangs mid-upload

    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        stub.Upload(frames_then_stall(), metadata=(("fl-upload-id", st.upload_id), ("fl-shard", "0")), timeout=20)
    stall.set()
    assert time.monotonic() - t0 < 10, "the stalled upload was not cancelled by the idle timeout"
    assert "CANCELLED" in str(err.value) or "cancel" in str(err.value).lower()
    deadline = time.monotonic() + 10
    while srv.aggregator.stats["round_restarts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.aggregator.stats["round_restarts"] == 1  # its folded first chunk must not count
    c.close()
