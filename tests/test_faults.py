"""Faults over real gRPC on 127.0.0.1: corrupted and cut transfers (through a fault-injecting TCP proxy), cuts at
random moments, a site killed mid-round, the aggregator killed and restarted (also mid-checkpoint and
mid-upload), a site that outlives the aggregator.

Model values are multiples of 1/16 of modest size, and FedAvg weights sum to a power of two, so every
reference below is exact in float32 whatever the order of the folds: results are compared bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _proxy import FaultProxy
from conftest import SiteThread, free_port, join_sites
from safetensors.numpy import load_file, save_file

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer

MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------------------
def _values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 multiples of 1/16 in [-32, 32): sums and products by small weights stay exact."""
    return (np.random.default_rng(seed).integers(-512, 512, shape) / 16).astype(np.float32)


def _load_global(run_dir: Path, r: int) -> dict[str, np.ndarray]:
    d = run_dir / "global" / f"round-{r:05d}"
    assert (d / "manifest.json").is_file(), f"{d} is not a complete checkpoint"
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_params_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _metrics(run_dir: Path, event: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in recs if r.get("event") == event]


def _server(tmp_path: Path, initial: dict[str, np.ndarray], **kw: Any) -> AggregatorServer:
    save_file(initial, str(tmp_path / "initial.safetensors"))
    kw.setdefault("linger", 0.5)
    cfg = AggregatorConfig(run_dir=tmp_path / "run", initial_model=tmp_path / "initial.safetensors", **kw)
    return AggregatorServer(cfg).start()


# -- 1. corrupted and cut transfers through a fault-injecting proxy ----------------------------------------
def _plus(k: float):
    return lambda r, p: ({n: v + np.float32(k) for n, v in p.items()}, "FULL", 1)


def _twice_minus_half(r, p):
    return {n: v * np.float32(2) - np.float32(0.5) for n, v in p.items()}, "FULL", 3


