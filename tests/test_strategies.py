"""Server-side strategies (aggregator/optimizers.py): FedAvgM, FedAdam, FedYogi, FedAdagrad, each checked round by
round against a float64 numpy reference of the paper's rules written here (3 sites x 3 rounds; FULL, DIFF and
FULL+DIFF updates; float32 and bf16 models), the optimizer state checkpointed with each round, a restart that
resumes that state, and the refusals of a restart with other settings.

Each strategy runs once over the real gRPC service on 127.0.0.1; the other cases use the in-memory transport
(tests/_inmemory.py: the same aggregator and servicer, no socket). The reference is checked per round: round
r+1's model is compared with the rule applied to round r's checkpointed model and to the updates the sites
computed from it (they are deterministic), with the moments m and v carried in float64 across rounds, and the
state files of each round (global/round-R/strategy/m.npy, v.npy) are compared with the reference's moments.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import SiteThread, join_sites, load_round, run_sites, save_numpy

from fl_plugins import checks
from fl_plugins.aggregator.core import Aggregator, AggregatorConfig
from fl_plugins.aggregator.fedavg import BLOCK
from fl_plugins.aggregator.optimizers import STATE_DIR
from fl_plugins.aggregator.service import Servicer
from fl_plugins.aggregator.store import RunStore
from fl_plugins.aggregator.strategy import STRATEGIES
from fl_plugins.client.transport import InMemoryTransport
from fl_plugins.errors import ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
OPTIMIZERS = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]
WEIGHTS = (1, 5, 20)
DEFAULTS = {
    "fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
    **dict.fromkeys(
        ["fedadam", "fedyogi", "fedadagrad"], {"server_lr": 0.01, "server_momentum": 0.9, "beta2": 0.99, "tau": 1e-3}
    ),
}
# Tolerances. The aggregator computes in float32 (24 significant bits, a rounding error of at most 6e-8 of the
# value per operation); the reference in float64. Per element and round there are about ten roundings (three
# weighted sums, the average, Δ, the moments, the step, x + step) on values below 8 in magnitude (the models
# here stay within +-8): at most 10 * 8 * 6e-8 ≈ 5e-6 absolute (measured: 2e-6). A wrong rule is far outside
# it: one step is ~1e-2 (adaptive, η = 0.01) to ~1e-1 (fedavgm).
ATOL_F32 = 5e-6
# bf16 models: the aggregator's float32 result is rounded once to bf16 (8 significant bits): it lies within half
# a bf16 unit of the float64 reference, 2^-8 of the value at most, plus the float32 bound above (a bound, not an
# estimate: measured, 99% of it is used).
RTOL_BF16 = 2.0**-8
# The moments (float32, computed from the bf16 values exactly as for float32 models, so one bound for both):
# every site adds at least 0.1 here, so Δ >= 0.1 and its relative error is at most 5e-6 / 0.1 = 5e-5; m is a
# sum of such Δs, v of their squares (twice the relative error): 1e-4 (measured: 6e-6). Starting v at 0
# instead of τ² is 3e-3 off.
RTOL_STATE = 1e-4


def _initial(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "big.weight": rng.standard_normal(BLOCK + 8 * 257).astype(dtype),  # over one block: windows across blocks
        "layer.bias": rng.standard_normal(257).astype(dtype),
        "scalar": np.array(0.5, dtype),
        "steps": np.array([10, 20, 30], np.int64),  # FedAvg's rule: the rounded average
        "mask": np.array([True, False, True, True]),  # FedAvg's rule: the global model's values
    }


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype == BF16


def _ptype(site: int, kind: str) -> str:
    return "DIFF" if kind == "DIFF" or (kind == "MIXED" and site == 0) else "FULL"


def _update(site: int, rnd: int, params: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """What `site` sends in round `rnd` from the global model `params`: a deterministic 'training step' that
    differs per site and round, as FULL values or as the DIFF from `params`."""
    diff = _ptype(site, kind) == "DIFF"
    out = {}
    for name, v in params.items():
        if _is_float(v):
            new = (v.astype(np.float32) * (1 + 0.01 * site) + 0.1 * (site + 1) * (rnd + 1)).astype(v.dtype)
            out[name] = (new.astype(np.float64) - v.astype(np.float64)).astype(v.dtype) if diff else new
        elif v.dtype == np.bool_:
            out[name] = ~v  # ignored: the global model's values are kept
        else:
            out[name] = np.full_like(v, site) if diff else v + site
    return out


def _steps(kind: str, weights=WEIGHTS):
    def make(site):
        def step(rnd, params):
            return _update(site, rnd, params, kind), _ptype(site, kind), weights[site]

        return step

    return {f"site-{s}": make(s) for s in range(len(weights))}


def _reference_step(name: str, h: dict, delta: np.ndarray, m: np.ndarray, v: np.ndarray | None):
    """The paper's rules in float64: (the step added to x, new m, new v)."""
    if name == "fedavgm":
        m = h["server_momentum"] * m + delta
        return h["server_lr"] * m, m, None
    m = h["server_momentum"] * m + (1 - h["server_momentum"]) * delta
    d2 = delta**2
    if name == "fedadam":
        v = h["beta2"] * v + (1 - h["beta2"]) * d2
    elif name == "fedyogi":
        v = v - (1 - h["beta2"]) * d2 * np.sign(v - d2)
    else:
        v = v + d2
    return h["server_lr"] * m / (np.sqrt(v) + h["tau"]), m, v


