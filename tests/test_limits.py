"""One site cannot hurt the others through what it sends or how many calls it holds (issue 10, items 7, 9, 10, 15).

* metrics / meta of an update and flare.log records are bounded (fl_plugins/wire/limits.py) and refused with a
  ProtocolError that names the site, the limit and what was got; the round's averaged metrics are rounded and
  bounded, so the next global model's manifest stays small;
* a site holds at most one GetTask long poll and a few transfers, and long calls never take the workers kept for
  heartbeats (service.py CallSlots): the other sites' heartbeats and rounds go on;
* Status shows a site only its own entries; the operator (the server kit's certificate) sees everything;
* nothing a site sends to Log or Status ends in anything but our own errors; a bug ends a call with INTERNAL.

Sites are played over the wire protocol by hand (rpc.Stub) against a real aggregator on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import ipaddress
import json
import logging
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import save_numpy

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.aggregator.store import RunStore
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import ProtocolError
from fl_plugins.tensors import ByteViews, describe
from fl_plugins.wire import frames, limits, rpc
from fl_plugins.wire.layout import Manifest, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardSender, TensorSource

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10
INITIAL = {"w": (np.arange(8192, dtype=np.float32) % 64) / 16}  # 32 KiB: one chunk


# -- a site that speaks the protocol by hand -------------------------------------------------------------------
def update(params: dict[str, np.ndarray], *, weight: float = 1, **envelope) -> tuple[Manifest, list[bytes]]:
    env = {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": weight}, **envelope}
    m = Manifest(plan_shards(describe(params)), CHUNK, env)
    return m, list(ShardSender(m, 0, TensorSource(m, ByteViews(params).get)).frames(0))


def shard_digest(frame_list: list[bytes], size: int) -> str:
    d = frames.ShardDigest()
    for f in frame_list:
        d.add(frames.decode(f)[2])
    return d.hexdigest(size)


class RawSite:
    def __init__(self, address: str, name: str, *, credentials: grpc.ChannelCredentials | None = None,
                 hello: bool = True) -> None:  # fmt: skip
        self.name = name
        self.channel = rpc.secure_channel(address, credentials) if credentials else rpc.insecure_channel(address)
        self.stub = rpc.Stub(self.channel)
        if hello:
            self.stub.Hello(pb.HelloRequest(site=name), timeout=10)

    def task(self, wait: float = 10.0) -> pb.Task:
        return self.stub.GetTask(pb.TaskRequest(site=self.name, wait_seconds=wait), timeout=wait + 10)

    def begin(self, task: pb.Task, manifest_json: str, nonce: str = "n1") -> pb.UploadState:
        req = pb.UploadBegin(site=self.name, round=task.round, attempt=task.attempt, manifest_json=manifest_json,
                             nonce=nonce)  # fmt: skip
        return self.stub.BeginUpload(req, timeout=10)

    def send(self, upload_id: str, frame_iter, timeout: float = 30) -> pb.UploadAck:
        return self.stub.Upload(frame_iter, metadata=(("fl-upload-id", upload_id), ("fl-shard", "0")), timeout=timeout)

    def upload(self, task: pb.Task, params, *, weight: float = 1, nonce: str = "n1", **envelope) -> None:
        m, fs = update(params, weight=weight, **envelope)
        st = self.begin(task, m.to_json(), nonce)
        self.send(st.upload_id, iter(fs))
        commit = pb.UploadCommit(upload_id=st.upload_id, shard_digests=[shard_digest(fs, m.shards[0].size)])
        assert self.stub.CommitUpload(commit, timeout=30).message == "update accepted"

    def log(self, records_json: str, round_: int = 0) -> pb.Empty:
        return self.stub.Log(pb.LogRequest(site=self.name, round=round_, records_json=records_json), timeout=30)

    def status(self, named: str | None = None) -> dict:
        md = (("fl-site", named),) if named is not None else None
        return json.loads(self.stub.Status(pb.StatusRequest(), metadata=md, timeout=10).status_json)

    def close(self) -> None:
        self.channel.close()


def refused(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details()


def server(tmp_path: Path, *, initial: bool = True, max_workers: int = 128, kit: Path | None = None,
           **cfg) -> AggregatorServer:  # fmt: skip
    cfg.setdefault("rounds", 1)
    cfg.setdefault("linger", 0.5)
    init = save_numpy(tmp_path / "initial.safetensors", INITIAL) if initial else None
    config = AggregatorConfig(run_dir=tmp_path / "run", initial_model=init, chunk_bytes=CHUNK, **cfg)
    return AggregatorServer(config, "127.0.0.1:0", kit=kit, max_workers=max_workers).start()


def train_task(site: RawSite) -> pb.Task:
    for _ in range(10):
        if (t := site.task()).kind == pb.Task.TRAIN:
            return t
    raise AssertionError(f"no TRAIN task for {site.name}")


def wait_done(futs: list[cf.Future], n: int, what: str) -> list[cf.Future]:
    """The first `n` of `futs` to finish (a bound on waiting only: never a measure of speed)."""
    done: set[cf.Future] = set()
    pending = set(futs)
    while len(done) < n and pending:
        d, pending = cf.wait(pending, timeout=30, return_when=cf.FIRST_COMPLETED)
        if not d:
            break
        done |= d
    assert len(done) >= n, f"{what}: only {len(done)} of the {n} calls expected to be refused ended"
    return list(done)


def outcome(f: cf.Future) -> tuple[grpc.StatusCode, str]:
    e = f.exception()
    return (e.code(), e.details()) if isinstance(e, grpc.RpcError) else (grpc.StatusCode.OK, "")


# == 7. metrics and meta ======================================================================================
OVER = [  # envelope, what the refusal must say
    ({"metrics": {f"m{i}": 0.5 for i in range(300)}}, "`metrics` has 300 keys, over the limit of 256"),
    ({"metrics": {"k" * 200: 0.5}}, "is 200 characters, over the limit of 128"),
    ({"meta": {"NUM_STEPS_CURRENT_ROUND": 1, "note": "x" * 5000}}, "a string of 5000 characters, over the limit"),
    ({"metrics": {"per_class": list(range(100))}}, "a list of 100 items, over the limit of 64"),
    ({"metrics": {"deep": {"a": {"b": 1}}}}, "nests a dict in a dict"),
    ({"metrics": {"deep": [1, 2, {"b": 3}]}}, "nests a dict in a list"),
    ({"metrics": {f"m{i}": ["y" * 250] * 60 for i in range(10)}}, "bytes as JSON, over the limit of 65536"),
    ({"metrics": {"blob": "z" * (4 << 20)}}, "a string of 4194304 characters, over the limit of 256"),  # the bloat
]


def test_metrics_and_meta_over_the_bounds_are_refused_and_round_metrics_stay_small(tmp_path):
    """Each oversized envelope is refused at BeginUpload (before any byte is sent), naming the site, the limit
    and what was got; a valid update then counts, and the round's metrics in the next global model's manifest
    are its finite top-level numbers rounded to 7 significant digits."""
    srv = server(tmp_path, evaluate_final=False)  # (a raw site answers no final evaluation: it would wait 60 s)
    evil = RawSite(srv.address, "evil")
    try:
        task = train_task(evil)
        for i, (env, want) in enumerate(OVER):
            m, _ = update(INITIAL, **{k: v for k, v in env.items() if k != "meta"})
            if "meta" in env:
                m.envelope["meta"] = env["meta"]
            code, details = refused(evil.begin, task, m.to_json(), nonce=f"n{i}")
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (i, code, details[:300])
            assert "site 'evil'" in details and want in details, (i, details[:300])
        metrics = {"acc": 0.123456789123, "loss": 2 / 3, "big": 10**400, "nan": float("nan"), "name": "resnet",
                   "per_class": [0.25, 0.75], "nested": {"a": 1}}  # fmt: skip
        evil.upload(task, {"w": INITIAL["w"] + 1}, weight=2, metrics=metrics)
        assert srv.wait() == 0
    finally:
        evil.close()
        srv.stop(0)
    round_metrics = RunStore(tmp_path / "run").load(1).envelope["metrics"]
    assert round_metrics == {"acc": 0.1234568, "loss": 0.6666667}
    assert srv.aggregator.stats["invalid_updates"] == len(OVER)


def test_round_metrics_keep_the_keys_most_updates_report_rounded():
    common = {"acc": 0.9, "loss": 1 / 3}
    records = [{"weight": 1.0, "metrics": {**common, **{f"junk{i:04d}": 1.0 for i in range(1000)}}},
               {"weight": 3.0, "metrics": {"acc": 0.5, "loss": 1 / 7, "f1": 0.1234567891}},
               {"weight": 1e300, "metrics": {"inf": 1e300}}]  # fmt: skip
    got = limits.mean_metrics(records)
    assert len(got) == limits.MAX_DICT_KEYS
    assert got["acc"] == 0.6 and got["loss"] == round(float(f"{(1 / 3 + 3 / 7) / 4:.7g}"), 10)
    assert got["f1"] == 0.1234568 and "inf" not in got  # an overflowing weighted sum is left out
    assert len(json.dumps(got)) < 8 << 10


# == 10 and 7. Log: hostile records are refused with our own errors ==========================================
BAD_LOGS = [  # records_json, what the refusal must say
    ("[" * 100_000, "not valid JSON (nested too deeply)"),
    ('[{"key": "k", "value": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}]", "not valid JSON (nested too deeply)"),
    ("not json", "not valid JSON"),
    ("[1" + "0" * 5000 + "]", "not valid JSON"),
    ('{"key": "k"}', "must be a JSON list of objects"),
    ("[1]", "must be a JSON list of objects (record 0 is 1)"),
    (json.dumps([{"key": "k", "value": 1}] * 1001), "1001 log records in one call, over the limit of 1000"),
    (json.dumps([{"key": "k", "value": "x" * (1 << 20)}]), "over the limit of 1048576"),
    (json.dumps([{"value": 1}]), "`key` must be a name of 1 to 128 characters (got None)"),
    (json.dumps([{"key": "k" * 129, "value": 1}]), "`key` must be a name of 1 to 128 characters"),
    (json.dumps([{"key": "k", "value": "t" * 5000}]), "a string of 5000 characters, over the limit of 4096"),
    (json.dumps([{"key": "k", "value": {"a": {"b": 1}}}]), "nests a dict in a dict"),
    (json.dumps([{"key": "k", "value": list(range(65))}]), "a list of 65 items, over the limit of 64"),
    (json.dumps([{"key": "k", **{f"f{i}": i for i in range(16)}}]), "17 fields, over the limit of 16"),
]


def test_log_refuses_what_is_malformed_or_too_big_and_keeps_serving(tmp_path):
    srv = server(tmp_path)
    evil = RawSite(srv.address, "evil")
    try:
        for i, (text, want) in enumerate(BAD_LOGS):
            code, details = refused(evil.log, text)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (i, code, details[:300])
            assert details.startswith("ProtocolError: site 'evil'") and want in details, (i, details[:300])
        evil.log(json.dumps([{"key": "loss", "value": 0.5, "step": 3}, {"key": "s", "value": {"a": 1.0, "b": 2}}]))
        evil.stub.Heartbeat(pb.HelloRequest(site="evil"), timeout=10)
    finally:
        evil.close()
        srv.stop(0)
    recs = [json.loads(x) for x in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert [(r["key"], r["site"]) for r in recs] == [("loss", "evil"), ("s", "evil")]


def test_log_calls_are_bounded_per_second_and_per_round(tmp_path):
    """Over the rate a call is refused as busy (RESOURCE_EXHAUSTED: the client retries it later); over the
    round's total it is refused for the rest of the round."""
    srv = server(tmp_path)
    a, b = RawSite(srv.address, "site-a"), RawSite(srv.address, "site-b")
    try:
        srv.servicer.log_budget = limits.LogBudget(rate=1e-6, burst=3, per_round=4000)  # a real budget, small
        rec = json.dumps([{"key": "loss", "value": 0.5}])
        for _ in range(3):
            a.log(rec)
        code, details = refused(a.log, rec)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "site 'site-a' sends more than 1e-06 Log calls a second (bursts of 3" in details
        assert isinstance(rpc.error_from_rpc(pytest.raises(grpc.RpcError, a.log, rec).value, "log"), grpc.RpcError)
        big = json.dumps([{"key": "text", "value": "t" * 3000}])
        b.log(big)
        code, details = refused(b.log, big)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "site 'site-b' has logged 3030 characters of records in round 0; 3030 more would pass the limit of " \
               "4000 per site per round" in details  # fmt: skip
        b.log(rec)  # what fits still goes
    finally:
        a.close()
        b.close()
        srv.stop(0)


