"""SCAFFOLD (--strategy scaffold; aggregator/scaffold.py, integrations/scaffold.py): control variates beside the
weights, as tensors `scaffold.c.NAME` of the global model and of every update.

* the aggregator: round 0 gets zero control variates (an initial model's, an offered one's), averages them without
  the updates' weights while the model keeps FedAvg's, resumes after a restart, and refuses an update without them
  (or a restart with another strategy) saying what to do;
* a site: the round driver's rule (the correction after each step, c_i⁺ at the round's end) against a float64
  reference of the paper's option II over two rounds, on every rank of a multi-process site too;
* the paper's claim, measured: two sites with heterogeneous least-squares problems, a Lightning site in this process
  and a Hugging Face Trainer site in another, over real aggregators on 127.0.0.1. FedAvg's global model stays far
  from the optimum of the pooled objective (client drift), SCAFFOLD's converges to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SiteThread, join_sites, load_round, save_numpy
from test_driver import ArrayTarget, Scripted

from fl_plugins.aggregator.core import Aggregator, AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer, Servicer
from fl_plugins.aggregator.uploads import check_plan
from fl_plugins.client.transport import InMemoryTransport
from fl_plugins.errors import ConfigError, ModelMismatchError
from fl_plugins.integrations.driver import RoundDriver, TaskKind
from fl_plugins.wire.layout import Manifest, plan_shards

C = "scaffold.c."
TESTS = Path(__file__).resolve().parent


# -- the aggregator ------------------------------------------------------------------------------------------------
def _initial() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "h": np.linspace(-1, 1, 5).astype(np.float16),
        "steps": np.array([4, 8], np.int64),  # no control variate: not floating-point
        "mask": np.array([True, False, True]),
    }


def _full_site(rnd: int, params: dict) -> tuple[dict, str, float]:
    """FULL, weight 1: the model's floats + 1, its control variates c_i⁺ = 1 (w) and 2 (h)."""
    out = {k: v + np.ones((), v.dtype) if v.dtype.kind == "f" else v for k, v in params.items() if C not in k}
    return out | {C + "w": np.full((3, 4), 1, np.float32), C + "h": np.full(5, 2, np.float32)}, "FULL", 1


def _diff_site(rnd: int, params: dict) -> tuple[dict, str, float]:
    """DIFF, weight 3: the model's floats + 2, its control variates the global ones + 5."""
    out = {k: np.full_like(v, 2 if v.dtype.kind == "f" else 0) for k, v in params.items() if C not in k}
    return out | {C + "w": np.full((3, 4), 5, np.float32), C + "h": np.full(5, 5, np.float32)}, "DIFF", 3


def _run(run_dir: Path, rounds: int, steps: dict, initial: dict | None = None, **config) -> Path:
    """A job on a real Aggregator over InMemoryTransport, its sites SiteThreads; returns the run directory."""
    init = save_numpy(run_dir.parent / "initial.safetensors", initial) if initial is not None else None
    cfg = AggregatorConfig(run_dir=run_dir, rounds=rounds, min_sites=len(steps), initial_model=init, linger=0.1,
                           **({"strategy": "scaffold"} | config))  # fmt: skip
    agg = Aggregator(cfg)
    agg.start()
    try:
        servicer = Servicer(agg)
        join_sites(*(SiteThread(None, n, s, transport=InMemoryTransport(servicer)) for n, s in steps.items()))
        deadline = time.monotonic() + 60
        while not agg.finished():
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.02)
        assert agg.error is None, agg.error
    finally:
        agg.stop()
    return run_dir


