"""Swarm learning over the wire (docs/swarm.md): a real mTLS aggregator that runs the job and relays sealed
transfers, three sites whose FLARE-style loops do not change, one of which folds each round.

The sites' "training" is a fixed numpy step, so the global models the swarm makes can be checked against FedAvg:
the aggregator site folds the counted updates in the sites' name order with the service's own fold, so a fold in
that order (here) gives the same bits, and a FedAvg job (whose fold order is the order chunks arrive) the same
values to float32 rounding."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_plugins.aggregator.optimizers import FedAvg
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.client.model import FLModel
from fl_plugins.client.session import ClientSession
from fl_plugins.config import AggregatorConfig
from fl_plugins.record_files import read_records
from fl_plugins.records import RoundRecord, SwarmRecord, UpdateRecord
from fl_plugins.security.provision import Kits, provision_local
from fl_plugins.security.seal import entropy_bits
from fl_plugins.security.tls import load_server_kit, load_site_kit
from fl_plugins.wire.layout import TensorInfo, dtype_of_numpy
from tests.conftest import save_numpy

pytestmark = pytest.mark.integration

SITES = ("site-1", "site-2", "site-3")
WEIGHTS = {"site-1": 1.0, "site-2": 2.0, "site-3": 3.0}
ROUNDS = 3


def initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal(33).astype(np.float32),
        "steps": np.array([5], dtype=np.int64),
    }


def step(site: str, r: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's deterministic "training": each site pulls the weights its own way."""
    k = SITES.index(site) + 1
    out = {n: np.asarray(v).copy() for n, v in params.items()}
    out["w"] = (out["w"] * np.float32(1 + 0.01 * k) + np.float32(0.001 * (r + 1))).astype(np.float32)
    out["b"] = (out["b"] - np.float32(0.1 * k)).astype(np.float32)
    out["steps"] = out["steps"] + k
    return out


def expected_rounds(start: dict[str, np.ndarray], rounds: int) -> list[dict[str, np.ndarray]]:
    """Round r+1's global model: the service's FedAvg fold of round r's updates in the sites' name order."""
    models = [start]
    for r in range(rounds):
        tensors = [TensorInfo(n, dtype_of_numpy(v.dtype), tuple(v.shape), 0, v.nbytes) for n, v in start.items()]
        fold = FedAvg(tensors)
        for site in SITES:
            upd = step(site, r, models[-1])
            for t in tensors:
                fold.fold(t, 0, memoryview(np.ascontiguousarray(upd[t.name]).reshape(-1).view(np.uint8)), WEIGHTS[site])
            fold.add_weight(WEIGHTS[site], "FULL")
        models.append({t.name: np.concatenate(list(fold.finalize(t, None))).reshape(t.shape) for t in tensors})
    return models


