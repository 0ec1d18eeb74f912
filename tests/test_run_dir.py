"""The run directory belongs to one job (RUN_DIR/run.json): a restart resumes that job or is refused, a start
that fails leaves nothing behind, and everything in it is private to the user (0700 / 0600).

Through the real CLI (`fl-plugins server`, `fl-plugins run`) and the real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.errors import ConfigError, FLError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_plugins.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(tmp_path: Path, name: str, value: float) -> Path:
    path = tmp_path / name
    save_file({"w": np.full((8, 4), value, np.float32), "b": np.zeros(4, np.float32)}, str(path))
    return path


def _job_id_seen_by_a_site(address: str) -> str:
    """The job id a site gets when it connects (what its policy.yaml is checked against)."""
    from fl_plugins.client.site import SiteClient

    c = SiteClient(address, "probe", connect_timeout=30)
    try:
        c.connect()
        return c.job_id
    finally:
        c.close()


class _Server:
    """`fl-plugins server ...` as a subprocess, stopped with SIGTERM (the job waits for sites that never come)."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "fl_plugins.cli", "server", "--address", self.address,
                                      *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL)  # fmt: skip

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture
def servers():
    started: list[_Server] = []

    def start(*args: str) -> _Server:
        s = _Server(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# -- fl-plugins server -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_start_on_a_busy_port_leaves_no_state(tmp_path):
    a = _model(tmp_path, "A.safetensors", 1.0)
    run = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _cli("server", "--address", f"127.0.0.1:{port}", "--run-dir", str(run), "--rounds", "1",
                   "--initial-model", str(a))  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"127.0.0.1:{port} is in use (another aggregator?)" in out.stderr
    assert not run.exists(), sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.integration
def test_a_restart_with_another_initial_model_is_refused(tmp_path, servers):
    a, b = _model(tmp_path, "A.safetensors", 1.0), _model(tmp_path, "B.safetensors", 2.0)
    run = tmp_path / "run"
    first = servers("--run-dir", str(run), "--rounds", "2", "--initial-model", str(a))
    assert _job_id_seen_by_a_site(first.address)
    first.stop()
    round0 = {p.name: p.read_bytes() for p in (run / "global" / "round-00000").iterdir()}
    t0 = time.monotonic()
    try:
        out = _cli("server", "--address", f"127.0.0.1:{_free_port()}", "--run-dir", str(run), "--rounds", "2",
                   "--initial-model", str(b), timeout=30)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the aggregator started on another job's run directory (it trains from A, not B)")
    assert out.returncode == 2, out.stdout + out.stderr
    assert time.monotonic() - t0 < 30
    msg = out.stderr
    assert f"{run / 'run.json'}: job " in msg and f"started from the initial model {a}" in msg, msg
    assert f"`--initial-model` {b} is another model (B.safetensors holds other bytes" in msg, msg
    assert "drop --initial-model" in msg and f"pass a new --run-dir to start from {b}" in msg, msg
    assert {p.name: p.read_bytes() for p in (run / "global" / "round-00000").iterdir()} == round0


@pytest.mark.integration
def test_a_restart_with_the_same_inputs_resumes_the_same_job(tmp_path, servers):
    a = _model(tmp_path, "A.safetensors", 1.0)
    run = tmp_path / "run"
    args = ("--run-dir", str(run), "--rounds", "2", "--initial-model", str(a))
    first = servers(*args)
    job = _job_id_seen_by_a_site(first.address)
    first.stop()
    second = servers(*args)
    assert _job_id_seen_by_a_site(second.address) == job
    out = second.stop()
    assert "resuming run" in (run / "aggregator.log").read_text(), out
    assert json.loads((run / "run.json").read_text())["job_id"] == job
    # no --initial-model: resumes as the run was
    third = servers("--run-dir", str(run), "--rounds", "2")
    assert _job_id_seen_by_a_site(third.address) == job


@pytest.mark.integration
def test_a_restart_with_another_job_id_is_refused(tmp_path, servers):
    a = _model(tmp_path, "A.safetensors", 1.0)
    run = tmp_path / "run"
    first = servers("--run-dir", str(run), "--rounds", "2", "--initial-model", str(a), "--job-id", "trial-7")
    assert _job_id_seen_by_a_site(first.address) == "trial-7"
    first.stop()
    try:
        out = _cli("server", "--address", f"127.0.0.1:{_free_port()}", "--run-dir", str(run), "--rounds", "2",
                   "--initial-model", str(a), "--job-id", "trial-8", timeout=30)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the aggregator resumed job trial-7's run directory as job trial-8")
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"{run / 'run.json'}: this run directory belongs to job 'trial-7', not `--job-id` 'trial-8': drop "
            "--job-id to resume job 'trial-7' as it was, or pass a new --run-dir to start job 'trial-8'"
            in out.stderr), out.stderr  # fmt: skip