def check_against_reference(run_dir: Path, name: str, h: dict, kind: str, rounds: int = 3, weights=WEIGHTS):
    """Round by round: round r+1's model and state equal the reference rule applied to round r's model."""
    store = RunStore(run_dir)
    order = [t.name for s in store.load(0).shards for t in s.tensors if t.dtype not in ("I64", "BOOL")]
    m = {k: 0.0 for k in order}
    v = {k: h.get("tau", 0.0) ** 2 for k in order}  # v_-1 = τ² (Algorithm 2)
    total = float(sum(weights))
    for r in range(rounds):
        g, got = load_round(run_dir, r), load_round(run_dir, r + 1)
        ups = [(_update(s, r, g, kind), w, _ptype(s, kind)) for s, w in enumerate(weights)]
        for k, x in g.items():
            sent = [(u[k].astype(np.float64), w, p) for u, w, p in ups]
            if not _is_float(x):
                avg = sum(w * (u + (x if p == "DIFF" else 0)) for u, w, p in sent) / total
                want = x if x.dtype == np.bool_ else np.rint(avg).astype(x.dtype)
                np.testing.assert_array_equal(got[k], want, err_msg=f"{name} round {r + 1} {k}")
                continue
            xf = x.astype(np.float64)
            delta = sum(w * (u if p == "DIFF" else u - xf) for u, w, p in sent) / total
            step, m[k], v[k] = _reference_step(name, h, delta, m[k], v[k])
            want, msg = xf + step, f"{name} round {r + 1} {k}"
            if x.dtype == BF16:
                assert got[k].dtype == BF16
                np.testing.assert_allclose(got[k].astype(np.float64), want, rtol=RTOL_BF16, atol=ATOL_F32, err_msg=msg)
            else:
                np.testing.assert_allclose(got[k], want, rtol=0, atol=ATOL_F32, err_msg=msg)
        check_state(run_dir, r + 1, name, h, order, g, {"m": m, "v": v})


