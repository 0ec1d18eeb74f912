"""`transfer.py --quantize`: what compressing an update costs on one core and saves on the wire, beside the raw
gRPC baseline measured in the same run.

A float32 model of `--gib` (0.25 for ~256 MiB) in `--tensors` tensors of normal values (std 0.01, the size of a
round's update), in this process, for each encoding of fl_plugins/wire/quantize.py:

  encode        `quantize.encode` of each tensor (what a site does before its chunks go out), MB/s of float32 in
  decode+fold   a `quantize.Decoder` per tensor fed the encoding in `--chunk-mib` pieces, each decoded batch added
                to a float32 accumulator (what the aggregator's streaming fold does), MB/s of float32 out; the
                row `none` is the fold alone (np.add of float32 chunks into the accumulator)
  bytes, error  encoded / float32 bytes; relative RMS error ||x - decode(encode(x))|| / ||x||

Then, with W = the raw upload's steady GB/s of the same run (receiver copies into a reused buffer), estimates of
the two ends of an upload when encoding and sending take turns on one core (as the site's one sending thread
and the aggregator's receive thread do), in MB/s of float32 model:

  quantise+send      model / (t_encode + encoded / W)
  receive+dequant    model / (encoded / W + t_decode_fold)

against `none`: model / (model / W) and model / (model / W + t_fold), and the link speed below which compressing
is faster (break-even: (1 - ratio) / (encode seconds per byte) when sending; when receiving, (1 - ratio) / (the
extra seconds per byte decode+fold costs over the fold)). Timings are the median of `--raw-repeats`.
"""

from __future__ import annotations

import time

import numpy as np
from _common import MiB, median

from fl_plugins.wire import quantize