def test_an_initial_model_gets_zero_control_variates_averaged_unweighted_and_a_restart_resumes(tmp_path, no_sockets):
    run = _run(tmp_path / "run", 1, {"a": _full_site, "b": _diff_site}, _initial())
    g0, g1 = load_round(run, 0), load_round(run, 1)
    assert sorted(k for k in g0 if k.startswith(C)) == [C + "h", C + "w"]  # floating-point tensors only
    for k in ("w", "h"):
        assert g0[C + k].dtype == np.float32 and g0[C + k].shape == _initial()[k].shape and not g0[C + k].any()
    assert (run / "global" / "round-00000" / "scaffold.safetensors").is_file()  # a shard of their own
    table = json.loads((run / "run.json").read_text())["tensors"]
    assert table[C + "w"] == ["F32", [3, 4]] and table[C + "h"] == ["F32", [5]]  # a restart checks them
    # the model: FedAvg's weights (1 and 3); the control variates: the plain mean of c_i⁺ (a DIFF's: c + diff)
    np.testing.assert_allclose(g1["w"], g0["w"] + (1 * 1 + 3 * 2) / 4, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g1[C + "w"], np.full((3, 4), (1 + (0 + 5)) / 2), rtol=0, atol=0)
    np.testing.assert_allclose(g1[C + "h"], np.full(5, (2 + (0 + 5)) / 2), rtol=0, atol=0)
    assert (
        json.loads((run / "global" / "round-00001" / "strategy" / "state.json").read_text())["strategy"] == "scaffold"
    )
    # another strategy does not resume it; the same one goes on from round 1's model and control variates
    with pytest.raises(ConfigError, match="was made by scaffold .* this start asks for fedavg"):
        Aggregator(AggregatorConfig(run_dir=run, rounds=2, min_sites=2))
    _run(run, 2, {"a": _full_site, "b": _diff_site})
    g2 = load_round(run, 2)
    np.testing.assert_allclose(g2["w"], g1["w"] + 1.75, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g2[C + "w"], np.full((3, 4), (1 + (3 + 5)) / 2), rtol=0, atol=0)


def test_an_update_without_control_variates_is_refused_saying_what_to_do(tmp_path, no_sockets):
    def plain(rnd: int, params: dict) -> tuple[dict, str, float]:
        return {k: v for k, v in params.items() if C not in k}, "FULL", 1

    with pytest.raises(ModelMismatchError) as e:
        _run(tmp_path / "run", 1, {"a": plain}, _initial())
    msg = str(e.value)
    assert "lacks SCAFFOLD's control variates ['scaffold.c.h', 'scaffold.c.w'] (2 of 2)" in msg, msg
    assert "Lightning or HF integrations" in msg and "`scaffold.c.*` tensors yourself" in msg, msg


def test_a_fedavg_run_is_not_resumed_as_scaffold_nor_a_cyclic_job_run(tmp_path, no_sockets):
    run = _run(
        tmp_path / "run", 1, {"a": lambda r, p: (p, "FULL", 1)}, {"w": np.zeros(3, np.float32)}, strategy="fedavg"
    )
    with pytest.raises(ConfigError, match="was made by fedavg .* this start asks for scaffold"):
        Aggregator(AggregatorConfig(run_dir=run, rounds=2, strategy="scaffold"))
    with pytest.raises(ConfigError, match="the cyclic workflow trains one site at a time"):
        AggregatorConfig(run_dir=run, rounds=2, strategy="scaffold", workflow="cyclic")


def test_a_submitted_model_may_leave_the_control_variates_out():
    """SUBMIT_MODEL sends the site's model: the control variates are not part of it (an update's must be there)."""

    def manifest(*names: str) -> Manifest:
        return Manifest(plan_shards([(n, "F32", (2,)) for n in names]))

    glob = manifest("w", C + "w")
    check_plan(glob, manifest("w"), "a submission", submitted=True)
    check_plan(glob, manifest("w", C + "w"), "a submission", submitted=True)
    with pytest.raises(ModelMismatchError, match="lacks SCAFFOLD's control variates"):
        check_plan(glob, manifest("w"), "an update")
    with pytest.raises(ModelMismatchError, match=r"missing \['w'\]"):
        check_plan(glob, manifest(C + "w"), "a submission", submitted=True)


# -- a site ---------------------------------------------------------------------------------------------------------
def _net():
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.tensor([1.0, 2.0]))  # travels, is not trained: a zero c_i
            self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # no control variate

        def forward(self, x):
            return self.lin(x) * self.scale

    return Net()


def _other(rnd: int, params: dict) -> tuple[dict, str, float]:
    """Another site: FULL, weight 1, its weights + 0.5 and its c_i⁺ 0.25 (round 0), 0.5 (round 1)."""
    out = {k: v + 0.5 if v.dtype.kind == "f" and C not in k else v for k, v in params.items()}
    return out | {k: np.full_like(v, 0.25 * (rnd + 1)) for k, v in params.items() if C in k}, "FULL", 1


