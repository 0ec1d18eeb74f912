"""The client API's module functions over a client session and the in-memory transport: a real aggregator in this
process, no socket (test_client_api.py keeps the same promises over gRPC, with FLARE-style scripts)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import load_round

import fl_plugins.client as flare
from fl_plugins import tensors
from fl_plugins.client import session
from fl_plugins.client.session import ClientSession
from fl_plugins.client.transport import InMemoryRpcError
from fl_plugins.errors import ConfigError, ModelMismatchError, ProtocolError, RoundError
from fl_plugins.wire import rpc
from fl_plugins.wire.layout import Manifest, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardSender, TensorSource

CHUNK = 64 << 10


pytestmark = pytest.mark.usefixtures("no_sockets")


@pytest.fixture
def federation(in_memory):
    return in_memory


def test_these_tests_would_notice_a_socket(tmp_path):
    from fl_plugins.client.site import SiteClient

    with pytest.raises(AssertionError, match="opened a socket"):
        SiteClient("127.0.0.1:1", "site-1")  # the gRPC transport's channel
    with pytest.raises(AssertionError, match="opened a socket"):
        socket.create_connection(("127.0.0.1", 1))


# -- the FLARE loop ------------------------------------------------------------------------------------------
def test_a_flare_loop_receives_and_sends_every_round(federation):
    fed = federation(rounds=2, initial={"w": np.ones(10, np.float32)})
    fed.activate("solo")
    seen = []
    while flare.is_running():
        m = flare.receive()
        assert flare.receive() is m  # cached until send
        assert isinstance(m.params["w"], np.ndarray) and m.params["w"].flags.writeable
        assert (m.total_rounds, m.start_round, flare.get_task_name()) == (2, 0, "train")
        assert flare.is_train() and not flare.is_evaluate() and not flare.is_submit_model()
        assert m.meta["site_name"] == "solo" and m.meta["current_round"] == m.current_round
        seen.append(m.current_round)
        m.params["w"] += 1
        flare.send(flare.FLModel(params=m.params, params_type="FULL", meta={"NUM_STEPS_CURRENT_ROUND": 3}))
    assert seen == [0, 1]
    assert flare.receive() is None and not flare.is_running()
    assert flare.system_info() == {"site_name": "solo", "job_id": fed.aggregator.job_id}
    assert flare.get_site_name() == "solo" and flare.get_job_id() == fed.aggregator.job_id
    fed.wait()
    np.testing.assert_array_equal(load_round(fed.run_dir, 2)["w"], np.full(10, 3, np.float32))
    assert [u["weight"] for u in fed.events("update")] == [3, 3]


def test_receive_asks_again_when_its_tasks_model_is_not_served(federation, caplog):
    """A task whose model the aggregator no longer serves (it restarted from an earlier checkpoint while this site
    held a later round's task, or moved on): receive() asks for the task at hand instead of failing the script."""
    fed = federation(rounds=1, initial={"w": np.ones(4, np.float32)})
    sess = fed.activate("solo")
    assert flare.is_running()
    sess.task.round = 3  # what a site holds when the aggregator restarted at round 0 after opening round 3
    with caplog.at_level(logging.WARNING, logger="fl_plugins.client.session"):
        m = flare.receive()
    assert m.current_round == 0 and m.params["w"].tolist() == [1, 1, 1, 1]
    assert "round 3's model is not served" in caplog.text
    flare.send(flare.FLModel(params=m.params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    fed.wait()


def test_metrics_meta_and_logs_reach_the_run_directory(federation):
    fed = federation(rounds=1, initial={"w": np.zeros(3, np.float32)}, evaluate_final=False)
    fed.activate("s1")
    m = flare.receive()
    flare.log("loss", np.float32(0.25), "SCALAR", step=7)
    flare.log("note", float("nan"))  # not JSON: travels as text
    metrics = {"accuracy": np.float64(0.5), "f1": 1}
    flare.send(flare.FLModel(params=m.params, metrics=metrics, meta={"NUM_STEPS_CURRENT_ROUND": 2, "tag": (1, 2)}))
    assert not flare.is_running()
    (update,) = fed.events("update")
    assert (update["site"], update["weight"], update["metrics"]) == ("s1", 2, {"accuracy": 0.5, "f1": 1})
    logs = {r["key"]: r for r in fed.logs()}
    want = {"round": 0, "key": "loss", "value": 0.25, "data_type": "SCALAR", "step": 7, "site": "s1"}
    assert {k: v for k, v in logs["loss"].items() if k in want} == want
    assert logs["note"]["value"] == "nan"


def test_log_checks_the_aggregators_bounds_before_sending(federation):
    fed = federation(rounds=1, initial={"w": np.zeros(3, np.float32)})
    fed.activate("s1")
    with pytest.raises(ProtocolError, match="key"):
        flare.log("k" * 500, 1.0)
    assert fed.logs() == []


def test_a_diff_update_is_added_to_the_global_model(federation):
    fed = federation(rounds=2, initial={"w": np.arange(4, dtype=np.float32)})
    fed.activate("s1")
    m = flare.receive()
    flare.send(flare.FLModel(params={"w": np.full(4, 0.5, np.float32)}, params_type=flare.ParamsType.DIFF))
    assert flare.is_running()
    np.testing.assert_array_equal(flare.receive().params["w"], np.arange(4, dtype=np.float32) + 0.5)
    assert m.current_round == 0


def test_receive_into_existing_tensors_reuses_their_memory(federation):
    torch = pytest.importorskip("torch")
    initial = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    fed = federation(rounds=1, initial=initial)
    fed.activate("s", params_format="torch")
    mine = {"w": torch.zeros(2, 3), "b": torch.zeros(5)}  # "b" has another shape: allocated anew
    m = flare.receive(into=mine)
    assert m.params["w"] is mine["w"] and m.params["b"] is not mine["b"]
    np.testing.assert_array_equal(mine["w"].numpy(), initial["w"])
    np.testing.assert_array_equal(m.params["b"].numpy(), initial["b"])
    flare.send(flare.FLModel(params=m.params))


# -- what the API refuses ------------------------------------------------------------------------------------
def test_every_function_needs_init_first():
    for call in (flare.is_running, flare.receive, flare.get_site_name, lambda: flare.log("k", 1)):
        with pytest.raises(ConfigError, match=r"flare.init\(\) first"):
            call()
    flare.shutdown()  # safe without a session, and twice
    flare.shutdown()


def test_send_refuses_what_it_cannot_send(federation):
    fed = federation(rounds=1, initial={"w": np.zeros(3, np.float32)})
    fed.activate("s1")
    with pytest.raises(RoundError, match=r"call flare.receive\(\) first"):
        flare.send(flare.FLModel(params={"w": np.zeros(3, np.float32)}))
    flare.receive()
    with pytest.raises(ConfigError, match="takes an FLModel"):
        flare.send({"w": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="params is None"):
        flare.send(flare.FLModel())
    with pytest.raises(ModelMismatchError, match="missing"):  # the aggregator's refusal, as our error
        flare.send(flare.FLModel(params={"v": np.zeros(3, np.float32)}))


def test_without_an_initial_model_the_plain_api_says_pass_initial_model(federation):
    fed = federation(rounds=1)
    fed.activate("s1")
    with pytest.raises(ConfigError, match="--initial-model"):
        flare.is_running()


def test_other_ranks_do_not_talk_to_the_aggregator():
    flare.init(rank=1)  # no address needed: rank 1 never connects
    try:
        assert session.get().client is None and session.get().site == "rank-1"
        assert flare.receive() is None
        flare.send(flare.FLModel(params={}))  # a no-op
        assert flare.is_running() is True  # as FLARE's: other ranks never learn the job's end; the script syncs them
    finally:
        flare.shutdown()


def test_a_second_session_is_refused_until_shutdown(federation):
    fed = federation(rounds=1, initial={"w": np.zeros(3, np.float32)})
    first = fed.activate("s1")
    flare.init("127.0.0.1:1", "other")  # a no-op: this process is connected
    assert session.get() is first
    with pytest.raises(ConfigError, match="shutdown"):
        session.activate(ClientSession(None, rank=1))
    flare.shutdown()
    assert session.current() is None


# -- other sites, refusals, refolds ---------------------------------------------------------------------------
def test_a_late_send_is_refused_with_a_warning_and_the_site_goes_on(federation, caplog):
    """Round deadline 1 s: the fast site closes round 0; our late update is refused, not mixed into round 1."""
    fed = federation(rounds=2, min_sites=2, initial={"w": np.zeros(2, np.float32)}, round_deadline=1.0)
    fast = fed.client("fast")
    fast.connect()
    fed.activate("slow")
    assert flare.is_running()
    m = flare.receive()
    task = fast.next_task()
    fast.upload(task.round, task.attempt, {"w": np.ones(2, np.float32)}, {})
    assert fast.next_task(poll=5).round == 1  # round 0 closed at its deadline, without us
    with caplog.at_level(logging.WARNING):
        flare.send(flare.FLModel(params={"w": np.full(2, 100, np.float32)}))
    assert "refused" in caplog.text and "late" in caplog.text
    assert flare.is_running() and flare.receive().current_round == 1
    np.testing.assert_array_equal(flare.receive().params["w"], np.ones(2, np.float32))  # ours never counted
    assert m.current_round == 0


def _partial_update(value: float, n: int) -> tuple[Manifest, list[bytes]]:
    """An update of "w" (n float32 values) as SiteClient would send it: its manifest and its shard's frames."""
    params = {"w": np.full(n, value, np.float32)}
    manifest = Manifest(plan_shards(tensors.describe(params)), CHUNK, {"params_type": "FULL"})
    source = TensorSource(manifest, tensors.ByteViews(params).get)
    return manifest, list(ShardSender(manifest, 0, source).frames(0))


def test_a_refold_has_the_site_resend_its_update(federation, caplog):
    """Another site streams part of its update (folded) and stalls past the round's deadline: the round is
    refolded without it, this site's session is asked for its update again (RESEND) and sends it unseen."""
    n = 1 << 15  # two chunks
    initial = {"w": np.zeros(n, np.float32)}
    fed = federation(rounds=1, min_sites=2, initial=initial, chunk_bytes=CHUNK, round_deadline=1.0)
    slow = fed.transport()
    slow.Hello(pb.HelloRequest(site="slow"), timeout=10)
    fed.activate("good")
    m = flare.receive()
    task = slow.GetTask(pb.TaskRequest(site="slow", wait_seconds=5), timeout=10)
    assert task.kind == pb.Task.TRAIN
    manifest, frames = _partial_update(9.0, n)
    begin = pb.UploadBegin(site="slow", round=0, manifest_json=manifest.to_json(), nonce="stall")
    state = slow.BeginUpload(begin, timeout=10)
    folded, go = threading.Event(), threading.Event()

    def first_chunk_then_stall():
        yield frames[0]
        folded.set()  # the servicer asks for the next frame: the first one is verified and folded
        go.wait(30)

    md = (("fl-upload-id", state.upload_id), ("fl-shard", "0"))
    stalled = slow.Upload(first_chunk_then_stall(), metadata=md)
    assert folded.wait(10)
    flare.send(flare.FLModel(params={"w": np.full(n, 2.0, np.float32)}))
    with caplog.at_level(logging.INFO, logger="fl_plugins.client"):
        assert not flare.is_running()  # RESEND, then END
    assert "resending this site's update" in caplog.text
    with pytest.raises(grpc.RpcError) as cut:  # the aggregator dropped the stalled upload
        stalled.result(timeout=10)
    assert cut.value.code() == grpc.StatusCode.CANCELLED
    go.set()
    fed.wait()
    np.testing.assert_array_equal(load_round(fed.run_dir, 1)["w"], np.full(n, 2.0, np.float32))
    assert [(r["round"], r["partial"], r["owed"]) for r in fed.events("refold")] == [(0, ["slow"], ["good"])]
    assert m.current_round == 0


def test_init_checks_its_arguments_before_any_client_or_channel_exists():
    """A bad params_format is reported as such, before a SiteClient (and its gRPC channel: a socket, which this
    module's tests refuse) exists, also when the address would be refused too (plaintext to a remote host)."""
    for server in ("127.0.0.1:1", "10.1.2.3:8443"):
        with pytest.raises(ConfigError, match=r"params_format must be one of .* \(got 'jax'\)"):
            flare.init(server, "s1", params_format="jax")
        assert session.current() is None


# -- retrying ------------------------------------------------------------------------------------------------
class _Clock:
    """time for fl_plugins.client.retry: sleep() only records the pause and moves monotonic() on."""

    def __init__(self) -> None:
        self.now, self.pauses = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def test_a_call_retries_after_0_1_s_and_a_transfer_after_0_05_s(monkeypatch):
    """The pauses between attempts double up to 2 s; a call's start at 0.1 s, a transfer's (which restart after
    progress) at 0.05 s."""
    from fl_plugins.client import retry
    from fl_plugins.client.site import SiteClient

    class Unavailable:
        def __getattr__(self, method):
            def refuse(*args, **kwargs):
                raise InMemoryRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")

            return refuse

        def close(self) -> None:
            pass

    clock = _Clock()
    monkeypatch.setattr(retry, "time", clock)
    client = SiteClient(None, "s1", transport=Unavailable(), retry_timeout=10.0, heartbeat=0)
    with pytest.raises(ConnectionError, match="did not answer"):
        client.status()
    assert clock.pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]
    assert client.stats["retries"] == len(clock.pauses)

    clock.pauses.clear()
    with pytest.raises(ConnectionError, match="no progress"):
        client.transfers.resumable(Unavailable().Download, "download x", progress=lambda: 0)
    assert clock.pauses[:6] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    client.close()


# -- the in-memory transport maps errors and ends calls as gRPC does ------------------------------------------------
def test_refusals_arrive_as_the_same_status_codes_and_errors(federation):
    fed = federation(rounds=1, initial={"w": np.zeros(4, np.float32)})
    t = fed.transport()
    t.Hello(pb.HelloRequest(site="s"), timeout=10)
    bad = pb.UploadBegin(site="s", round=0, manifest_json="not json", nonce="n")
    with pytest.raises(grpc.RpcError) as e:
        t.BeginUpload(bad, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("ProtocolError: ")
    assert isinstance(rpc.error_from_rpc(e.value, "begin upload"), ProtocolError)
    with pytest.raises(grpc.RpcError) as e:
        t.Hello(pb.HelloRequest(site="a/b"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(rpc.error_from_rpc(e.value, "connect"), ConfigError)
    status = json.loads(t.Status(pb.StatusRequest(), timeout=10).status_json)  # a local caller: the operator's view
    assert status["round"] == 0


def test_a_busy_site_gets_resource_exhausted_and_a_poll_ends_with_its_call(federation):
    """One GetTask at a time per site (limits.MAX_POLLS_PER_SITE): a second is refused as busy (retryable); the
    first one's deadline ends it at once for the caller and for the aggregator, whose slot is free again."""
    fed = federation(rounds=1, min_sites=2, initial={"w": np.zeros(4, np.float32)})  # nobody trains: polls wait
    t = fed.transport()
    t.Hello(pb.HelloRequest(site="s"), timeout=10)
    poll = pb.TaskRequest(site="s", wait_seconds=20)
    errors: list[grpc.RpcError] = []
    started = time.monotonic()
    waiting = threading.Thread(target=lambda: errors.append(_refused(lambda: t.GetTask(poll, timeout=1.0))))
    waiting.start()
    time.sleep(0.3)
    busy = _refused(lambda: t.GetTask(poll, timeout=5))
    assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "BusyError" in busy.details()
    assert rpc.error_from_rpc(busy, "poll") is busy and busy.code() in rpc.RETRYABLE  # the client retries it
    waiting.join(10)
    assert errors[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
    assert t.GetTask(pb.TaskRequest(site="s", wait_seconds=0), timeout=5).kind == pb.Task.WAIT


def test_close_cancels_the_calls_under_way_and_refuses_new_ones(federation):
    fed = federation(rounds=1, min_sites=2, initial={"w": np.zeros(4, np.float32)})
    t = fed.transport()
    errors: list[grpc.RpcError] = []
    poll = pb.TaskRequest(site="s", wait_seconds=20)
    waiting = threading.Thread(target=lambda: errors.append(_refused(lambda: t.GetTask(poll, timeout=30))))
    waiting.start()
    time.sleep(0.3)
    t.close()
    waiting.join(5)
    assert errors[0].code() == grpc.StatusCode.CANCELLED
    with pytest.raises(ValueError, match="closed"):
        t.Hello(pb.HelloRequest(site="s"), timeout=5)


def test_a_download_cancelled_midway_frees_its_slot(federation):
    """Each Download holds one of the site's transfer slots (limits.MAX_TRANSFERS_PER_SITE = 4) until it ends: a
    cancelled one gives its slot back (its servicer's clean-up runs), so more cancelled downloads than slots
    leave the site able to download."""
    fed = federation(rounds=1, initial={"w": np.zeros(1 << 16, np.float32)}, chunk_bytes=CHUNK)
    t = fed.transport()
    t.Hello(pb.HelloRequest(site="s"), timeout=10)
    t.GetTask(pb.TaskRequest(site="s", wait_seconds=5), timeout=10)
    request = pb.DownloadRequest(site="s", round=0, shard=0)
    for _ in range(6):
        call = _when_a_slot_is_free(lambda: t.Download(request))
        call.cancel()
        with pytest.raises(InMemoryRpcError) as e:
            next(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    frames = _when_a_slot_is_free(lambda: list(t.Download(request, timeout=10)))
    assert sum(len(f) for f in frames) > 4 * CHUNK


def _when_a_slot_is_free(start):
    """`start()` (which takes a frame), again while the site is busy: a slot is given back as its call ends."""
    deadline = time.monotonic() + 5
    while True:
        try:
            call = start()
            if not isinstance(call, list):
                assert len(next(call)) > CHUNK
            return call
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _refused(call) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call was not refused")
