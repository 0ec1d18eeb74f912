"""wire/quantize.py's encodings and client/feedback.py's error feedback: sizes, error bounds, streaming decode
cut at any byte, refusals of what must not be sent or used, and residuals that keep the error from growing."""

from __future__ import annotations

import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_plugins.client.feedback import ErrorFeedback
from fl_plugins.errors import ProtocolError
from fl_plugins.wire import quantize as q

PROPS = settings(max_examples=120, deadline=None, derandomize=True, database=None)
SCALED = ("int8", "nf4")


def _blocks(enc: str, n: int) -> list[tuple[int, int, int]]:
    """(first element, element count, first byte) of each block of an n-element tensor."""
    spec, out, pos = q.encoding(enc), [], 0
    for e0 in range(0, n, spec.block):
        k = min(spec.block, n - e0)
        out.append((e0, k, pos))
        pos += spec.block_nbytes(k)
    return out


def _scales(enc: str, buf: np.ndarray, n: int) -> np.ndarray:
    return np.array([buf[p : p + 4].view("<f4")[0] for _, _, p in _blocks(enc, n)], np.float32)


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Normal values with a heavy tail and a few all-zero blocks, as updates have."""
    x = rng.standard_t(3, n).astype(np.float32) * np.float32(0.01)
    x[64:128] = 0
    return x


# -- sizes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 127, 128, 1000, 4097])
def test_encoded_size_is_a_function_of_encoding_and_count(n):
    full, rem = divmod(n, 64)
    assert q.encoded_nbytes("bf16", n) == 2 * n
    assert q.encoded_nbytes("int8", n) == full * 68 + (4 + rem if rem else 0)
    assert q.encoded_nbytes("nf4", n) == full * 36 + (4 + (rem + 1) // 2 if rem else 0)
    x = np.ones(n, np.float32)
    for enc in q.ENCODINGS:
        assert q.encode(enc, x).shape == (q.encoded_nbytes(enc, n),)


def test_worth_encoding_only_when_the_tensor_shrinks():
    assert q.worth_encoding("bf16", "F32", 10) and not q.worth_encoding("bf16", "BF16", 10)
    assert not q.worth_encoding("bf16", "F16", 10)
    assert q.worth_encoding("int8", "BF16", 1000) and q.worth_encoding("nf4", "F16", 1000)
    assert not q.worth_encoding("int8", "F32", 1)  # 4 bytes raw, 5 encoded
    assert not q.worth_encoding("int8", "I64", 1000) and not q.worth_encoding("nf4", "BOOL", 1000)


# -- error bounds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 64, 1000, 70_001])
def test_int8_error_is_at_most_half_a_step_per_block(n):
    x = _values(np.random.default_rng(n), n)
    buf = q.encode("int8", x)
    got = q.decode("int8", buf, n)
    scales = _scales("int8", buf, n)
    for (e0, k, _), s in zip(_blocks("int8", n), scales, strict=True):
        block = x[e0 : e0 + k]
        assert s == np.float32(np.abs(block).max() / np.float32(127))  # the scale was computed from the block
        assert np.abs(got[e0 : e0 + k] - block).max() <= s / 2 * (1 + 1e-4)
    assert not got[64:128].any() or n < 128  # an all-zero block comes back as zeros


@pytest.mark.parametrize("n", [1, 63, 64, 1001, 70_001])
def test_nf4_sends_the_nearest_code(n):
    x = _values(np.random.default_rng(n), n)
    buf = q.encode("nf4", x)
    got = q.decode("nf4", buf, n)
    half_gap = float(np.diff(q.NF4).max()) / 2
    for (e0, k, _), s in zip(_blocks("nf4", n), _scales("nf4", buf, n), strict=True):
        block = x[e0 : e0 + k]
        assert s == np.abs(block).max()
        nearest = np.abs(block[:, None] - q.NF4[None, :] * s).min(axis=1)  # the best any code could do
        err = np.abs(got[e0 : e0 + k] - block)
        assert (err <= nearest + 1e-6 * s).all()
        assert err.max() <= half_gap * s * (1 + 1e-5)


def test_bf16_rounds_to_nearest_even_and_reads_every_float_dtype():
    x = _values(np.random.default_rng(0), 5000)
    assert np.array_equal(q.decode("bf16", q.encode("bf16", x), 5000), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    for dt in (np.float16, ml_dtypes.bfloat16):
        y = x.astype(dt)
        assert np.array_equal(q.decode("bf16", q.encode("bf16", y), 5000), y.astype(ml_dtypes.bfloat16).astype("f4"))
        for enc in SCALED:  # a half-precision tensor decodes as its float32 values would
            assert np.array_equal(q.encode(enc, y), q.encode(enc, y.astype(np.float32)))


def test_blocks_too_small_to_scale_are_sent_as_zeros():
    x = np.full(130, q.ZERO_BELOW / 2, np.float32)
    x[64:128] = np.float32(1e-30)  # above ZERO_BELOW: scaled as usual
    for enc in SCALED:
        got = q.decode(enc, q.encode(enc, x), 130)
        assert not got[:64].any() and not got[128:].any()
        assert np.allclose(got[64:128], 1e-30, rtol=0.15)


def test_a_slice_from_a_block_boundary_encodes_to_that_byte_range():
    x = _values(np.random.default_rng(1), 64 * 300 + 17)
    for enc in q.ENCODINGS:
        whole = q.encode(enc, x)
        spec = q.encoding(enc)
        a, b = 64 * 7, 64 * 250
        lo, hi = a // spec.block * spec.block_nbytes(spec.block), b // spec.block * spec.block_nbytes(spec.block)
        assert np.array_equal(q.encode(enc, x[a:b]), whole[lo:hi])
        assert np.array_equal(q.encode(enc, x[a:]), whole[lo:])  # the short last block included


# -- streaming --------------------------------------------------------------------------------------------
def _stream(enc: str, buf: np.ndarray, n: int, cuts: list[int], out: np.ndarray | None = None) -> np.ndarray:
    dec = q.Decoder(enc, n, name="w")
    got = np.full(n, np.nan, np.float32)
    bounds = [0, *sorted(c % (len(buf) + 1) for c in cuts), len(buf)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        for e0, v in dec.feed(lo, memoryview(buf[lo:hi].tobytes()), out=out):
            assert np.isnan(got[e0 : e0 + len(v)]).all()  # each element comes out once
            got[e0 : e0 + len(v)] = v
    dec.finish()
    return got


@PROPS
@given(
    enc=st.sampled_from(q.ENCODINGS),
    n=st.integers(0, 3000),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=12),
    small_out=st.booleans(),
)
def test_streaming_decode_cut_anywhere_equals_the_whole_decode(enc, n, cuts, small_out):
    x = _values(np.random.default_rng(n), n)
    buf = q.encode(enc, x)
    whole = q.decode(enc, buf, n)
    out = np.empty(q.encoding(enc).block * 3, np.float32) if small_out else None
    assert np.array_equal(_stream(enc, buf, n, cuts, out), whole)


def test_one_byte_at_a_time_and_no_gap_or_rewind():
    n = 64 * 5 + 9
    x = _values(np.random.default_rng(2), n)
    for enc in q.ENCODINGS:
        buf = q.encode(enc, x)
        whole = q.decode(enc, buf, n)
        assert np.array_equal(_stream(enc, buf, n, list(range(len(buf)))), whole)
        bb = q.encoding(enc).block_nbytes(q.encoding(enc).block)
        dec = q.Decoder(enc, n)
        list(dec.feed(0, buf[:bb]))
        with pytest.raises(ProtocolError, match=f"from offset {2 * bb}, but the next expected are at {bb}"):
            dec.feed(2 * bb, buf[2 * bb :])  # a gap: block 1 would never be decoded, yet finish() would pass
        with pytest.raises(ProtocolError, match="without gaps or rewinds"):
            dec.feed(0, buf)  # a rewind: block 0 would be decoded (and folded) twice
        assert len([v for _, v in dec.feed(bb, buf[bb:])]) >= 1 and dec.done
        dec.finish()


def test_peak_bounds_what_the_last_feed_decoded():
    x = _values(np.random.default_rng(3), 4096)
    for enc in q.ENCODINGS:
        dec = q.Decoder(enc, len(x))
        top = max((float(np.abs(v).max()) for _, v in dec.feed(0, q.encode(enc, x))), default=0.0)
        assert top <= dec.peak <= 1.02 * float(np.abs(x).max()) + 1e-6


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("enc", q.ENCODINGS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_the_tensor_and_element(enc, bad):
    for i in (3, 64 * 3 + 5):  # a full block, the short last one
        x = np.ones(64 * 3 + 9, np.float32)
        x[i] = bad
        with pytest.raises(ValueError, match=rf"tensor 'layer.w' holds {bad} at element {i} .*finite"):
            q.encode(enc, x, name="layer.w")


def test_what_an_encoding_cannot_carry_is_refused():
    with pytest.raises(ValueError, match="beyond bfloat16's range.*without compression|beyond bfloat16"):
        q.encode("bf16", np.array([1.0, 3.4e38], np.float32), name="w")
    with pytest.raises(ValueError, match="int32; only float32, float16 and bfloat16 .* send integer"):
        q.encode("int8", np.arange(10, dtype=np.int32), name="steps")
    with pytest.raises(ValueError, match="float64"):
        q.encode("nf4", np.ones(10), name="w")
    with pytest.raises(ValueError, match="unknown encoding 'int4'; choose one of bf16, int8, nf4"):
        q.encoded_nbytes("int4", 10)
    with pytest.raises(ValueError, match=r"writes 68 bytes; `out` is uint8 \(67,\)"):
        q.encode("int8", np.ones(64, np.float32), out=np.empty(67, np.uint8))


@pytest.mark.parametrize("enc", q.ENCODINGS)
def test_wrong_sizes_truncation_and_out_of_order_pieces_are_refused(enc):
    n = 200
    buf = q.encode(enc, np.ones(n, np.float32))
    for size in (len(buf) - 1, len(buf) + 1):
        with pytest.raises(ProtocolError, match=rf"got {size} bytes; {enc} holds 200 elements in exactly {len(buf)}"):
            q.decode(enc, np.resize(buf, size), n, name="w")
    dec = q.Decoder(enc, n, name="w")
    list(dec.feed(0, buf[:11]))
    with pytest.raises(ProtocolError, match="the bytes end at 11, .* short; the sender must send the whole encoding"):
        dec.finish()
    with pytest.raises(ProtocolError, match="from offset 12, but the next expected are at 11"):
        dec.feed(12, buf[12:20])
    with pytest.raises(ProtocolError, match=rf"run past its {len(buf)} bytes"):
        dec.feed(11, np.concatenate([buf[11:], buf[:3]]))
    with pytest.raises(ProtocolError, match="from offset 3, but the next expected are at 0"):
        q.Decoder(enc, n).feed(3, buf[3:9])


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0, 3.0e36])
@pytest.mark.parametrize("enc", SCALED)
def test_a_scale_no_encoder_writes_is_refused_before_anything_is_decoded(enc, scale):
    n = 64 * 4
    buf = q.encode(enc, np.ones(n, np.float32))
    bb = q.encoding(enc).block_nbytes(64)
    if enc == "nf4" and scale == 3.0e36:
        scale = np.inf
    buf[2 * bb : 2 * bb + 4] = np.array([scale], "<f4").view(np.uint8)
    dec = q.Decoder(enc, n, name="w")
    with pytest.raises(ProtocolError, match=rf"tensor 'w' .*: block 2 has scale {re.escape(f'{float(scale):.6g}')}, "):
        dec.feed(0, buf)
    assert dec.pos == 0  # nothing kept: the piece may not be used


@PROPS
@given(enc=st.sampled_from(q.ENCODINGS), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_random_bytes_from_a_peer_decode_to_finite_values_or_a_protocol_error(enc, n, seed):
    buf = np.random.default_rng(seed).integers(0, 256, q.encoded_nbytes(enc, n), dtype=np.uint8)
    try:
        got = q.decode(enc, buf, n)
    except ProtocolError:
        return
    assert np.isfinite(got).all()


def test_a_bf16_nan_from_a_peer_is_refused():
    buf = q.encode("bf16", np.ones(10, np.float32))
    buf[6:8] = np.array([0x7FC0], "<u2").view(np.uint8)
    with pytest.raises(ProtocolError, match="element 3 is a bfloat16 NaN or infinity"):
        q.decode("bf16", buf, 10, name="w")


def test_the_library_imports_no_torch():
    code = (
        "import sys, numpy as np\nimport fl_plugins.wire.quantize as q, fl_plugins.client.feedback as f\n"
        "f.ErrorFeedback('int8').encode('w', np.ones(100, np.float32)); q.encode('bf16', np.ones(3, np.float32))\n"
        "print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- error feedback ---------------------------------------------------------------------------------------
def _rounds(enc: str, feedback: bool, rounds: int = 100) -> tuple[float, float]:
    """Send `rounds` DIFF updates; return the largest |sum sent - sum of true diffs| and the last round's
    largest scale. Each block holds one large element (setting the scale to ~1) and small ones that point the
    same way every round, between codes: quantised alone they are rounded the same way every round."""
    rng = np.random.default_rng(7)
    n = 64 * 20
    ef = ErrorFeedback(enc)
    true_sum = np.zeros(n, np.float64)
    sent_sum = np.zeros(n, np.float64)
    drift = np.full(n, 0.02, np.float32)
    drift[::64] = 1.0
    scale = 0.0
    for _ in range(rounds):
        d = drift + rng.normal(0, 1e-4, n).astype(np.float32)
        buf = ef.encode("w", d.reshape(20, 64)) if feedback else q.encode(enc, d)
        true_sum += d
        sent_sum += q.decode(enc, buf, n)
        scale = float(_scales(enc, buf, n).max())
    return float(np.abs(sent_sum - true_sum).max()), scale


@pytest.mark.parametrize("enc", SCALED)
def test_error_feedback_keeps_the_summed_error_within_one_round(enc):
    step = {"int8": 1.0, "nf4": float(np.diff(q.NF4).max())}[enc]  # the widest quantisation step, in scales
    err, scale = _rounds(enc, feedback=True)
    bound = step * scale / 2 * 1.01  # the last residual only, however many rounds
    assert err <= bound
    err_plain, _ = _rounds(enc, feedback=False)
    assert err_plain > 5 * bound  # without feedback the same updates drift away, more every round


def test_the_residual_is_what_the_encoding_dropped():
    rng = np.random.default_rng(5)
    ef = ErrorFeedback("int8")
    d1, d2 = rng.normal(0, 1, 300).astype(np.float32), rng.normal(0, 1, 300).astype(ml_dtypes.bfloat16)
    b1 = ef.encode("w", d1)
    r1 = ef.residual("w").copy()
    assert np.allclose(r1, d1 - q.decode("int8", b1, 300), atol=1e-7) and ef.nbytes == 1200
    b2 = ef.encode("w", d2)
    assert np.array_equal(b2, q.encode("int8", d2.astype(np.float32) + r1))  # corrected before encoding
    ef.encode("w", np.zeros(10, np.float32))  # the tensor changed shape: starts from zero
    assert ef.residual("w").shape == (10,) and not ef.residual("w").any()


def test_residuals_survive_a_restart_and_a_refused_update_keeps_none():
    ef = ErrorFeedback("nf4")
    ef.encode("a", np.linspace(-1, 1, 100, dtype=np.float32))
    ef.encode("b", np.linspace(0, 1, 50, dtype=np.float32))
    again = ErrorFeedback("nf4")
    again.load_state_dict(ef.state_dict())
    x = np.linspace(-2, 3, 100, dtype=np.float32)
    assert np.array_equal(again.encode("a", x), ef.encode("a", x))
    bad = np.ones(50, np.float32)
    bad[7] = np.nan
    with pytest.raises(ValueError, match="tensor 'b' holds nan at element 7"):
        ef.encode("b", bad)
    assert ef.residual("b") is None and ef.residual("a") is not None
    ef.reset()
    assert ef.nbytes == 0
    with pytest.raises(ValueError, match="tensor 'n' is int64; only float32"):
        ef.encode("n", np.arange(5))
    with pytest.raises(ValueError, match="unknown encoding 'int3'"):
        ErrorFeedback("int3")
    with pytest.raises(ValueError, match="residual of tensor 'a' is float64"):
        again.load_state_dict({"a": np.zeros(3)})