def test_log_budget_refills_with_time_and_resets_each_round():
    now = [0.0]
    budget = limits.LogBudget(rate=2.0, burst=2, per_round=100, clock=lambda: now[0])
    budget.charge("s", 0, 10)
    budget.charge("s", 0, 10)
    with pytest.raises(limits.BusyError, match="more than 2 Log calls a second"):
        budget.charge("s", 0, 10)
    now[0] += 0.5  # one token back
    budget.charge("s", 0, 70)
    now[0] += 10
    with pytest.raises(ProtocolError, match="has logged 90 characters .* in round 0; 11 more would pass the limit"):
        budget.charge("s", 0, 11)
    budget.charge("s", 1, 100)  # a new round
    budget.charge("other", 0, 100)  # per site


def test_flare_log_checks_the_bounds_in_the_script(tmp_path):
    import fl_plugins.client as flare

    srv = server(tmp_path)
    try:
        flare.init(srv.address, "site-1")
        with pytest.raises(ProtocolError, match=r"flare.log\('kkkk.*`key` must be a name of 1 to 128 characters"):
            flare.log("k" * 200, 1.0)
        with pytest.raises(ProtocolError, match="a string of 5000 characters, over the limit of 4096"):
            flare.log("note", "t" * 5000, "TEXT")
        flare.log("loss", np.float32(0.25), step=1)
    finally:
        flare.shutdown()
        srv.stop(0)
    recs = [json.loads(x) for x in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert [(r["key"], r["value"]) for r in recs] == [("loss", 0.25)]


# == 10. No input to Log or Status raises anything but our errors =============================================
def test_log_and_status_answer_hostile_input_with_our_errors_only(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    srv = server(tmp_path)
    site = RawSite(srv.address, "fuzz")
    ours = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}  # fmt: skip
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300)
    values = st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=70) | st.dictionaries(st.text(max_size=140), c, max_size=20),
        max_leaves=200,
    )
    records = st.lists(st.dictionaries(st.sampled_from(["key", "value", "step", "data_type"]) | st.text(max_size=150),
                                       values, max_size=18), max_size=5).map(json.dumps)  # fmt: skip
    deep = st.tuples(st.sampled_from(["[", '{"a":', '[{"key": "k", "value": [']), st.integers(1, 200_000)).map(
        lambda t: t[0] * t[1]
    )
    texts = records | deep | st.text(max_size=500) | values.map(json.dumps)
    names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)

    def call(fn, *args, **kw) -> grpc.StatusCode:
        try:
            fn(*args, **kw)
        except grpc.RpcError as e:
            assert e.code() in ours, (e.code(), e.details())
            assert e.details().split(":")[0] in ("ProtocolError", "BusyError", "AuthError", "ConfigError"), e.details()
            return e.code()
        return grpc.StatusCode.OK

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    @hypothesis.given(texts, st.integers(-(2**31), 2**31 - 1), names)
    def check(text: str, round_: int, name: str) -> None:
        call(site.log, text, round_)
        call(site.status, name)

    try:
        check()
        site.stub.Heartbeat(pb.HelloRequest(site="fuzz"), timeout=10)  # still serving
        assert srv.aggregator.error is None
    finally:
        site.close()
        srv.stop(0)


