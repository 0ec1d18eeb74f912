"""`fl-plugins run --backend ray` (fl_plugins/backends): sites on a real local Ray cluster on 127.0.0.1.

- Ray started by the runner listens on loopback only.
- The Lightning recipe's 3 sites as Ray actors reach the process backend's model (same seeds).
- 20 virtual sites in 4 slots (each site one turn at a time) draw the same samples and reach the same model as 20
  site processes.
- A site's Ray actor that dies mid-job, and a virtual site's turn that fails, are reported with the log's tail; the
  round goes on by its rules and the job finishes.

One cluster (`ray start --head`, bound to 127.0.0.1) serves the runs that pass --ray-address; the first test
starts Ray the way the runner does without one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NUMPY_SITE = Path(__file__).resolve().parent / "_numpy_site.py"
# the cluster's servers on 127.0.0.1 (on_ray.py says why this variable), its token checked (a driver sends the
# token of ~/.ray/auth_token only with RAY_AUTH_MODE=token)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on 127.0.0.1 with 2 CPUs; its address."""
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    temp = tmp_path_factory.mktemp("ray")
    cmd = [_ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
           "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=200000000"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _run(recipe: Path, run_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fl_plugins.cli", "run", str(recipe), "--run-dir", str(run_dir), *args]
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no final model in {run_dir}"
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def _assert_same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # (the average's float sums follow the updates' arrival order)
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_ray_started_by_the_runner_listens_on_loopback_only(tmp_path):
    script = textwrap.dedent("""
        import ipaddress, psutil
        from fl_plugins.backends import on_ray
        from fl_plugins.backends.spec import BackendSpec
        resources = on_ray.connect(BackendSpec(type="ray"))
        import ray
        @ray.remote(num_cpus=1)
        def where():
            return ray.util.get_node_ip_address()
        node = ray.get(where.remote())
        bad = []
        for p in psutil.Process().children(recursive=True):
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            for c in conns:
                a = ipaddress.ip_address(c.laddr.ip)
                a = getattr(a, "ipv4_mapped", None) or a  # ::ffff:127.0.0.1 is loopback too
                if c.status == psutil.CONN_LISTEN and not a.is_loopback:
                    bad.append((p.name(), c.laddr))
        on_ray.disconnect()
        print("CPU", resources["CPU"], "NODE", node, "BAD", bad)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env={**env, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"CPU {float(os.cpu_count() or 1)} NODE 127.0.0.1 BAD []" in out.stdout, out.stdout


def _lightning_recipe(tmp_path: Path, backend: str) -> Path:
    src = (ROOT / "recipes" / "lightning.yaml").read_text()
    script = ROOT / "examples" / "lightning" / "train_fl.py"
    text = src.replace("../examples/lightning/train_fl.py", str(script)).replace("rounds: 5", "rounds: 2")
    p = tmp_path / f"lightning-{backend}.yaml"
    p.write_text(text + f"name: lightning\nbackend: {backend}\n")
    return p


def test_lightning_recipe_on_ray_reaches_the_process_backends_model(tmp_path, cluster):
    procs = _run(_lightning_recipe(tmp_path, "process"), tmp_path / "procs")
    assert procs.returncode == 0, procs.stdout[-3000:] + procs.stderr[-3000:]
    on_ray = _run(_lightning_recipe(tmp_path, "{type: ray, num_cpus: 0.5}"), tmp_path / "ray", "--ray-address", cluster)
    assert on_ray.returncode == 0, on_ray.stdout[-3000:] + on_ray.stderr[-3000:]
    assert "sites: Ray actors (2 CPU; 0.5 CPU per site)" in on_ray.stdout and "virtual" not in on_ray.stdout
    log = (tmp_path / "ray" / "sites" / "site-2.log").read_text()
    assert "# fl-plugins run: on Ray" in log and "`Trainer.fit` stopped" in log  # the site's output came back from its actor
    _assert_same_model(_final(tmp_path / "procs"), _final(tmp_path / "ray"))
    for run in ("procs", "ray"):
        rounds = _records(tmp_path / run, "round")
        assert [r["updates"] for r in rounds] == [3, 3], run


def _numpy_job(tmp_path: Path, sites: int, rounds: int, extra: str) -> Path:
    init = tmp_path / "init.safetensors"
    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}, str(init))
    shutil.copy(NUMPY_SITE, tmp_path / "site.py")
    p = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    p.write_text(f"name: numpy\nscript: site.py\nsites: {sites}\nrounds: {rounds}\ninitial_model: init.safetensors\n"
                 f"{extra}")  # fmt: skip
    return p


def test_virtual_sites_in_turns_reach_the_process_backends_model(tmp_path, cluster):
    workflow = "workflow: {sample_sites: 0.5, seed: 7}\n"
    procs = _run(_numpy_job(tmp_path, 20, 2, workflow), tmp_path / "procs")
    assert procs.returncode == 0, procs.stdout[-3000:] + procs.stderr[-3000:]
    job = _numpy_job(tmp_path, 20, 2, workflow + "backend: {type: ray, num_cpus: 0.5, slots: 4}\n")
    virt = _run(job, tmp_path / "ray", "--ray-address", cluster)
    assert virt.returncode == 0, virt.stdout[-3000:] + virt.stderr[-3000:]
    assert "virtual sites, 4 at once" in virt.stdout and "exited with code" not in virt.stderr, virt.stderr[-3000:]
    samples = {run: [(r["round"], r["sites"]) for r in _records(tmp_path / run, "sample")] for run in ("procs", "ray")}
    assert samples["procs"] == samples["ray"] and len(samples["ray"]) == 2
    for (r, sampled), rec in zip(samples["ray"], _records(tmp_path / "ray", "round"), strict=True):
        assert len(sampled) == 10 and rec["updates"] == 10, (r, rec)
    _assert_same_model(_final(tmp_path / "procs"), _final(tmp_path / "ray"))
    # the final model was scored by the same sites (those that sent metrics: every site sampled at least once)
    scored = {run: _records(tmp_path / run, "evaluation")[-1]["sites"] for run in ("procs", "ray")}
    assert set(scored["ray"]) == set(scored["procs"]) == {s for _, sampled in samples["ray"] for s in sampled}
    assert all("metrics" in cell for cell in scored["ray"].values()), scored["ray"]
    # each sampled site ran one turn per round it was sampled in and one for the final evaluation; no other ran
    turns = {f"site-{i}": 0 for i in range(1, 21)}
    for _, sampled in samples["ray"]:
        for s in sampled:
            turns[s] += 1
    for s in scored["ray"]:
        turns[s] += 1
    for name, n in turns.items():
        log = tmp_path / "ray" / "sites" / f"{name}.log"
        ran = log.read_text().count("# fl-plugins run (ray)") if log.exists() else 0
        assert ran == n, (name, ran, n)


def test_a_dead_actor_is_reported_and_the_job_finishes(tmp_path, cluster):
    job = _numpy_job(tmp_path, 3, 3, "min_sites: 2\nenv: {FAIL_AT: 'site-2:1:actor'}\n"
                                     "backend: {type: ray, num_cpus: 0.5}\n")  # fmt: skip
    out = _run(job, tmp_path / "run", "--ray-address", cluster)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "site site-2 exited with code -1; the job goes on without it" in out.stderr, out.stderr[-3000:]
    assert "killing my Ray actor in round 1" in out.stderr  # its log's tail
    assert "the site's Ray actor died" in (tmp_path / "run" / "sites" / "site-2.log").read_text()
    rounds = _records(tmp_path / "run", "round")  # (how many joined round 0 depends on when Ray placed them)
    assert [r["round"] for r in rounds] == [0, 1, 2] and all("site-2" not in r["sites"] for r in rounds[1:])
    assert (tmp_path / "run" / "final").is_dir()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sites"]["site-2"]["exit_code"] == -1


def test_a_failed_virtual_turn_sits_out_and_the_site_comes_back(tmp_path, cluster):
    job = _numpy_job(tmp_path, 4, 3, "min_sites: 2\nenv: {FAIL_AT: 'site-3:1:exit'}\n"
                                     "backend: {type: ray, num_cpus: 1}\n")  # fmt: skip
    out = _run(job, tmp_path / "run", "--ray-address", cluster)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "virtual sites, 2 at once" in out.stdout
    assert "site site-3's turn in round 1 exited with code 3; it sits that attempt out" in out.stderr
    assert "failing in round 1" in out.stderr
    rounds = _records(tmp_path / "run", "round")
    assert [r["updates"] for r in rounds] == [4, 3, 4]  # back in round 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(s["exit_code"] == 0 for s in summary["sites"].values())  # the job finished; the failure was told


def test_a_turn_that_fails_after_its_update_counted_does_not_stall_the_next_round(tmp_path, cluster):
    # every site needed to start a round (min_sites: all 3): the failed site must still count as there
    job = _numpy_job(tmp_path, 3, 3, "env: {FAIL_AT: 'site-1:1:after'}\nbackend: {type: ray, num_cpus: 1}\n")
    out = _run(job, tmp_path / "run", "--ray-address", cluster, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "site site-1's turn in round 1 exited with code 3" in out.stderr
    assert [r["updates"] for r in _records(tmp_path / "run", "round")] == [3, 3, 3]


def test_virtual_sites_that_cannot_offer_round_0_stop_the_run(tmp_path, cluster):
    shutil.copy(NUMPY_SITE, tmp_path / "site.py")  # the plain client API has no weights to offer
    (tmp_path / "job.yaml").write_text("script: site.py\nsites: 4\nrounds: 2\nbackend: {type: ray, num_cpus: 1}\n")
    out = _run(tmp_path / "job.yaml", tmp_path / "run", "--ray-address", cluster, timeout=240)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "site site-1 cannot offer round 0's weights" in out.stderr, out.stderr[-3000:]
    assert "give the recipe an initial_model" in out.stderr
