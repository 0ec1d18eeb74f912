"""Round R+1's global model served from the accumulator's memory while its checkpoint is written (finished.py).

The promises: what a site downloads is the checkpoint that becomes durable, byte for byte, whether it reads it
from memory, from the files, or from both (a stream that spans the switch); round R+1's folds wait until the
memory is no longer served and the accumulator is reset; every dtype's rule holds on this path; a checkpoint
that cannot be written stops the aggregator and serves nothing more. The window between the round opening and
the files being written is widened by holding the checkpoint's thread, never by sleeping.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from conftest import SiteThread, join_sites

from fl_plugins.aggregator import finished as finished_mod
from fl_plugins.aggregator.uploads import Gate
from fl_plugins.wire.stream import ShardReceiver, ShardSender

BF16 = np.dtype(ml_dtypes.bfloat16)


def load(path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as numpy arrays (bf16 ones through torch, which safetensors.numpy cannot read)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for k, v in load_file(str(path)).items():
        out[k] = v.view(torch.uint16).numpy().view(BF16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def adds(x: float):
    def step(r, p):
        out = {}
        for k, v in p.items():
            out[k] = v if v.dtype == np.bool_ else (v.astype(np.float64) + x).astype(v.dtype)
        return out, "FULL", 1

    return step


def test_every_dtype_goes_through_memory_and_matches_its_checkpoint(server_factory):
    """Rounds 1 and 2 are served from memory (round 3, the last, is written first): what sites receive is the
    average by each dtype's rule, and equals the checkpoint on disk. Small chunks make chunks span tensors."""
    initial = {
        "w": np.linspace(-1, 1, 40_000, dtype=np.float32),
        "h": np.linspace(0, 4, 50_001).astype(BF16),
        "d": np.array([1.0, 2.0, 3.0], np.float64),
        "n": np.array(7, np.int64),
        "u": np.array([5, 6, 7], np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros(0, np.float32),
    }
    srv = server_factory(rounds=3, min_sites=2, initial=initial, chunk_bytes=64 << 10)
    a, b = SiteThread(srv.address, "a", adds(1)), SiteThread(srv.address, "b", adds(3))
    join_sites(a, b)
    assert srv.wait() == 0, srv.aggregator.error
    run = srv.aggregator.config.run_dir
    want = {k: np.array(v) for k, v in initial.items()}
    for r in (1, 2, 3):
        want = {k: v if v.dtype == np.bool_ else (v.astype(np.float64) + 2).astype(v.dtype) for k, v in want.items()}
        on_disk = load(run / "global" / f"round-{r:05d}" / "initial.safetensors")
        for k, v in want.items():
            got = on_disk[k]
            np.testing.assert_allclose(got.astype(np.float64), v.astype(np.float64), rtol=1e-2, err_msg=k)
            if r < 3:
                for site in (a, b):
                    assert site.received[r][k].tobytes() == on_disk[k].tobytes(), k


class WatchedGate(Gate):
    """The fold gate, saying when a fold had to wait for a close."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            if self._exclusive:
                self.waited.set()
        with super().shared():
            yield


def test_a_download_spanning_the_switch_and_folds_waiting_for_the_reset(server_factory, monkeypatch):
    go, switched = threading.Event(), threading.Event()
    write, to_files = finished_mod.Finished.write, finished_mod.Finished.to_files

    def held_write(self, tmp):
        assert go.wait(60), "the test never let the checkpoint be written"
        return write(self, tmp)

    def watched_to_files(self, paths):
        to_files(self, paths)
        switched.set()

    monkeypatch.setattr(finished_mod.Finished, "write", held_write)
    monkeypatch.setattr(finished_mod.Finished, "to_files", watched_to_files)
    initial = {"w": np.arange(1 << 16, dtype=np.float32), "v": np.ones(100, np.float32)}
    srv = server_factory(rounds=2, min_sites=2, initial=initial, chunk_bytes=64 << 10)
    agg = srv.aggregator
    agg.gate = gate = WatchedGate()
    a, b = SiteThread(srv.address, "a", adds(1)), SiteThread(srv.address, "b", adds(3))
    a.start(), b.start()
    with agg.lock:
        assert agg.lock.wait_for(lambda: agg.round == 1 or agg.error is not None, 60), "round 1 never opened"
        memory = agg.memory_model
    assert memory is not None, agg.error
    manifest, source, digests = agg.global_source(1)
    shard_file = agg.serving / manifest.shards[0].name
    got = bytearray()

    class Keep:
        def header(self, shard, prefix):
            got.extend(prefix)

        def data(self, shard, tensor, lo, payload):
            got.extend(payload)

    rx = ShardReceiver(manifest, 0, Keep())
    frames = ShardSender(manifest, 0, source, digests[0]).frames()
    rx.accept(next(frames))  # from memory: nothing is written yet
    assert not shard_file.exists()
    assert gate.waited.wait(60), "no fold of round 1 reached the gate"  # a site's update waits for the reset
    assert not agg.counted
    go.set()
    assert switched.wait(60)
    for frame in frames:  # the rest from the files, checked against the same digests
        rx.accept(frame)
    rx.finish(manifest.shards[0].digest)
    assert source._fds is not None  # the stream did switch
    source.close()
    for s in (a, b):
        s.join(60)
        assert not s.is_alive() and s.error is None, s.error
    assert srv.wait() == 0, agg.error
    run = agg.config.run_dir
    assert bytes(got) == (run / "global" / "round-00001" / manifest.shards[0].name).read_bytes()
    final = load(run / "global" / "round-00002" / manifest.shards[0].name)
    np.testing.assert_array_equal(final["w"], initial["w"] + 4)  # the folds after the reset all counted
    np.testing.assert_array_equal(final["v"], initial["v"] + 4)


def test_a_checkpoint_that_cannot_be_written_stops_the_aggregator(server_factory, monkeypatch):
    def full_disk(self, tmp):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finished_mod.Finished, "write", full_disk)
    srv = server_factory(rounds=3, min_sites=2, initial={"w": np.zeros(64, np.float32)})
    sites = [SiteThread(srv.address, n, adds(1)) for n in "ab"]
    for s in sites:
        s.start()
    assert srv.wait() == 1
    assert "No space left on device" in str(srv.aggregator.error)
    for s in sites:
        s.join(60)
        assert not s.is_alive()
    run = srv.aggregator.config.run_dir
    assert not (run / "global" / "round-00001").exists()
    assert not (run / "global" / "round-00002").exists()


def test_an_accumulator_on_disk_gives_the_same_model_and_leaves_no_file(server_factory, tmp_path, caplog):
    """`accumulator_dir`: the sums live in an unlinked file there (a model larger than memory); the rounds give
    the model the in-memory accumulator gives, and the folder is left empty."""
    initial = {"w": np.arange(1 << 16, dtype=np.float32), "n": np.array(7, np.int64), "m": np.array([True, False])}
    where = tmp_path / "acc"
    with caplog.at_level("INFO", logger="fl_plugins.aggregator.core"):
        srv = server_factory(rounds=3, min_sites=2, initial=initial, accumulator_dir=where)
        join_sites(SiteThread(srv.address, "a", adds(1)), SiteThread(srv.address, "b", adds(3)))
        assert srv.wait() == 0, srv.aggregator.error
    assert f"is a file in {where}" in caplog.text
    assert list(where.iterdir()) == []
    final = load(srv.aggregator.config.run_dir / "global" / "round-00003" / "initial.safetensors")
    np.testing.assert_array_equal(final["w"], initial["w"] + 6)
    assert final["n"] == 13 and final["m"].tolist() == [True, False]


def test_keep_rounds_keeps_round_0_and_the_latest(server_factory):
    """`keep_rounds` 2 over 6 rounds: round 0 (the initial model) and the 2 latest rounds stay, and hold exactly
    what they should; the others were deleted as newer ones became durable."""
    initial = {"w": np.arange(1 << 16, dtype=np.float32), "h": np.linspace(0, 1, 999).astype(BF16)}
    srv = server_factory(rounds=6, min_sites=2, initial=initial, keep_rounds=2)
    a, b = SiteThread(srv.address, "a", adds(1)), SiteThread(srv.address, "b", adds(3))
    join_sites(a, b)
    assert srv.wait() == 0, srv.aggregator.error
    g = srv.aggregator.config.run_dir / "global"
    assert sorted(p.name for p in g.iterdir()) == ["round-00000", "round-00005", "round-00006"]
    for r in (5, 6):
        got = load(g / f"round-{r:05d}" / "initial.safetensors")
        np.testing.assert_array_equal(got["w"], initial["w"] + 2 * r)
    assert a.received[5]["w"].tobytes() == load(g / "round-00005" / "initial.safetensors")["w"].tobytes()
    assert load(g / "round-00000" / "initial.safetensors")["w"].tobytes() == initial["w"].tobytes()


def test_swarm_refuses_the_aggregators_own_storage_settings(tmp_path):
    import pytest

    from fl_plugins.config import AggregatorConfig
    from fl_plugins.errors import ConfigError

    for kw in ({"keep_rounds": 2}, {"accumulator_dir": tmp_path}):
        with pytest.raises(ConfigError, match="keeps no global rounds at the aggregator"):
            AggregatorConfig(run_dir=tmp_path / "run", rounds=2, min_sites=2, workflow="swarm", **kw)
