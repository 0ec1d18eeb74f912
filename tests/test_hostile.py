"""Hostile and broken input against a real aggregator on 127.0.0.1: each is refused with an error that names
what was wrong, the round carries on with the other sites, and the global model and run directory stay intact.

A misbehaving site ("evil") speaks the wire protocol by hand (`RawSite`, over rpc.Stub) where a well-behaved
client cannot produce the input, else it uses the real SiteClient. Two good sites (SiteThreads, weights 1 and 3)
train round 0 only once the test releases them, so the bad input arrives while the round is open. Model values
are small multiples of 1/16 and the weights sum to a power of two, so results are compared bit for bit.

Covered elsewhere, not repeated here:
* a duplicate update after a commit, a late update, missing/unexpected tensor names, wrong shapes:
  test_client_api.py::test_duplicate_late_and_mismatched_updates_are_refused;
* an upload that stalls, alone: test_client_api.py::test_an_upload_that_stalls_is_cancelled_after_the_idle_timeout
  (here: with other sites, the round carries on);
* chunks out of order or repeated, headers that disagree, malformed manifests, at the receiver: test_wire.py;
* random bytes and mutations thrown at the frame, manifest and header parsers: test_fuzz.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
from conftest import SiteThread, load_round

from fl_plugins.aggregator.store import RunStore
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import ModelMismatchError, RoundError
from fl_plugins.tensors import ByteViews, describe
from fl_plugins.wire import frames, rpc
from fl_plugins.wire.frames import ChunkHasher
from fl_plugins.wire.layout import Manifest, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import ShardSender, TensorSource

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHUNK = 64 << 10  # the smallest the aggregator allows: the model below spans three chunks
W = "blocks.0/attn..proj.weight"  # tensor names may hold dots and slashes: they never become file names
B = "blocks.0/attn..proj.bias"
N = "norm.scale"


def _values(shape: tuple[int, ...], seed: int, dtype=np.float32, scale: int = 16) -> np.ndarray:
    """Multiples of 1/scale in [-32, 32): sums and products by small weights stay exact."""
    return (np.random.default_rng(seed).integers(-32 * scale, 32 * scale, shape) / scale).astype(dtype)


# float32 weight (128 KiB: chunks 0-1), bias, and a bf16 tensor last (multiples of 1/4: exact in bf16 too)
INITIAL = {W: _values((128, 256), 1), B: _values((256,), 2),
           N: (_values((64,), 3, scale=4) / 4).astype(ml_dtypes.bfloat16)}  # fmt: skip

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def plus(k: float) -> Step:
    return lambda p: {n: (v + k).astype(v.dtype) for n, v in p.items()}


def twice_minus_half(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: (v * 2 - 0.5).astype(v.dtype) for n, v in p.items()}


GOOD = [("good-1", plus(1), 1), ("good-2", twice_minus_half, 3)]


def fedavg(g: dict[str, np.ndarray], updates: list[tuple[Step, float]]) -> dict[str, np.ndarray]:
    """The aggregator's arithmetic: float32 sums of weight * update, divided by the total weight (a power of
    two here, so exact), cast back to each tensor's dtype."""
    total = sum(w for _, w in updates)
    outs = [(step(g), w) for step, w in updates]
    return {k: (sum(np.float32(w) * o[k].astype(np.float32) for o, w in outs) / np.float32(total)).astype(v.dtype)
            for k, v in g.items()}  # fmt: skip


def assert_params_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k].astype(np.float32), want[k].astype(np.float32), err_msg=k)


END_OF_JOB = {"final", "summary.json"}  # what a complete job leaves (aggregator/ending.py)


