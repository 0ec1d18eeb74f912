"""Transfer throughput and memory: raw gRPC byte streaming vs fl-plugins, on loopback, in one run.

    python benchmarks/transfer.py                 # 2 GiB model, fp32 and bf16, 1 site and 4 sites
    python benchmarks/transfer.py --gib 0.25      # quick
    python benchmarks/transfer.py --json out.json
    python benchmarks/transfer.py --gib 0.25 --sealed     # only: the sealed (swarm) path beside the mTLS one
    python benchmarks/transfer.py --gib 0.25 --quantize   # only: bf16/int8/nf4 encode, decode beside raw gRPC

Raw baseline: a tiny grpc server (generic handlers, identity serializers, no framework) and a client in
separate processes move the model's byte count in `--chunk-mib` messages. The sender turns each chunk of a
model-sized, already-touched buffer into `bytes` (grpcio sends only bytes: one copy, as any sender of real
weights makes). The receiver copies each message into (i) fresh memory of model size, first touched by the
copy ("first"; by default the same allocator as fl-plugins' receiver: torch.empty on the downloading side,
np.zeros like the accumulator on the uploading side; `--raw-fresh numpy` uses np.empty on both), or (ii) a
reused, already-touched buffer ("steady"). Each case runs `--raw-repeats` times (median). Also measured, for
context only: "wire" = one prebuilt message sent again and again, receiver discards.

fl-plugins: an aggregator process (AggregatorServer, --initial-model written beforehand) and one site
process (SiteClient, torch tensors). Per round the site times download() and upload() (until the commit is
acknowledged). Round 0 = "first" (the site allocates new tensors, the aggregator's float32 accumulator is
first touched); "steady" = the median of later rounds (SiteClient.download allocates new tensors every
round, so a steady download still writes fresh memory). Then the same with 4 site processes uploading
concurrently, for the aggregator's peak RSS with 1 vs 4 sites. Peak RSS is each process's own ru_maxrss
(kernel high-water mark); a 50 ms psutil sampler gives a second opinion and the peak of the tree's sum.

On this VM first-touch of fresh memory costs 0.5-18 GB/s depending on whether the host took the pages back
(it does within ~2 s of a free): `--settle` pauses before every "first" measurement so raw and fl-plugins
start from the same state. Expect run-to-run noise on "first" figures.

`--sealed` runs instead the sealed path of swarm learning beside the mTLS path (_sealed.py says how): a model sealed
by one site for another, through the aggregator's relay, against the same model uploaded to and downloaded from an
mTLS aggregator, in MB/s each way and their ratio (target >= 0.8).

`--quantize` runs instead the raw baseline and then the compressed encodings of wire/quantize.py on a float32 model
of --gib (_quantize.py says how): encode and decode+fold MB/s on one core, bytes and error, and what quantise + send
and receive + dequantise reach against the raw upload's GB/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _quantize  # noqa: E402
import _sealed  # noqa: E402
from _common import (  # noqa: E402
    CTX,
    Children,
    GiB,
    MiB,
    RSSSampler,
    aggregator_main,
    child_setup,
    environment,
    gbps,
    maxrss,
    median,
    recv,
    site_client_main,
    tensor_specs,
    write_model,
)

RAW_SERVICE = "rawbench.Bytes"
MAX_MSG = 96 << 20
RAW_OPTIONS = [("grpc.max_send_message_length", MAX_MSG), ("grpc.max_receive_message_length", MAX_MSG)]


def _ident(b):
    return b


# -- raw gRPC baseline ------------------------------------------------------------------------------------
def raw_server_main(conn, nbytes: int, chunk: int, fresh: str) -> None:
    child_setup("raw-server")
    try:
        from concurrent import futures

        import grpc

        src = np.empty(nbytes, np.uint8)
        src.fill(1)  # the download source, touched
        steady = np.empty(nbytes, np.uint8)
        steady.fill(0)  # the reused upload destination, touched
        prebuilt = bytes(chunk)

        def up(request_iterator, context):
            mode = dict(context.invocation_metadata()).get("mode", "steady")
            if mode == "fresh":  # like the aggregator's accumulator: np.zeros, first touched by the copy
                dst = np.zeros(nbytes, np.uint8) if fresh == "match" else np.empty(nbytes, np.uint8)
            else:
                dst = steady if mode == "steady" else None
            off = 0
            for msg in request_iterator:
                n = len(msg)
                if dst is not None:
                    dst[off : off + n] = np.frombuffer(msg, np.uint8)
                off += n
            return struct.pack("<Q", off)

        def down(request, context):
            total, source = json.loads(request)
            off = 0
            while off < total:
                n = min(chunk, total - off)
                yield prebuilt if source == "prebuilt" and n == chunk else src[off : off + n].tobytes()
                off += n

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=RAW_OPTIONS)
        handlers = {
            "Up": grpc.stream_unary_rpc_method_handler(up, request_deserializer=_ident, response_serializer=_ident),
            "Down": grpc.unary_stream_rpc_method_handler(down, request_deserializer=_ident,
                                                         response_serializer=_ident),
        }  # fmt: skip
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(RAW_SERVICE, handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        conn.send({"address": f"127.0.0.1:{port}"})
        conn.recv()  # "stop"
        server.stop(0).wait()
        conn.send({"maxrss": maxrss()})
    except BaseException as e:
        try:
            conn.send({"error": f"{type(e).__name__}: {e}"})
        finally:
            raise


def raw_client_main(conn, address: str, nbytes: int, chunk: int, repeats: int, fresh: str, settle: float) -> None:
    child_setup("raw-client")
    try:
        import grpc

        if fresh == "match":  # the site receives into new torch tensors: same allocator, same page size
            import torch

            def fresh_buffer(n: int) -> np.ndarray:
                return torch.empty(n, dtype=torch.uint8).numpy()
        else:

            def fresh_buffer(n: int) -> np.ndarray:
                return np.empty(n, np.uint8)

        ch = grpc.insecure_channel(address, options=RAW_OPTIONS)
        grpc.channel_ready_future(ch).result(timeout=30)
        up = ch.stream_unary(f"/{RAW_SERVICE}/Up", request_serializer=_ident, response_deserializer=_ident)
        down = ch.unary_stream(f"/{RAW_SERVICE}/Down", request_serializer=_ident, response_deserializer=_ident)
        src = np.empty(nbytes, np.uint8)
        src.fill(1)
        steady = np.empty(nbytes, np.uint8)
        steady.fill(0)
        prebuilt = bytes(chunk)

        def messages(total: int, source: str):
            off = 0
            while off < total:
                n = min(chunk, total - off)
                yield prebuilt if source == "prebuilt" and n == chunk else src[off : off + n].tobytes()
                off += n

        def do_up(total: int, mode: str, source: str) -> float:
            t0 = time.perf_counter()
            reply = up(messages(total, source), metadata=(("mode", mode),))
            dt = time.perf_counter() - t0
            assert struct.unpack("<Q", reply)[0] == total
            return dt

        def do_down(total: int, mode: str, source: str) -> float:
            t0 = time.perf_counter()
            dst = fresh_buffer(total) if mode == "fresh" else steady if mode == "steady" else None
            off = 0
            for msg in down(json.dumps([total, source]).encode()):
                n = len(msg)
                if dst is not None:
                    dst[off : off + n] = np.frombuffer(msg, np.uint8)
                off += n
            dt = time.perf_counter() - t0
            assert off == total
            del dst
            return dt

        for _ in range(2):  # warm up the connection and both code paths
            do_up(64 * MiB, "steady", "copy")
            do_down(64 * MiB, "steady", "copy")
        def settled(fn, *a) -> float:
            time.sleep(settle)  # let memory freed by the previous run go back, as between fl rounds/cases
            return fn(*a)

        out: dict = {}
        for direction, fn in (("upload", do_up), ("download", do_down)):
            out[direction] = {
                "wire": [fn(nbytes, "discard", "prebuilt") for _ in range(repeats)],
                "first": [settled(fn, nbytes, "fresh", "copy") for _ in range(repeats)],
                "steady": [fn(nbytes, "steady", "copy") for _ in range(repeats)],
            }
        ch.close()
        conn.send({"seconds": out, "maxrss": maxrss()})
    except BaseException as e:
        try:
            conn.send({"error": f"{type(e).__name__}: {e}"})
        finally:
            raise


def run_raw(nbytes: int, chunk: int, repeats: int, fresh: str, settle: float, timeout: float) -> dict:
    with Children() as ch:
        s_par, s_child = CTX.Pipe()
        ch.start(raw_server_main, s_child, nbytes, chunk, fresh, name="raw-server")
        s_child.close()
        address = recv(s_par, timeout, "raw server start")["address"]
        c_par, c_child = CTX.Pipe()
        ch.start(raw_client_main, c_child, address, nbytes, chunk, repeats, fresh, settle, name="raw-client")
        c_child.close()
        res = recv(c_par, timeout, "raw client")
        s_par.send("stop")
        srv = recv(s_par, 30, "raw server stop")
    out: dict = {"bytes": nbytes, "chunk_bytes": chunk, "repeats": repeats, "fresh_alloc": fresh,
                 "settle_s": settle, "seconds": res["seconds"],
                 "client_maxrss": res["maxrss"], "server_maxrss": srv["maxrss"]}  # fmt: skip
    out["gbps"] = {d: {k: gbps(nbytes, median(v)) for k, v in cases.items()} for d, cases in res["seconds"].items()}
    return out


# -- fl-plugins --------------------------------------------------------------------------------------------
def run_fl(root: Path, dtype: str, model_bytes: int, n_tensors: int, n_sites: int, rounds: int, chunk: int,
           timeout: float, settle: float, reuse: bool = True) -> dict:  # fmt: skip
    d = root / f"fl-{dtype.lower()}-{n_sites}site{'' if reuse else '-fresh'}"
    d.mkdir(parents=True)
    try:
        specs = tensor_specs(model_bytes, dtype, n_tensors)
        t0 = time.perf_counter()
        size = write_model(d / "init.safetensors", specs)
        write_s = time.perf_counter() - t0
        time.sleep(settle)
        cfg = {"run_dir": d / "run", "rounds": rounds, "min_sites": n_sites, "initial_model": d / "init.safetensors",
               "chunk_bytes": chunk, "linger": 3.0}  # fmt: skip
        with Children() as ch:
            sampler = RSSSampler().start()
            a_par, a_child = CTX.Pipe()
            agg = ch.start(aggregator_main, a_child, cfg, name="aggregator")
            a_child.close()
            sampler.add("aggregator", agg.pid)
            ready = recv(a_par, timeout, "aggregator start")
            pipes = []
            for k in range(n_sites):
                p_par, p_child = CTX.Pipe()
                p = ch.start(site_client_main, p_child, ready["address"], f"site-{k + 1}", "torch", reuse,
                             name=f"site-{k + 1}")  # fmt: skip
                p_child.close()
                sampler.add(f"site-{k + 1}", p.pid)
                pipes.append(p_par)
            deadline = time.monotonic() + timeout
            sites = [recv(p, max(1.0, deadline - time.monotonic()), f"site-{k + 1}") for k, p in enumerate(pipes)]
            done = recv(a_par, max(1.0, deadline - time.monotonic()), "aggregator finish")
            sampler.stop()
        if done.get("rc") != 0:
            raise RuntimeError(f"aggregator exited with rc={done.get('rc')}: {done.get('agg_error')}")
        per_round = [r for s in sites for r in s["rounds"]]
        first = [r for r in per_round if r["round"] == 0]
        steady = [r for r in per_round if r["round"] > 0]
        res = {
            "dtype": dtype, "sites": n_sites, "receive_into": reuse, "rounds": rounds, "model_bytes": size,
            "write_model_s": write_s, "acc_bytes": ready["acc_bytes"],
            "seconds": {
                "download": {"first": median(r["download_s"] for r in first),
                             "steady": median(r["download_s"] for r in steady)},
                "upload": {"first": median(r["upload_s"] for r in first),
                           "steady": median(r["upload_s"] for r in steady)},
            },
            "per_site_rounds": [s["rounds"] for s in sites],
            "aggregator_maxrss": done["maxrss"], "aggregator_rss_ready": ready["rss_ready"],
            "site_maxrss": [s["maxrss"] for s in sites], "site_rss_idle": [s["rss_idle"] for s in sites],
            "sampled_peak_rss": dict(sampler.peak), "sampled_peak_tree_rss": sampler.peak_sum,
            "aggregator_stats": done["stats"], "site_stats": [s["stats"] for s in sites],
        }  # fmt: skip
        res["gbps"] = {dr: {k: gbps(size, v) for k, v in c.items()} for dr, c in res["seconds"].items()}
        return res
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------------------
def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def report(out: dict) -> list[str]:
    lines, checks = [], []
    raw = out["raw"]
    model = out["model_bytes"]
    env = out.get("env", {})
    dirty = " (+ local changes)" if env.get("fl_plugins_dirty") else ""
    arenas = env.get("MALLOC_ARENA_MAX")
    lines.append(f"fl-plugins at {env.get('git_head', '?')[:12]}{dirty}, MALLOC_ARENA_MAX={arenas}")
    lines.append(f"model {model / GiB:.2f} GiB ({out['tensors']} tensors), chunk {out['chunk_mib']} MiB, "
                 f"raw repeats {raw['repeats']} (median)")  # fmt: skip
    lines.append(f"raw wire ceiling (prebuilt msgs, receiver discards): up {raw['gbps']['upload']['wire']:.2f} "
                 f"GB/s, down {raw['gbps']['download']['wire']:.2f} GB/s")  # fmt: skip
    for direction in ("upload", "download"):
        spread = ", ".join(f"{k} {min(v) and model / max(v) / 1e9:.2f}-{model / min(v) / 1e9:.2f}"
                           for k, v in raw["seconds"][direction].items())  # fmt: skip
        lines.append(f"raw {direction} GB/s min-max over repeats: {spread}")
    lines.append("")
    lines.append(f"{'case':<26}{'raw GB/s':>10}{'fl GB/s':>10}{'fl/raw':>9}   fl seconds")
    for dt in out["dtypes"]:
        fl = out["fl"][dt]
        for direction in ("download", "upload"):
            for phase in ("first", "steady"):
                r, f = raw["gbps"][direction][phase], fl["gbps"][direction][phase]
                ratio = f / r if (f and r) else None
                out["ratios"][f"{dt}/{direction}/{phase}"] = ratio
                ok = ratio is not None and ratio >= 0.7
                checks.append((f"ratio {dt} {direction} {phase} >= 0.7", ok, f"{ratio:.2f}" if ratio else "-"))
                lines.append(f"{dt + ' ' + direction + ' ' + phase:<26}{r:>10.2f}{f:>10.2f}{ratio:>9.2f}   "
                             f"{fl['seconds'][direction][phase]:.2f}")  # fmt: skip
    for dt in out["dtypes"]:
        per = out["fl"][dt]["per_site_rounds"][0]
        lines.append(f"fl {dt} per round GB/s (download/upload): " + ", ".join(
            f"r{r['round']} {r['bytes'] / r['download_s'] / 1e9:.2f}/{r['bytes'] / r['upload_s'] / 1e9:.2f}"
            for r in per))  # fmt: skip
    lines.append("")
    lines.append(f"{'memory (MiB)':<26}{'model':>9}{'acc':>9}{'agg peak':>10}{'site peak':>11}{'site idle':>11}"
                 f"{'tree peak':>11}")  # fmt: skip
    for fl in [out["fl"][dt] for dt in out["dtypes"]] + [out.get("multi")]:
        if fl is None:
            continue
        label = f"{fl['dtype']} {fl['sites']} site" + ("s" if fl["sites"] > 1 else "")
        lines.append(f"{label:<26}{mib(fl['model_bytes']):>9}{mib(fl['acc_bytes']):>9}"
                     f"{mib(fl['aggregator_maxrss']):>10}{mib(max(fl['site_maxrss'])):>11}"
                     f"{mib(max(fl['site_rss_idle'])):>11}{mib(fl['sampled_peak_tree_rss']):>11}")  # fmt: skip
        agg_ok = fl["aggregator_maxrss"] <= fl["acc_bytes"] + 512 * MiB
        checks.append((f"aggregator peak <= acc + 512 MiB ({label})", agg_ok,
                       f"{mib(fl['aggregator_maxrss'])} vs {mib(fl['acc_bytes'] + 512 * MiB)}"))  # fmt: skip
        site_ok = max(fl["site_maxrss"]) <= fl["model_bytes"] + 512 * MiB
        checks.append((f"site peak <= model + 512 MiB ({label})", site_ok,
                       f"{mib(max(fl['site_maxrss']))} vs {mib(fl['model_bytes'] + 512 * MiB)}"))  # fmt: skip
    multi = out.get("multi")
    if multi:
        s = multi["seconds"]
        n = multi["sites"]
        lines.append("")
        lines.append(f"{n} sites concurrently ({multi['dtype']}): per-site median download first/steady "
                     f"{s['download']['first']:.2f}/{_f(s['download']['steady'])} s, upload first/steady "
                     f"{s['upload']['first']:.2f}/{_f(s['upload']['steady'])} s; aggregate upload steady "
                     f"{_f(_agg(multi, 'upload'))} GB/s")  # fmt: skip
    wi = out.get("fresh_receive")
    if wi:
        g, raw_g = wi["gbps"]["download"], raw["gbps"]["download"]
        lines.append("")
        lines.append(f"plain receive() without into= (new tensors every round, first-touched): F32 "
                     f"download first {_f(g['first'])} GB/s, steady {_f(g['steady'])} GB/s "
                     f"(fl/raw {_f(_ratio(g['steady'], raw_g['steady']))}); upload steady "
                     f"{_f(wi['gbps']['upload']['steady'])} GB/s; site peak {mib(max(wi['site_maxrss']))} "
                     "MiB")  # fmt: skip
    lines.append("")
    lines.append("targets:")
    for what, ok, val in checks:
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {what}: {val}")
    out["targets"] = {what: {"pass": ok, "value": val} for what, ok, val in checks}
    return lines


def _ratio(a, b):
    return a / b if (a and b) else None


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _agg(multi: dict, direction: str):
    """All sites' bytes over the slowest site's median steady time (a lower bound on aggregate GB/s)."""
    per = [median(r[f"{direction}_s"] for r in rs if r["round"] > 0) for rs in multi["per_site_rounds"]]
    if any(p is None for p in per):
        return None
    return multi["sites"] * multi["model_bytes"] / max(per) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="model size in GiB (default %(default)s)")
    p.add_argument("--chunk-mib", type=int, default=4, help="chunk (gRPC message) size in MiB (default 4)")
    p.add_argument("--tensors", type=int, default=4, help="number of tensors in the model (default 4)")
    p.add_argument("--dtypes", default="F32,BF16", help="comma-separated safetensors dtypes (default F32,BF16)")
    p.add_argument("--steady-rounds", type=int, default=2, help="rounds after round 0 (median; default 2)")
    p.add_argument("--raw-repeats", type=int, default=3, help="raw runs per case (median; default 3)")
    p.add_argument("--multi-sites", type=int, default=4, help="sites in the concurrent run (0: skip; default 4)")
    p.add_argument("--multi-rounds", type=int, default=2, help="rounds in the concurrent run (default 2)")
    p.add_argument("--multi-dtype", default="F32", help="dtype of the concurrent run (default F32)")
    p.add_argument("--raw-fresh", choices=["match", "numpy"], default="match",
                   help="raw 'first' memory: 'match' = like fl-plugins (download into torch.empty, upload into "
                        "np.zeros), 'numpy' = np.empty on both sides (default %(default)s)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds to pause before each 'first' measurement so memory freed just before has "
                        "gone back to the host, as it has by a real first round (default %(default)s)")
    p.add_argument("--fresh-receive", action="store_true",
                   help="also run F32 with the site receiving into new tensors every round (plain receive() "
                        "without into=; not in targets)")
    p.add_argument("--run-dir", type=Path, default=None, help="scratch directory (default: a new one in /tmp)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per case (default 900)")
    p.add_argument("--json", type=Path, help="write all figures here as JSON")
    p.add_argument("--sealed", action="store_true",
                   help="run only the sealed path (swarm: seal, relay, open) beside the mTLS path, the first of "
                        "--dtypes, with kits from provision_local (see _sealed.py)")
    p.add_argument("--quantize", action="store_true",
                   help="run only the raw baseline and the bf16/int8/nf4 encodings' encode and decode+fold "
                        "throughput on a float32 model of --gib (see _quantize.py)")
    p.add_argument("--sealed-repeats", type=int, default=3,
                   help="--sealed: steady repeats of each path after the first (median; default %(default)s)")
    args = p.parse_args(argv)

    model_bytes = int(args.gib * GiB) // 4096 * 4096
    chunk = args.chunk_mib * MiB
    dtypes = [d.strip().upper() for d in args.dtypes.split(",") if d.strip()]
    root = Path(tempfile.mkdtemp(prefix="flbench-transfer-", dir=args.run_dir or "/tmp"))
    out: dict = {"gib": args.gib, "model_bytes": model_bytes, "chunk_mib": args.chunk_mib, "tensors": args.tensors,
                 "dtypes": dtypes, "fl": {}, "ratios": {}, "started": time.time(), "env": environment()}  # fmt: skip
    t_all = time.perf_counter()
    if args.sealed:
        return sealed_main(args, out, root, model_bytes, chunk, dtypes[0], t_all)
    if args.quantize:
        return quantize_main(args, out, root, model_bytes, chunk, t_all)
    try:
        print(f"raw gRPC baseline ({model_bytes / GiB:.2f} GiB) ...", flush=True)
        out["raw"] = run_raw(model_bytes, chunk, args.raw_repeats, args.raw_fresh, args.settle, args.timeout)
        for dt in dtypes:
            print(f"fl-plugins {dt}, 1 site, {1 + args.steady_rounds} rounds ...", flush=True)
            out["fl"][dt] = run_fl(root, dt, model_bytes, args.tensors, 1, 1 + args.steady_rounds, chunk,
                                   args.timeout, args.settle)  # fmt: skip
        if args.multi_sites > 0:
            print(f"fl-plugins {args.multi_dtype}, {args.multi_sites} sites, {args.multi_rounds} rounds ...",
                  flush=True)  # fmt: skip
            out["multi"] = run_fl(root, args.multi_dtype.upper(), model_bytes, args.tensors, args.multi_sites,
                                  args.multi_rounds, chunk, args.timeout, args.settle)  # fmt: skip
        if args.fresh_receive:
            print(f"F32, 1 site receiving into new tensors every round, {1 + args.steady_rounds} rounds ...",
                  flush=True)  # fmt: skip
            out["fresh_receive"] = run_fl(root, "F32", model_bytes, args.tensors, 1, 1 + args.steady_rounds, chunk,
                                          args.timeout, args.settle, reuse=False)  # fmt: skip
        out["total_seconds"] = time.perf_counter() - t_all
        print()
        print("\n".join(report(out)))
        print(f"\ntotal {out['total_seconds']:.0f} s")
    finally:
        _clean_up(args, out, root)
    return 0


def _clean_up(args, out: dict, root: Path) -> None:
    """After a run, done or not: the scratch folder goes, the figures so far go to --json."""
    shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")


def sealed_main(args, out: dict, root: Path, model_bytes: int, chunk: int, dtype: str, t_all: float) -> int:
    """--sealed: the mTLS and sealed paths of one model through one aggregator (_sealed.py)."""
    try:
        print(f"mTLS vs sealed, {dtype} {model_bytes / GiB:.2f} GiB, 1 + {args.sealed_repeats} repeats ...", flush=True)
        out["sealed"] = _sealed.run_sealed(root, dtype, model_bytes, args.tensors, args.sealed_repeats, chunk,
                                           args.timeout, args.settle)  # fmt: skip
        out["total_seconds"] = time.perf_counter() - t_all
        print()
        print("\n".join(_sealed.report(out["sealed"], dtype, args.chunk_mib)))
        print(f"\ntotal {out['total_seconds']:.0f} s")
    finally:
        _clean_up(args, out, root)
    return 0


def quantize_main(args, out: dict, root: Path, model_bytes: int, chunk: int, t_all: float) -> int:
    """--quantize: the raw gRPC baseline, then each encoding's encode and decode+fold (_quantize.py)."""
    try:
        print(f"raw gRPC baseline ({model_bytes / GiB:.2f} GiB) ...", flush=True)
        out["raw"] = run_raw(model_bytes, chunk, args.raw_repeats, args.raw_fresh, args.settle, args.timeout)
        print(f"encode, decode+fold of {', '.join(_quantize.quantize.ENCODINGS)} ...", flush=True)
        out["quantize"] = _quantize.run_quantize(model_bytes, args.tensors, chunk, args.raw_repeats)
        out["total_seconds"] = time.perf_counter() - t_all
        print()
        print("\n".join(_quantize.report(out["quantize"], out["raw"])))
        print(f"\ntotal {out['total_seconds']:.0f} s")
    finally:
        _clean_up(args, out, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
