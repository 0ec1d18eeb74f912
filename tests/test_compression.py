"""Compressed transfers (config.py's `update_compression`, `model_compression`; wire/quantize.py's encodings) over a
real aggregator on 127.0.0.1 and real SiteClients: what the aggregate is for each encoding, error feedback over
several rounds, a resumed and a refused upload, a corrupted scale, the bytes that travel, the encoded download, and
the heterogeneous-LoRA strategies fed decoded values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _proxy import FaultProxy
from conftest import SiteThread, join_sites, load_round, save_numpy

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.client.compress import Compression, Packed
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import ConfigError, ProtocolError
from fl_plugins.wire import quantize
from fl_plugins.wire.layout import Manifest, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb

KiB = 1 << 10


def _server(tmp_path: Path, initial: dict[str, np.ndarray], **kw: Any) -> AggregatorServer:
    kw.setdefault("linger", 0.5)
    kw.setdefault("min_sites", 1)
    tmp_path.mkdir(parents=True, exist_ok=True)
    init = save_numpy(tmp_path / "initial.safetensors", initial)
    return AggregatorServer(AggregatorConfig(run_dir=tmp_path / "run", initial_model=init, **kw)).start()


def _updates(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "update"]


def _q(enc: str, x: np.ndarray) -> np.ndarray:
    """x as it arrives encoded with `enc` (float32, x's shape)."""
    return quantize.decode(enc, quantize.encode(enc, x), x.size).reshape(x.shape)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((256, 256)).astype(np.float32),  # encoded
        "h": rng.standard_normal((40, 10)).astype(np.float16),  # encoded as F16 by int8 and nf4, raw under bf16
        "one": np.array([0.5], np.float32),  # too small to gain from a scale: raw under int8 and nf4
        "steps": np.array([7], np.int64),  # raw
    }


