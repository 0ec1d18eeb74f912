"""Run directories on object storage (aggregator/remote.py): `fl-plugins server --run-dir s3://bucket/job` against a
real S3-compatible server (moto's server mode, started here on 127.0.0.1), with the aggregator killed mid-job and
restarted on a machine without its working copy (the folder deleted): it resumes from the store's latest round, and
the job's final model is the one an uninterrupted local run reaches."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import free_port

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "_numpy_site.py"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server on 127.0.0.1 with a bucket; the environment that reaches it."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("runs")
    try:
        yield fs, env
    finally:
        server.stop()


def _server(run_dir: str, init: Path, env: dict, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fl_plugins.cli", "server", "--address", f"127.0.0.1:{port}", "--run-dir", run_dir,
           "--rounds", "4", "--min-sites", "2", "--initial-model", str(init)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)  # noqa: SIM115


def _sites(port: int, env: dict, tmp: Path, tag: str) -> list[subprocess.Popen]:
    out = []
    for name in ("site-1", "site-2"):
        e = {**env, "FL_SERVER": f"127.0.0.1:{port}", "FL_SITE": name, "FL_RETRY_TIMEOUT": "120"}
        log = open(tmp / f"{tag}-{name}.log", "ab")  # noqa: SIM115
        out.append(subprocess.Popen([sys.executable, str(SITE)], env=e, stdout=log, stderr=subprocess.STDOUT))
    return out


def _wait(procs: list[subprocess.Popen], timeout: float = 180) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]


def test_a_run_in_an_object_store_survives_its_aggregator_and_its_disk(tmp_path, s3):
    fs, store_env = s3
    init = tmp_path / "init.safetensors"
    save_file({"w": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32),
               "b": np.zeros(32, np.float32)}, str(init))  # fmt: skip
    env = {**os.environ, **store_env, "PYTHONPATH": str(ROOT), "FL_CACHE_DIR": str(tmp_path / "cache")}

    # the reference: the same job in a local run directory
    port = free_port()
    ref = _server(str(tmp_path / "local"), init, env, port, tmp_path / "ref.log")
    assert _wait(_sites(port, env, tmp_path, "ref")) == [0, 0]
    assert ref.wait(timeout=60) == 0

    url = "s3://runs/job"
    port = free_port()
    agg = _server(url, init, env, port, tmp_path / "agg.log")
    release = tmp_path / "release"
    sites = _sites(port, {**env, "HOLD": f"2:{release}"}, tmp_path, "s3")  # the sites hold round 2's updates
    deadline = time.monotonic() + 120
    while not fs.exists("runs/job/global/round-00002/manifest.json"):  # round 1 done and in the store
        assert time.monotonic() < deadline, (tmp_path / "agg.log").read_text()[-3000:]
        time.sleep(0.1)
    agg.send_signal(signal.SIGKILL)
    agg.wait()
    shutil.rmtree(tmp_path / "cache")  # another machine: nothing of the run on its disk
    agg = _server(url, init, env, port, tmp_path / "agg.log")
    release.touch()
    assert _wait(sites) == [0, 0]
    assert agg.wait(timeout=60) == 0, (tmp_path / "agg.log").read_text()[-3000:]
    log = (tmp_path / "agg.log").read_text()
    assert "fetching round 2 of s3://runs/job" in log and "from global/round-00002" in log  # resumed there

    # the store holds every round (each with its manifest), each round's record once, and the final model
    rounds = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/job/global"))
    assert rounds == [f"round-{r:05d}" for r in range(5)]
    assert all(fs.exists(f"runs/job/global/{r}/manifest.json") for r in rounds)
    import json

    records = [json.loads(x) for x in fs.cat("runs/job/metrics.jsonl").decode().splitlines()]
    assert sorted(r["round"] for r in records if r["event"] == "round") == [0, 1, 2, 3]
    assert fs.exists("runs/job/run.json") and fs.exists("runs/job/summary.json")
    final = [p for p in fs.ls("runs/job/final") if p.endswith(".safetensors")]
    got = {}
    for p in final:
        fs.get(p, str(tmp_path / "got.safetensors"))
        got.update(load_file(tmp_path / "got.safetensors"))
    want = {}
    for p in (tmp_path / "local" / "final").glob("*.safetensors"):
        want.update(load_file(p))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_store_that_refuses_uploads_stops_the_aggregator_with_the_url(tmp_path, s3):
    _, store_env = s3
    init = tmp_path / "init.safetensors"
    save_file({"w": np.zeros(8, np.float32)}, str(init))
    env = {**os.environ, **store_env, "PYTHONPATH": str(ROOT), "FL_CACHE_DIR": str(tmp_path / "cache")}
    agg = _server("s3://no-such-bucket/job", init, env, free_port(), tmp_path / "agg.log")
    assert agg.wait(timeout=120) != 0
    log = (tmp_path / "agg.log").read_text()
    assert "to s3://no-such-bucket/job/global/round-00000/" in log and "failed 3 times" in log, log[-3000:]


def test_run_dir_urls_map_to_a_working_copy(tmp_path, monkeypatch):
    from fl_plugins.aggregator.remote import bind, is_url, working_copy

    monkeypatch.setenv("FL_CACHE_DIR", str(tmp_path))
    assert is_url("s3://b/job") and not is_url("runs/job") and not is_url(Path("runs/job"))
    flags, fixed = bind({"run_dir": "s3://b/job/", "rounds": 2})
    assert fixed == {"store_url": "s3://b/job"} and flags["rounds"] == 2
    assert flags["run_dir"] == working_copy("s3://b/job/") and flags["run_dir"].parent == tmp_path / "runs"
    assert working_copy("s3://b/job") != working_copy("s3://b/other")
    assert working_copy("s3://b/job") == working_copy("s3://b/job/")
    assert bind({"run_dir": Path("runs/job")}) == ({"run_dir": Path("runs/job")}, {})


def test_fl_plugins_run_keeps_its_run_in_the_store(tmp_path, s3):
    fs, store_env = s3
    env = {**os.environ, **store_env, "PYTHONPATH": str(ROOT), "FL_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fl_plugins.cli", "run", str(ROOT / "recipes" / "quickstart.yaml"),
           "--run-dir", "s3://runs/quickstart"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert fs.exists("runs/quickstart/global/round-00003/manifest.json")
    assert any(p.endswith(".safetensors") for p in fs.ls("runs/quickstart/final"))
    import json

    summary = json.loads(fs.cat("runs/quickstart/summary.json"))
    assert summary["sites"]["site-1"]["exit_code"] == 0  # the runner's summary (with the sites), not only the aggregator's
    # uploads lost at the end (the runner killed while they ran): the same command on this machine completes the store
    for rel in ("final", "summary.json", "global/round-00003"):
        fs.rm(f"runs/quickstart/{rel}", recursive=True)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert fs.exists("runs/quickstart/global/round-00003/manifest.json") and fs.exists("runs/quickstart/summary.json")
    assert any(p.endswith(".safetensors") for p in fs.ls("runs/quickstart/final"))
    # on a machine without the working copy, the same command sees the run finished and starts nothing
    shutil.rmtree(tmp_path / "cache")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads(fs.cat("runs/quickstart/summary.json"))["sites"]["site-1"]["exit_code"] == 0  # kept


def test_a_store_that_cannot_be_read_is_a_clear_error(tmp_path, s3):
    _, store_env = s3
    env = {**os.environ, **store_env, "PYTHONPATH": str(ROOT), "FL_CACHE_DIR": str(tmp_path / "cache"),
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    init = tmp_path / "init.safetensors"
    save_file({"w": np.zeros(8, np.float32)}, str(init))
    cmd = [sys.executable, "-m", "fl_plugins.cli", "server", "--run-dir", "s3://runs/nowhere", "--rounds", "1",
           "--initial-model", str(init)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert out.returncode != 0
    assert "--run-dir s3://runs/nowhere: the store cannot be read" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