class _Broken:
    """A servicer with a bug in every method: what a site sees, and what the aggregator logs."""

    def __getattr__(self, name):
        def method(request, context):
            raise ZeroDivisionError("division by zero")

        def stream(request, context):
            yield b"x"
            raise KeyError("gone")

        method.__name__ = stream.__name__ = name
        return stream if name == "Download" else method


def test_an_unexpected_error_in_a_handler_is_logged_and_ends_the_call_with_internal(caplog):
    from concurrent import futures

    srv = grpc.server(futures.ThreadPoolExecutor(4), options=rpc.SERVER_OPTIONS)
    srv.add_generic_rpc_handlers([rpc.generic_handler(_Broken())])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    ch = rpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = rpc.Stub(ch)
        with caplog.at_level(logging.ERROR, logger="fl_plugins.wire.rpc"):
            code, details = refused(stub.Status, pb.StatusRequest(), timeout=10)
            assert code == grpc.StatusCode.INTERNAL
            assert details.startswith("InternalError: the aggregator failed handling Status: ZeroDivisionError: "
                                      "division by zero; this is a bug in fl-plugins")  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Download(pb.DownloadRequest(), timeout=10))
            assert e.value.code() == grpc.StatusCode.INTERNAL and "Download: KeyError" in e.value.details()
        ours = [r.exc_info[0] for r in caplog.records if r.name == "fl_plugins.wire.rpc"]
        assert ours == [ZeroDivisionError, KeyError]
        code, _ = refused(stub.Heartbeat, pb.HelloRequest(), timeout=10)  # the server goes on answering
        assert code == grpc.StatusCode.INTERNAL
    finally:
        ch.close()
        srv.stop(0)


