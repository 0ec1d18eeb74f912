"""The aggregator's central promise under unlucky timing and hostile sites (issue 10): the global model holds
exactly the weighted average of the counted updates, whatever closes the round, and one site cannot make a round
run again and again, bury the model in Inf, or upload for a round it was never given.

Each test drives a real aggregator on 127.0.0.1 with two good sites (test_hostile.Federation: real SiteClients,
which keep their update and send it again when a refold asks) and one broken or hostile site that speaks the
wire protocol by hand (RawSite). A site that "stalls mid-upload" streams some chunks, which are verified and
folded, then holds its stream open on an Event the test sets only after the round has closed: the timing cannot
go the other way. Results are compared bit for bit (values are small multiples of 1/16, weights sum to 4).
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import SiteThread, join_sites, load_round
from test_hostile import (
    CHUNK,
    GOOD,
    INITIAL,
    Federation,
    RawSite,
    assert_params_equal,
    fedavg,
    metrics,
    plus,
    refused,
    shard_digest,
    update,
)

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.errors import ConfigError, ModelMismatchError
from fl_plugins.wire.proto import fl_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GOOD_ONLY = fedavg(INITIAL, [(step, w) for _, step, w in GOOD])


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Stalled:
    """A RawSite update of 101.0s that streams its first `chunks` chunks (verified and folded), then holds the
    stream open until `release()`; `error` is what the aggregator answered the stream."""

    def __init__(self, site: RawSite, task: pb.Task, chunks: int = 2, value: float = 101.0) -> None:
        params = {k: np.full_like(v, value) for k, v in INITIAL.items()}
        self.manifest, self.frames = update(params)
        self.begin = site.begin(task, self.manifest.to_json())
        self._go = threading.Event()
        self.error: grpc.RpcError | None = None
        sent = threading.Event()

        def frames():
            yield from self.frames[:chunks]
            sent.set()
            self._go.wait(60)

        def stream():
            try:
                site.send(self.begin.upload_id, frames())
            except grpc.RpcError as e:
                self.error = e

        self.thread = threading.Thread(target=stream, daemon=True)
        self.thread.start()
        assert sent.wait(30)

    def release(self) -> None:
        self._go.set()
        self.thread.join(30)


def folded_chunks(srv, site: str) -> bool:
    """The site's upload has folded at least one chunk into the accumulator."""
    with srv.aggregator.lock:
        return any(u.site == site and u.folded for u in srv.aggregator.uploads.live.values())