# -- the Python API --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_python_api_keeps_the_job_and_refuses_another_model(tmp_path):
    a, b = _model(tmp_path, "A.safetensors", 1.0), _model(tmp_path, "B.safetensors", 2.0)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="expected a .safetensors file or a model folder"):
        AggregatorServer(AggregatorConfig(run_dir=run, rounds=1, initial_model=tmp_path / "missing.bin"))
    assert not run.exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(a.read_bytes()[:-7])  # a truncated file: fails mid-import
    with pytest.raises(FLError, match="bad.safetensors"):
        AggregatorServer(AggregatorConfig(run_dir=run, rounds=1, initial_model=bad))
    assert not run.exists(), "a failed import left state behind"
    with AggregatorServer(AggregatorConfig(run_dir=run, rounds=1, initial_model=a)) as srv:
        job = srv.aggregator.job_id
        assert _job_id_seen_by_a_site(srv.address) == job
    with pytest.raises(ConfigError, match=r"`--initial-model` .*B.safetensors is another model"):
        AggregatorServer(AggregatorConfig(run_dir=run, rounds=1, initial_model=b))
    os.utime(a)  # touched, same bytes: read again and found the same
    with AggregatorServer(AggregatorConfig(run_dir=run, rounds=1, initial_model=a)) as srv:
        assert srv.aggregator.job_id == job


@pytest.mark.integration
def test_a_run_whose_round_0_a_site_offered_keeps_its_job_and_refuses_an_initial_model(tmp_path):
    from fl_plugins.client.site import SiteClient
    from fl_plugins.wire.proto import fl_pb2 as pb

    run = tmp_path / "run"
    with AggregatorServer(AggregatorConfig(run_dir=run, rounds=1)) as srv:
        assert not run.exists(), "nothing is written before round 0 exists"
        c = SiteClient(srv.address, "s1", can_offer_initial=True)
        c.connect()
        try:
            assert c.next_task().kind == pb.Task.OFFER_INITIAL
            c.upload(0, 0, {"w": np.ones((2, 3), np.float32)}, {"params_type": "FULL"}, initial=True)
            assert c.next_task().kind == pb.Task.TRAIN
            job = c.job_id
        finally:
            c.close()
    ident = json.loads((run / "run.json").read_text())
    assert (ident["job_id"], ident["initial_model"], ident["tensors"]) == (job, {"offered": True},
                                                                           {"w": ["F32", [2, 3]]})  # fmt: skip
    round0 = run / "global" / "round-00000"  # the site's shard files, written by the aggregator: private too
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [round0, *round0.iterdir()]}
    assert len(modes) == 4 and all(m == (0o700 if n == "round-00000" else 0o600) for n, m in modes.items()), modes
    with pytest.raises(ConfigError, match=r"round 0 of job '.*' is the weights a site offered, not `--initial-mod"):
        AggregatorServer(AggregatorConfig(run_dir=run, rounds=1, initial_model=_model(tmp_path, "A.safetensors", 1)))
    with AggregatorServer(AggregatorConfig(run_dir=run, rounds=1)) as srv:
        assert _job_id_seen_by_a_site(srv.address) == job


# -- fl-plugins run --------------------------------------------------------------------------------------------

SITE = textwrap.dedent(
    """
    import numpy as np
    import fl_plugins.client as flare

    flare.init()
    while flare.is_running():
        m = flare.receive()
        flare.send(flare.FLModel(params={k: v + np.float32(1) for k, v in m.params.items()},
                                 metrics={"loss": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    """
)