def _fedavg_1_3(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference for one round with sites _plus(1) (weight 1) and _twice_minus_half (weight 3)."""
    return {k: ((1 * (v + 1) + 3 * (2 * v - 0.5)) / 4).astype(np.float32) for k, v in g.items()}


def _model_4mib() -> dict[str, np.ndarray]:
    return {"layer.weight": _values((1024, 1024), 1), "layer.bias": _values((1000,), 2)}


@pytest.mark.timeout(60)
def test_corrupted_upload_chunk_is_rejected_and_resent(tmp_path):
    initial = _model_4mib()
    srv = _server(tmp_path, initial, rounds=1, min_sites=2, chunk_bytes=MiB)
    try:
        # Byte 1.5 MiB of client->server DATA payload: inside the 2nd 1 MiB chunk of site-1's upload.
        with FaultProxy(srv.address, flip_up_at=3 * MiB // 2) as proxy:
            s1 = SiteThread(proxy.address, "site-1", _plus(1))
            s2 = SiteThread(srv.address, "site-2", _twice_minus_half)
            join_sites(s1, s2)
            assert proxy.fired["up"], "the proxy never flipped a byte: the upload was smaller than expected"
        status = srv.aggregator.status()
    finally:
        srv.stop(0)
    run = tmp_path / "run"
    assert status["corrupted_chunks"] >= 1, status
    assert status["round_restarts"] == 0, status
    upd = {r["site"]: r for r in _metrics(run, "update")}
    assert upd["site-1"]["corrupted_chunks"] >= 1, upd
    assert upd["site-1"]["bytes_received"] == upd["site-1"]["bytes"], upd  # the bad chunk was not counted
    assert upd["site-2"]["corrupted_chunks"] == 0, upd
    assert s1.stats["retries"] >= 1, s1.stats
    # Exact FedAvg: the flipped byte never reached the accumulator.
    _assert_params_equal(_load_global(run, 1), _fedavg_1_3(initial))


@pytest.mark.timeout(60)
def test_corrupted_download_chunk_is_rejected_and_resent(tmp_path):
    initial = _model_4mib()
    srv = _server(tmp_path, initial, rounds=1, min_sites=2, chunk_bytes=MiB)
    try:
        # Byte 1.5 MiB of server->client DATA payload: inside the 2nd chunk of round 0's global model.
        with FaultProxy(srv.address, flip_down_at=3 * MiB // 2) as proxy:
            s1 = SiteThread(proxy.address, "site-1", _plus(1))
            s2 = SiteThread(srv.address, "site-2", _twice_minus_half)
            join_sites(s1, s2)
            assert proxy.fired["down"], "the proxy never flipped a byte: the download was smaller than expected"
    finally:
        srv.stop(0)
    assert s1.stats["corrupted_chunks"] >= 1, s1.stats
    assert s1.stats["retries"] >= 1, s1.stats
    assert s2.stats["corrupted_chunks"] == 0, s2.stats
    _assert_params_equal(s1.received[0], initial)  # what the site trained on is the global model, intact
    _assert_params_equal(_load_global(tmp_path / "run", 1), _fedavg_1_3(initial))


@pytest.mark.timeout(60)
def test_connection_cut_mid_shard_resumes_without_resending(tmp_path):
    initial = {"w": _values((4 * MiB,), 3)}  # one 16 MiB tensor: one shard of 16 chunks
    srv = _server(tmp_path, initial, rounds=1, min_sites=1, chunk_bytes=MiB)
    try:
        # Client->server traffic is a few KB of control calls, then the upload: the cut lands near chunk 8.
        with FaultProxy(srv.address, cut_up_after=8 * MiB) as proxy:
            s1 = SiteThread(proxy.address, "site-1", _plus(1))
            join_sites(s1)
            assert proxy.fired["cut"] and proxy.connections >= 2, (proxy.fired, proxy.connections)
        status = srv.aggregator.status()
    finally:
        srv.stop(0)
    run = tmp_path / "run"
    (upd,) = _metrics(run, "update")
    shard_bytes = upd["bytes"]
    assert 16 * MiB < shard_bytes < 16 * MiB + 4096, upd  # one shard: the tensor plus its header
    assert upd["bytes_received"] == shard_bytes, upd
    assert upd["corrupted_chunks"] == 0, upd  # no chunk re-sent at an offset the aggregator already had
    assert status["bytes_received"] == shard_bytes, status  # nor under a fresh upload from offset 0
    assert status["round_restarts"] == 0, status
    assert s1.stats["retries"] >= 1, s1.stats
    _assert_params_equal(_load_global(run, 1), {"w": initial["w"] + np.float32(1)})


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_connections_cut_at_random_moments_give_the_exact_result(tmp_path, seed):
    """Each site talks through its own proxy, which cuts its connection at seeded random byte counts in both
    directions (two cut points each way, the second one on the reconnection): mid-download, mid-upload, in a
    control call. Two rounds; every update counts once and the result is FedAvg, bit for bit."""
    rng = np.random.default_rng(seed)
    initial = _model_4mib()
    srv = _server(tmp_path, initial, rounds=2, min_sites=2, chunk_bytes=MiB)
    span = 9 * MiB  # about what one site moves each way over two rounds
    cuts = {f"site-{i}": {d: sorted(int(x) for x in rng.integers(1, span, 2)) for d in ("up", "down")}
            for i in (1, 2)}  # fmt: skip
    proxies = {
        site: FaultProxy(srv.address, cut_up_after=c["up"], cut_down_after=c["down"]) for site, c in cuts.items()
    }
    try:
        s1 = SiteThread(proxies["site-1"].address, "site-1", _plus(1), retry_timeout=60)
        s2 = SiteThread(proxies["site-2"].address, "site-2", _twice_minus_half, retry_timeout=60)
        join_sites(s1, s2)
        assert srv.wait() == 0
    finally:
        for p in proxies.values():
            p.close()
        srv.stop(0)
    fired = {site: p.cuts for site, p in proxies.items()}
    assert sum(n for c in fired.values() for n in c.values()) >= 1, (cuts, fired)
    run = tmp_path / "run"
    rounds = _metrics(run, "round")
    assert [r["round"] for r in rounds] == [0, 1], rounds
    for r in rounds:  # each site's update counted once in the attempt that closed the round
        sites = [u["site"] for u in _metrics(run, "update") if (u["round"], u["attempt"]) == (r["round"], r["attempt"])]
        assert sorted(sites) == ["site-1", "site-2"], (r, sites)
    _assert_params_equal(_load_global(run, 2), _fedavg_1_3(_fedavg_1_3(initial)))


# -- subprocess federations ------------------------------------------------------------------------------
SITE_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, sys, time
    import numpy as np
    import fl_plugins.client as flare

    idx = int(os.environ["SITE_INDEX"])
    per_round_sleep = float(os.environ.get("SITE_SLEEP", "0"))
    hang_round = int(os.environ.get("HANG_ROUND", "-1"))
    go_file = os.environ.get("GO_FILE")
    flare.init()  # FL_SERVER, FL_SITE, FL_PARAMS_FORMAT=numpy from the environment
    out = {"rounds": [], "is_running_s": []}
    while True:
        t0 = time.monotonic()
        running = flare.is_running()
        out["is_running_s"].append(round(time.monotonic() - t0, 3))
        if not running:
            break
        m = flare.receive()
        r = m.current_round
        out["rounds"].append(r)
        if os.environ.get("ROUND_MARKERS"):
            pathlib.Path(os.environ["ROUND_MARKERS"], f"site-{idx}.round-{r}").touch()
        if r == hang_round:
            pathlib.Path(os.environ["MARKER"]).write_text("hanging")
            time.sleep(60)
        time.sleep(per_round_sleep)
        params = {k: v + np.float32(idx + r) for k, v in m.params.items()}
        flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
        if go_file and r == m.total_rounds - 1:  # outlive the aggregator before asking for more
            deadline = time.monotonic() + 60
            while not os.path.exists(go_file) and time.monotonic() < deadline:
                time.sleep(0.05)
    t0 = time.monotonic()
    again = flare.receive()
    out["receive_after_end_is_none"] = again is None
    out["receive_after_end_s"] = round(time.monotonic() - t0, 3)
    out["is_running_after_end"] = flare.is_running()
    flare.shutdown()
    pathlib.Path(os.environ["RESULT"]).write_text(json.dumps(out))
    """
)


