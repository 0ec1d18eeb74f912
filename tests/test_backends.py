"""The recipe's `backend:` section and the Ray backend's arithmetic (fl_plugins/backends), without a cluster; the
runs themselves are in tests/test_ray.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_plugins.backends.on_ray import is_loopback, slots
from fl_plugins.backends.spec import BackendSpec
from fl_plugins.errors import ConfigError
from fl_plugins.recipe import load_recipe


def _load(tmp_path: Path, backend: str):
    (tmp_path / "train.py").write_text("print('hi')\n")
    p = tmp_path / "job.yaml"
    p.write_text(f"script: train.py\nsites: 4\nrounds: 2\nbackend: {backend}\n")
    return load_recipe(p)


def test_backend_forms(tmp_path):
    assert _load(tmp_path, "process").backend == BackendSpec()
    assert _load(tmp_path, "null").backend == BackendSpec()
    assert _load(tmp_path, "ray").backend == BackendSpec(type="ray")
    b = _load(tmp_path, "{num_cpus: 0.5, num_gpus: 0.25, memory_gib: 2, slots: 3, virtual: false}").backend
    assert b == BackendSpec("ray", None, 0.5, 0.25, 2.0, 3, "false")
    b = _load(tmp_path, "{type: ray, address: 'ray://head:10001', aggregator_host: 10.0.0.5}").backend
    assert (b.address, b.aggregator_host) == ("ray://head:10001", "10.0.0.5")


@pytest.mark.parametrize(("backend", "expected"), [
    ("rya", "`backend` must be one of process, ray; did you mean 'ray'?"),
    ("{type: ray, num_gpu: 1}", "unknown key `backend.num_gpu`; did you mean `backend.num_gpus`?"),
    ("{type: process, num_cpus: 2}", "`backend.num_cpus` applies to `type: ray` only (got 2)"),
    ("{type: ray, num_cpus: -1}", "`backend.num_cpus` must be a number >= 0 (got -1)"),
    ("{type: ray, slots: 0}", "`backend.slots` must be an integer >= 1 (got 0)"),
    ("{type: ray, virtual: sometimes}", "`backend.virtual` must be one of auto, true, false"),
    ("{type: ray, address: ''}", "`backend.address` must be a Ray address"),
    ("[ray]", "`backend` must be a type (process, ray) or a mapping"),
])  # fmt: skip
def test_backend_errors_name_the_key(tmp_path, backend, expected):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, backend)
    assert expected in str(e.value) and "job.yaml" in str(e.value)


def test_the_command_line_overrides_the_recipe():
    spec = BackendSpec(type="ray", num_cpus=2)
    assert spec.with_cli("process", None).type == "process"
    assert spec.with_cli(None, None) == spec
    moved = BackendSpec().with_cli(None, "127.0.0.1:6379")  # an address implies Ray
    assert (moved.type, moved.address) == ("ray", "127.0.0.1:6379")


def test_slots_are_what_the_cluster_holds_at_the_per_site_resources():
    cluster = {"CPU": 8.0, "GPU": 2.0, "memory": 64.0 * 2**30}
    assert slots(BackendSpec("ray", num_cpus=1), cluster) == 8
    assert slots(BackendSpec("ray", num_cpus=0.5), cluster) == 16
    assert slots(BackendSpec("ray", num_cpus=1, num_gpus=0.25), cluster) == 8
    assert slots(BackendSpec("ray", num_cpus=1, num_gpus=1), cluster) == 2
    assert slots(BackendSpec("ray", num_cpus=1, memory_gib=24), cluster) == 2
    assert slots(BackendSpec("ray", num_cpus=1, slots=3), cluster) == 3
    assert slots(BackendSpec("ray", num_cpus=0), cluster) is None  # nothing asked: no bound
    assert slots(BackendSpec("ray", num_cpus=1, num_gpus=1), {"CPU": 8.0}) == 0  # no GPU at all


@pytest.mark.parametrize(("address", "loop"), [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True), ("[::1]:6379", True),
    ("10.0.0.5:6379", False), ("ray://head:10001", False), ("127.0.0.1", True), ("::1", True), ("10.0.0.5", False),
])  # fmt: skip
def test_a_loopback_address_keeps_ray_on_loopback(address, loop):
    assert is_loopback(address) is loop


@pytest.mark.parametrize(("settings", "expected"), [
    ({"workflow": "fedavg,cross-site-eval"}, "cannot run the workflow 'fedavg,cross-site-eval'"),
    ({"evaluate_every": 2}, "cannot run evaluations between rounds"),
    ({"strategy": "scaffold"}, "cannot run SCAFFOLD"),
])  # fmt: skip
def test_what_virtual_sites_cannot_do_is_refused(tmp_path, settings, expected):
    from types import SimpleNamespace

    from fl_plugins.backends.launch import _check_virtual
    from fl_plugins.config import AggregatorConfig

    config = AggregatorConfig(run_dir=tmp_path / "run", rounds=2, **settings)
    with pytest.raises(ConfigError, match="virtual sites") as e:
        _check_virtual(SimpleNamespace(config=config))  # type: ignore[arg-type]
    assert expected in str(e.value)
    _check_virtual(SimpleNamespace(config=AggregatorConfig(run_dir=tmp_path / "run", rounds=2)))  # type: ignore[arg-type]