def check_state(run_dir: Path, r: int, name: str, h: dict, order: list[str], g: dict, moments: dict) -> None:
    """global/round-R/strategy/ holds the moments after round R's model was made, in manifest order."""
    d = RunStore(run_dir).round_dir(r) / STATE_DIR
    meta = json.loads((d / "state.json").read_text())
    assert (meta["strategy"], meta["hyper_parameters"], meta["step"]) == (name, h, r)
    for buf in ["m"] if name == "fedavgm" else ["m", "v"]:
        got = np.load(d / f"{buf}.npy")
        want = np.concatenate([np.broadcast_to(moments[buf][k], g[k].shape).reshape(-1) for k in order])
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL_STATE, atol=0, err_msg=f"{name} {buf} of round {r}")
    assert os.stat(d / "m.npy").st_mode & 0o777 == 0o600


def _run(root: Path, initial: dict | None, steps: dict, **config) -> Path:
    """A job on a real Aggregator reached over InMemoryTransport (tests/_inmemory.py's set-up; the initial model is
    written with torch, which also writes bf16), its sites as SiteThreads; returns the run directory."""
    root.mkdir(parents=True, exist_ok=True)
    init = save_numpy(root / "initial.safetensors", initial) if initial is not None else None
    config.setdefault("min_sites", len(steps))
    cfg = AggregatorConfig(run_dir=root / "run", initial_model=init, chunk_bytes=64 << 10, linger=0.1, **config)
    agg = Aggregator(cfg)
    agg.start()
    try:
        servicer = Servicer(agg)
        join_sites(
            *(SiteThread(None, name, step, transport=InMemoryTransport(servicer)) for name, step in steps.items())
        )
        deadline = time.monotonic() + 60
        while not agg.finished():
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.02)
        assert agg.error is None, agg.error
    finally:
        agg.stop()
    return cfg.run_dir


def test_the_registry_is_the_config_s_choices():
    assert sorted(STRATEGIES) == sorted(checks.STRATEGIES)


@pytest.mark.integration
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_strategy_over_grpc_matches_the_reference(server_factory, name):
    srv = server_factory(rounds=3, min_sites=3, initial=_initial(np.float32), chunk_bytes=64 << 10, strategy=name)
    run_sites(srv.address, _steps("FULL"))
    assert srv.wait() == 0
    check_against_reference(srv.aggregator.config.run_dir, name, DEFAULTS[name], "FULL")


