"""Load: many sites at once against one aggregator for several rounds: updates/s, seconds per round, peak RSS.

    python benchmarks/load.py                           # 50 sites x 60 rounds, 256 KiB model, vs 1 site
    python benchmarks/load.py --sites 100 --rounds 120
    python benchmarks/load.py --json out.json

One aggregator process (AggregatorServer, --initial-model written beforehand) and one site process running
`--sites` SiteClient threads (numpy params, torch-free, as tests/test_load.py runs them; the local step sends
back what it received, plus `--add-constant`). Baseline, measured in the same run: the same job with one site.

Figures per job: updates/s over the whole job (accepted updates / wall seconds from the first round's start to
the last checkpoint) and steady (sites / mean interval between round ends, rounds >= 1); seconds per round from
the aggregator's RUN_DIR/metrics.jsonl "round" events (round start to checkpoint written); the aggregator's
peak RSS sampled every 20 ms (psutil), also split by round (the samples up to each round's end; ru_maxrss is in
the JSON only: a spawned child's starts at its parent's RSS, so it overstates small processes); each site's
median download/upload seconds. Ratios: updates/s with N sites over 1 site; aggregator peak RSS N vs 1 site.
Checks: every update counted exactly once; the aggregator's RSS flat: the highest round peak of the last third
of the rounds within FLAT_MIB of the middle third's. (The first rounds warm up: glibc's heap grows to hold the
messages of N concurrent transfers, up and down, and gRPC's per-connection state: with 50 sites and a 256 KiB
model in one chunk, +50 MiB by round 10, +10 more by round 40, then flat. No Python object of fl-plugins grows:
tracemalloc.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CTX,
    Children,
    MiB,
    RSSSampler,
    aggregator_main,
    child_setup,
    environment,
    maxrss,
    median,
    read_jsonl,
    recv,
    tensor_specs,
    write_model,
)

KiB = 1 << 10
FLAT_MIB = 8  # RSS growth allowed from the middle third of the rounds to the last third


def sites_main(conn, address: str, n: int, add_constant: float) -> None:
    """Child: `n` sites, one thread each, on SiteClient with numpy params; per round, download and upload
    seconds (until the commit is acknowledged)."""
    child_setup("sites")
    try:
        import numpy as np

        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        results: list[dict] = [{} for _ in range(n)]

        def site(k: int) -> None:
            c = SiteClient(address, f"site-{k + 1:03d}", connect_timeout=120, retry_timeout=300)
            rounds = []
            try:
                c.connect()
                while (task := c.next_task(poll=2.0)).kind != pb.Task.END:
                    t0 = time.perf_counter()
                    _, params = c.download(task, "numpy")
                    t1 = time.perf_counter()
                    if add_constant:
                        params = {name: v + np.float32(add_constant) for name, v in params.items()}
                    env = {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1}}
                    c.upload(task.round, task.attempt, params, env)
                    rounds.append({"round": task.round, "download_s": t1 - t0, "upload_s": time.perf_counter() - t1})
                results[k] = {"rounds": rounds, "stats": dict(c.stats)}
            except BaseException as e:  # reported to the parent
                results[k] = {"error": f"{type(e).__name__}: {e}"}
            finally:
                c.close()

        threads = [threading.Thread(target=site, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            conn.send({"error": f"{len(errors)} of {n} sites failed; the first: {errors[0]}"})
            return
        conn.send({"sites": results, "maxrss": maxrss()})
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


def run_job(root: Path, n_sites: int, args) -> dict:
    run_dir = root / f"run-{n_sites}"
    cfg = {"run_dir": run_dir, "rounds": args.rounds, "min_sites": n_sites, "initial_model": root / "init.safetensors",
           "linger": 0.5}  # fmt: skip
    if args.chunk_kib:
        cfg["chunk_bytes"] = args.chunk_kib * KiB
    with Children() as ch:
        sampler = RSSSampler(interval=0.02).start()
        a_par, a_child = CTX.Pipe()
        agg = ch.start(aggregator_main, a_child, cfg, name="aggregator")
        a_child.close()
        sampler.add("aggregator", agg.pid)
        ready = recv(a_par, args.timeout, "aggregator start")
        s_par, s_child = CTX.Pipe()
        sp = ch.start(sites_main, s_child, ready["address"], n_sites, args.add_constant, name="sites")
        s_child.close()
        sampler.add("sites", sp.pid)
        deadline = time.monotonic() + args.timeout
        sites = recv(s_par, max(1.0, deadline - time.monotonic()), f"{n_sites} sites")
        done = recv(a_par, max(1.0, deadline - time.monotonic()), "aggregator finish")
        sampler.stop()
    if done.get("rc") != 0:
        raise RuntimeError(f"aggregator exited with rc={done.get('rc')}: {done.get('agg_error')}")
    events = read_jsonl(run_dir / "metrics.jsonl")
    rounds = [e for e in events if e["event"] == "round"]
    updates = [e for e in events if e["event"] == "update"]
    counted = sorted((u["round"], u["site"]) for u in updates
                     if any((u["round"], u["attempt"]) == (r["round"], r["attempt"]) for r in rounds))  # fmt: skip
    want = sorted((r, f"site-{k + 1:03d}") for r in range(args.rounds) for k in range(n_sites))
    series = sampler.series.get("aggregator", [])
    per_round, prev = [], None
    for e in rounds:
        start = prev if prev is not None else 0.0
        peak = max((rss for t, rss in series if start < t <= e["time"]), default=None)
        per_round.append({"round": e["round"], "attempt": e["attempt"], "updates": e["updates"],
                          "seconds": e["seconds"], "checkpoint_seconds": e["checkpoint_seconds"],
                          "interval_s": None if prev is None else e["time"] - prev, "peak_rss": peak})  # fmt: skip
        prev = e["time"]
    t_first = rounds[0]["time"] - rounds[0]["seconds"]
    steady = [r["interval_s"] for r in per_round if r["interval_s"] is not None]
    site_rounds = [x for s in sites["sites"] for x in s["rounds"]]
    return {
        "sites": n_sites, "per_round": per_round, "exactly_once": counted == want,
        "updates": len(counted), "restarts": done["stats"]["round_restarts"],
        "updates_per_s": len(counted) / (rounds[-1]["time"] - t_first),
        "steady_updates_per_s": n_sites / statistics.mean(steady) if steady else None,
        "round_s_mean": statistics.mean(r["seconds"] for r in per_round),
        "aggregator_maxrss": done["maxrss"], "aggregator_peak_rss": sampler.peak.get("aggregator", 0),
        "sites_maxrss": sites["maxrss"], "sites_peak_rss": sampler.peak.get("sites", 0),
        "site_download_s": median([x["download_s"] for x in site_rounds]),
        "site_upload_s": median([x["upload_s"] for x in site_rounds]),
        "retries": sum(s["stats"]["retries"] for s in sites["sites"]),
    }  # fmt: skip


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="flbench-load-", dir=args.run_dir or "/tmp"))
    out: dict = {"sites": args.sites, "rounds": args.rounds, "model_kib": args.model_kib, "tensors": args.tensors,
                 "chunk_kib": args.chunk_kib, "add_constant": args.add_constant, "env": environment()}  # fmt: skip
    try:
        specs = tensor_specs(args.model_kib * KiB, "F32", args.tensors)
        out["model_bytes"] = write_model(root / "init.safetensors", specs)
        out["baseline"] = run_job(root, 1, args)
        out["load"] = run_job(root, args.sites, args)
        return out
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def report(out: dict) -> list[str]:
    b, n = out["baseline"], out["load"]
    env = out.get("env", {})
    dirty = " (+ local changes)" if env.get("fl_plugins_dirty") else ""
    lines = [f"fl-plugins at {env.get('git_head', '?')[:12]}{dirty}, MALLOC_ARENA_MAX={env.get('MALLOC_ARENA_MAX')}",
             f"model {out['model_bytes'] / KiB:,.0f} KiB F32 ({out['tensors']} tensors), chunk "
             f"{out['chunk_kib'] or 4096} KiB, {out['rounds']} rounds, local step: "
             f"{'add ' + str(out['add_constant']) if out['add_constant'] else 'send back what was received'}", "",
             f"{'':<34}{'1 site':>10}{str(n['sites']) + ' sites':>12}{'ratio':>9}"]  # fmt: skip

    def row(what: str, x, y, fmt: str, ratio: str = "") -> None:
        fx = "-" if x is None else format(x, fmt)
        fy = "-" if y is None else format(y, fmt)
        lines.append(f"{what:<34}{fx:>10}{fy:>12}{ratio:>9}")

    def div(x, y) -> str:
        return f"{y / x:.2f}" if x and y else "-"

    row("updates/s, whole job", b["updates_per_s"], n["updates_per_s"], ".1f", div(b["updates_per_s"],
        n["updates_per_s"]))  # fmt: skip
    row("updates/s, steady (rounds >= 1)", b["steady_updates_per_s"], n["steady_updates_per_s"], ".1f",
        div(b["steady_updates_per_s"], n["steady_updates_per_s"]))  # fmt: skip
    row("round seconds, mean", b["round_s_mean"], n["round_s_mean"], ".3f", div(b["round_s_mean"], n["round_s_mean"]))
    row("site download s, median", b["site_download_s"], n["site_download_s"], ".4f")
    row("site upload s (to commit), median", b["site_upload_s"], n["site_upload_s"], ".4f")
    row("aggregator peak RSS MiB", b["aggregator_peak_rss"] / MiB, n["aggregator_peak_rss"] / MiB, ".1f",
        f"+{(n['aggregator_peak_rss'] - b['aggregator_peak_rss']) / MiB:.1f}")  # fmt: skip
    row("site process peak RSS MiB", b["sites_peak_rss"] / MiB, n["sites_peak_rss"] / MiB, ".1f")
    row("round restarts", b["restarts"], n["restarts"], "d")
    row("client retries", b["retries"], n["retries"], "d")
    lines.append("")
    lines.append(f"{n['sites']} sites, per round:")
    lines.append(f"{'round':>5}{'updates':>9}{'seconds':>9}{'checkpoint':>12}{'interval':>10}{'agg peak RSS':>14}")
    for r in n["per_round"]:
        iv = "-" if r["interval_s"] is None else f"{r['interval_s']:.3f}"
        rss = "-" if r["peak_rss"] is None else f"{r['peak_rss'] / MiB:.1f} MiB"
        lines.append(f"{r['round']:>5}{r['updates']:>9}{r['seconds']:>9.3f}{r['checkpoint_seconds']:>12.3f}{iv:>10}"
                     f"{rss:>14}")  # fmt: skip
    peaks = [r["peak_rss"] or 0 for r in n["per_round"]]
    checks = [("every update counted exactly once (1 site)", b["exactly_once"], f"{b['updates']} updates"),
              (f"every update counted exactly once ({n['sites']} sites)", n["exactly_once"],
               f"{n['updates']} updates")]  # fmt: skip
    third = len(peaks) // 3
    if third >= 3:
        mid, last = max(peaks[third : 2 * third]), max(peaks[2 * third :])
        checks.append((f"aggregator RSS flat: last third of the rounds' peak <= middle third's + {FLAT_MIB} MiB",
                       last <= mid + FLAT_MIB * MiB, f"{mid / MiB:.1f} -> {last / MiB:.1f} MiB (round 0: "
                       f"{peaks[0] / MiB:.1f} MiB)"))  # fmt: skip
    else:
        lines.append(f"(RSS flatness not judged: it needs --rounds >= 9, got {len(peaks)})")
    lines.append("checks:")
    for what, ok, val in checks:
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {what}: {val}")
    out["checks"] = {what: {"pass": ok, "value": val} for what, ok, val in checks}
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=50, help="sites at once (default %(default)s)")
    p.add_argument("--rounds", type=int, default=60,
                   help="rounds (default %(default)s: the first ~20 warm up, see the README)")  # fmt: skip
    p.add_argument("--model-kib", type=int, default=256, help="model size in KiB (default %(default)s)")
    p.add_argument("--tensors", type=int, default=4, help="number of tensors (default %(default)s)")
    p.add_argument("--chunk-kib", type=int, default=None, help="chunk size in KiB (default: the aggregator's, 4 MiB)")
    p.add_argument("--add-constant", type=float, default=0.0, help="local step: add this to every parameter")
    p.add_argument("--run-dir", type=Path, default=None, help="parent of the scratch run directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (checkpoints, metrics.jsonl)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed for each job")
    p.add_argument("--json", type=Path, help="write all figures here as JSON")
    args = p.parse_args(argv)
    out: dict = {}
    try:
        out = run(args)
        print("\n".join(report(out)))
    finally:
        if args.json and out:
            args.json.write_text(json.dumps(out, indent=1, default=str))
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