def test_the_sites_rule_is_the_papers_option_two_and_an_offered_model_gets_zero_control_variates(in_memory, no_sockets):
    """Two rounds with a torch model through the real round driver, plain SGD at three learning rates a round: its
    weights after each step and its c_i⁺ equal a float64 reference of the paper (y <- y - lr (g(y) - c_i + c);
    c_i⁺ = c_i - c + (x - y) / Σ lr); round 0's model, offered by this site, gets zero control variates; the
    aggregator then averages the two sites' c_i⁺ without their weights (3 steps here, 1 there)."""
    torch = pytest.importorskip("torch")

    from fl_plugins.integrations._torch import ModuleTarget

    fed = in_memory(rounds=2, min_sites=2, strategy="scaffold")  # no initial model: the driver's site offers its own
    other = SiteThread(None, "other", _other, transport=fed.transport())
    other.start()
    fed.activate("site-1", params_format="torch")
    model, lrs, trained = _net(), [0.1, 0.05, 0.2], ["lin.weight", "lin.bias"]
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)
    opt = torch.optim.SGD(model.lin.parameters(), lr=1.0)
    drv = RoundDriver()
    drv.start()
    mine = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items() if k in trained}
    sent = []
    for _ in range(2):
        assert drv.open_round(ModuleTarget(model))
        assert not any(C in k for k in drv.model.params)  # split off before loading, never loaded
        c = {k: drv.variates[C + k].double() for k in trained}  # the round's control variates c
        start = {k: model.state_dict()[k].double().clone() for k in trained}
        ref = _net().double()
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        for lr in lrs:
            for m, o in ((model, opt), (ref, None)):
                m.zero_grad()
                torch.nn.functional.mse_loss(m(x.to(m.lin.weight.dtype)), y.to(m.lin.weight.dtype)).backward()
                if o is not None:
                    o.param_groups[0]["lr"] = lr
                    o.step()
                    drv.step_ended(lr)
            with torch.no_grad():
                for k, p in ref.named_parameters():
                    p -= lr * (p.grad + c[k] - mine[k])
            for k, p in ref.named_parameters():
                torch.testing.assert_close(model.state_dict()[k].double(), p.detach(), atol=1e-6, rtol=0)
        drv.end_round()
        mine = {k: mine[k] - c[k] + (start[k] - ref.state_dict()[k]) / sum(lrs) for k in trained}
        for k in trained:
            torch.testing.assert_close(drv.corrections.scaffold.own[k].double(), mine[k], atol=1e-5, rtol=0)
        sent.append(({k: model.state_dict()[k].double().clone() for k in trained}, mine))
    other.join(30)
    assert not other.is_alive() and other.error is None
    fed.wait()
    g0, g1, g2 = (load_round(fed.run_dir, r) for r in range(3))
    assert sorted(k for k in g0 if C in k) == [C + "lin.bias", C + "lin.weight", C + "scale"]
    assert all(not g0[k].any() for k in g0 if C in k)
    for g, r, prev in ((g1, 0, g0), (g2, 1, g1)):
        for k in trained:  # c⁺: the plain mean; the model: weighted by the steps (3 here, 1 at the other site)
            weights, variates = sent[r]
            np.testing.assert_allclose(g[C + k], (variates[k].numpy() + 0.25 * (r + 1)) / 2, rtol=0, atol=1e-6)
            np.testing.assert_allclose(g[k], (3 * weights[k].numpy() + prev[k] + 0.5) / 4, rtol=0, atol=1e-6)
        # an untrained tensor (a buffer): this site sends a zero control variate for it
        np.testing.assert_allclose(g[C + "scale"], np.full(2, 0.25 * (r + 1) / 2), rtol=0, atol=0)


@pytest.fixture
def rank_one():
    """This process is rank 1 of a multi-process site: it never talks to the aggregator."""
    import fl_plugins.client as flare
    from fl_plugins.client import session
    from fl_plugins.client.session import ClientSession

    session.activate(ClientSession(None, rank=1))
    yield
    flare.shutdown()