CUSTOM = {
    "fedavgm": {"server_lr": 0.7, "server_momentum": 0.5},
    **dict.fromkeys(
        ["fedadam", "fedyogi", "fedadagrad"], {"server_lr": 0.05, "server_momentum": 0.5, "beta2": 0.9, "tau": 0.01}
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize(
    "kind, dtype, hyper",
    [
        ("DIFF", np.float32, "custom"),
        ("MIXED", np.float32, "default"),
        ("FULL", BF16, "default"),
        ("DIFF", BF16, "custom"),
    ],
    ids=["diff-f32-custom", "mixed-f32", "full-bf16", "diff-bf16-custom"],
)
def test_each_strategy_in_memory_matches_the_reference(tmp_path, no_sockets, name, kind, dtype, hyper):
    h = (CUSTOM if hyper == "custom" else DEFAULTS)[name]
    run = _run(tmp_path, _initial(dtype), _steps(kind), rounds=3, strategy=name, **(h if hyper == "custom" else {}))
    check_against_reference(run, name, h, kind)


def test_fedavgm_without_momentum_at_rate_one_is_fedavg(tmp_path, no_sockets):
    runs = {}
    for name, kw in [("fedavg", {}), ("fedavgm", {"server_lr": 1.0, "server_momentum": 0.0})]:
        runs[name] = load_round(
            _run(tmp_path / name, _initial(np.float32), _steps("MIXED"), rounds=2, strategy=name, **kw), 2
        )
    assert not (tmp_path / "fedavg" / "run" / "global" / "round-00002" / STATE_DIR).exists()  # FedAvg keeps none
    for k, want in runs["fedavg"].items():  # x + (avg - x) is avg, up to float32's rounding of the sum
        np.testing.assert_allclose(runs["fedavgm"][k], want, rtol=1e-6, atol=1e-6)


def _two_site_run(root: Path, rounds: int, initial=None) -> Path:
    """fedyogi, two sites: each element's sum has two terms, whose order does not change it (bit for bit)."""
    return _run(root, initial, _steps("FULL", weights=(1, 3)), rounds=rounds, strategy="fedyogi")


def _assert_same_run(got: Path, want: Path, r: int) -> None:
    for k, a in load_round(want, r).items():
        np.testing.assert_array_equal(load_round(got, r)[k], a, err_msg=k)
    for buf in ("m.npy", "v.npy", "state.json"):
        same = (got / "global" / f"round-{r:05d}" / STATE_DIR / buf).read_bytes()
        assert same == (want / "global" / f"round-{r:05d}" / STATE_DIR / buf).read_bytes(), buf


def test_a_restarted_aggregator_resumes_the_optimizer_state(tmp_path, no_sockets):
    initial = _initial(np.float32)
    whole = _two_site_run(tmp_path / "whole", 3, initial)
    # stopped after round 0 (round 1's model and the state that made it are checkpointed), restarted, finished
    stopped = _two_site_run(tmp_path / "stopped", 1, initial)
    _two_site_run(tmp_path / "stopped", 3)
    _assert_same_run(stopped, whole, 3)
    # died after writing round 2's model and state but before publishing them: round 1 runs again from round 1's
    crashed = _two_site_run(tmp_path / "crashed", 2, initial)
    os.rename(crashed / "global" / "round-00002", crashed / "global" / "round-00002.tmp")
    _two_site_run(tmp_path / "crashed", 3)
    _assert_same_run(crashed, whole, 3)


def _plus_one(rnd: int, params: dict) -> tuple[dict, str, float]:
    return {"w": params["w"] + 1}, "FULL", 1


def _config(run_dir: Path, **kw) -> AggregatorConfig:
    return AggregatorConfig(run_dir=run_dir, rounds=kw.pop("rounds", 3), min_sites=1, **kw)


def test_a_restart_with_other_strategy_settings_is_refused(tmp_path, no_sockets):
    run = _run(tmp_path, {"w": np.zeros(8, np.float32)}, {"site-0": _plus_one}, rounds=1, strategy="fedadam")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    refused = [
        ({"strategy": "fedyogi"}, "fedyogi"),
        ({"strategy": "fedadam", "server_lr": 0.1}, "--server-lr 0.1"),
        ({"strategy": "fedadam", "tau": 0.01}, "--tau 0.01"),
        ({}, "asks for fedavg"),
    ]
    for kw, shown in refused:
        with pytest.raises(ConfigError, match="was made by fedadam") as e:
            Aggregator(_config(run, **kw))
        msg = str(e.value)
        assert shown in msg and "--strategy fedadam --server-lr 0.01 --server-momentum 0.9" in msg, msg
        assert "--run-dir" in msg
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written
    Aggregator(_config(run, strategy="fedadam", server_lr=0.01)).stop()  # the same settings resume


def test_a_fedavg_run_is_not_resumed_by_a_server_optimizer(tmp_path, no_sockets):
    run = _run(tmp_path, {"w": np.zeros(8, np.float32)}, {"site-0": _plus_one}, rounds=1)
    with pytest.raises(ConfigError, match="made by fedavg .* holds no optimizer state; this start asks for fedavgm"):
        Aggregator(_config(run, strategy="fedavgm"))
    Aggregator(_config(run)).stop()


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"strategy": "fedadam", "server_momentum": 1.0},
            r"`server_momentum` \(--server-momentum\) must be a number in \[0, 1\) for fedadam \(got 1.0\)",
        ),
        ({"strategy": "fedavgm", "server_momentum": 1.5}, r"for fedavgm \(got 1.5\)"),
        ({"strategy": "fedyogi", "beta2": 1.0}, r"`beta2` \(--beta2\) must be a number in \[0, 1\)"),
    ],
)
def test_hyper_parameters_out_of_range_are_refused_at_start(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        Aggregator(_config(tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()
