"""The global model equals a FedAvg reference computed here with numpy: 3 sites x 3 rounds, real gRPC."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import load_round, run_sites, save_numpy

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer

BF16 = np.dtype(ml_dtypes.bfloat16)


def _initial(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.weight": rng.standard_normal((300, 257)).astype(dtype),  # several chunks, odd sizes
        "layer.bias": rng.standard_normal(257).astype(dtype),
        "scalar": np.array(0.5, dtype),
        "steps": np.array([10, 20, 30], np.int64),
    }


def _local(site: int, rnd: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A deterministic 'training step' that differs per site and round."""
    out = {}
    for name, v in params.items():
        if v.dtype.kind == "f" or v.dtype == BF16:
            out[name] = (v.astype(np.float32) * (1 + 0.01 * site) + 0.1 * (site + 1) * (rnd + 1)).astype(v.dtype)
        else:
            out[name] = v + site
    return out


def _reference(initial, rounds, weights, dtype) -> dict[str, np.ndarray]:
    g = {k: v.copy() for k, v in initial.items()}
    for r in range(rounds):
        locals_ = [_local(s, r, g) for s in range(len(weights))]
        W = sum(weights)
        new = {}
        for k in g:
            acc = sum(w * loc[k].astype(np.float64) for w, loc in zip(weights, locals_, strict=True)) / W
            new[k] = np.rint(acc).astype(g[k].dtype) if g[k].dtype.kind == "i" else acc.astype(g[k].dtype)
        g = new
    return g


def _steps(weights, params_type):
    def make(site):
        def step(rnd, params):
            new = _local(site, rnd, params)
            if params_type == "DIFF":
                new = {k: (new[k].astype(np.float64) - params[k].astype(np.float64)).astype(params[k].dtype)
                       if params[k].dtype.kind == "f" or params[k].dtype == BF16 else new[k] - params[k]
                       for k in new}  # fmt: skip
            return new, params_type, weights[site]

        return step

    return {f"site-{s}": make(s) for s in range(len(weights))}


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 5, 20)], ids=["even", "uneven"])
def test_three_sites_three_rounds_match_numpy_fedavg(server_factory, dtype, weights):
    initial = _initial(dtype)
    srv = server_factory(rounds=3, min_sites=3, initial=initial, chunk_bytes=64 << 10)
    run_sites(srv.address, _steps(weights, "FULL"))
    assert srv.wait() == 0
    got = load_round(srv.aggregator.config.run_dir, 3)
    want = _reference(initial, 3, weights, dtype)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        if dtype == BF16 and want[k].dtype == BF16:  # one bf16 rounding step may differ (fp32 vs fp64 sum)
            np.testing.assert_allclose(got[k].astype(np.float32), want[k].astype(np.float32), rtol=2**-7, atol=1e-2)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    # every round was checkpointed, with its metrics line
    for r in range(4):
        assert (srv.aggregator.config.run_dir / "global" / f"round-{r:05d}" / "manifest.json").is_file()


@pytest.mark.integration
def test_full_and_diff_updates_give_the_same_model(server_factory, tmp_path):
    initial = _initial(np.float32)
    results = {}
    for ptype in ("FULL", "DIFF"):
        cfg = AggregatorConfig(run_dir=tmp_path / ptype, rounds=2, min_sites=3, linger=0.3, chunk_bytes=64 << 10,
                               initial_model=save_numpy(tmp_path / "init.safetensors", initial))  # fmt: skip
        with AggregatorServer(cfg) as srv:
            run_sites(srv.address, _steps((2, 3, 5), ptype))
            assert srv.wait() == 0
        results[ptype] = load_round(tmp_path / ptype, 2)
    for k in results["FULL"]:
        np.testing.assert_allclose(results["DIFF"][k], results["FULL"][k], rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_mixed_full_and_diff_in_one_round(server_factory):
    initial = {"w": np.arange(12, dtype=np.float32)}
    srv = server_factory(rounds=1, min_sites=2, initial=initial)

    def full(rnd, p):
        return {"w": p["w"] + 1}, "FULL", 1

    def diff(rnd, p):
        return {"w": np.full(12, 3, np.float32)}, "DIFF", 3

    run_sites(srv.address, {"a": full, "b": diff})
    assert srv.wait() == 0
    got = load_round(srv.aggregator.config.run_dir, 1)["w"]
    np.testing.assert_allclose(got, (1 * (initial["w"] + 1) + 3 * (initial["w"] + 3)) / 4)


@pytest.mark.integration
def test_an_update_failing_its_shard_digest_is_not_counted_and_the_round_runs_again(server_factory, monkeypatch):
    """Its bytes were already folded: the aggregator must not keep any of them (the rare, slow path)."""
    from conftest import SiteThread, join_sites

    from fl_plugins.wire.stream import ShardSender

    srv = server_factory(rounds=1, initial={"w": np.zeros(8, np.float32)})
    real, calls = ShardSender.shard_digest, []

    def wrong_once(self):
        calls.append(1)
        return "0" * 32 if len(calls) == 1 else real(self)

    monkeypatch.setattr(ShardSender, "shard_digest", wrong_once)
    site = SiteThread(srv.address, "a", lambda r, p: ({"w": p["w"] + 1}, "FULL", 1))
    join_sites(site)
    assert srv.wait() == 0
    assert len(site.refused) == 1 and "sits attempt 0 of round 0 out" in str(site.refused[0])
    # the only site sits attempt 0 out, so attempt 1 lets it train again; its first bytes are refolded away
    assert srv.aggregator.stats["round_restarts"] == 1 and srv.aggregator.stats["refolds"] == 1
    np.testing.assert_array_equal(load_round(srv.aggregator.config.run_dir, 1)["w"], np.ones(8, np.float32))
