"""The in-memory model's serving rules (aggregator/finished.py) as a hypothesis state machine.

A real `Finished` over real accumulator arrays and real shard files: sources are opened, read chunk by chunk (each
as ShardSender builds its frame, verified by a ShardReceiver against the manifest's digests), and closed, while the
close's side writes the files, switches the serving to them, reuses the memory (the accumulator reset: zeros, then
the next round's sums), fails, or retires the model, in any order hypothesis picks within the closer's own order
(write, switch, then reset; retire after the switch).

The promise: every chunk a source serves is the model's, byte for byte (never zeros or the next round's sums);
a source that cannot serve raises RoundError (retired before it switched, or the write failed), never sends
anything else; a source that switched keeps serving after the model is retired and the memory reused.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from fl_plugins.aggregator.finished import Finished
from fl_plugins.errors import RoundError
from fl_plugins.tensors import describe
from fl_plugins.wire.layout import Manifest, plan_shards
from fl_plugins.wire.stream import ShardReceiver, ShardSender

CHUNK = 64 << 10


class _Keep:
    def __init__(self) -> None:
        self.got = bytearray()

    def header(self, shard: int, prefix: bytes) -> None:
        self.got += prefix

    def data(self, shard, tensor, lo, payload) -> None:
        self.got += payload


class Serving(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def make(self, seed: int) -> None:
        import tempfile
        from pathlib import Path

        rng = np.random.default_rng(seed)
        model = {"w": rng.standard_normal(50_000).astype(np.float32), "n": np.array([seed], np.int64),
                 "m": rng.random(3) > 0.5}  # fmt: skip
        self.layout = Manifest(plan_shards(describe(model), max_shard_bytes=120_000), CHUNK, {})
        tensors = [t for s in self.layout.shards for t in s.tensors]
        self.arrays = {t.name: np.zeros(t.numel if t.dtype != "BOOL" else 0,
                                        np.float64 if t.dtype == "I64" else np.float32) for t in tensors}  # fmt: skip
        for t in tensors:  # the sums: two updates of the model, weight 1 each
            if t.dtype != "BOOL":
                self.arrays[t.name][:] = 2 * model[t.name].reshape(-1)
        self.finished = Finished(self.layout, self.arrays, "round 1's global model")

        def blocks_of(t):
            if t.dtype == "BOOL":
                return [model[t.name].reshape(-1)]
            acc = self.arrays[t.name]
            return [(acc[b : b + 7000] / 2).astype(model[t.name].dtype) for b in range(0, len(acc), 7000)]

        self.manifest = self.finished.fill(blocks_of, {"current_round": 1})
        self.tmp = Path(tempfile.mkdtemp(prefix="fl-finished-"))
        self.expected = [
            s.header + b"".join(model[t.name].tobytes() for t in s.tensors) for s in self.layout.shards
        ]
        self.paths = None
        self.switched = self.reused = self.retired = self.failed = False
        self.streams: list[tuple] = []  # (source, shard, frames iterator, receiver, sink, done)

    @rule(shard=st.integers(0, 10))
    def open_stream(self, shard: int) -> None:
        shard %= len(self.layout.shards)
        source = self.finished.source()
        sink = _Keep()
        frames = ShardSender(self.manifest, shard, source, self.finished.chunk_digests[shard]).frames()
        self.streams.append([source, shard, frames, ShardReceiver(self.manifest, shard, sink), sink, False])

    @precondition(lambda self: self.streams)
    @rule(i=st.integers(0, 100), chunks=st.integers(1, 3))
    def read(self, i: int, chunks: int) -> None:
        s = self.streams[i % len(self.streams)]
        source, shard, frames, rx, sink, done = s
        if done:
            return
        for _ in range(chunks):
            try:
                frame = next(frames)
            except StopIteration:
                rx.finish(self.manifest.shards[shard].digest)
                assert bytes(sink.got) == self.expected[shard]
                s[5] = True
                return
            except RoundError:
                # allowed only when this source never switched and the model was retired, or the write failed
                assert (self.retired and source._fds is None) or self.failed
                s[5] = True
                return
            rx.accept(frame)  # the digest check: the bytes are the model's
            assert bytes(sink.got) == self.expected[shard][: len(sink.got)]

    @precondition(lambda self: self.paths is None and not self.failed)
    @rule()
    def write(self) -> None:
        self.paths = self.finished.write(self.tmp)
        for p, want in zip(self.paths, self.expected, strict=True):
            assert p.read_bytes() == want

    @precondition(lambda self: self.paths is not None and not self.switched)
    @rule()
    def switch(self) -> None:
        self.finished.to_files(self.paths)
        self.switched = True

    @precondition(lambda self: self.switched)
    @rule(value=st.sampled_from([0.0, 7.5]))
    def reuse_memory(self, value: float) -> None:
        """The accumulator reset, then the next round's sums."""
        for a in self.arrays.values():
            a.fill(value)
        self.reused = True

    @precondition(lambda self: not self.switched and not self.failed)
    @rule()
    def fail(self) -> None:
        self.finished.fail(OSError(28, "No space left on device"))
        self.failed = True

    @precondition(lambda self: (self.switched or self.failed) and not self.retired)
    @rule()
    def retire(self) -> None:
        self.finished.close()
        self.retired = True

    def teardown(self) -> None:
        import shutil

        for s in getattr(self, "streams", []):
            s[0].close()
        if hasattr(self, "finished"):
            self.finished.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.filterwarnings("ignore")
def test_the_in_memory_models_serving_rules():
    Serving.TestCase.settings = settings(
        max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    Serving.TestCase().runTest()
