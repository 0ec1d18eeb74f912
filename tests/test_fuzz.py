"""Property-based tests of the parsers that read what a peer sends: chunk frames (and the receiver that puts
them in order), the manifest, and safetensors headers.

Whatever the bytes, only fl-plugins' own errors (FLError subclasses) may come out, and no input makes a parser
allocate more than a few MB (measured with tracemalloc): a length field that claims 2^60 bytes is refused before
anything of that size is allocated. Inputs are random bytes and mutations of valid inputs (bytes flipped,
inserted, deleted or overwritten with huge lengths; JSON values replaced, deleted or added).

Deterministic (`derandomize=True`): the same examples on every run, so CI does not flake.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_plugins.errors import FLError
from fl_plugins.tensors import ByteViews, describe
from fl_plugins.wire import frames
from fl_plugins.wire.layout import Manifest, parse_header, plan_shards
from fl_plugins.wire.stream import ShardReceiver, ShardSender, TensorSource

ALLOC_LIMIT = 4 << 20  # bytes a parser may allocate for one (small) input
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
HUGE = [2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**64 - 1, 2**64, 10**30, -1, -(2**63)]


@pytest.fixture(scope="module", autouse=True)
def _trace():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def parses_within_bounds(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a parser: return what it returns, None if it raised an FLError (anything else fails the test),
    and fail if it allocated more than ALLOC_LIMIT at its peak."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        return fn(*args)
    except FLError:
        return None
    finally:
        grew = tracemalloc.get_traced_memory()[1] - before
        assert grew < ALLOC_LIMIT, f"{fn.__qualname__} allocated {grew} bytes at its peak"


# -- valid inputs to mutate ----------------------------------------------------------------------------------
def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"layer.0.weight": rng.standard_normal((6, 5)).astype(np.float32),
            "layer.0.bias": np.arange(5, dtype=np.int16), "head/w..x": rng.standard_normal(7).astype(np.float64),
            "empty": np.zeros((0, 3), np.float32)}  # fmt: skip


PARAMS = _params()
MANIFEST = Manifest(plan_shards(describe(PARAMS), max_shard_bytes=200), 64, {"params_type": "FULL", "metrics": {}})
MANIFEST_JSON = MANIFEST.to_json()
HEADER = MANIFEST.shards[0].header
FRAMES = list(ShardSender(MANIFEST, 0, TensorSource(MANIFEST, ByteViews(PARAMS).get)).frames(0))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """`data` with a few bytes flipped, inserted, deleted, or a little-endian length written over them."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "u64", "u32"]))
        if op == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[pos:]
        elif op in ("u64", "u32"):
            n = draw(st.sampled_from([h for h in HUGE if h >= 0]) | st.integers(0, 2**64 - 1))
            size = 8 if op == "u64" else 4
            buf[pos : pos + size] = (n % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(buf)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_mutations(draw, obj: Any) -> Any:
    """A deep copy of `obj` with a few values replaced by random JSON (huge numbers included), deleted, or
    with a key added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(obj)))
        if not path:
            obj = draw(json_values)
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(json_values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(json_values)
        else:
            parent.insert(path[-1], draw(json_values))
    return obj


# -- chunk frames ------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_a_frame(data):
    parses_within_bounds(frames.decode, data)


@FUZZ
@given(st.sampled_from(FRAMES).flatmap(byte_mutations))
def test_mutated_frames(frame):
    got = parses_within_bounds(frames.decode, frame)
    if got is not None:  # accepted: then it must be intact (magic, length and digest all agree)
        offset, payload, digest = got
        assert frames.encode(offset, [payload]) == frame


class _Bounded:
    """A sink that checks every range it is handed lies within its tensor."""

    def __init__(self) -> None:
        self.got: dict[str, bytearray] = {}

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard, tensor, lo, payload) -> None:
        assert 0 <= lo and lo + len(payload) <= tensor.nbytes, (tensor, lo, len(payload))
        self.got.setdefault(tensor.name, bytearray(tensor.nbytes))[lo : lo + len(payload)] = payload


@FUZZ
@given(st.lists(st.sampled_from(FRAMES).flatmap(lambda f: st.just(f) | byte_mutations(f)) | st.binary(max_size=80),
                max_size=12))  # fmt: skip
def test_a_receiver_fed_any_frames_uses_only_verified_chunks_in_order(stream):
    sink = _Bounded()
    rx = ShardReceiver(Manifest.from_json(MANIFEST_JSON), 0, sink)
    for frame in stream:
        before = rx.offset
        n = parses_within_bounds(rx.accept, frame)
        if n == 0 and rx.offset == before and before > 0:  # an exact repeat of a chunk already used: skipped
            assert frame in FRAMES[: before // MANIFEST.chunk_bytes], "a chunk that was never used was skipped"
        elif n is not None:
            assert frame == FRAMES[before // MANIFEST.chunk_bytes], "a chunk other than the expected one was used"
            assert rx.offset == before + n
        else:
            assert rx.offset == before


# -- manifests -----------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_random_bytes_as_a_manifest(data):
    parses_within_bounds(Manifest.from_json, data)


@FUZZ
@given(byte_mutations(MANIFEST_JSON.encode()))
def test_manifest_with_mutated_bytes(data):
    parses_within_bounds(Manifest.from_json, data)


def _check_parsed(m: Manifest) -> None:
    """What a parsed manifest promises the aggregator: plain unique shard names, tensors back to back."""
    names = [s.name for s in m.shards]
    assert len(set(names)) == len(names)
    for s in m.shards:
        assert "/" not in s.name and "\\" not in s.name and "\0" not in s.name and not s.name.startswith(".")
        assert s.data_start % 8 == 0 and s.data_start >= 8
        pos = 0
        for t in s.tensors:
            assert t.start == pos and t.end >= t.start
            pos = t.end


@FUZZ
@given(json_mutations(json.loads(MANIFEST_JSON)))
def test_manifest_with_mutated_values(obj):
    m = parses_within_bounds(Manifest.from_json, json.dumps(obj))
    if m is not None:
        _check_parsed(m)


# -- safetensors headers -------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_a_safetensors_header(data):
    parses_within_bounds(parse_header, data, "fuzz")


@FUZZ
@given(byte_mutations(HEADER))
def test_safetensors_header_with_mutated_bytes(prefix):
    parses_within_bounds(parse_header, prefix, "fuzz")
    parses_within_bounds(MANIFEST.check_header, 0, prefix)


@FUZZ
@given(json_mutations(json.loads(HEADER[8:])))
def test_safetensors_header_with_mutated_values(obj):
    body = json.dumps(obj).encode()
    body += b" " * (-len(body) % 8)
    parses_within_bounds(parse_header, struct.pack("<Q", len(body)) + body, "fuzz")


# -- the cases the properties are about, spelled out -----------------------------------------------------------
@pytest.mark.parametrize("claimed", [2**60, 2**64 - 1, 100 << 20 | 1])
def test_a_header_claiming_a_huge_length_is_refused_before_allocating(claimed):
    prefix = struct.pack("<Q", claimed) + b"{}      "
    assert parses_within_bounds(parse_header, prefix, "fuzz") is None


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 50_000, "1" + "0" * 5000,
                                  '{"format": "fl-plugins/manifest", "version": 1' + "0" * 5000 + "}"])  # fmt: skip
def test_deep_nesting_and_huge_numbers_are_protocol_errors(text):
    assert parses_within_bounds(Manifest.from_json, text) is None
    body = text.encode() + b" " * (-len(text) % 8)
    assert parses_within_bounds(parse_header, struct.pack("<Q", len(body)) + body, "fuzz") is None


@pytest.mark.parametrize("shape, dtype", [([1] * 65, "F32"), ([2**62] * 1000, "F32"), ([10**4000] * 2, "F32"),
                                          ([6, 5], ["F32"]), ([6, True], "F32"), ([6, 5.0], "F32")])  # fmt: skip
def test_bad_shapes_and_dtypes_are_refused(shape, dtype):
    """More dimensions than numpy allows (multiplying out a long list of huge dimensions would run for minutes),
    dimensions whose product has too many digits to print in a message, an unhashable dtype, booleans or floats
    as dimensions."""
    obj = json.loads(MANIFEST_JSON)
    obj["shards"][0]["tensors"]["layer.0.weight"].update(shape=shape, dtype=dtype)
    with pytest.raises(FLError, match="layer.0.weight"):
        Manifest.from_json(json.dumps(obj))
    assert parses_within_bounds(Manifest.from_json, json.dumps(obj)) is None