class _Procs:
    """Subprocesses of one test, with their output in files; all killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        (tmp_path / "site.py").write_text(SITE_SCRIPT)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.tmp_path / f"{name}.{len(self.procs)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp_path,
                                 env={**os.environ, **(env or {})})  # fmt: skip
        self.procs.append((p, log))
        return p

    def aggregator(self, port: int, run_dir: Path, *args: str) -> subprocess.Popen:
        return self.start("aggregator", [sys.executable, "-m", "fl_plugins.cli", "server", "--address",
                                         f"127.0.0.1:{port}", "--run-dir", str(run_dir), *args])  # fmt: skip

    def site(self, port: int, index: int, **env: str) -> subprocess.Popen:
        env = {"FL_SERVER": f"127.0.0.1:{port}", "FL_SITE": f"site-{index}", "FL_PARAMS_FORMAT": "numpy",
               "SITE_INDEX": str(index), "RESULT": str(self.tmp_path / f"site-{index}.json"), **env}  # fmt: skip
        return self.start(f"site-{index}", [sys.executable, str(self.tmp_path / "site.py")], env)

    def wait(self, p: subprocess.Popen, timeout: float, what: str) -> int:
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} still running after {timeout:.0f} s\n{self.logs()}")

    def logs(self) -> str:
        out = []
        logs = [(f"rc {p.poll()}", log) for p, log in self.procs]
        logs += [("run dir", log) for log in sorted(self.tmp_path.glob("*/aggregator.log"))]
        for what, log in logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(f"--- {log.name} ({what}) ---\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(out)

    def kill_all(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def procs(tmp_path):
    ps = _Procs(tmp_path)
    yield ps
    ps.kill_all()


def _wait_for(path: Path, timeout: float, procs: _Procs, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {path} did not appear within {timeout:.0f} s\n{procs.logs()}")
        time.sleep(0.05)


def _site_step_reference(g0: dict[str, np.ndarray], rounds: int, sites: list[int]) -> dict[str, np.ndarray]:
    """FedAvg (equal weights) of the site script's step: params + site_index + round."""
    g = {k: v.astype(np.float64) for k, v in g0.items()}
    for r in range(rounds):
        g = {k: sum(v + i + r for i in sites) / len(sites) for k, v in g.items()}
    return {k: v.astype(np.float32) for k, v in g.items()}