def _trained(seed: int):
    """A site's local training: seeded noise added to what it received, FULL, weight 1 + seed."""

    def noise(name: str, r: int, v: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([seed, r, *name.encode()])
        return rng.standard_normal(v.shape).astype(v.dtype) * np.asarray(0.1, v.dtype)

    def step(r: int, p: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, float]:
        out = {k: v + noise(k, r, v) if v.dtype.kind == "f" else v + 1 for k, v in p.items()}
        return out, "FULL", 1.0 + seed

    return step


@pytest.mark.parametrize("enc", ["bf16", "int8", "nf4"])
def test_each_encoding_round_trips_an_update_and_shrinks_what_travels(tmp_path, enc):
    g = _model()
    srv = _server(tmp_path, g, rounds=1, min_sites=2, update_compression=enc)
    try:
        join_sites(*(SiteThread(srv.address, f"site-{k}", _trained(k)) for k in (1, 2)), timeout=60)
    finally:
        srv.stop(0)
    sent = {k: _trained(k)(0, g)[0] for k in (1, 2)}
    weights = {1: 2.0, 2: 3.0}
    got = load_round(tmp_path / "run", 1)
    for name in ("w", "h", "one"):
        if enc == "bf16":  # FULL, each float32 value rounded to bfloat16 (F16 tensors travel as they are)
            q = {k: _q(enc, s[name]) if s[name].dtype == np.float32 else s[name] for k, s in sent.items()}
            want = sum(weights[k] * q[k].astype(np.float32) for k in q) / 5
        else:  # made a DIFF against the received model, encoded (the first round's residual is zero)
            d = {k: s[name].astype(np.float32) - g[name].astype(np.float32) for k, s in sent.items()}
            q = {k: _q(enc, v) if quantize.worth_encoding(enc, "F32", v.size) else v for k, v in d.items()}
            want = g[name].astype(np.float32) + sum(weights[k] * q[k] for k in q) / 5
        tol = 1e-3 if g[name].dtype == np.float16 else 2e-6
        np.testing.assert_allclose(got[name].astype(np.float32), want, atol=tol, rtol=tol, err_msg=name)
    assert got["steps"][0] == 8
    plain = plan_shards([(k, "F32" if v.dtype.kind == "f" else "I64", v.shape) for k, v in g.items()])
    f32_bytes = sum(s.size for s in plain)
    ratio = {"bf16": 0.5, "int8": 0.27, "nf4": 0.145}[enc]
    for rec in _updates(tmp_path / "run"):
        assert rec["params_type"] == ("FULL" if enc == "bf16" else "DIFF"), rec
        assert rec["bytes"] == rec["bytes_received"]
        assert abs(rec["bytes"] / f32_bytes - ratio) < 0.02, (rec["bytes"], f32_bytes)


def test_int8_diffs_with_error_feedback_track_uncompressed_fedavg(tmp_path):
    """In every block of 64 one element moves by 1 per round and the others by 0.001, below half an int8 step
    (1/254): without feedback they would arrive as 0 every round; with it, the global model stays within the last
    residual (half a step) of uncompressed FedAvg's, however many rounds."""
    rounds = 8
    g = {"w": np.zeros(64 * 64, np.float32)}
    delta = np.full(64 * 64, 0.001, np.float32)
    delta[::64] = 1.0

    def step(r: int, p: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, float]:
        return {"w": p["w"] + delta}, "FULL", 1.0

    finals = {}
    for enc in ("none", "int8"):
        srv = _server(tmp_path / enc, g, rounds=rounds, update_compression=enc)
        try:
            join_sites(SiteThread(srv.address, "site-1", step), timeout=60)
        finally:
            srv.stop(0)
        finals[enc] = load_round(tmp_path / enc / "run", rounds)["w"]
    np.testing.assert_allclose(finals["none"], rounds * delta, rtol=1e-5)
    assert np.abs(finals["int8"] - finals["none"]).max() <= 0.5 / 127 * 1.01
    small = np.ones(64 * 64, bool)
    small[::64] = False
    assert finals["int8"][small].min() > 0.003  # they moved, as 0.008 should: no feedback would leave 0


def test_a_resumed_upload_continues_mid_block(tmp_path):
    n = 600_000
    g = {"w": np.linspace(-1, 1, n, dtype=np.float32)}
    size = quantize.encoded_nbytes("int8", n)
    (layout,) = plan_shards([("w", "U8", (size,))])
    bb = quantize.encoding("int8").block_nbytes(64)

    def mid_block(chunk: int) -> bool:  # every chunk boundary (a resume point) falls inside a block
        return all((k * chunk - layout.data_start) % bb for k in range(1, -(-layout.size // chunk)))

    chunk = next(c for c in range(64 * KiB, 65 * KiB, 8) if mid_block(c))
    srv = _server(tmp_path, g, rounds=1, chunk_bytes=chunk, update_compression="int8")
    try:
        with FaultProxy(srv.address, cut_up_after=size // 2) as proxy:
            site = SiteThread(proxy.address, "site-1", lambda r, p: ({"w": p["w"] * np.float32(2)}, "FULL", 1))
            join_sites(site, timeout=60)
            assert proxy.fired["cut"] and proxy.connections >= 2, (proxy.fired, proxy.connections)
        status = srv.aggregator.status()
    finally:
        srv.stop(0)
    (rec,) = _updates(tmp_path / "run")
    assert rec["bytes"] == layout.size and rec["bytes_received"] == layout.size, rec  # nothing sent twice
    assert status["bytes_received"] == layout.size and status["refolds"] == 0, status
    assert site.stats["retries"] >= 1, site.stats
    want = g["w"] + _q("int8", g["w"])  # the DIFF (2w - w) as decoded
    np.testing.assert_allclose(load_round(tmp_path / "run", 1)["w"], want, atol=1e-6)


def _one_round(address: str, name: str, compression: Compression | None = None) -> Exception | None:
    """A site that trains one round (+1 everywhere) with `compression` in place of what Hello set; returns the
    error its upload met (None: accepted)."""
    c = SiteClient(address, name, heartbeat=0.5)
    try:
        c.connect()
        if compression is not None:
            c.transfers.compression = compression
        task = c.next_task(poll=2.0)
        _, params = c.download(task, "numpy")
        try:
            c.upload(task.round, task.attempt, {k: v + 1 for k, v in params.items()}, {"params_type": "FULL"})
        except ProtocolError as e:
            return e
        return None
    finally:
        c.close()


def test_an_encoding_the_job_did_not_set_is_refused(tmp_path):
    srv = _server(tmp_path, {"w": np.zeros(4096, np.float32)}, rounds=1, update_compression="int8")
    try:
        err = _one_round(srv.address, "site-1", Compression("nf4"))
        assert err is not None and "encoded with nf4" in str(err) and "update_compression is int8" in str(err)
        assert _one_round(srv.address, "site-1") is None  # Hello's own setting is accepted
    finally:
        srv.stop(0)


class _CorruptScale(Compression):
    """A site whose encoder writes a NaN scale into the first block of its update."""

    def pack(self, params: Any, envelope: dict[str, Any]) -> Packed:
        packed = super().pack(params, envelope)
        packed.params["w"][:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
        return packed


def test_a_corrupted_scale_is_refused_before_anything_is_folded(tmp_path):
    g = {"w": np.zeros(4096, np.float32)}
    srv = _server(tmp_path, g, rounds=1, min_sites=2, update_compression="int8")
    try:
        good = SiteThread(srv.address, "site-2", lambda r, p: ({"w": p["w"] + 3}, "FULL", 1))
        good.start()
        err = _one_round(srv.address, "site-1", _CorruptScale("int8"))
        good.join(60)
        status = srv.aggregator.status()
    finally:
        srv.stop(0)
    assert good.error is None
    assert isinstance(err, ProtocolError) and "block 0 has scale nan" in str(err), err
    assert status["invalid_updates"] == 1 and status["refolds"] == 0, status  # nothing of it reached the sum
    assert [r["site"] for r in _updates(tmp_path / "run")] == ["site-2"]
    np.testing.assert_array_equal(load_round(tmp_path / "run", 1)["w"], np.full(4096, 3, np.float32))


def test_the_global_model_travels_encoded_and_the_checkpoint_stays_exact(tmp_path):
    g = _model(1)
    srv = _server(tmp_path, g, rounds=2, model_compression="int8")
    received: dict[int, dict[str, np.ndarray]] = {}
    final: dict[str, np.ndarray] = {}
    c = SiteClient(srv.address, "site-1", heartbeat=0.5)
    try:
        c.connect()
        while (task := c.next_task(poll=2.0)).kind != pb.Task.END:
            manifest = Manifest.from_json(task.manifest_json)
            assert sorted(manifest.encoded) == ["h", "w"] and manifest.encoding == "int8"
            _, params = c.download(task, "numpy")
            received[task.round] = {k: np.array(v) for k, v in params.items()}
            c.upload(task.round, task.attempt, {k: v + 1 for k, v in params.items()}, {"params_type": "FULL"})
        assert not Manifest.from_json(task.manifest_json).encoded  # END's final model: the checkpoint's bytes
        final = c.download(task, "numpy")[1]
    finally:
        c.close()
        srv.stop(0)
    run = tmp_path / "run"
    for r in (0, 1):
        ckpt = load_round(run, r)
        for name in ("w", "h"):  # decoded into the tensors' own dtype
            np.testing.assert_array_equal(received[r][name], _q("int8", ckpt[name]).astype(ckpt[name].dtype))
        np.testing.assert_array_equal(received[r]["one"], ckpt["one"])
        assert received[r]["w"].dtype == np.float32 and received[r]["h"].dtype == np.float16
    last = load_round(run, 2)
    np.testing.assert_allclose(last["w"], g["w"] + 2, atol=1e-5)  # the DIFFs, added to the exact model
    np.testing.assert_array_equal(last["steps"], [9])
    for name, v in last.items():
        np.testing.assert_array_equal(final[name], v, err_msg=name)
    kept = {p.name for p in (run / "global").iterdir()}
    assert kept == {"round-00000", "round-00001", "round-00002", "round-00001.int8"}  # round 0's copy removed


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_heterogeneous_lora_strategies_fold_decoded_diffs(tmp_path, strategy):
    """Sites at ranks 2 and 4 of a rank-4 adapter send FULL factors; with int8 they travel as DIFFs against the
    received factors cut to each site's rank. The result matches the uncompressed run's to int8's error."""
    rng = np.random.default_rng(3)
    g = {
        "m.lora_A.weight": rng.standard_normal((4, 64)).astype(np.float32),
        "m.lora_B.weight": rng.standard_normal((32, 4)).astype(np.float32),
        "head.weight": rng.standard_normal((8, 64)).astype(np.float32),
    }

    def site(rank: int):
        def step(r: int, p: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, float]:
            out = {
                "m.lora_A.weight": p["m.lora_A.weight"][:rank] * 1.5,
                "m.lora_B.weight": p["m.lora_B.weight"][:, :rank] * 0.5,
            }
            return {**out, "head.weight": p["head.weight"] + 1}, "FULL", float(rank)

        return step

    results = {}
    for enc in ("none", "int8"):
        srv = _server(tmp_path / enc, g, rounds=1, min_sites=2, strategy=strategy, update_compression=enc)
        try:
            join_sites(*(SiteThread(srv.address, f"site-r{k}", site(k)) for k in (2, 4)), timeout=60)
        finally:
            srv.stop(0)
        results[enc] = load_round(tmp_path / enc / "run", 1)
        assert {r["params_type"] for r in _updates(tmp_path / enc / "run")} == {"DIFF" if enc == "int8" else "FULL"}
    prod = {e: r["m.lora_B.weight"] @ r["m.lora_A.weight"] for e, r in results.items()}
    scale = np.abs(prod["none"]).max()
    np.testing.assert_allclose(prod["int8"], prod["none"], atol=0.02 * scale)
    np.testing.assert_allclose(results["int8"]["head.weight"], results["none"]["head.weight"], atol=1e-5)


def test_settings_and_manifest_checks(tmp_path):
    with pytest.raises(ConfigError, match="must be one of"):
        AggregatorConfig(run_dir=tmp_path, rounds=1, update_compression="zip")
    with pytest.raises(ConfigError, match="does not compress transfers"):
        AggregatorConfig(run_dir=tmp_path, rounds=1, workflow="swarm", model_compression="int8")
    (layout,) = plan_shards([("w", "U8", (quantize.encoded_nbytes("int8", 100),))])
    ok = Manifest([layout], encoded={})
    good = {"w": {"encoding": "int8", "dtype": "BF16", "shape": [10, 10]}}
    for bad, says in [
        ({"w": {"encoding": "int4", "dtype": "BF16", "shape": [10, 10]}}, "an encoding is one of"),
        ({"w": {"encoding": "int8", "dtype": "I64", "shape": [10, 10]}}, "an encoding is one of"),
        ({"w": {"encoding": "int8", "dtype": "F32", "shape": [10, 11]}}, "travels as U8"),
        ({"v": good["w"]}, "no such tensor"),
        ({"w": {**good["w"], "extra": 1}}, "exactly encoding, dtype and shape"),
    ]:
        obj = json.loads(ok.to_json())
        obj["encoded"] = bad
        with pytest.raises(ProtocolError, match=says):
            Manifest.from_json(json.dumps(obj))
    obj = json.loads(ok.to_json())
    obj["encoded"] = good
    m = Manifest.from_json(json.dumps(obj))
    assert m.model_tensors()["w"].dtype == "BF16" and m.model_tensors()["w"].shape == (10, 10)
    assert Manifest.from_json(m.to_json()).encoded == m.encoded