def assert_run_dir_intact(tmp_path: Path, rounds: int) -> None:
    """Only complete checkpoints, global/round-00000 .. round-R (a manifest, shards whose bytes match their
    digests, their chunk digests), round 0 still the initial model, the job's end (final/: round R's files;
    summary.json), and nothing written anywhere else."""
    run = tmp_path / "run"
    assert {p.name for p in tmp_path.iterdir()} <= {"run", "initial.safetensors"}
    assert {p.name for p in run.iterdir()} <= {"global", "metrics.jsonl", "logs.jsonl", "run.json"} | END_OF_JOB
    if (run / "final").exists():
        final, last = run / "final", RunStore(run).round_dir(rounds)
        assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in last.iterdir())
        assert all((final / p.name).read_bytes() == p.read_bytes() for p in last.iterdir())
    assert sorted(p.name for p in (run / "global").iterdir()) == [f"round-{r:05d}" for r in range(rounds + 1)]
    store = RunStore(run)
    for r in range(rounds + 1):
        m = store.load(r)
        names = ["manifest.json", *(s.name for s in m.shards), *(s.name + ".chunks" for s in m.shards)]
        assert sorted(p.name for p in store.round_dir(r).iterdir()) == sorted(names)
        for shard, path in zip(m.shards, store.shard_paths(r, m), strict=True):
            h = ChunkHasher(m.chunk_bytes)
            h.update(path.read_bytes())
            assert h.hexdigest() == shard.digest, path
    assert_params_equal(load_round(run, 0), INITIAL)


def metrics(srv, event: str) -> list[dict]:
    path = srv.aggregator.config.run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