def _model(model_bytes: int, n_tensors: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    per = model_bytes // 4 // n_tensors
    out = []
    for _ in range(n_tensors):
        x = np.empty(per, np.float32)
        for b in range(0, per, 1 << 22):  # in pieces: no float64 temporary of model size
            x[b : b + (1 << 22)] = rng.standard_normal(min(1 << 22, per - b), np.float32) * np.float32(0.01)
        out.append(x)
    return out


def _decode_fold(enc: str, buf: np.ndarray, acc: np.ndarray, chunk: int, scratch: np.ndarray) -> None:
    dec = quantize.Decoder(enc, len(acc))
    for lo in range(0, len(buf), chunk):
        for e0, v in dec.feed(lo, buf[lo : lo + chunk], out=scratch):
            dst = acc[e0 : e0 + len(v)]
            np.add(dst, v, out=dst)
    dec.finish()


def _fold(x: np.ndarray, acc: np.ndarray, chunk: int) -> None:
    step = chunk // 4
    for b in range(0, len(x), step):
        dst = acc[b : b + step]
        np.add(dst, x[b : b + step], out=dst)


def _rel_error(enc: str, model: list[np.ndarray], bufs: list[np.ndarray]) -> float:
    num = den = 0.0
    for x, buf in zip(model, bufs, strict=True):
        d = quantize.decode(enc, buf, len(x))
        d -= x
        num += float(np.dot(d, d))
        den += float(np.dot(x, x))
    return (num / den) ** 0.5


def run_quantize(model_bytes: int, n_tensors: int, chunk: int, repeats: int) -> dict:
    """Encode and decode+fold seconds, bytes and error of each encoding; `none` = the float32 fold alone."""
    model = _model(model_bytes, n_tensors)
    nbytes = sum(x.nbytes for x in model)
    accs = [np.zeros_like(x) for x in model]  # touched: the accumulator exists before an update arrives
    scratch = np.empty(quantize.BATCH, np.float32)
    out: dict = {"model_bytes": nbytes, "tensors": n_tensors, "repeats": repeats, "encodings": {}}
    fold_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, acc in zip(model, accs, strict=True):
            _fold(x, acc, chunk)
        fold_s.append(time.perf_counter() - t0)
    out["encodings"]["none"] = {"bytes": nbytes, "encode_s": 0.0, "decode_fold_s": median(fold_s), "rel_error": 0.0}
    for enc in quantize.ENCODINGS:  # warm up: bf16 imports ml_dtypes on first use (seconds on a cold disk)
        quantize.decode(enc, quantize.encode(enc, np.ones(256, np.float32)), 256)
    for enc in quantize.ENCODINGS:
        bufs = [np.empty(quantize.encoded_nbytes(enc, len(x)), np.uint8) for x in model]
        enc_s, dec_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x, buf in zip(model, bufs, strict=True):
                quantize.encode(enc, x, out=buf)
            enc_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for buf, acc in zip(bufs, accs, strict=True):
                _decode_fold(enc, buf, acc, chunk, scratch)
            dec_s.append(time.perf_counter() - t0)
        out["encodings"][enc] = {
            "bytes": sum(b.nbytes for b in bufs),
            "encode_s": median(enc_s),
            "decode_fold_s": median(dec_s),
            "rel_error": _rel_error(enc, model, bufs),
        }
    return out


def report(res: dict, raw: dict) -> list[str]:
    """The table, and the estimates against the raw upload's steady GB/s (`raw` from transfer.run_raw)."""
    model = res["model_bytes"]
    wire = raw["gbps"]["upload"]["steady"] * 1e9  # bytes per second
    lines = [
        f"float32 model {model / MiB:,.0f} MiB in {res['tensors']} tensors, one core, median of {res['repeats']}; "
        f"raw gRPC upload steady {wire / 1e9:.2f} GB/s (the same run)",
        "",
        f"{'encoding':<10}{'bytes':>8}{'rel err':>10}{'encode':>10}{'dec+fold':>10}{'quant+send':>12}"
        f"{'recv+deq':>10}{'vs none':>13}",
        f"{'':<10}{'ratio':>8}{'RMS':>10}{'MB/s':>10}{'MB/s':>10}{'MB/s est':>12}{'MB/s est':>10}{'send/recv':>13}",
    ]
    base = None
    for enc, r in res["encodings"].items():
        wire_s = r["bytes"] / wire
        send = model / (r["encode_s"] + wire_s) / 1e6
        recv = model / (wire_s + r["decode_fold_s"]) / 1e6
        r["quant_send_mbps"], r["recv_dequant_mbps"] = send, recv
        base = base or (send, recv)
        enc_mbps = f"{model / r['encode_s'] / 1e6:,.0f}" if r["encode_s"] else "-"
        lines.append(
            f"{enc:<10}{r['bytes'] / model:>8.3f}{r['rel_error']:>10.4f}{enc_mbps:>10}"
            f"{model / r['decode_fold_s'] / 1e6:>10,.0f}{send:>12,.0f}{recv:>10,.0f}"
            f"{send / base[0]:>7.2f}/{recv / base[1]:.2f}"
        )
    lines.append("")
    fold = res["encodings"]["none"]["decode_fold_s"] / model  # seconds per byte
    even = []
    for enc, r in res["encodings"].items():
        if enc == "none":
            continue
        saved = 1 - r["bytes"] / model  # of the wire's seconds per byte
        send = saved / (r["encode_s"] / model) / 1e6
        extra = r["decode_fold_s"] / model - fold
        recv = f"{saved / extra / 1e6:,.0f}" if extra > 0 else "any"
        r["break_even_mbps"] = {"send": send, "receive": None if extra <= 0 else saved / extra / 1e6}
        even.append(f"{enc} {send:,.0f}/{recv}")
    lines.append(f"break-even link MB/s (send/receive; compressing wins on slower links): {', '.join(even)}")
    lines.append(
        "est: encoding and sending take turns on one core (the site's sender, the aggregator's receive thread); "
        "MB = 1e6 bytes of float32"
    )
    return lines