# -- 2. a site killed mid-round does not stall the job past the round deadline ----------------------------
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_sigkilled_site_does_not_stall_past_round_deadline(tmp_path, procs):
    g0 = {"w": _values((64, 33), 4), "b": _values((33,), 5)}
    save_file(g0, str(tmp_path / "initial.safetensors"))
    port, run = free_port(), tmp_path / "run"
    agg = procs.aggregator(port, run, "--rounds", "2", "--min-sites", "2", "--round-deadline", "8",
                           "--initial-model", str(tmp_path / "initial.safetensors"))  # fmt: skip
    good = procs.site(port, 1)
    marker = tmp_path / "hanging"
    bad = procs.site(port, 2, HANG_ROUND="0", MARKER=str(marker))
    _wait_for(marker, 30, procs, "site-2 reaching round 0")
    killed_at = time.monotonic()
    bad.send_signal(signal.SIGKILL)
    bad.wait(10)
    # Two deadlines (8 s each) and the linger (5 s) after the kill; without the deadline, round 0 would wait
    # for site-2's site timeout (60 s) alone.
    rc = procs.wait(agg, 50, "the aggregator")
    elapsed = time.monotonic() - killed_at
    assert rc == 0, procs.logs()
    assert elapsed < 40, f"the job took {elapsed:.0f} s after the kill\n{procs.logs()}"
    assert procs.wait(good, 30, "site-1") == 0, procs.logs()
    assert json.loads((tmp_path / "site-1.json").read_text())["rounds"] == [0, 1]
    rounds = _metrics(run, "round")
    assert [(r["round"], r["updates"]) for r in rounds] == [(0, 1), (1, 1)], rounds
    assert {r["site"] for r in _metrics(run, "update")} == {"site-1"}
    _assert_params_equal(_load_global(run, 2), _site_step_reference(g0, 2, [1]))


# -- 3. the aggregator killed and restarted resumes from its last checkpoint ------------------------------
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_sigkilled_aggregator_restarts_and_finishes(tmp_path, procs):
    g0 = {"w": _values((64, 33), 6), "b": _values((33,), 7)}
    save_file(g0, str(tmp_path / "initial.safetensors"))
    port, run, marks = free_port(), tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    cmd = ("--rounds", "4", "--min-sites", "2", "--initial-model", str(tmp_path / "initial.safetensors"))
    agg = procs.aggregator(port, run, *cmd)
    sites = [procs.site(port, i, SITE_SLEEP="1", ROUND_MARKERS=str(marks)) for i in (1, 2)]
    # Kill while both sites train on round 2's model (each spends 1 s per round before it sends).
    _wait_for(run / "global" / "round-00002" / "manifest.json", 40, procs, "round 1 closing")
    for i in (1, 2):
        _wait_for(marks / f"site-{i}.round-2", 10, procs, f"site-{i} receiving round 2")
    agg.send_signal(signal.SIGKILL)
    assert agg.wait(10) == -signal.SIGKILL
    assert not (run / "global" / "round-00003").exists(), "the kill came too late to test a restart"
    agg2 = procs.aggregator(port, run, *cmd)  # same command, same port; the sites retry meanwhile
    # Round 2 closes once both sites' updates reach the new process (~1 s), round 3 a second later.
    _wait_for(run / "global" / "round-00003" / "manifest.json", 15, procs, "round 2 closing after the restart")
    assert procs.wait(agg2, 30, "the restarted aggregator") == 0, procs.logs()
    for i, p in zip((1, 2), sites, strict=True):
        assert procs.wait(p, 30, f"site-{i}") == 0, procs.logs()
        assert json.loads((tmp_path / f"site-{i}.json").read_text())["rounds"][-1] == 3
    assert "resuming run" in (run / "aggregator.log").read_text()
    assert sorted({r["round"] for r in _metrics(run, "round")}) == [0, 1, 2, 3]
    _assert_params_equal(_load_global(run, 4), _site_step_reference(g0, 4, [1, 2]))


def _assert_only_complete_checkpoints(run: Path) -> list[str]:
    """Every `global/round-R` directory is a whole checkpoint: its manifest, each shard of the manifest's size
    whose chunks hash to the manifest's digest, and the chunk digests file. Returns what else is in `global/`
    (a `round-R.tmp` a kill left behind, which a restart ignores and rewrites)."""
    from fl_plugins.aggregator.store import RunStore
    from fl_plugins.wire.frames import ChunkHasher

    store = RunStore(run)
    others = []
    for d in sorted((run / "global").iterdir()):
        if not d.name.startswith("round-") or d.name.endswith(".tmp"):
            others.append(d.name)
            continue
        m = store.load(int(d.name.split("-")[1]))  # checks the manifest, each header and each size
        for shard, path in zip(m.shards, store.shard_paths(int(d.name.split("-")[1]), m), strict=True):
            h = ChunkHasher(m.chunk_bytes)
            with open(path, "rb") as f:
                while block := f.read(8 * MiB):
                    h.update(block)
            assert h.hexdigest() == shard.digest, f"{path} does not match its manifest: a half-written checkpoint"
            assert path.with_name(path.name + ".chunks").stat().st_size == 16 * len(h.shard.digests), path
    return others