# -- a site that speaks the protocol by hand --------------------------------------------------------------
def update(params: dict[str, np.ndarray], *, weight: float = 1, **envelope) -> tuple[Manifest, list[bytes]]:
    """An update's manifest and its (single) shard's frames, as SiteClient.upload would send them."""
    env = {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": weight}, **envelope}
    m = Manifest(plan_shards(describe(params)), CHUNK, env)
    assert len(m.shards) == 1
    return m, list(ShardSender(m, 0, TensorSource(m, ByteViews(params).get)).frames(0))


def shard_digest(m: Manifest, frame_list: list[bytes]) -> str:
    d = frames.ShardDigest()
    for f in frame_list:
        d.add(frames.decode(f)[2])
    return d.hexdigest(m.shards[0].size)


class RawSite:
    """A site that makes the gRPC calls itself (rpc.Stub), to send what a well-behaved client cannot."""

    def __init__(self, address: str, name: str = "evil", can_offer: bool = False) -> None:
        self.name, self.can_offer = name, can_offer
        self.channel = rpc.insecure_channel(address)
        self.stub = rpc.Stub(self.channel)
        self.stub.Hello(pb.HelloRequest(site=name, can_offer_initial=can_offer), timeout=10)

    def task(self, wait: float = 10.0) -> pb.Task:
        req = pb.TaskRequest(site=self.name, wait_seconds=wait, can_offer_initial=self.can_offer)
        return self.stub.GetTask(req, timeout=wait + 10)

    def train_task(self) -> pb.Task:
        deadline = time.monotonic() + 30
        while (t := self.task()).kind == pb.Task.WAIT:
            assert time.monotonic() < deadline, "no task for the site"
        return t

    def begin(self, task: pb.Task, manifest_json: str, nonce: str = "n1", initial: bool = False) -> pb.UploadState:
        req = pb.UploadBegin(site=self.name, round=task.round, attempt=task.attempt, manifest_json=manifest_json,
                             nonce=nonce, initial=initial)  # fmt: skip
        return self.stub.BeginUpload(req, timeout=10)

    def send(self, upload_id: str, frame_list, shard: int = 0) -> pb.UploadAck:
        md = (("fl-upload-id", upload_id), ("fl-shard", str(shard)))
        return self.stub.Upload(iter(frame_list), metadata=md, timeout=30)

    def commit(self, upload_id: str, digests: list[str]) -> pb.CommitReply:
        return self.stub.CommitUpload(pb.UploadCommit(upload_id=upload_id, shard_digests=digests), timeout=30)

    def upload(self, task: pb.Task, params, *, weight: float = 1, nonce: str = "n1", **envelope) -> str:
        """A complete, valid update, committed; returns its upload id."""
        m, fs = update(params, weight=weight, **envelope)
        st = self.begin(task, m.to_json(), nonce)
        self.send(st.upload_id, fs)
        assert self.commit(st.upload_id, [shard_digest(m, fs)]).message == "update accepted"
        return st.upload_id

    def close(self) -> None:
        self.channel.close()


def refused(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call the aggregator refuses."""
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details()


class Federation:
    """The aggregator and the two good sites, held at round 0's step until `release()`."""

    def __init__(self, server_factory, **cfg) -> None:
        cfg.setdefault("chunk_bytes", CHUNK)
        self.srv = server_factory(rounds=1, min_sites=2, initial=INITIAL, **cfg)
        self.address = self.srv.address
        self.go = threading.Event()
        self.sites = [SiteThread(self.address, name, self._held(step, w)) for name, step, w in GOOD]
        for s in self.sites:
            s.start()

    def _held(self, step: Step, weight: float):
        def run(r, params):
            assert self.go.wait(60), "the test never released the good sites"
            return step(params), "FULL", weight

        return run

    def release(self) -> None:
        self.go.set()

    def finish(self, extra: list[tuple[Step, float]] = (), *, refolds: int = 0, evil_counted: int = 0) -> dict:
        """Release the good sites, wait for the job's end, and check: the aggregator ran to the end, the result
        is FedAvg of the good sites' updates (plus `extra`), the evil site's update counted `evil_counted`
        times, and the run directory is intact."""
        self.release()
        for s in self.sites:
            s.join(60)
            assert not s.is_alive(), f"{s.site} did not finish: the round waited for the refused site?"
            if s.error is not None:
                raise s.error
        assert self.srv.wait() == 0, f"the aggregator stopped: {self.srv.aggregator.error!r}"
        status = self.srv.aggregator.status()
        assert (status["round_restarts"], status["refolds"]) == (0, refolds), status
        updates = metrics(self.srv, "update")
        assert sorted(u["site"] for u in updates) == sorted(
            ["good-1", "good-2"] + ["evil"] * evil_counted)  # fmt: skip
        want = fedavg(INITIAL, [(step, w) for _, step, w in GOOD] + list(extra))
        assert_params_equal(load_round(self.srv.aggregator.config.run_dir, 1), want)
        assert_run_dir_intact(self.srv.aggregator.config.run_dir.parent, 1)
        return status


# -- malformed manifests and envelopes ---------------------------------------------------------------------
def _manifest_with(**changes) -> str:
    obj = json.loads(update(INITIAL)[0].to_json())
    for path, value in changes.items():
        node = obj
        *parents, last = path.split("__")
        for k in parents:
            node = node[int(k) if k.isdigit() else k]
        node[last] = value
    return json.dumps(obj)


MALFORMED = [
    ("not json", "not valid JSON"),
    ("[" * 100_000, "nested too deeply"),
    ('{"a": 1' + "0" * 5000 + "}", "not valid JSON"),
    (json.dumps({"format": "fl-plugins/manifest", "version": 2}), "`version`"),
    (_manifest_with(shards__0__size=1), "`size` 1 disagrees"),
    (_manifest_with(shards__0__header_size=12), "`header_size`"),
    (_manifest_with(envelope__params_type="HALF"), "params_type must be FULL or DIFF"),
    (_manifest_with(envelope__meta={"NUM_STEPS_CURRENT_ROUND": -1}), "NUM_STEPS_CURRENT_ROUND must be"),
    (_manifest_with(envelope__meta={"NUM_STEPS_CURRENT_ROUND": float("inf")}), "must be a finite number"),
    (_manifest_with(envelope__meta={"NUM_STEPS_CURRENT_ROUND": 10**400}), "must be a finite number"),
    (_manifest_with(envelope__meta=[1]), "`meta` must be an object"),
    (_manifest_with(envelope__metrics=[0.5]), "`metrics` must be an object"),
]


def test_malformed_manifests_are_refused_and_the_round_goes_on(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    for i, (text, match) in enumerate(MALFORMED):
        code, details = refused(evil.begin, task, text, nonce=f"n{i}")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and match in details and "'evil'" in details, (i, details)
    assert fed.srv.aggregator.stats["invalid_updates"] == len(MALFORMED)
    evil.close()
    fed.finish()  # without waiting for the evil site, which took the task


def test_unusable_metrics_do_not_stop_the_aggregator(server_factory):
    """Metrics are informative: values that are not finite numbers are left out of the round's mean."""
    fed = Federation(server_factory, evaluate_final=False)  # (the evil site, which sent metrics, never evaluates)
    evil = RawSite(fed.address)
    evil.upload(evil.train_task(), plus(2)(INITIAL), weight=4,
                metrics={"loss": 10**400, "nan": float("nan"), "acc": 0.5, "nested": {"a": 1}})  # fmt: skip
    fed.finish([(plus(2), 4)], evil_counted=1)
    (rnd,) = metrics(fed.srv, "round")
    assert rnd["metrics"] == {"acc": 0.5}


# -- shards that disagree with their manifest ---------------------------------------------------------------
def test_a_shard_whose_header_disagrees_with_the_manifest_is_refused(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, _ = update(INITIAL)  # what the manifest declares
    _, fs = update({**INITIAL, W: INITIAL[W].reshape(256, 128)})  # what the shard's header says: same bytes
    st = evil.begin(task, m.to_json())
    code, details = refused(evil.send, st.upload_id, fs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"header disagrees with the manifest for [{W!r}]" in details and "sits attempt 0 of round 0 out" in details
    assert evil.task(wait=0.2).kind == pb.Task.WAIT  # no task for the rest of round 0
    code, details = refused(evil.begin, task, m.to_json(), nonce="n2")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sits attempt 0 of the round out" in details, details
    evil.close()
    fed.finish()


@pytest.mark.parametrize("how", ["extra chunk", "longer last chunk"])
def test_a_shard_larger_than_declared_is_refused(server_factory, how):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update(plus(2)(INITIAL))
    size = m.shards[0].size
    if how == "extra chunk":
        fs = [*fs, frames.encode(size, [b"\0" * 64])]
    else:
        offset, payload, _ = frames.decode(fs[-1])
        fs = [*fs[:-1], frames.encode(offset, [bytes(payload) + b"\0" * 8])]
    st = evil.begin(task, m.to_json())
    code, details = refused(evil.send, st.upload_id, fs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"shard larger than declared: the manifest says {size} bytes" in details, details
    code, details = refused(evil.commit, st.upload_id, [shard_digest(m, fs[:3])])
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    evil.close()
    fed.finish(refolds=1)  # its first chunks were folded: the good sites' updates are refolded without it


# -- updates that disagree with the global model ------------------------------------------------------------
def test_tensors_of_the_wrong_dtype_are_refused(server_factory):
    fed = Federation(server_factory)
    c = SiteClient(fed.address, "evil", retry_timeout=10)
    try:
        c.connect()
        task = c.next_task()
        bad = {**INITIAL, W: INITIAL[W].astype(np.float64), N: INITIAL[N].astype(np.float16)}
        want = (r"mismatched .*F64\[128, 256\] \(global model: F32\[128, 256\]\)"
                r".*norm.scale: F16\[64\] \(global model: BF16\[64\]\)")  # fmt: skip
        with pytest.raises(ModelMismatchError, match=want):
            c.upload(task.round, task.attempt, bad, {})
    finally:
        c.close()
    fed.finish()


@pytest.mark.parametrize("where, tensor, index, value, refolds", [
    ("first chunk", W, (0, 0), np.nan, 0),
    ("a later chunk", B, (255,), np.inf, 1),
    ("a bf16 tensor, last chunk", N, (5,), -np.inf, 1),
])  # fmt: skip
def test_nan_and_inf_in_an_update_are_refused(server_factory, where, tensor, index, value, refolds):
    fed = Federation(server_factory)
    c = SiteClient(fed.address, "evil", retry_timeout=10)
    try:
        c.connect()
        task = c.next_task()
        bad = plus(2)(INITIAL)
        bad[tensor][index] = value
        flat = int(np.ravel_multi_index(index, bad[tensor].shape))
        with pytest.raises(ModelMismatchError, match=rf"tensor '{tensor}' holds {value} at element {flat} .*"
                                                     r"--allow-nonfinite.*sits attempt 0 of round 0 out"):  # fmt: skip
            c.upload(task.round, task.attempt, bad, {})
        with pytest.raises(RoundError, match="sits attempt 0 of the round out"):
            c.upload(task.round, task.attempt, plus(2)(INITIAL), {})
    finally:
        c.close()
    fed.finish(refolds=refolds)  # folded chunks of it (all but the first chunk case): the round is refolded


def test_nan_is_averaged_when_reject_nonfinite_is_off(server_factory):
    fed = Federation(server_factory, reject_nonfinite=False)
    evil = RawSite(fed.address)
    bad = plus(2)(INITIAL)
    bad[W][3, 7] = np.nan
    evil.upload(evil.train_task(), bad, weight=4)
    fed.release()
    for s in fed.sites:
        s.join(60)
    assert fed.srv.wait() == 0
    got = load_round(fed.srv.aggregator.config.run_dir, 1)
    want = fedavg(INITIAL, [(step, w) for _, step, w in GOOD] + [(plus(2), 4)])
    assert np.isnan(got[W][3, 7])
    want[W][3, 7] = got[W][3, 7]
    assert_params_equal(got, want)


# -- file names ---------------------------------------------------------------------------------------------
ESCAPING = ["../escaped.safetensors", "../../escaped.safetensors", "sub/x.safetensors", "/tmp/abs.safetensors",
            "..\\escaped.safetensors", ".hidden.safetensors", "nul\0.safetensors", "new\nline.safetensors",
            "x" * 300 + ".safetensors"]  # fmt: skip


def test_shard_names_that_would_leave_the_directory_are_refused(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    for i, name in enumerate(ESCAPING):
        code, details = refused(evil.begin, task, _manifest_with(shards__0__name=name), nonce=f"n{i}")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "plain file name" in details, (name, details)
    evil.close()
    fed.finish()


def test_an_initial_model_offer_with_an_escaping_name_is_refused(server_factory, tmp_path):
    """The one upload written to files: a site's weights offered as round 0's model."""
    srv = server_factory(rounds=1, chunk_bytes=CHUNK)  # no initial model: sites may offer theirs
    evil = RawSite(srv.address, can_offer=True)
    task = evil.task()
    assert task.kind == pb.Task.OFFER_INITIAL
    for i, name in enumerate(ESCAPING):
        code, details = refused(evil.begin, task, _manifest_with(shards__0__name=name), nonce=f"n{i}", initial=True)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "plain file name" in details, (name, details)
    evil.close()
    # The offer went back: a good site is asked for its weights, at once, and the job runs.
    good = SiteClient(srv.address, "good-1", can_offer_initial=True)
    try:
        good.connect()
        assert good.next_task().kind == pb.Task.OFFER_INITIAL
        good.upload(0, 0, INITIAL, {}, initial=True)
        task = good.next_task()
        _, params = good.download(task, "numpy")
        good.upload(task.round, task.attempt, plus(1)(params), {})
    finally:
        good.close()
    assert srv.wait() == 0
    assert not list(tmp_path.rglob("escaped.safetensors")) and not (tmp_path.parent / "escaped.safetensors").exists()
    assert not Path("/tmp/abs.safetensors").exists()
    assert_run_dir_intact(tmp_path, 1)
    assert_params_equal(load_round(tmp_path / "run", 1), plus(1)(INITIAL))


# -- chunks out of order, duplicates, late ------------------------------------------------------------------
def test_out_of_order_chunks_are_refused_and_the_upload_goes_on(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update(plus(2)(INITIAL), weight=4)
    st = evil.begin(task, m.to_json())
    code, details = refused(evil.send, st.upload_id, [fs[0], fs[2]])  # skips chunk 1
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"chunk at offset {2 * CHUNK} out of order" in details
    evil.send(st.upload_id, [fs[0]])  # an exact repeat of one the aggregator has: skipped, not folded twice
    forged = frames.encode(0, [bytes(CHUNK)])  # another chunk at that offset is no repeat
    code, details = refused(evil.send, st.upload_id, [forged])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"out of order (expected {CHUNK})" in details
    resumed = evil.begin(task, m.to_json())  # same nonce: where to go on from
    assert list(resumed.offsets) == [CHUNK]
    evil.send(st.upload_id, fs[1:])
    assert evil.commit(st.upload_id, [shard_digest(m, fs)]).message == "update accepted"
    status = fed.finish([(plus(2), 4)], evil_counted=1)  # exact: the repeated chunk counted once
    assert status["corrupted_chunks"] == 2
    (rec,) = [u for u in metrics(fed.srv, "update") if u["site"] == "evil"]
    assert rec["bytes_received"] == m.shards[0].size and rec["corrupted_chunks"] == 2


def test_a_duplicate_commit_and_late_chunks_count_once(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update(plus(2)(INITIAL), weight=4)
    upload_id = evil.upload(task, plus(2)(INITIAL), weight=4)
    assert evil.commit(upload_id, [shard_digest(m, fs)]).message == "already committed"
    code, details = refused(evil.send, upload_id, fs[-1:])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "committed already" in details, details
    code, details = refused(evil.begin, task, m.to_json(), nonce="n2")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "duplicate" in details, details
    fed.release()
    deadline = time.monotonic() + 30
    while not fed.srv.aggregator.done:
        assert time.monotonic() < deadline, "round 0 did not close"
        time.sleep(0.05)
    for call, args in [(evil.send, (upload_id, fs[:1])), (evil.commit, (upload_id, [shard_digest(m, fs)]))]:
        code, details = refused(call, *args)  # late: the round has closed
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "unknown or its round ended" in details, details
    evil.close()
    fed.finish([(plus(2), 4)], evil_counted=1)


# -- a site that stalls forever mid-upload -------------------------------------------------------------------
def test_a_site_that_stalls_mid_upload_is_dropped_and_the_round_goes_on(server_factory):
    fed = Federation(server_factory, idle_timeout=1.0)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update(plus(2)(INITIAL))
    st = evil.begin(task, m.to_json())
    hang = threading.Event()
    outcome: list[BaseException] = []

    def first_chunk_then_hang():
        yield fs[0]
        hang.wait(60)

    def stream():
        try:
            evil.send(st.upload_id, first_chunk_then_hang())
        except grpc.RpcError as e:
            outcome.append(e)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    t.join(30)  # the aggregator cancels the stream once it has moved no bytes for idle_timeout
    hang.set()
    assert outcome and outcome[0].code() == grpc.StatusCode.CANCELLED, outcome
    code, details = refused(evil.commit, st.upload_id, [shard_digest(m, fs)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    evil.close()
    fed.finish(refolds=1)  # its first chunk was folded: the round is refolded without it


# -- logs ---------------------------------------------------------------------------------------------------
def test_a_log_record_cannot_claim_another_site(server_factory):
    srv = server_factory(rounds=1, initial=INITIAL)
    evil = RawSite(srv.address)
    records = [{"key": "loss", "value": 1.0, "site": "good-1", "round": 0}]
    evil.stub.Log(pb.LogRequest(site="evil", round=0, records_json=json.dumps(records)), timeout=10)
    evil.close()
    (rec,) = [json.loads(x) for x in (srv.aggregator.config.run_dir / "logs.jsonl").read_text().splitlines()]
    assert rec["site"] == "evil" and rec["key"] == "loss"