def load_files(directory: Path) -> dict[str, np.ndarray]:
    """A model folder's safetensors shards, read with the safetensors library (what a user would do)."""
    from safetensors.numpy import load_file

    return {k: v for p in sorted(directory.glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Kits:
    return provision_local(tmp_path_factory.mktemp("swarm") / "kits", list(SITES))


def server(tmp_path: Path, kits: Kits, address: str | None = None, **kw: Any) -> AggregatorServer:
    kw.setdefault("initial_model", save_numpy(tmp_path / "initial.safetensors", initial()))
    cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=ROUNDS, min_sites=3, workflow="swarm", linger=0.5, **kw)
    return AggregatorServer(cfg, address, kit=load_server_kit(kits.server))


class SwarmSiteThread(threading.Thread):
    """A FLARE client-API loop (receive, train, send) for one site, unchanged from a FedAvg job's."""

    def __init__(self, address: str, kits: Kits, site: str, offer: bool = False) -> None:
        super().__init__(daemon=True, name=site)
        self.address, self.kit, self.site, self.offer = address, load_site_kit(kits.sites[site]), site, offer
        self.received: dict[int, dict[str, np.ndarray]] = {}
        self.error: BaseException | None = None
        self.session: ClientSession | None = None

    def run(self) -> None:
        try:
            s = self.session = ClientSession.open(self.address, self.site, params_format="numpy", kit=self.kit)
            if self.offer:
                s.allow_offer_initial()
            while s.is_running():
                model = s.receive()
                if model is None:
                    break
                if model.params is None:  # round 0's weights are asked of this site
                    model = s.offer_initial(initial())
                    assert model is not None
                r = int(model.current_round or 0)
                self.received[r] = {k: np.array(v) for k, v in model.params.items()}
                meta = {"NUM_STEPS_CURRENT_ROUND": WEIGHTS[self.site]}
                metrics = {"accuracy": 0.5 + 0.1 * SITES.index(self.site) + 0.01 * r}
                s.send(FLModel(params=step(self.site, r, model.params), meta=meta, metrics=metrics))
            s.close()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e


def run_swarm(address: str, kits: Kits, timeout: float = 60, offer: str = "") -> dict[str, SwarmSiteThread]:
    sites = {n: SwarmSiteThread(address, kits, n, offer=n == offer) for n in SITES}
    for t in sites.values():
        t.start()
    for t in sites.values():
        t.join(timeout)
        assert not t.is_alive(), f"{t.site} did not finish within {timeout} s"
    for t in sites.values():
        if t.error is not None:
            raise t.error
    return sites


def test_a_swarm_job_makes_fedavgs_models_with_the_sites_folding_in_turn(tmp_path, kits, monkeypatch):
    monkeypatch.chdir(tmp_path)  # each site's output folder: ./fl-output/JOB/SITE
    with server(tmp_path, kits) as srv:
        sites = run_swarm(srv.address, kits)
    want = expected_rounds(initial(), ROUNDS)
    for r in range(ROUNDS):  # every site trained on the same global model, FedAvg's in the sites' order, bit for bit
        for t in sites.values():
            for name, value in want[r].items():
                np.testing.assert_array_equal(t.received[r][name], value, err_msg=f"{t.site} round {r} {name}")
    recs = read_records(tmp_path / "run" / "metrics.jsonl")
    swarm = [rec for rec in recs if isinstance(rec, SwarmRecord)]
    assert [rec.site for rec in swarm] == ["site-1", "site-2", "site-3"]  # round robin, in name order
    assert all(rec.updates == SITES and rec.bytes_relayed and rec.bytes_relayed > 0 for rec in swarm)
    assert [rec.round for rec in recs if isinstance(rec, RoundRecord)] == list(range(ROUNDS))
    assert len([rec for rec in recs if isinstance(rec, UpdateRecord)]) == ROUNDS * len(SITES)
    # every site keeps the final model, and the received model that scored best on its data (the metrics it sent)
    job = json.loads((tmp_path / "run" / "run.json").read_text())["job_id"]
    for site in SITES:
        out = tmp_path / "fl-output" / job / site
        final = load_files(out / "final")
        assert final.keys() == want[ROUNDS].keys()
        for name, value in want[ROUNDS].items():
            np.testing.assert_array_equal(final[name], value)
        best = json.loads((out / "best" / "best.json").read_text())
        assert best["round"] == ROUNDS - 1 and best["metric"] == "accuracy"  # the score rises each round
        for name, value in load_files(out / "best").items():
            np.testing.assert_array_equal(value, want[ROUNDS - 1][name])
        kept = sorted(p.name for p in (out / "global").iterdir())  # the last two it received (or fetched)
        assert len(kept) == 2 and "round-00002" in kept, kept
    assert not list((tmp_path / "run").glob("global/round-0000[1-9]*"))  # the aggregator wrote no global model


def test_a_restarted_aggregator_resumes_the_swarm_from_its_last_sealed_model(tmp_path, kits, monkeypatch):
    """The aggregator stops with round 1 open (its model sealed in the relay's spool, named in RUN_DIR/swarm.json)
    and starts again on the same run directory: the sites reconnect and the job ends with the same models."""
    monkeypatch.chdir(tmp_path)
    first = server(tmp_path, kits).start()
    opened = threading.Event()
    real_open = first.aggregator._open

    def open_and_tell(model: Any) -> None:
        real_open(model)
        if model.round == 1:
            opened.set()

    monkeypatch.setattr(first.aggregator, "_open", open_and_tell)
    sites = {n: SwarmSiteThread(first.address, kits, n) for n in SITES}
    for t in sites.values():
        t.start()
    assert opened.wait(60)
    first.stop(0)  # round 1 is open, its model at the relay: the aggregator goes away
    with server(tmp_path, kits, address=first.address) as again:
        assert again.aggregator.rounds.round == 1 and again.aggregator.model.transfer
        for t in sites.values():
            t.join(90)
            assert not t.is_alive() and t.error is None, (t.site, t.error)
    want = expected_rounds(initial(), ROUNDS)
    for t in sites.values():
        for r in range(ROUNDS):
            for name, value in want[r].items():
                np.testing.assert_array_equal(t.received[r][name], value, err_msg=f"{t.site} round {r} {name}")
    recs = read_records(tmp_path / "run" / "metrics.jsonl")
    assert sorted({rec.round for rec in recs if isinstance(rec, SwarmRecord)}) == list(range(ROUNDS))


def test_sites_with_an_inbound_port_take_their_updates_directly(tmp_path, kits, monkeypatch):
    """FL_INBOUND: every site serves its inbound port (mTLS with its site certificate); the updates go straight to
    the round's aggregator site and only the global models pass the aggregator's relay. Same models, bit for bit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_INBOUND", "127.0.0.1:0")
    relayed: dict[str, int] = {}
    with server(tmp_path, kits) as srv:
        relay = srv.aggregator.relay

        def capture(transfer_id: str, record: bytes) -> None:
            t = relay.transfer(transfer_id)
            relayed[t.purpose if t else "?"] = relayed.get(t.purpose if t else "?", 0) + len(record)

        relay.on_record = capture
        sites = run_swarm(srv.address, kits)
    want = expected_rounds(initial(), ROUNDS)
    for t in sites.values():
        for r in range(ROUNDS):
            for name, value in want[r].items():
                np.testing.assert_array_equal(t.received[r][name], value, err_msg=f"{t.site} round {r} {name}")
    assert set(relayed) == {"model"}, relayed  # no update passed the relay
    recs = [rec for rec in read_records(tmp_path / "run" / "metrics.jsonl") if isinstance(rec, SwarmRecord)]
    model_bytes = sum(v.nbytes for v in initial().values())
    for rec in recs:  # each round: 3 updates direct, one sealed model through the relay
        assert rec.bytes_direct and rec.bytes_direct > 3 * model_bytes, rec
        assert rec.bytes_relayed and model_bytes < rec.bytes_relayed < 2 * model_bytes, rec


def test_an_inbound_port_that_cannot_be_reached_falls_back_to_the_relay(tmp_path, kits, monkeypatch, caplog):
    """site-2 announces an inbound port nobody can reach: the updates of round 1 (site-2 folds it) go through the
    relay after a failed direct try, and the job makes the same models."""
    import logging

    from fl_plugins.aggregator.swarm import SwarmAggregator
    from fl_plugins.swarm import site as swarm_site

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_INBOUND", "127.0.0.1:0")
    monkeypatch.setattr(swarm_site, "DIRECT_RETRY", 1.0)
    hello = SwarmAggregator.hello

    def unreachable(self: SwarmAggregator, site: str, can_offer: bool, cert: Any = None, inbound: str = "") -> Any:
        return hello(self, site, can_offer, cert, "127.0.0.1:9" if site == "site-2" and inbound else inbound)

    monkeypatch.setattr(SwarmAggregator, "hello", unreachable)
    caplog.set_level(logging.WARNING, logger="fl_plugins.swarm.site")
    with server(tmp_path, kits) as srv:
        sites = run_swarm(srv.address, kits)
    want = expected_rounds(initial(), ROUNDS)
    for t in sites.values():
        np.testing.assert_array_equal(t.received[ROUNDS - 1]["w"], want[ROUNDS - 1]["w"])
    recs = [rec for rec in read_records(tmp_path / "run" / "metrics.jsonl") if isinstance(rec, SwarmRecord)]
    assert [rec.site for rec in recs] == list(SITES) and recs[1].bytes_direct == 0 and recs[0].bytes_direct
    assert any("inbound port 127.0.0.1:9 did not take the update" in r.getMessage() for r in caplog.records)


def test_a_site_that_falsely_says_it_will_not_seal_for_the_aggregator_site_sits_the_round_out(
    tmp_path, kits, monkeypatch
):
    """site-3 tells the aggregator it will not seal its round-1 update for site-2 (the round's aggregator site),
    whose certificate is sound: the aggregator checks it itself, fails nobody over, and site-3 sits the round out
    (its update is refused); the round folds site-1's and site-2's, and the job ends."""
    from fl_plugins.swarm.site import SwarmSite

    monkeypatch.chdir(tmp_path)
    send, said = SwarmSite.send, []

    def lying_first(self: SwarmSite, task: Any, params: dict, envelope: dict) -> Any:
        if self.client.site == "site-3" and task.round == 1 and not said:
            said.append(self.client.send_result(task.round, task.transfer_id, {"meta": {"error": "made up"}}).message)
        return send(self, task, params, envelope)

    monkeypatch.setattr(SwarmSite, "send", lying_first)
    with server(tmp_path, kits) as srv:
        run_swarm(srv.address, kits)
        assert not srv.aggregator.failed
    assert said == ["site 'site-2''s certificate is sound: sit this round out"]
    recs = [rec for rec in read_records(tmp_path / "run" / "metrics.jsonl") if isinstance(rec, SwarmRecord)]
    assert [rec.updates for rec in recs] == [SITES, ("site-1", "site-2"), SITES]


def test_the_aggregator_relays_ciphertext_only(tmp_path, kits, monkeypatch):
    monkeypatch.chdir(tmp_path)
    captured: list[bytes] = []
    with server(tmp_path, kits) as srv:
        srv.aggregator.relay.on_record = lambda transfer_id, record: captured.append(bytes(record))
        sites = run_swarm(srv.address, kits)
    plain = [v.tobytes() for t in sites.values() for m in t.received.values() for v in m.values() if v.nbytes >= 64]
    blob = b"".join(captured)
    assert len(blob) > sum(len(p) for p in plain[:3])
    for p in plain:  # no 16-byte window of any model the sites trained on or sent
        for i in range(0, len(p) - 16, 997):
            assert p[i : i + 16] not in blob
    assert entropy_bits(blob) > 7.9


def test_the_aggregator_site_policies():
    from fl_plugins.aggregator.swarm_state import choose

    sites = ["site-1", "site-2", "site-3"]
    assert [choose("round_robin", 0, "accuracy", r, sites, [])[0] for r in range(4)] == [*sites, "site-1"]
    picks = [choose("random", 7, "accuracy", r, sites, []) for r in range(6)]
    assert picks == [choose("random", 7, "accuracy", r, sites, []) for r in range(6)]  # seeded: the same again
    assert {p[0] for p in picks} <= set(sites) and all(p[1] == "random (seed 7)" for p in picks)
    history = [{"site": "site-1", "metrics": {"accuracy": 0.7, "loss": 0.3}},
               {"site": "site-2", "metrics": {"accuracy": 0.9, "loss": 0.5}},
               {"site": "site-3", "metrics": {"loss": 0.2}}]  # fmt: skip
    assert choose("best_metric", 0, "accuracy", 5, sites, history) == ("site-2", "best accuracy: 0.9")
    assert choose("best_metric", 0, "-loss", 5, sites, history) == ("site-3", "best -loss: 0.2")
    assert choose("best_metric", 0, "f1", 1, sites, history)[0] == "site-2"  # nobody reported it: round robin
    assert choose("best_metric", 0, "accuracy", 1, ["site-1", "site-3"], history)[0] == "site-1"  # among the eligible
    assert choose("round_robin", 0, "accuracy", 0, [], history) is None