class Handing(Scripted):
    """Rank 1's Collective: rank 0's values in turn, and rank 0's tensors copied into this rank's."""

    def __init__(self, *script, tensors: list) -> None:
        super().__init__(*script)
        self.given = tensors

    def broadcast_tensors(self, tensors) -> None:
        tensors = list(tensors)
        for t, v in zip(tensors, self.given.pop(0), strict=True):
            t.copy_(v)
        self.tensors.append(tensors)


def test_every_rank_corrects_its_weights_with_rank_zeros_correction(rank_one):
    """Multi-process training: rank 0 says the round is a SCAFFOLD round and broadcasts c - c_i; the other ranks
    apply it after each step, so every replica stays the same."""
    torch = pytest.importorskip("torch")

    from fl_plugins.integrations._torch import ModuleTarget

    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corr = [torch.tensor([[1.0, 2, 3], [4, 5, 6]]), torch.tensor([-1.0, 1])]
    coll = Handing({"round": 1, "total_rounds": 2, "scaffold": True}, tensors=[list(before.values()), corr])
    drv = RoundDriver()
    drv.start(rank=1)
    assert drv.open_round(ModuleTarget(model), collective=coll)
    assert [list(t.shape) for t in coll.tensors[1]] == [[2, 3], [2]]  # lin.weight and lin.bias only
    drv.step_ended(0.5)
    torch.testing.assert_close(model.lin.weight, before["lin.weight"] - 0.5 * corr[0])
    torch.testing.assert_close(model.lin.bias, before["lin.bias"] - 0.5 * corr[1])
    assert torch.equal(model.scale, before["scale"])


def test_an_evaluation_of_a_scaffold_global_model_loads_the_model_alone(in_memory, no_sockets):
    fed = in_memory(rounds=1, initial={"w": np.full(2, 5, np.float32)}, workflow="evaluate", strategy="scaffold")
    fed.activate("site-1")
    target = ArrayTarget(w=np.zeros(2, np.float32))
    drv = RoundDriver()
    drv.start()
    assert drv.open_task(target) is TaskKind.EVALUATE
    drv.begin_evaluation(target)
    np.testing.assert_array_equal(target.arrays["w"], np.full(2, 5, np.float32))
    drv.end_evaluation(target, {"loss": 0.5})
    drv.next_iteration()
    assert not drv.is_running()
    fed.wait()


# -- the paper's claim, measured --------------------------------------------------------------------------------------
# Two sites with least-squares problems whose features are scaled (2, 0.3) at one site and (0.3, 2) at the other,
# and whose targets come from different lines: their Hessians differ, so many local steps drift each site toward its
# own optimum along its own stiff direction, and FedAvg settles where those drifts balance, not at the optimum of the
# pooled objective (the mean of the two site losses). SCAFFOLD's correction replaces each site's gradient drift by
# the global one, so its fixed point is the pooled optimum. Full-batch SGD at a constant rate makes every run
# deterministic: the float64 simulation of the paper's algorithm below (the paper's rules, not this code) predicts,
# after 10 rounds of 20 steps at lr 0.1, FedAvg 0.56 from the optimum (already at its fixed point from round 5 on, so
# not a matter of rounds) and SCAFFOLD 0.005, ~120 times closer; both runs must also match their simulation.
K, LR, ROUNDS, ROWS = 20, 0.1, 10, 32


def _problem() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for scale, w, b in [((2.0, 0.3), (1.0, -2.0), 0.5), ((0.3, 2.0), (-1.5, 1.0), -0.5)]:
        x = (rng.standard_normal((ROWS, 2)) * scale).astype(np.float32)
        out.append((x, (x.astype(np.float64) @ np.array(w) + b).astype(np.float32)))
    return out


