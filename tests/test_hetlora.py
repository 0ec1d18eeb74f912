"""Heterogeneous LoRA ranks (aggregator/lora.py, lora_flex.py; the sites' side in integrations/targets.py and
hf_model.py): hetlora's zero-padded fold and flexlora's SVD redistribution checked against a direct float64
computation, with each update's chunks arriving in random sizes and in a random order across sites; the
refusals (a larger rank, mixed ranks under another strategy, a module's factors at two ranks); and both
strategies over the real gRPC service, 3 sites training tiny PEFT Llama adapters at ranks 4, 8 and 16, 2 rounds,
each site loading the rank-16 global adapter into its own rank.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SiteThread, join_sites, load_round, save_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_plugins.aggregator.lora import HetLoRA
from fl_plugins.aggregator.lora_flex import FlexLoRA
from fl_plugins.aggregator.uploads import check_plan
from fl_plugins.errors import ConfigError, ModelMismatchError
from fl_plugins.integrations.targets import check_params, matching
from fl_plugins.lora_ranks import fit_ranks, partner, rank_dim, truncate
from fl_plugins.wire.layout import Manifest, TensorInfo, plan_shards

RANKS = (4, 8, 16)  # the sites' ranks over gRPC; the global model's is 16
R = 6  # the global rank of the numpy cases
# name: the global shape (at rank R); the rank dimension follows from the name (lora_ranks.py)
SHAPES = {
    "m.q.lora_A.weight": (R, 5),
    "m.q.lora_B.weight": (7, R),
    "m.emb.lora_embedding_A": (R, 9),
    "m.emb.lora_embedding_B": (4, R),
    "m.conv.lora_A.weight": (R, 2, 3, 3),
    "m.conv.lora_B.weight": (3, R, 1, 1),
    "head.weight": (3, 5),
}
# float32 rounding: values here are O(1) and each output is a handful of operations away from the float64 result
ATOL = 2e-5


def _at_rank(name: str, shape: tuple[int, ...], r: int) -> tuple[int, ...]:
    d = rank_dim(name)
    return shape if d is None else tuple(r if i == d else s for i, s in enumerate(shape))


def _info(name: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, "F32", shape, 0, 4 * int(np.prod(shape)))


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _updates(seed: int, ranks: list[int], diffs: list[bool]) -> list[dict[str, np.ndarray]]:
    """Each site's update at its rank (FULL values, or DIFFs from the global model cut to its rank)."""
    rng = np.random.default_rng(seed)
    return [
        {k: rng.standard_normal(_at_rank(k, s, r)).astype(np.float32) * (0.1 if d else 1.0) for k, s in SHAPES.items()}
        for r, d in zip(ranks, diffs, strict=True)
    ]