def _recipes(tmp_path: Path) -> tuple[Path, Path]:
    _model(tmp_path, "initial.safetensors", 1.0)
    (tmp_path / "site.py").write_text(SITE)
    (tmp_path / "other.py").write_text(SITE)
    common = "sites: 1\nrounds: 1\ninitial_model: initial.safetensors\nenv: {FL_PARAMS_FORMAT: numpy}\n"
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("name: first\nscript: site.py\n" + common)
    second.write_text("name: second\nscript: other.py\n" + common)
    return first, second


def _modes(run: Path) -> dict[str, str]:
    """Each path under `run` (and `run` itself) with its permission bits; report/ (plots) left out."""
    out = {".": oct(stat.S_IMODE(run.stat().st_mode))}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if rel.parts[0] != "report":
            out[str(rel)] = oct(stat.S_IMODE(p.lstat().st_mode))
    return out


@pytest.mark.integration
def test_a_run_directory_is_private(tmp_path):
    first, _ = _recipes(tmp_path)
    run = tmp_path / "run"
    out = _cli("run", str(first), "--run-dir", str(run), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    modes = _modes(run)
    wrong = {p: m for p, m in modes.items() if m != ("0o700" if (run / p).is_dir() else "0o600")}
    assert not wrong, f"not private (0700 folders, 0600 files): {wrong}"
    for name in ("metrics.jsonl", "aggregator.log", "summary.json", "sites/site-1.log", "run.json",
                 "global/round-00001/manifest.json", "global/round-00000/initial.safetensors.chunks"):  # fmt: skip
        assert name in modes, sorted(modes)


@pytest.mark.integration
def test_run_refuses_the_run_directory_of_another_recipe(tmp_path):
    first, second = _recipes(tmp_path)
    run = tmp_path / "run"
    out = _cli("run", str(first), "--run-dir", str(run), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    t0 = time.monotonic()
    out = _cli("run", str(second), "--run-dir", str(run), timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stdout + out.stderr
    assert took < 20, f"the refusal took {took:.1f} s"
    msg = out.stderr
    assert f"this run directory belongs to recipe {first} (job 'first'); {second} differs in" in msg, msg
    assert "`name` ('first' in the run, 'second' now)" in msg and "`script` ('site.py' in the run" in msg, msg
    assert "pass a new --run-dir" in msg, msg
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "the refused run wrote"
    assert sorted(p.name for p in (run / "sites").iterdir()) == ["site-1.log"]
    ident = json.loads((run / "run.json").read_text())
    assert ident["job_id"] == "first" and ident["recipe"]["job"]["script"] == "site.py"
    assert ident["tensors"] == {"b": ["F32", [4]], "w": ["F32", [8, 4]]}
    # the same recipe resumes (its rounds are done: the site is told the job is over)
    out = _cli("run", str(first), "--run-dir", str(run), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.integration
def test_a_run_that_fails_to_start_leaves_no_run_directory(tmp_path):
    first, _ = _recipes(tmp_path)
    (tmp_path / "initial.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    run = tmp_path / "run"
    out = _cli("run", str(first), "--run-dir", str(run), timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "initial.safetensors" in out.stderr
    assert not run.exists(), sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_a_written_shards_chunk_digests_cover_its_last_partial_chunk(tmp_path):
    """store.write_shard: the .chunks file holds one digest per chunk, the last (partial) one too, so a checkpoint
    is served with its digests (a short file is ignored and every chunk hashed again as it is served)."""
    from fl_plugins import tensors
    from fl_plugins.aggregator.store import write_shard
    from fl_plugins.wire.layout import plan_shards

    data = np.arange(70_000, dtype=np.float32)  # 280 000 bytes + header: 5 chunks of 64 KiB, the last partial
    (layout,) = plan_shards(tensors.describe({"w": data}))
    written = write_shard(tmp_path / layout.name, layout, [data], 64 << 10)
    size = (tmp_path / layout.name).stat().st_size
    assert (tmp_path / (layout.name + ".chunks")).stat().st_size == 16 * -(-size // (64 << 10))
    assert written.digest