def _simulate(problem: list, scaffold: bool) -> np.ndarray:
    """The global model (w1, w2, b) after ROUNDS rounds of FedAvg, or of SCAFFOLD (option II, η_g = 1), in float64."""

    def grad(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = x @ p[:2] + p[2] - y
        return np.concatenate([2 * x.T @ r / len(y), [2 * r.mean()]])

    x, c, ci = np.zeros(3), np.zeros(3), [np.zeros(3) for _ in problem]
    for _ in range(ROUNDS):
        ys, new = [], []
        for i, (a, b) in enumerate(problem):
            y = x.copy()
            for _ in range(K):
                y -= LR * (grad(y, a.astype(np.float64), b.astype(np.float64)) + (c - ci[i] if scaffold else 0))
            ys.append(y)
            new.append(ci[i] - c + (x - y) / (K * LR))
        x = np.mean(ys, axis=0)
        if scaffold:
            ci, c = new, np.mean(new, axis=0)
    return x


def _lightning_site(srv: AggregatorServer, site, x: np.ndarray, y: np.ndarray) -> None:
    """A Lightning site: full-batch SGD, K steps a round (one fit: K batches of the same rows)."""
    import lightning.pytorch as L
    import torch

    import fl_plugins.lightning as flare

    class Line(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]).squeeze(-1), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    rows = torch.utils.data.TensorDataset(torch.from_numpy(x).repeat(K, 1), torch.from_numpy(y).repeat(K))
    loader = torch.utils.data.DataLoader(rows, batch_size=ROWS, shuffle=False)
    site(srv, "lightning")
    module = Line()
    tr = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    flare.patch(tr)
    while flare.is_running():
        flare.receive()
        tr.fit(module, train_dataloaders=loader)
    flare.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_scaffold_removes_the_client_drift_that_keeps_fedavg_from_the_pooled_optimum(tmp_path, site):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    problem = _problem()
    pooled = np.linalg.lstsq(
        np.concatenate([np.c_[x, np.ones(ROWS)] for x, _ in problem]).astype(np.float64),
        np.concatenate([y for _, y in problem]).astype(np.float64),
        rcond=None,
    )[0]
    zeros = {"net.weight": np.zeros((1, 2), np.float32), "net.bias": np.zeros(1, np.float32)}
    init = save_numpy(tmp_path / "initial.safetensors", zeros)
    servers = {}
    for name in ("fedavg", "scaffold"):
        cfg = AggregatorConfig(
            run_dir=tmp_path / name, rounds=ROUNDS, min_sites=2, initial_model=init, strategy=name, linger=0.5
        )
        servers[name] = AggregatorServer(cfg).start()
    np.savez(tmp_path / "hf.npz", x=problem[1][0], y=problem[1][1])
    argv = [str(TESTS / "_scaffold_hf_site.py"), str(tmp_path / "hf.npz"), str(K), str(LR)]
    addresses = [s.address for s in servers.values()]
    hf = subprocess.Popen(
        [sys.executable, *argv, *addresses], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(hf.communicate()[0]), daemon=True)
    reader.start()
    try:
        for srv in servers.values():
            _lightning_site(srv, site, *problem[0])
            assert srv.wait() == 0
        reader.join(120)
        assert hf.returncode == 0, out
    finally:
        hf.kill()
        for srv in servers.values():
            srv.stop(0)
    got, dist = {}, {}
    for name in servers:
        final = load_round(tmp_path / name, ROUNDS)
        got[name] = np.concatenate([final["net.weight"].reshape(-1), final["net.bias"]]).astype(np.float64)
        dist[name] = float(np.linalg.norm(got[name] - pooled))
        records = map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        updates = [(u["round"], u["site"], u["weight"]) for u in records if u["event"] == "update"]
        assert sorted(updates) == [(r, s, K) for r in range(ROUNDS) for s in ("hf", "lightning")]
    ratio = dist["fedavg"] / dist["scaffold"]
    print(
        f"\ndistance to the pooled optimum {pooled.round(4)} after {ROUNDS} rounds of {K} steps: "
        f"FedAvg {dist['fedavg']:.4f}, SCAFFOLD {dist['scaffold']:.2e} ({ratio:.0f}x closer)"
    )
    for name, scaffold in (("fedavg", False), ("scaffold", True)):  # both integrations follow the paper's rules
        np.testing.assert_allclose(got[name], _simulate(problem, scaffold), rtol=0, atol=1e-4, err_msg=name)
    assert dist["fedavg"] > 0.4  # client drift: FedAvg stays away from the pooled optimum
    assert dist["scaffold"] < 0.02 and ratio > 20