def _status(port: int) -> dict[str, Any]:
    from fl_plugins.wire import rpc
    from fl_plugins.wire.proto import fl_pb2 as pb

    with rpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return json.loads(rpc.Stub(ch).Status(pb.StatusRequest(), timeout=5).status_json)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_aggregator_killed_mid_checkpoint_and_mid_upload_leaves_no_partial_state(tmp_path, procs):
    """SIGKILL the aggregator (a subprocess) once it has begun writing a checkpoint (the shard file in
    `round-R.tmp` has grown), restart it, SIGKILL it again while an update is partly received and folded,
    restart it: after each kill only complete checkpoints exist, and the job ends with the exact FedAvg result.
    The sites (threads of this process) retry meanwhile."""
    g0 = {"w": _values((4 * MiB,), 10)}  # 16 MiB: writing and syncing a checkpoint takes a while
    save_file(g0, str(tmp_path / "initial.safetensors"))
    port, run = free_port(), tmp_path / "run"
    cmd = ("--rounds", "3", "--min-sites", "2", "--initial-model", str(tmp_path / "initial.safetensors"),
           "--chunk-bytes", str(MiB))  # fmt: skip
    agg = procs.aggregator(port, run, *cmd)
    sites = [
        SiteThread(f"127.0.0.1:{port}", "site-1", _plus(1), connect_timeout=60, retry_timeout=120),
        SiteThread(f"127.0.0.1:{port}", "site-2", _twice_minus_half, connect_timeout=60, retry_timeout=120),
    ]
    for s in sites:
        s.start()
    kills = []
    try:
        # 1. mid-checkpoint: round 0 closed, its result being written (the shard file has begun to grow)
        shard = run / "global" / "round-00001.tmp" / "initial.safetensors"
        deadline = time.monotonic() + 60
        while not (shard.exists() and shard.stat().st_size > 0):
            assert time.monotonic() < deadline and agg.poll() is None, f"round 0 never closed\n{procs.logs()}"
            time.sleep(0.0005)
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        kills.append(("checkpoint", _assert_only_complete_checkpoints(run)))
        agg = procs.aggregator(port, run, *cmd)
        # 2. mid-upload: an update partly received and folded, not committed
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and agg.poll() is None, f"no upload seen\n{procs.logs()}"
            try:
                st = _status(port)
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.01)
                continue
            if any(0 < sum(u["offsets"]) < 16 * MiB for u in st["uploads"].values()):
                break
            time.sleep(0.002)
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        kills.append((f"upload in round {st['round']}", _assert_only_complete_checkpoints(run)))
        agg = procs.aggregator(port, run, *cmd)
        for s in sites:
            s.join(120)
            assert not s.is_alive(), f"{s.site} did not finish\n{procs.logs()}"
            assert s.error is None, f"{s.site}: {s.error!r}\n{procs.logs()}"
        agg.send_signal(signal.SIGTERM)  # the job is over: skip the linger
        assert procs.wait(agg, 30, "the aggregator") == 0, procs.logs()
    finally:
        for s in sites:
            s.join(0.1)
    assert kills[0][1] in ([], ["round-00001.tmp"]), kills  # the tmp directory, if the rename had not happened
    assert _assert_only_complete_checkpoints(run) == [], "a .tmp directory outlived the job"
    assert sorted(p.name for p in (run / "global").iterdir()) == [f"round-{r:05d}" for r in range(4)]
    g = g0
    for _ in range(3):
        g = _fedavg_1_3(g)
    _assert_params_equal(_load_global(run, 3), g)


# -- 4. after the last round, a site that outlived the aggregator learns the job is over ------------------
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_site_slower_than_linger_ends_cleanly(tmp_path, procs):
    g0 = {"w": _values((16, 8), 8)}
    srv = _server(tmp_path, g0, rounds=2, min_sites=1, linger=0.5)
    port = srv.port
    go = tmp_path / "aggregator-gone"
    try:
        site = procs.site(port, 1, GO_FILE=str(go))
        assert srv.wait(stop_event=None) == 0
    finally:
        srv.stop(0)  # the aggregator is gone: nothing listens on the port any more
    go.touch()
    gone_at = time.monotonic()
    rc = procs.wait(site, 60, "site-1")
    elapsed = time.monotonic() - gone_at
    assert rc == 0, procs.logs()
    out = json.loads((tmp_path / "site-1.json").read_text())
    assert out["rounds"] == [0, 1]
    assert out["receive_after_end_is_none"] is True and out["is_running_after_end"] is False, out
    # The last is_running() found no aggregator; it must give up after a short wait, not hang.
    assert out["is_running_s"][-1] < 20, (out, elapsed)
    _assert_params_equal(_load_global(tmp_path / "run", 2), _site_step_reference(g0, 2, [1]))