def _fold_all(strategy, updates, weights, diffs, seed: int) -> None:
    """Every update's tensors cut into chunks of random sizes (whole elements), folded in a random order across
    sites and tensors, as FoldSink does (`fold_update` for flexlora); then counted."""
    rnd = random.Random(seed)
    chunks = []
    for i, u in enumerate(updates):
        for name, a in u.items():
            raw = memoryview(a.tobytes())
            lo = 0
            while lo < len(raw):
                n = 4 * rnd.randint(1, max(1, a.size // 2))
                chunks.append((i, _info(name, a.shape), lo, raw[lo : lo + n]))
                lo += n
    rnd.shuffle(chunks)
    for i, t, lo, payload in chunks:
        if isinstance(strategy, FlexLoRA):
            strategy.fold_update(f"u{i}", t, lo, payload, weights[i], diff=diffs[i])
        else:
            strategy.fold(t, lo, payload, weights[i], diff=diffs[i])
    for w, d in zip(weights, diffs, strict=True):
        strategy.add_weight(w, "DIFF" if d else "FULL")


def _finalized(strategy, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in SHAPES.items():
        flat = g[name].reshape(-1)
        blocks = strategy.finalize(_info(name, shape), lambda e0, n, flat=flat: flat[e0 : e0 + n])
        out[name] = np.concatenate(list(blocks)).reshape(shape)
    return out


def _full(name: str, x: np.ndarray, g: np.ndarray, diff: bool) -> np.ndarray:
    """An update's factor as FULL values, float64."""
    d = rank_dim(name)
    return x.astype(np.float64) + ((g if d is None else truncate(name, g, x.shape[d])) if diff else 0.0)


case = st.tuples(
    st.lists(st.integers(1, R), min_size=1, max_size=4),  # the sites' ranks
    st.integers(0, 2**31),  # the seed of the values, the weights, the DIFF flags and the chunking
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_hetlora_is_the_zero_padded_average_and_untrained_slices_keep_the_global_value(c):
    ranks, seed = c
    rng = np.random.default_rng(seed)
    weights = [float(w) for w in rng.integers(1, 20, len(ranks))]
    diffs = [bool(d) for d in rng.integers(0, 2, len(ranks))]
    g, updates = _global(seed % 7), _updates(seed, ranks, diffs)
    strategy = HetLoRA([_info(k, s) for k, s in SHAPES.items()])
    _fold_all(strategy, updates, weights, diffs, seed)
    got = _finalized(strategy, g)
    for name, shape in SHAPES.items():
        d = rank_dim(name)
        if d is None:  # FedAvg
            want = sum(w * _full(name, u[name], g[name], df) for u, w, df in zip(updates, weights, diffs, strict=True))
            np.testing.assert_allclose(got[name], want / sum(weights), atol=ATOL, rtol=0, err_msg=name)
            continue
        acc, per_slice = np.zeros(shape), np.zeros(R)
        for u, w, df in zip(updates, weights, diffs, strict=True):
            r = u[name].shape[d]
            acc[(slice(None),) * d + (slice(0, r),)] += w * _full(name, u[name], g[name], df)
            per_slice[:r] += w
        view = [1] * len(shape)
        view[d] = R
        want = np.where(per_slice.reshape(view) > 0, acc / sum(weights), g[name])
        np.testing.assert_allclose(got[name], want, atol=ATOL, rtol=0, err_msg=name)


def _matrix(name: str, x: np.ndarray) -> np.ndarray:
    """A factor as the 2-D matrix of the module's product: A as r x in, B as out x r."""
    d = rank_dim(name)
    return x.reshape(x.shape[0], -1) if d == 0 else np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_flexlora_is_the_truncated_svd_of_the_weighted_average_product(tmp_path_factory, c):
    ranks, seed = c
    rng = np.random.default_rng(seed)
    weights = [float(w) for w in rng.integers(1, 20, len(ranks))]
    diffs = [bool(d) for d in rng.integers(0, 2, len(ranks))]
    g, updates = _global(seed % 7), _updates(seed, ranks, diffs)
    strategy = FlexLoRA([_info(k, s) for k, s in SHAPES.items()])
    _fold_all(strategy, updates, weights, diffs, seed)
    previous, staging = tmp_path_factory.mktemp("prev"), tmp_path_factory.mktemp("next")
    save_numpy(previous / "model.safetensors", g)  # where `stage` reads the global factors for DIFF updates
    strategy.stage(previous, staging)
    assert (staging / "strategy" / "state.json").is_file()
    got = _finalized(strategy, g)
    total = sum(weights)
    ups = zip(updates, weights, diffs, strict=True)
    want = sum(w * _full("head.weight", u["head.weight"], g["head.weight"], d) for u, w, d in ups)
    np.testing.assert_allclose(got["head.weight"], want / total, atol=ATOL, rtol=0)
    for a in (n for n in SHAPES if rank_dim(n) == 0):
        b = partner(a)
        m = sum(
            w * _matrix(b, _full(b, u[b], g[b], d)) @ _matrix(a, _full(a, u[a], g[a], d))
            for u, w, d in zip(updates, weights, diffs, strict=True)
        )
        m = m / total
        u_, s, vt = np.linalg.svd(m, full_matrices=False)
        live = int(np.sum(s > s[0] * 1e-9)) if s[0] > 0 else 0
        k = min(R, live)
        new_a, new_b = _matrix(a, got[a]), _matrix(b, got[b])
        scale = max(1.0, float(np.abs(m).max()))
        np.testing.assert_allclose(new_b @ new_a, (u_[:, :k] * s[:k]) @ vt[:k], atol=ATOL * scale, rtol=0, err_msg=a)
        for j in range(k):  # B = U sqrt(S), A = sqrt(S) V^T: both of norm sqrt(s_j)
            assert np.isclose(np.linalg.norm(new_b[:, j]), np.sqrt(s[j]), rtol=1e-4), (a, j)
            assert np.isclose(np.linalg.norm(new_a[j]), np.sqrt(s[j]), rtol=1e-4), (a, j)
        # a site at rank r takes the first r components: the best rank-r approximation
        r = min(ranks)
        best = (u_[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(new_b[:, :r] @ new_a[:r], best, atol=ATOL * scale, rtol=0)
        if k < R:  # components beyond M's rank: B's column zero, A's row the global one (still trainable)
            assert not new_b[:, k:].any()
            np.testing.assert_array_equal(new_a[k:], _matrix(a, g[a])[k:])


def test_a_refold_forgets_what_was_folded_and_kept(tmp_path):
    g = _global()
    for cls in (HetLoRA, FlexLoRA):
        strategy = cls([_info(k, s) for k, s in SHAPES.items()])
        _fold_all(strategy, _updates(1, [2, 6], [False, False]), [1.0, 3.0], [False, False], 1)
        strategy.reset()
        updates = _updates(2, [4], [False])
        _fold_all(strategy, updates, [2.0], [False], 2)
        got = _finalized(strategy, g)
        np.testing.assert_allclose(got["head.weight"], updates[0]["head.weight"], atol=ATOL)
        # hetlora: slices 0..3 are the one update's, 4..5 keep the global value
        if cls is HetLoRA:
            a = got["m.q.lora_A.weight"]
            np.testing.assert_allclose(a[:4], updates[0]["m.q.lora_A.weight"], atol=ATOL)
            np.testing.assert_array_equal(a[4:], g["m.q.lora_A.weight"][4:])


# -- the plan check: what an update may hold --------------------------------------------------------------------
def _manifest(shapes: dict[str, tuple[int, ...]]) -> Manifest:
    return Manifest(plan_shards([(k, "F32", s) for k, s in shapes.items()]))


def _update_shapes(r: int, b_rank: int | None = None) -> dict[str, tuple[int, ...]]:
    out = {k: _at_rank(k, s, r) for k, s in SHAPES.items()}
    if b_rank is not None:
        out["m.q.lora_B.weight"] = (7, b_rank)
    return out


def test_smaller_ranks_pass_the_plan_check_only_under_the_lora_strategies():
    glob = _manifest(SHAPES)
    for strategy in ("hetlora", "flexlora"):
        check_plan(glob, _manifest(_update_shapes(2)), "the update", strategy=strategy)
        check_plan(glob, _manifest(_update_shapes(R)), "the update", strategy=strategy)
    with pytest.raises(ModelMismatchError) as e:
        check_plan(glob, _manifest(_update_shapes(2)), "the update from site 'a'", strategy="fedavg")
    msg = str(e.value)
    assert "the update from site 'a'" in msg and "m.q.lora_B.weight: rank 2 (global model: 6)" in msg
    assert "--strategy hetlora" in msg and "--strategy flexlora" in msg and "strategy: {type: hetlora}" in msg
    with pytest.raises(ModelMismatchError) as e:  # no strategy named: FedAvg's rule
        check_plan(glob, _manifest(_update_shapes(2)), "the update")
    assert "hetlora" in str(e.value)
    with pytest.raises(ModelMismatchError, match="leave the submit_model phase out"):  # cross-site evaluation
        check_plan(glob, _manifest(_update_shapes(2)), "the model submitted by site 'a'", submitted=True)


def test_a_larger_rank_is_refused_with_the_tensor_both_ranks_and_the_fix():
    with pytest.raises(ModelMismatchError) as e:
        check_plan(
            _manifest(SHAPES), _manifest(_update_shapes(R + 2)), "the update from site 'big'", strategy="hetlora"
        )
    msg = str(e.value)
    assert "m.q.lora_A.weight: rank 8 (global model: 6)" in msg
    assert "initial_model" in msg and "offer round 0's model" in msg and "rank 6 or less" in msg


def test_a_module_s_factors_at_two_ranks_and_other_mismatches_are_refused():
    glob = _manifest(SHAPES)
    with pytest.raises(ModelMismatchError, match=r"A and B factors have different ranks.*m\.q\.lora_A\.weight: 2"):
        check_plan(glob, _manifest(_update_shapes(2, b_rank=3)), "the update", strategy="flexlora")
    bad = _update_shapes(2)
    bad["m.q.lora_A.weight"] = (2, 4)  # another input size: not a rank
    with pytest.raises(ModelMismatchError, match=r"mismatched.*m\.q\.lora_A\.weight: F32\[2, 4\]"):
        check_plan(glob, _manifest(bad), "the update", strategy="hetlora")
    half = dict(SHAPES)
    del half["m.q.lora_B.weight"]
    with pytest.raises(ConfigError, match="without their other factor"):
        FlexLoRA([_info(k, s) for k, s in half.items()])


# -- the site's side --------------------------------------------------------------------------------------------
def test_a_site_cuts_a_larger_global_rank_to_its_own_and_refuses_a_smaller_one():
    g = _global()
    local = {k: np.zeros(_at_rank(k, s, 2), np.float32) for k, s in SHAPES.items()}
    check_params(g, local)
    fitted = fit_ranks(g, local)
    np.testing.assert_array_equal(fitted["m.q.lora_A.weight"], g["m.q.lora_A.weight"][:2])
    np.testing.assert_array_equal(fitted["m.q.lora_B.weight"], g["m.q.lora_B.weight"][:, :2])
    np.testing.assert_array_equal(fitted["m.conv.lora_B.weight"], g["m.conv.lora_B.weight"][:, :2])
    assert set(matching(g, local)) == set(local)
    big = {k: np.zeros(_at_rank(k, s, R + 2), np.float32) for k, s in SHAPES.items()}
    with pytest.raises(ModelMismatchError, match=r"m\.q\.lora_A\.weight: \(6, 5\) vs local \(8, 5\)"):
        check_params(g, big)
    assert partner("x.lora_embedding_B") == "x.lora_embedding_A"
    assert partner("x.lora_A.default.weight") == "x.lora_B.default.weight"
    assert rank_dim("x.lora_B.bias") is None and rank_dim("x.lora_A.default.weight") == 0


def test_a_classifier_received_in_place_beside_a_larger_rank_loads():
    """A received model's tensors that fit the site's model arrive in its own storage (`into`), the LoRA factors of
    a larger rank cannot: the load gets only those. PEFT looks up every adapter key (its classifier, a
    modules_to_save), which failed with KeyError 'base_model.model.classifier.weight' in the demo under hetlora."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from fl_plugins.integrations.hf_model import HFTarget

    def model(rank: int):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, num_labels=3)  # fmt: skip
        lora = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=["query", "value"])
        return get_peft_model(BertForSequenceClassification(cfg), lora)

    site, top = HFTarget(model(4)), HFTarget(model(8))
    local = site.state()
    received = {k: (local[k] if "classifier" in k else v.detach().clone() + 1) for k, v in top.state().items()}
    site.load(received, strict=True)
    after = site.state()
    for k, v in received.items():
        want = fit_ranks({k: v}, {k: local[k]})[k]
        assert torch.equal(after[k], want), k


# -- over the real service ----------------------------------------------------------------------------------------
def _peft_model(rank: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}
    cfg = LlamaConfig(vocab_size=32, num_hidden_layers=1, **sizes)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    return get_peft_model(base, lora)


def _lora_site(rank: int, sent: dict, loaded: dict):
    """A site training a rank-`rank` PEFT adapter: it loads the global model into it (cut to its rank), and sends
    the loaded values plus a step that differs per site and round."""
    from fl_plugins.integrations.hf_model import HFTarget

    target = None

    def step(rnd: int, params: dict):
        nonlocal target
        if target is None:
            target = HFTarget(_peft_model(rank), "adapter")
        check_params(params, target.state(), f"round {rnd}'s global model")
        target.load(params, strict=True)
        state = {k: v.detach().numpy().copy() for k, v in target.state().items()}
        loaded[rnd] = state
        rng = np.random.default_rng(100 * rank + rnd)
        new = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}
        sent[rnd] = new
        return new, "FULL", float(rank)  # weight: the rank (4, 8, 16), so weights differ

    return step


@pytest.mark.integration
@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_sites_at_ranks_4_8_16_over_grpc(server_factory, name):
    from peft import get_peft_model_state_dict

    initial = {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(_peft_model(16)).items()}
    srv = server_factory(rounds=2, min_sites=3, initial=initial, strategy=name, chunk_bytes=64 << 10)
    sent: dict[int, dict] = {r: {} for r in RANKS}
    loaded: dict[int, dict] = {r: {} for r in RANKS}
    join_sites(*(SiteThread(srv.address, f"site-r{r}", _lora_site(r, sent[r], loaded[r])) for r in RANKS))
    assert srv.wait() == 0
    run = srv.aggregator.config.run_dir
    for rnd in (0, 1):
        g, got = load_round(run, rnd), load_round(run, rnd + 1)
        for k, v in loaded[4][rnd].items():  # the rank-4 site holds the global adapter cut to rank 4
            np.testing.assert_array_equal(v, truncate(k, g[k], 4) if rank_dim(k) is not None else g[k], err_msg=k)
        updates = [sent[r][rnd] for r in RANKS]
        weights = [float(r) for r in RANKS]
        total = sum(weights)
        for k, x in g.items():
            msg = f"{name} round {rnd + 1} {k}"
            d = rank_dim(k)
            if d is None:  # lm_head (modules_to_save): FedAvg
                want = sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total
                np.testing.assert_allclose(got[k], want, atol=ATOL, rtol=0, err_msg=msg)
            elif name == "hetlora":
                acc = np.zeros(x.shape)
                for u, w in zip(updates, weights, strict=True):
                    acc[(slice(None),) * d + (slice(0, u[k].shape[d]),)] += w * u[k]
                np.testing.assert_allclose(got[k], acc / total, atol=ATOL, err_msg=msg)  # zero-padded average
            elif d == 0:
                _check_flexlora(got, k, updates, weights, msg)


def _check_flexlora(got: dict, a: str, updates: list[dict], weights: list[float], msg: str) -> None:
    """The module of `a`: B = U_16 sqrt(S_16), A = sqrt(S_16) V_16^T of the weighted average product, each
    component up to its sign (an SVD's singular vectors are defined up to one)."""
    b = partner(a)
    m = sum(w * u[b].astype(np.float64) @ u[a] for u, w in zip(updates, weights, strict=True)) / sum(weights)
    u_, s, vt = np.linalg.svd(m)
    np.testing.assert_allclose(got[b] @ got[a], m, atol=ATOL, rtol=0, err_msg=msg)  # rank(M) = 16 here
    for j in range(16):
        sign = np.sign(got[a][j] @ vt[j])
        np.testing.assert_allclose(sign * got[a][j], np.sqrt(s[j]) * vt[j], atol=1e-4, err_msg=f"{msg} row {j}")
        np.testing.assert_allclose(sign * got[b][:, j], np.sqrt(s[j]) * u_[:, j], atol=1e-4, err_msg=f"{msg} col {j}")


# -- DIFF updates, a restart, another strategy on the same run (in memory: the real aggregator, no socket) ---------
def _numpy_site(rank: int, diff: bool, weight: float):
    """Sends a step from the global model cut to `rank`: FULL values, or (`diff`) only the step."""

    def step(rnd: int, params: dict):
        local = fit_ranks(params, {k: np.zeros(_at_rank(k, s, rank)) for k, s in SHAPES.items()})
        rng = np.random.default_rng(10 * rank + rnd)
        delta = {k: (0.1 * rng.standard_normal(local[k].shape)).astype(np.float32) for k in sorted(local)}
        new = delta if diff else {k: (local[k] + delta[k]).astype(np.float32) for k in local}
        return new, "DIFF" if diff else "FULL", weight

    return step


def _run(root: Path, rounds: int, strategy: str, initial: dict | None = None) -> Path:
    from fl_plugins.aggregator.core import Aggregator, AggregatorConfig
    from fl_plugins.aggregator.service import Servicer
    from fl_plugins.client.transport import InMemoryTransport

    root.mkdir(parents=True, exist_ok=True)
    init = save_numpy(root / "initial.safetensors", initial) if initial is not None else None
    cfg = AggregatorConfig(
        run_dir=root / "run", initial_model=init, rounds=rounds, min_sites=2, linger=0.1, strategy=strategy
    )
    agg = Aggregator(cfg)
    agg.start()
    try:
        servicer = Servicer(agg)
        steps = {"site-a": _numpy_site(2, True, 1.0), "site-b": _numpy_site(R, False, 3.0)}
        join_sites(*(SiteThread(None, n, s, transport=InMemoryTransport(servicer)) for n, s in steps.items()))
        assert _finished(agg), "the job did not finish"
        assert agg.error is None, agg.error
    finally:
        agg.stop()
    return cfg.run_dir


def _finished(agg) -> bool:
    deadline = time.monotonic() + 60
    while not agg.finished():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_diff_updates_and_a_restart_give_the_same_run(tmp_path, no_sockets, name):
    g = _global()
    whole = _run(tmp_path / "whole", 2, name, g)
    stopped = _run(tmp_path / "stopped", 1, name, g)  # stopped after round 0, restarted, finished
    _run(tmp_path / "stopped", 2, name)
    for k, want in load_round(whole, 2).items():
        np.testing.assert_array_equal(load_round(stopped, 2)[k], want, err_msg=k)
    # round 1, from the DIFF update of the rank-2 site and the FULL one of the rank-6 site
    got, updates = load_round(whole, 1), [_numpy_site(2, True, 1.0)(0, g)[0], _numpy_site(R, False, 3.0)(0, g)[0]]
    a, b = "m.q.lora_A.weight", "m.q.lora_B.weight"
    full = [{k: _full(k, u[k], g[k], i == 0) for k in (a, b)} for i, u in enumerate(updates)]
    if name == "hetlora":  # slices 0, 1: both sites' (weights 1 and 3); slices 2..5: the rank-6 site's, over 4
        want = np.concatenate([(full[0][a] + 3 * full[1][a][:2]) / 4, 3 * full[1][a][2:] / 4])
        np.testing.assert_allclose(got[a], want, atol=ATOL, rtol=0)
    else:  # the product, and A's rows: sqrt(S) V^T of its SVD, each up to its sign
        m = (full[0][b] @ full[0][a] + 3 * full[1][b] @ full[1][a]) / 4
        np.testing.assert_allclose(got[b] @ got[a], m, atol=ATOL, rtol=0)
        _, sv, vt = np.linalg.svd(m.astype(np.float64))
        for j in (j for j in range(min(R, len(sv))) if sv[j] > 1e-3):
            row = np.sign(got[a][j] @ vt[j]) * got[a][j]
            np.testing.assert_allclose(row, np.sqrt(sv[j]) * vt[j], atol=1e-4, err_msg=f"row {j}")
    with pytest.raises(ConfigError, match=f"made by {name}"):  # the run goes on with the strategy that made it
        _run(tmp_path / "stopped", 3, "fedavg")
