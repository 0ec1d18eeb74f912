"""Unit tests of the transport's parsers and state machines (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fl_plugins.errors import IntegrityError, ProtocolError
from fl_plugins.wire import frames
from fl_plugins.wire.layout import Manifest, parse_header, plan_shards
from fl_plugins.wire.stream import ShardReceiver, ShardSender, TensorSource


def _params():
    rng = np.random.default_rng(1)
    return {"a": rng.standard_normal((33, 17)).astype(np.float32), "b": np.arange(5, dtype=np.int16),
            "c": rng.standard_normal(1000).astype(np.float64), "empty": np.zeros((0, 3), np.float32)}  # fmt: skip


def _manifest(params, max_shard=1 << 30, chunk=64):
    from fl_plugins.tensors import describe

    return Manifest(plan_shards(describe(params), max_shard_bytes=max_shard), chunk, {"params_type": "FULL"})


class _Collect:
    def __init__(self):
        self.got = {}

    def header(self, shard, prefix):
        pass

    def data(self, shard, tensor, lo, payload):
        buf = self.got.setdefault(tensor.name, bytearray(tensor.nbytes))
        buf[lo : lo + len(payload)] = payload


def test_tensors_are_aligned_to_their_item_size():
    for s in plan_shards([("x", "I8", (3,)), ("y", "F64", (2,)), ("z", "F16", (5,))]):
        for t in s.tensors:
            from fl_plugins.wire.layout import ITEMSIZE

            assert (s.data_start + t.start) % ITEMSIZE[t.dtype] == 0
        assert s.data_start % 8 == 0


def test_big_tensor_gets_its_own_shard():
    shards = plan_shards([("a", "F32", (10,)), ("big", "F32", (100,)), ("c", "F32", (10,))], max_shard_bytes=100)
    assert [[t.name for t in s.tensors] for s in shards] == [["a"], ["big"], ["c"]]


@pytest.mark.parametrize("max_shard", [1 << 30, 2000])
def test_round_trip_through_frames(max_shard):
    params = _params()
    m = _manifest(params, max_shard)
    from fl_plugins.tensors import ByteViews

    src = TensorSource(m, ByteViews(params).get)
    sink = _Collect()
    m2 = Manifest.from_json(m.to_json())
    for i in range(len(m.shards)):
        sender = ShardSender(m, i, src)
        rx = ShardReceiver(m2, i, sink)
        for f in sender.frames(0):
            rx.accept(f)
        rx.finish(sender.shard_digest())
    for k, v in params.items():
        assert bytes(sink.got.get(k, b"")) == v.tobytes()


def test_resume_from_a_chunk_boundary_and_reject_out_of_order():
    params = _params()
    m = _manifest(params)
    from fl_plugins.tensors import ByteViews

    sender = ShardSender(m, 0, TensorSource(m, ByteViews(params).get))
    all_frames = list(sender.frames(0))
    rx = ShardReceiver(m, 0, _Collect())
    for f in all_frames[:5]:
        rx.accept(f)
    with pytest.raises(ProtocolError, match="out of order"):
        rx.accept(all_frames[7])
    used = {k: bytes(v) for k, v in rx.sink.got.items()}
    rx.sink.data = lambda *a: pytest.fail("a repeated chunk reached the sink")
    assert rx.accept(all_frames[2]) == 0  # an exact repeat (a resend racing its old stream): skipped, not used
    assert rx.offset == 5 * m.chunk_bytes and {k: bytes(v) for k, v in rx.sink.got.items()} == used
    del rx.sink.data
    from fl_plugins.wire import frames

    _, payload, _ = frames.decode(all_frames[2])
    other = bytes(payload[:-1]) + bytes([payload[-1] ^ 1])
    with pytest.raises(ProtocolError, match="out of order"):  # another chunk at a used offset is no repeat
        rx.accept(frames.encode(2 * m.chunk_bytes, [other]))
    for f in ShardSender(m, 0, TensorSource(m, ByteViews(params).get)).frames(rx.offset):
        rx.accept(f)
    rx.finish(sender.shard_digest())
    with pytest.raises(ProtocolError, match="chunk boundary"):
        next(sender.frames(3))


def test_corrupted_chunk_is_rejected_before_use():
    params = _params()
    m = _manifest(params)
    from fl_plugins.tensors import ByteViews

    f = bytearray(next(ShardSender(m, 0, TensorSource(m, ByteViews(params).get)).frames(0)))
    f[40] ^= 1
    sink = _Collect()
    rx = ShardReceiver(m, 0, sink)
    with pytest.raises(IntegrityError, match="xxh3"):
        rx.accept(bytes(f))
    assert rx.offset == 0 and not sink.got


def test_shard_digest_catches_a_wrong_shard():
    params = _params()
    m = _manifest(params)
    from fl_plugins.tensors import ByteViews

    sender = ShardSender(m, 0, TensorSource(m, ByteViews(params).get))
    rx = ShardReceiver(m, 0, _Collect())
    for f in sender.frames(0):
        rx.accept(f)
    with pytest.raises(IntegrityError, match="digest"):
        rx.finish("0" * 32)


def test_header_that_disagrees_with_the_manifest_is_refused():
    params = _params()
    m = _manifest(params)
    other = _params()
    other["a"] = other["a"].reshape(17, 33)  # same bytes, other shape
    from fl_plugins.tensors import ByteViews

    m_other = _manifest(other)
    rx = ShardReceiver(m, 0, _Collect())
    with pytest.raises(ProtocolError, match="disagrees"):
        for f in ShardSender(m_other, 0, TensorSource(m_other, ByteViews(other).get)).frames(0):
            rx.accept(f)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda o: o.update(format="x"), "format"),
        (lambda o: o.update(chunk_bytes=7), "chunk_bytes"),
        (lambda o: o["shards"][0].update(name="../evil.safetensors"), "plain file name"),
        (lambda o: o["shards"][0].update(size=1), "size"),
        (lambda o: o["shards"][0]["tensors"]["a"].update(dtype="F99"), "dtype"),
        (lambda o: o["shards"][0]["tensors"]["a"].update(shape=[2, 2]), "data_offsets"),
        (lambda o: o.update(envelope={"bogus": 1}), "envelope"),
    ],
)
def test_malformed_manifest_is_a_protocol_error(mutate, match):
    obj = json.loads(_manifest(_params()).to_json())
    mutate(obj)
    with pytest.raises(ProtocolError, match=match):
        Manifest.from_json(json.dumps(obj))


def test_malformed_frames_and_headers():
    with pytest.raises(ProtocolError):
        frames.decode(b"short")
    with pytest.raises(ProtocolError, match="magic"):
        frames.decode(b"XXXX" + bytes(40))
    with pytest.raises(ProtocolError):
        parse_header(b"\xff" * 16, "x")
    with pytest.raises(ProtocolError, match="JSON"):
        parse_header((8).to_bytes(8, "little") + b"{notjson", "x")


def test_chunk_hasher_matches_sender_digest_whatever_the_write_pieces():
    params = _params()
    m = _manifest(params)
    from fl_plugins.tensors import ByteViews

    sender = ShardSender(m, 0, TensorSource(m, ByteViews(params).get))
    blob = b"".join(f[frames.HEADER_SIZE :] for f in sender.frames(0))
    h = frames.ChunkHasher(m.chunk_bytes)
    for i in range(0, len(blob), 37):
        h.update(blob[i : i + 37])
    assert h.hexdigest() == sender.shard_digest()


def test_a_checkpoint_not_yet_published_is_ignored_by_a_restart(tmp_path):
    """Round R+1 is served while its fsync runs; if the aggregator dies before the rename, R is redone."""
    from conftest import save_numpy

    from fl_plugins.aggregator.store import RunStore

    store = RunStore(tmp_path / "run")
    m0 = store.import_initial(save_numpy(tmp_path / "init.safetensors", {"w": np.ones(5, np.float32)}), 64)
    tmp, m1 = store.write_round(1, m0, lambda t: [np.full(5, 2, np.float32)], {"current_round": 1})
    assert store.latest_round() == 0
    store.commit(1, tmp, m1)
    assert store.latest_round() == 1 and store.load(1).shards[0].digest == m1.shards[0].digest


def test_frames_filled_in_place_equal_the_joined_ones_from_memory_and_from_files(tmp_path):
    """ShardSender builds each message and has the source fill its payload (one copy: a pread, or a copy out of
    tensor memory): the frames are exactly `encode`'s, and a file that ends early is refused, never sent."""
    from fl_plugins.tensors import ByteViews
    from fl_plugins.wire.stream import FileSource

    params = _params()
    m = _manifest(params, chunk=64)
    src = TensorSource(m, ByteViews(params).get)
    shard = m.shards[0]
    joined = [frames.encode(o, src.pieces(0, o, min(64, shard.size - o))) for o in range(0, shard.size, 64)]
    assert list(ShardSender(m, 0, src).frames(0)) == joined
    path = tmp_path / shard.name
    path.write_bytes(b"".join(bytes(p) for p in src.pieces(0, 0, shard.size)))
    files = FileSource([path])
    assert list(ShardSender(m, 0, files).frames(0)) == joined
    files.close()
    path.write_bytes(path.read_bytes()[:-10])  # the file ends 10 bytes early
    short = FileSource([path])
    sent = ShardSender(m, 0, short).frames(0)
    with pytest.raises(IntegrityError, match="ended early"):
        list(sent)
    short.close()