# == 9. RPC slots ============================================================================================
def test_one_site_holds_one_long_poll_and_a_few_transfers_and_the_others_go_on(tmp_path):
    """A hostile site opens many Upload streams, Downloads and GetTask long polls at once on a 16-worker server:
    all but its allowance are refused with RESOURCE_EXHAUSTED and a message, while the good site's heartbeats,
    download, upload and commit go through and the round ends with both updates."""
    srv = server(tmp_path, max_workers=16)
    good = SiteClient(srv.address, "good", heartbeat=0, retry_timeout=30)
    evil = RawSite(srv.address, "evil")
    pool = cf.ThreadPoolExecutor(48)
    release = threading.Event()
    try:
        good.connect()
        good_task = good.next_task()
        task = train_task(evil)
        m, fs = update({"w": INITIAL["w"] + 3}, weight=3)
        st = evil.begin(task, m.to_json())

        def held():  # an upload stream that sends nothing until released
            release.wait(60)
            yield from ()

        ups = [pool.submit(evil.send, st.upload_id, held(), 60) for _ in range(12)]
        for f in wait_done(ups, 12 - limits.MAX_TRANSFERS_PER_SITE, "Upload"):
            code, details = outcome(f)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "Upload refused: site 'evil' already has 4 Upload/Download streams open, the most a site may " \
                   "(limits.MAX_TRANSFERS_PER_SITE = 4)" in details  # fmt: skip
        code, details = refused(lambda: list(evil.stub.Download(pb.DownloadRequest(site="evil", round=0), timeout=10)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Download refused: site 'evil'" in details
        good.stub.Heartbeat(pb.HelloRequest(site="good"), timeout=10)
        _, params = good.download(good_task, "numpy")  # another site's transfer is not refused
        release.set()
        assert sum(outcome(f)[0] == grpc.StatusCode.OK for f in ups) == limits.MAX_TRANSFERS_PER_SITE
        evil.send(st.upload_id, iter(fs))
        commit = pb.UploadCommit(upload_id=st.upload_id, shard_digests=[shard_digest(fs, m.shards[0].size)])
        assert evil.stub.CommitUpload(commit, timeout=30).message == "update accepted"

        # its update counted, the evil site's long polls wait for the next round: it tries to take every worker
        polls = [pool.submit(evil.task, 30) for _ in range(32)]
        for f in wait_done(polls, 31, "GetTask"):
            code, details = outcome(f)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "site 'evil' already has 1 GetTask call waiting for a task, the most a site may " \
                   "(limits.MAX_POLLS_PER_SITE = 1): wait for its answer" in details  # fmt: skip
        good.stub.Heartbeat(pb.HelloRequest(site="good"), timeout=10)
        good.upload(good_task.round, good_task.attempt, {"w": params["w"] + 1},
                    {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1}})  # fmt: skip
        assert srv.wait() == 0
        (last,) = [f for f in polls if not f.done() or outcome(f)[0] == grpc.StatusCode.OK]
        assert last.result(timeout=30).kind == pb.Task.END  # the one poll it kept hears the job's end
    finally:
        release.set()
        good.close()
        evil.close()
        srv.stop(0)
        pool.shutdown(wait=True)
    got = RunStore(tmp_path / "run")
    assert got.load(1).envelope["current_round"] == 1
    from conftest import load_round

    np.testing.assert_array_equal(load_round(tmp_path / "run", 1)["w"], INITIAL["w"] + (3 * 3 + 1 * 1) / 4)


def test_long_calls_under_many_names_never_take_the_workers_kept_for_heartbeats(tmp_path):
    """Plaintext lets a caller claim any name, so per-site caps alone do not protect the server: long polls of
    many names together take at most max_workers - reserved_workers(max_workers); the rest are refused, and
    Hello, Heartbeat and Status still find a worker."""
    srv = server(tmp_path, initial=False, max_workers=8, min_sites=100)  # no model yet: every GetTask waits
    evil = RawSite(srv.address, "evil-0")
    pool = cf.ThreadPoolExecutor(16)
    held = 8 - limits.reserved_workers(8)
    try:
        polls = [pool.submit(evil.stub.GetTask, pb.TaskRequest(site=f"evil-{i}", wait_seconds=30), timeout=40)
                 for i in range(16)]  # fmt: skip
        for f in wait_done(polls, 16 - held, "GetTask"):
            code, details = outcome(f)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert f"the aggregator already serves {held} long calls (long polls and transfers), its most " \
                   "(8 workers, 2 kept for heartbeats)" in details  # fmt: skip
        good = RawSite(srv.address, "good")  # Hello
        good.stub.Heartbeat(pb.HelloRequest(site="good"), timeout=10)
        assert good.status("good")["sites"] == ["good"]
        good.close()
        assert sum(not f.done() for f in polls) == held
    finally:
        evil.close()
        srv.stop(0)
        pool.shutdown(wait=True)


# == 15. Status ==============================================================================================
def _two_sites_uploading(srv: AggregatorServer, a: RawSite, b: RawSite) -> dict[str, str]:
    ids = {}
    for s in (a, b):
        m, _ = update(INITIAL)
        ids[s.name] = s.begin(train_task(s), m.to_json()).upload_id
    return ids


def test_status_over_plaintext_shows_a_named_site_only_its_own_entries(tmp_path):
    srv = server(tmp_path, min_sites=2)
    a, b = RawSite(srv.address, "site-a"), RawSite(srv.address, "site-b")
    try:
        ids = _two_sites_uploading(srv, a, b)
        mine = a.status("site-a")
        assert mine == {
            "job_id": srv.aggregator.job_id,
            "round": 0,
            "attempt": 0,
            "done": False,
            "total_rounds": 1,
            "phase": "training",
            "site": "site-a",
            "sites": ["site-a"],
            "uploads": {
                ids["site-a"]: {
                    **{"site": "site-a", "round": 0, "attempt": 0, "initial": False},
                    **{"bytes_received": 0, "corrupted_chunks": 0, "offsets": [0]},
                }
            },
        }
        assert b.status("nobody")["sites"] == [] and b.status("nobody")["uploads"] == {}
        full = a.status()  # no name, from this machine: the operator's own tools (the local demo, tests)
        assert full["sites"] == ["site-a", "site-b"] and set(full["uploads"]) == set(ids.values())
        def still(status: dict) -> dict:  # without what moves between two calls: last contact, upload seconds
            uploads = {k: {**u, "seconds": None} for k, u in status["uploads"].items()}
            return {**status, "site_states": None, "uploads": uploads}

        assert still(srv.aggregator.status()) == still(full)  # in-process: everything
    finally:
        a.close()
        b.close()
        srv.stop(0)


def _operator_kit(kits) -> Path:
    """The server kit with a certificate the operator can also present as a client (clientAuth): what `fl-plugins
    provision` must issue for the operator's Status (today it issues serverAuth only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fl_plugins.security.provision import CertificateAuthority

    ca = CertificateAuthority.load(kits.ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test aggregator")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))  # fmt: skip
    (kits.server / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (kits.server / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))  # fmt: skip
    (kits.server / "server.key").chmod(0o600)
    return kits.server


@pytest.mark.integration
def test_status_over_mtls_shows_a_site_its_own_entries_and_the_operator_everything(tmp_path):
    pytest.importorskip("cryptography")
    from fl_plugins.security.provision import provision_local
    from fl_plugins.security.tls import load_server_kit, load_site_kit

    kits = provision_local(tmp_path / "kits", ["site-1", "site-2"])
    kit = load_server_kit(_operator_kit(kits))
    srv = server(tmp_path, kit=kits.server, min_sites=2)
    creds = {s: load_site_kit(kits.sites[s]).credentials() for s in ("site-1", "site-2")}
    a, b = (RawSite(srv.address, s, credentials=creds[s]) for s in ("site-1", "site-2"))
    op = RawSite(srv.address, "operator", hello=False,
                 credentials=grpc.ssl_channel_credentials(kit.ca, kit.key, kit.cert))  # fmt: skip
    try:
        ids = _two_sites_uploading(srv, a, b)
        mine = a.status()
        assert mine["site"] == "site-1" and mine["sites"] == ["site-1"] and list(mine["uploads"]) == [ids["site-1"]]
        assert "bytes_received" not in mine and "updates_accepted" not in mine  # no totals over every site
        code, details = refused(a.status, "site-2")  # naming another site does not help
        assert code == grpc.StatusCode.PERMISSION_DENIED and "its certificate is site 'site-1'" in details
        full = op.status()
        assert full["sites"] == ["site-1", "site-2"] and set(full["uploads"]) == set(ids.values())
        assert "updates_accepted" in full
    finally:
        for s in (a, b, op):
            s.close()
        srv.stop(0)


def test_a_long_poll_whose_caller_left_frees_its_worker_at_once(tmp_path):
    """A GetTask whose caller gave up (its deadline passed, its process died) ends when gRPC says the call is
    over, not when its 30 s wait would: the worker and the site's poll slot are free again at once."""
    import time

    srv = server(tmp_path, min_sites=2)  # no round can start: the poll would wait its whole 30 s
    evil = RawSite(srv.address, "evil")
    try:
        with pytest.raises(grpc.RpcError) as e:
            evil.stub.GetTask(pb.TaskRequest(site="evil", wait_seconds=30), timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stop = time.monotonic() + 10
        while srv.servicer.slots._polls:
            assert time.monotonic() < stop, "the abandoned poll still holds its worker"
            time.sleep(0.02)
        assert evil.task(wait=0.2).kind == pb.Task.WAIT  # and the site may poll again
    finally:
        evil.close()
        srv.stop(0)