# -- 1. whatever closes the round, no partial update reaches the global model --------------------------------
def test_a_round_closed_at_its_deadline_drops_a_slow_sites_partial_update(server_factory):
    """The review's case: A and B commit, C has streamed (and folded) two chunks when the deadline passes."""
    fed = Federation(server_factory, round_deadline=2.0, min_updates=1)
    slow = RawSite(fed.address, "slow")
    stalled = Stalled(slow, slow.train_task())
    wait_for(lambda: folded_chunks(fed.srv, "slow"), "the slow site's chunks to be folded")
    status = fed.finish(refolds=1)  # the good sites resend their updates; the slow site's bytes are gone
    stalled.release()
    assert stalled.error is not None and stalled.error.code() == grpc.StatusCode.CANCELLED
    assert status["updates_lost"] == 0
    code, details = refused(slow.commit, stalled.begin.upload_id, [shard_digest(stalled.manifest, stalled.frames)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round ended" in details, details
    refold = [r for r in metrics(fed.srv, "refold")]
    assert [(r["round"], r["partial"], r["owed"]) for r in refold] == [(0, ["slow"], ["good-1", "good-2"])]
    slow.close()


def test_the_round_after_a_refold_does_not_run_again(server_factory):
    """The review saw the next round restart for no reason after a deadline close (a flag never reset)."""
    srv = server_factory(rounds=2, min_sites=1, initial=INITIAL, chunk_bytes=CHUNK, round_deadline=1.5)
    go = threading.Event()

    def held(r, params):
        assert go.wait(60)
        return plus(1)(params), "FULL", 1

    good = SiteThread(srv.address, "good", held)
    good.start()
    slow = RawSite(srv.address, "slow")
    stalled = Stalled(slow, slow.train_task())
    go.set()
    wait_for(lambda: srv.aggregator.round >= 1, "round 0 to close")
    stalled.release()
    good.join(60)
    assert not good.is_alive() and good.error is None, good.error
    assert srv.wait() == 0, srv.aggregator.error
    assert_params_equal(load_round(srv.aggregator.config.run_dir, 2), plus(2)(INITIAL))
    rounds = metrics(srv, "round")
    assert [(r["round"], r["attempt"], r["refolds"]) for r in rounds] == [(0, 0, 1), (1, 0, 0)]
    assert srv.aggregator.stats["round_restarts"] == 0
    slow.close()


def test_a_site_dropped_for_silence_mid_upload_leaves_nothing_behind(server_factory):
    fed = Federation(server_factory, site_timeout=1.5)
    for s in fed.sites:
        s.client_kw["heartbeat"] = 0.2  # the good sites stay alive; set before their client is made
    silent = RawSite(fed.address, "silent")  # no heartbeat: silent once its chunks stop
    stalled = Stalled(silent, silent.train_task())
    wait_for(lambda: folded_chunks(fed.srv, "silent"), "the silent site's chunks to be folded")
    wait_for(lambda: "silent" not in {u.site for u in fed.srv.aggregator.uploads.live.values()}, "the drop")
    fed.finish(refolds=1)
    stalled.release()
    silent.close()


def test_a_site_whose_policy_refuses_mid_upload_leaves_nothing_behind(server_factory):
    fed = Federation(server_factory)
    site = RawSite(fed.address, "refuser")
    stalled = Stalled(site, site.train_task())
    wait_for(lambda: folded_chunks(fed.srv, "refuser"), "the site's chunks to be folded")
    rec = [{"key": "policy_refused", "value": "task type 'train' is not allowed", "data_type": "TEXT"}]
    site.stub.Log(pb.LogRequest(site="refuser", round=0, records_json=json.dumps(rec)), timeout=10)
    fed.finish(refolds=1)
    stalled.release()
    site.close()


def test_a_chunk_folded_after_its_upload_was_dropped_is_caught(server_factory, monkeypatch):
    """The race: a chunk passes the 'is the upload alive' check, the round closes (dropping the upload while
    none of its bytes are folded yet), then the chunk is folded. The window is held open here by the test."""
    from fl_plugins.aggregator import uploads

    entered, proceed = threading.Event(), threading.Event()
    real = uploads.FoldSink.data

    def slow_data(self, shard, tensor, lo, payload):
        if self.upload.site == "racer" and not entered.is_set():
            entered.set()
            assert proceed.wait(60)
        return real(self, shard, tensor, lo, payload)

    monkeypatch.setattr(uploads.FoldSink, "data", slow_data)
    fed = Federation(server_factory, round_deadline=2.0, min_updates=1)
    racer = RawSite(fed.address, "racer")
    stalled = Stalled(racer, racer.train_task(), chunks=1)
    assert entered.wait(30)
    fed.release()
    wait_for(lambda: fed.srv.aggregator.rounds.closing is not None, "the round to close")
    assert not folded_chunks(fed.srv, "racer")  # the upload was dropped with nothing folded ...
    proceed.set()  # ... and now its chunk is folded
    fed.finish(refolds=1)
    stalled.release()
    racer.close()


# -- 2. one site cannot make a round run again and again -----------------------------------------------------
def test_a_new_send_after_a_folded_chunk_sits_the_site_out_and_keeps_the_others(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    stalled = Stalled(evil, task)
    wait_for(lambda: folded_chunks(fed.srv, "evil"), "evil's chunks to be folded")
    m, fs = update(plus(2)(INITIAL))
    code, details = refused(evil.begin, task, m.to_json(), "n2")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sits attempt 0 of round 0 out" in details, details
    code, details = refused(evil.begin, task, m.to_json(), "n3")  # and it stays out
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sits attempt 0" in details, details
    stalled.release()
    status = fed.finish(refolds=1)
    assert status["round_restarts"] == 0  # the good sites' updates were refolded, not thrown away
    evil.close()


def test_a_wrong_shard_digest_sits_the_site_out_once(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update(plus(2)(INITIAL))
    st = evil.begin(task, m.to_json())
    evil.send(st.upload_id, fs)
    code, details = refused(evil.commit, st.upload_id, ["0" * 32])
    assert code == grpc.StatusCode.DATA_LOSS and "sits attempt 0 of round 0 out" in details, details
    code, details = refused(evil.begin, task, m.to_json(), "n2")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sits attempt 0" in details, details
    fed.finish(refolds=1)
    evil.close()


@pytest.mark.parametrize("policy", ["fail", "close"])
def test_a_round_gives_up_after_max_attempts(server_factory, policy):
    """A lone site whose every update fails its digest: each attempt it sits out, the next lets it try again;
    after `max_attempts` the job fails with an error that says why (or, with `close`, a good update counts)."""
    srv = server_factory(rounds=1, min_sites=1, initial=INITIAL, chunk_bytes=CHUNK, max_attempts=2,
                         on_attempts_exhausted=policy)  # fmt: skip
    evil = RawSite(srv.address)
    m, fs = update(plus(2)(INITIAL))
    for attempt in range(2):
        task = evil.train_task()
        assert (task.round, task.attempt) == (0, attempt)
        st = evil.begin(task, m.to_json(), f"n{attempt}")
        evil.send(st.upload_id, fs)
        refused(evil.commit, st.upload_id, ["0" * 32])
    assert srv.wait() == 1
    assert "round 0 used its 2 attempts with 0 updates counted" in str(srv.aggregator.error)
    assert "on_attempts_exhausted" in str(srv.aggregator.error)
    assert not (srv.aggregator.config.run_dir / "global" / "round-00001").exists()
    evil.close()


# -- 3. huge weights and overflowing sums --------------------------------------------------------------------
def test_a_weight_beyond_the_bound_is_refused(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, _ = update(plus(2)(INITIAL), weight=1e39)  # finite as a float64, inf as a float32
    code, details = refused(evil.begin, task, m.to_json())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1e+12 (got 1e+39)" in details, details
    fed.finish()
    evil.close()


def test_values_that_times_their_weight_could_overflow_are_refused(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update({k: np.full_like(v, 1e30) for k, v in INITIAL.items() if v.dtype == np.float32}
                   | {k: v for k, v in INITIAL.items() if v.dtype != np.float32}, weight=1e9)  # fmt: skip
    st = evil.begin(task, m.to_json())
    code, details = refused(evil.send, st.upload_id, fs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "could overflow the accumulator" in details, details
    fed.finish()  # refused on its first chunk, before anything of it was folded
    evil.close()


def test_an_average_that_overflows_is_not_written(server_factory):
    """Products are bounded per chunk; what is left is the global model itself near float32's limit times a
    DIFF update's weight: the finished average is checked before it is written."""
    big = {"w": np.full(16, 3e38, np.float32)}
    srv = server_factory(rounds=1, min_sites=2, initial=big)
    sites = [SiteThread(srv.address, n, lambda r, p: ({"w": np.zeros(16, np.float32)}, "DIFF", 2)) for n in "ab"]
    for s in sites:
        s.start()
    assert srv.wait() == 1
    assert "round 0's average of tensor 'w' holds inf" in str(srv.aggregator.error)
    for s in sites:  # they learn that the aggregator stopped, and why
        s.join(30)
        assert "holds inf" in str(s.error)
    assert not (srv.aggregator.config.run_dir / "global" / "round-00001").exists()


# -- 4 and 6. dtypes: bool carried, integers exact or refused, float64 in float64 --------------------------
def test_bool_int_and_float64_tensors_follow_their_rules(server_factory):
    initial = {
        "mask": np.array([True, False, True, False]),
        "num_batches_tracked": np.array(7, np.int64),
        "counts_u8": np.array([5, 5, 200], np.uint8),
        "w64": np.array([1.0, 2.0], np.float64),
    }
    tiny = 2.0**-40  # lost in a float32 sum of values near 1

    def step(delta_u8):
        def run(r, p):
            return ({"mask": ~p["mask"], "num_batches_tracked": p["num_batches_tracked"] + 3,
                     "counts_u8": (p["counts_u8"] + np.array(delta_u8)).astype(np.uint8),
                     "w64": p["w64"] + tiny}, "FULL", 1)  # fmt: skip

        return run

    def diff(r, p):  # a DIFF update: local - global, wrapped for uint8 (3 - 5 = 254)
        return ({"mask": p["mask"], "num_batches_tracked": np.array(1, np.int64),
                 "counts_u8": np.array([254, 4, 50], np.uint8), "w64": np.array([tiny, tiny])}, "DIFF", 1)  # fmt: skip

    srv = server_factory(rounds=1, min_sites=2, initial=initial)
    join_sites(SiteThread(srv.address, "a", step([1, 1, 0])), SiteThread(srv.address, "b", diff))
    assert srv.wait() == 0, srv.aggregator.error
    got = load_round(srv.aggregator.config.run_dir, 1)
    np.testing.assert_array_equal(got["mask"], initial["mask"])  # carried, never averaged
    assert got["num_batches_tracked"] == 9  # ((7 + 3) + (7 + 1)) / 2
    np.testing.assert_array_equal(got["counts_u8"], [4, 8, 225])  # rint(4.5) = 4, (6 + 9) / 2, (200 + 250) / 2
    np.testing.assert_array_equal(got["w64"], initial["w64"] + tiny)


def test_int64_values_beyond_2_pow_53_are_refused(server_factory):
    srv = server_factory(rounds=1, min_sites=1, initial={"n": np.array([1, 2], np.int64)})
    bad = SiteThread(srv.address, "a", lambda r, p: ({"n": np.array([2**60, 1], np.int64)}, "FULL", 1))
    bad.start()
    bad.join(60)
    assert isinstance(bad.error, ModelMismatchError), bad.error  # refused mid-stream: send() raises
    assert "holds 1152921504606846976 at element 0" in str(bad.error)
    assert "exact only up to 2^53" in str(bad.error)


# -- 8. sizes a site declares -------------------------------------------------------------------------------
def test_a_plan_the_aggregator_would_not_make_is_refused(server_factory):
    from fl_plugins.wire.layout import Manifest, ShardLayout

    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, _ = update(plus(2)(INITIAL))
    odd = Manifest(m.shards, 8, m.envelope)  # a chunk size of its own
    code, details = refused(evil.begin, task, odd.to_json(), "n1")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "chunk_bytes is 8, the aggregator's is 65536" in details
    empty = ShardLayout("extra.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", [])
    extra = Manifest([*m.shards, empty], CHUNK, m.envelope)
    code, details = refused(evil.begin, task, extra.to_json(), "n2")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "holds no tensor" in details, details
    fed.finish()
    evil.close()


# -- 10. configuration values ------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("min_updates", 0, "`min_updates` (--min-updates) must be an integer >= 1 (got 0)"),
    ("min_sites", 1.5, "`min_sites` (--min-sites) must be an integer >= 1 (got 1.5)"),
    ("idle_timeout", 0, "`idle_timeout` (--idle-timeout) must be a number > 0 (got 0)"),
    ("site_timeout", float("nan"), "`site_timeout` (--site-timeout) must be a number > 0 (got nan)"),
    ("max_attempts", 0, "`max_attempts` (--max-attempts) must be an integer >= 1 (got 0)"),
    ("on_attempts_exhausted", "retry",
     "`on_attempts_exhausted` (--on-attempts-exhausted) must be 'fail' or 'close' (got 'retry')"),
    ("linger", -1, "`linger` must be a number >= 0 (got -1)"),
])  # fmt: skip
def test_every_setting_is_checked_wherever_it_comes_from(tmp_path, field, value, message):
    with pytest.raises(ConfigError) as e:
        AggregatorConfig(run_dir=tmp_path, rounds=1, **{field: value})
    assert message in str(e.value)


def test_min_updates_zero_is_refused_on_the_command_line(tmp_path):
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "server", "--run-dir", str(tmp_path / "r"),
                          "--rounds", "1", "--min-updates", "0"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "`min_updates` (--min-updates) must be an integer >= 1 (got 0)" in bad.stderr
    assert not (tmp_path / "r").exists()


# -- 11. only a site given the round's task may upload for it -------------------------------------------------
def test_an_upload_without_the_task_is_refused(server_factory):
    fed = Federation(server_factory)
    evil = RawSite(fed.address)  # connected, never asked for a task
    m, fs = update(plus(2)(INITIAL))
    fake = pb.Task(round=0, attempt=0)
    code, details = refused(evil.begin, fake, m.to_json())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "was not given round 0's task" in details, details
    fed.finish()
    evil.close()


def test_no_upload_before_min_sites_are_connected(server_factory):
    srv = server_factory(rounds=1, min_sites=2, initial=INITIAL, chunk_bytes=CHUNK, round_deadline=1.0)
    alone = RawSite(srv.address, "alone")
    m, fs = update(plus(2)(INITIAL))
    code, details = refused(alone.begin, pb.Task(round=0, attempt=0), m.to_json())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "starts once 2 sites are connected" in details, details
    assert alone.task(wait=1.0).kind == pb.Task.WAIT
    assert srv.aggregator.round == 0 and not (srv.aggregator.config.run_dir / "global" / "round-00001").exists()
    alone.close()


def test_a_frame_larger_than_the_aggregators_chunks_is_not_buffered(server_factory):
    """gRPC buffers a message whole before the servicer sees it: the receive limit follows the aggregator's chunk
    size (and MAX_CONTROL_BYTES for manifests), not the old fixed 96 MiB."""
    from fl_plugins.wire import frames
    from fl_plugins.wire.rpc import MAX_CONTROL_BYTES

    fed = Federation(server_factory)
    evil = RawSite(fed.address)
    task = evil.train_task()
    m, fs = update(plus(2)(INITIAL), weight=4)  # the weights sum to 8: the average stays exact
    st = evil.begin(task, m.to_json())
    huge = frames.encode(0, [bytes(MAX_CONTROL_BYTES + 1)])
    code, details = refused(evil.send, st.upload_id, [huge])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    code, details = refused(evil.begin, task, "x" * (MAX_CONTROL_BYTES + 1), "n2")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    evil.send(st.upload_id, fs)  # nothing of the refused frames was used: the upload goes on from offset 0
    assert evil.commit(st.upload_id, [shard_digest(m, fs)]).message == "update accepted"
    fed.finish([(plus(2), 4)], evil_counted=1)
    evil.close()


def test_an_upload_before_any_task_was_given_is_refused_in_a_new_run(server_factory):
    """Two sites connected, none has asked for a task yet: an upload is no 'resume after a restart' (this run has
    never been restarted), so it is refused. Before, the first upload of a run could start its round."""
    srv = server_factory(rounds=1, min_sites=2, initial=INITIAL, chunk_bytes=CHUNK)
    other, evil = RawSite(srv.address, "other"), RawSite(srv.address, "evil")
    m, _ = update(plus(2)(INITIAL))
    code, details = refused(evil.begin, pb.Task(round=0, attempt=0), m.to_json())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "was not given round 0's task" in details, details
    other.close()
    evil.close()
