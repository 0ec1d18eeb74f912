"""Seconds per federated round and peak memory of the whole federation on this machine.

    python benchmarks/round.py                                  # 2 sites x 1 GiB x 3 rounds
    python benchmarks/round.py --gib 3 --sites 2 --rounds 2
    python benchmarks/round.py --json out.json
    python benchmarks/round.py --gib 0.25 --rounds 3 --strategy fedadam   # a server optimizer (strategy.py)
    python benchmarks/round.py --rounds 4 --plain     # FLARE's plain loop: receive() without into=
    python benchmarks/round.py --backend ray          # the sites on a local Ray, as `fl-plugins run --backend ray`
    python benchmarks/round.py --gib 4 --sites 1 --rounds 2 --aggregator-memory-gib 2 --accumulator-dir /tmp/acc
                                                      # a model larger than the aggregator's memory (cgroup v1 cap)

One aggregator process (AggregatorServer with --initial-model written beforehand) and `--sites` site
processes written like a user script on the FLARE-style client API (`flare.init / is_running / receive /
send`, torch params) with a no-op local step (`--add-constant X` adds X in place instead). Seconds per round
come from the aggregator's RUN_DIR/metrics.jsonl "round" events (`seconds`: from the round's start to its
checkpoint being written; also shown: the checkpoint's share, and the wall interval between consecutive
round ends). Peak tree RSS is the peak of the sum of the aggregator's and all sites' RSS sampled together
every 50 ms; each process's own ru_maxrss is shown too. `--strategy` names the aggregator's strategy; its state
(a server optimizer's one or two float32 buffers per float element, kept in files) is shown next to the
accumulator, and the aggregator's peak RSS is checked against accumulator + state + 0.5 GiB. Each round's
timeline (aggregator/timeline.py: until every site had the model, the sites' median download / local step /
upload, the last update, the fold wait, the write) says where its seconds went.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CTX,
    Children,
    GiB,
    MiB,
    RSSSampler,
    aggregator_main,
    environment,
    read_jsonl,
    recv,
    site_api_main,
    tensor_specs,
    write_model,
)

from fl_plugins.checks import STRATEGIES as STRATEGY_NAMES  # noqa: E402


def run(args) -> dict:
    from fl_plugins.aggregator.strategy import STRATEGIES

    model_bytes = int(args.gib * GiB) // 4096 * 4096
    root = Path(tempfile.mkdtemp(prefix="flbench-round-", dir=args.run_dir or "/tmp"))
    out: dict = {"backend": args.backend, "plain": args.plain,
                 "gib": args.gib, "sites": args.sites, "rounds": args.rounds, "dtype": args.dtype,
                 "tensors": args.tensors, "add_constant": args.add_constant, "chunk_mib": args.chunk_mib,
                 "strategy": args.strategy, "keep_rounds": args.keep_rounds, "run_dir": str(root),
                 "env": environment()}  # fmt: skip
    cap = None
    try:
        t0 = time.perf_counter()
        out["model_bytes"] = write_model(root / "init.safetensors", tensor_specs(model_bytes, args.dtype, args.tensors))
        out["write_model_s"] = time.perf_counter() - t0
        cfg = {"run_dir": root / "run", "rounds": args.rounds, "min_sites": args.sites,
               "initial_model": root / "init.safetensors", "chunk_bytes": args.chunk_mib * MiB,
               "linger": 5.0, "strategy": args.strategy, "accumulator_dir": args.accumulator_dir,
               "keep_rounds": args.keep_rounds}  # fmt: skip
        out["accumulator_dir"], out["aggregator_memory_gib"] = args.accumulator_dir, args.aggregator_memory_gib
        with Children() as ch:
            sampler = RSSSampler().start()
            a_par, a_child = CTX.Pipe()
            agg = ch.start(aggregator_main, a_child, cfg, name="aggregator")
            a_child.close()
            cap = _memory_cap(agg.pid, args.aggregator_memory_gib) if args.aggregator_memory_gib else None
            sampler.add("aggregator", agg.pid)
            ready = recv(a_par, args.timeout, "aggregator start")
            t_ready = time.time()
            deadline = time.monotonic() + args.timeout
            if args.backend == "ray":
                sites = _ray_sites(args, root, ready["address"], sampler, deadline)
            else:
                pipes = []
                for k in range(args.sites):
                    p_par, p_child = CTX.Pipe()
                    p = ch.start(site_api_main, p_child, ready["address"], f"site-{k + 1}", args.add_constant,
                                 args.plain, name=f"site-{k + 1}")  # fmt: skip
                    p_child.close()
                    sampler.add(f"site-{k + 1}", p.pid)
                    pipes.append(p_par)
                sites = [recv(p, max(1.0, deadline - time.monotonic()), f"site-{k + 1}") for k, p in enumerate(pipes)]
            done = recv(a_par, max(1.0, deadline - time.monotonic()), "aggregator finish")
            sampler.stop()
            if cap is not None:
                out["aggregator_cgroup_peak"] = int((cap / "memory.max_usage_in_bytes").read_text())
        if done.get("rc") != 0:
            raise RuntimeError(f"aggregator exited with rc={done.get('rc')}: {done.get('agg_error')}")
        records = read_jsonl(root / "run" / "metrics.jsonl")
        events = [e for e in records if e.get("event") == "round"]
        updates = [e for e in records if e.get("event") == "update"]
        prev = None
        rounds = []
        for e in events:
            rounds.append({"round": e["round"], "attempt": e["attempt"], "updates": e["updates"],
                           "seconds": e["seconds"], "checkpoint_seconds": e["checkpoint_seconds"],
                           "interval_s": (e["time"] - prev) if prev is not None else e["time"] - t_ready,
                           "timeline": _timeline(e, updates)})  # fmt: skip
            prev = e["time"]
        out["per_round"] = rounds
        steady = [r["seconds"] for r in rounds if r["round"] > 0]
        out["steady_mean_s"] = statistics.mean(steady) if steady else None
        out["steady_interval_mean_s"] = (statistics.mean(r["interval_s"] for r in rounds if r["round"] > 0)
                                         if steady else None)  # fmt: skip
        out["acc_bytes"] = ready["acc_bytes"]
        # every tensor here is a float one: the state has one float32 per element per buffer, as the accumulator
        out["state_bytes"] = len(STRATEGIES[args.strategy].buffers) * ready["acc_bytes"]
        out["peak_tree_rss"] = sampler.peak_sum
        out["sampled_peak_rss"] = dict(sampler.peak)
        out["aggregator_maxrss"] = done["maxrss"]
        out["site_maxrss"] = [s["maxrss"] for s in sites]
        out["site_rounds"] = [s["rounds"] for s in sites]
        out["aggregator_stats"] = done["stats"]
        with open("/proc/meminfo") as f:
            out["mem_total"] = int(f.readline().split()[1]) * 1024
        return out
    except Exception as e:
        oom = cap is not None and "oom_kill 0" not in (cap / "memory.oom_control").read_text()
        if oom:  # what the sites saw (an aggregator gone) is not the cause
            raise RuntimeError(f"the aggregator was killed at its {args.aggregator_memory_gib} GiB memory cap") from e
        raise
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        if cap is not None:
            cap.rmdir()  # (its processes have ended: Children stops them)


def _memory_cap(pid: int, gib: float) -> Path:
    """Put the aggregator (`pid`) into a cgroup v1 memory group capped at `gib` GiB (its page cache counts too, and is
    reclaimed at the cap; anonymous memory beyond it is killed: there is no swap)."""
    group = Path("/sys/fs/cgroup/memory") / f"flbench-{pid}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(int(gib * GiB)))
    (group / "cgroup.procs").write_text(str(pid))
    return group


def _ray_sites(args, root: Path, address: str, sampler: RSSSampler, deadline: float) -> list[dict]:
    """The sites as `fl-plugins run --backend ray` runs them: each a script started by a Ray actor (on_ray.py)
    holding cores / sites CPUs, on a Ray started here on 127.0.0.1. Every Ray process (its servers, the actors'
    workers, the sites) counts in the tree's RSS, as the site processes do without Ray."""
    import os

    import psutil

    from fl_plugins.backends import on_ray
    from fl_plugins.backends.spec import BackendSpec

    spec = BackendSpec(type="ray", num_cpus=(os.cpu_count() or 1) / args.sites)
    on_ray.connect(spec)
    out = root / "sites"
    out.mkdir()
    script = str(Path(__file__).resolve().parent / "_ray_site.py")
    runs = []
    for k in range(args.sites):
        name = f"site-{k + 1}"
        argv = [script, address, name, str(out / f"{name}.json"), str(args.add_constant), "1" if args.plain else "0"]
        log = open(out / f"{name}.log", "ab")  # noqa: SIM115 - closed by RaySite.kill
        runs.append(on_ray.RaySite(spec, name, argv, {"OMP_NUM_THREADS": "1"}, out / f"{name}.log", log))
    known = set(sampler.pids.values())
    try:
        while any(r.poll() is None for r in runs):
            for p in psutil.Process().children(recursive=True):  # Ray's servers, workers and the sites
                if p.pid not in known:
                    known.add(p.pid)
                    with contextlib.suppress(psutil.Error):
                        sampler.add(f"ray:{p.name()}:{p.pid}", p.pid)
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray sites did not finish in time")
            time.sleep(0.2)
    finally:
        for r in runs:
            r.kill()
        on_ray.disconnect()
    bad = [r for r in runs if r.rc != 0]
    if bad:
        raise RuntimeError(f"{bad[0].name} exited with {bad[0].rc}: see {bad[0].log_path}")
    return [json.loads((out / f"{r.name}.json").read_text()) for r in runs]


def _timeline(rnd: dict, updates: list[dict]) -> dict:
    """The round's timeline (aggregator/timeline.py) with its sites' median download, train and upload."""
    line = dict(rnd.get("timeline") or {})
    ups = [u.get("timeline") or {} for u in updates if u.get("round") == rnd["round"]]
    for key in ("download", "train", "upload"):
        values = [u[key] for u in ups if key in u]
        if values:
            line[f"site_{key}"] = statistics.median(values)
    return line


def report(out: dict) -> list[str]:
    lines = [f"{out['sites']} sites x {out['model_bytes'] / GiB:.2f} GiB {out['dtype']} ({out['tensors']} tensors) "
             f"x {out['rounds']} rounds, chunk {out['chunk_mib']} MiB, strategy {out['strategy']}, local step: "
             f"{'add ' + str(out['add_constant']) if out['add_constant'] else 'no-op'}, sites "
             f"{'receive() with no into= (plain FLARE loop)' if out.get('plain') else 'receive(into=)'}"
             f"{', sites on Ray' if out.get('backend') == 'ray' else ''}"]  # fmt: skip
    env = out.get("env", {})
    dirty = " (+ local changes)" if env.get("fl_plugins_dirty") else ""
    arenas = env.get("MALLOC_ARENA_MAX")
    lines.append(f"fl-plugins at {env.get('git_head', '?')[:12]}{dirty}, MALLOC_ARENA_MAX={arenas}")
    lines.append(f"{'round':>5}{'seconds':>9}{'checkpoint':>12}{'interval':>10}   per-site receive/send s")
    for r in out["per_round"]:
        sr = [next((x for x in s if x["round"] == r["round"]), None) for s in out["site_rounds"]]
        per = "  ".join(f"{x['receive_s']:.2f}/{x['send_s']:.2f}" for x in sr if x)
        lines.append(f"{r['round']:>5}{r['seconds']:>9.2f}{r['checkpoint_seconds']:>12.2f}{r['interval_s']:>10.2f}"
                     f"   {per}")  # fmt: skip
    keys = ("downloads", "site_download", "site_train", "site_upload", "last_update", "fold_wait", "write")
    lines.append("where each round went, s (aggregator's clock): " + " / ".join(keys))
    for r in out["per_round"]:
        tl = r.get("timeline") or {}
        lines.append(f"{r['round']:>5}   " + " / ".join("-" if tl.get(k) is None else f"{tl[k]:.2f}" for k in keys))
    sm = out["steady_mean_s"]
    lines.append(f"steady-round mean (rounds >= 1): {'-' if sm is None else f'{sm:.2f}'} s"
                 + ("" if sm is None else f" (wall interval {out['steady_interval_mean_s']:.2f} s)"))  # fmt: skip
    lines.append(f"peak tree RSS (sum, sampled): {out['peak_tree_rss'] / GiB:.2f} GiB of {out['mem_total'] / GiB:.1f} "
                 f"GiB; aggregator ru_maxrss {out['aggregator_maxrss'] / MiB:,.0f} MiB (accumulator "
                 f"{out['acc_bytes'] / MiB:,.0f} MiB, strategy state on disk {out['state_bytes'] / MiB:,.0f} MiB); "
                 "sites ru_maxrss "
                 + ", ".join(f"{x / MiB:,.0f}" for x in out["site_maxrss"]) + " MiB")  # fmt: skip
    if out.get("aggregator_cgroup_peak"):
        lines.append(f"aggregator capped at {out['aggregator_memory_gib']:.2f} GiB (cgroup, page cache included; "
                     f"accumulator in {out['accumulator_dir'] or 'memory'}): its cgroup peaked at "
                     f"{out['aggregator_cgroup_peak'] / GiB:.2f} GiB")  # fmt: skip
    checks = []
    if abs(out["gib"] - 1) < 1e-9 and out["sites"] == 2 and sm is not None:
        checks.append(("1 GiB, 2 sites: steady round < 5 s", sm < 5.0, f"{sm:.2f} s"))
    checks.append(("completes within RAM", out["peak_tree_rss"] < out["mem_total"],
                   f"{out['peak_tree_rss'] / GiB:.2f} GiB < {out['mem_total'] / GiB:.1f} GiB"))  # fmt: skip
    bound = out["acc_bytes"] + out["state_bytes"] + GiB // 2
    checks.append(("aggregator memory <= accumulator + strategy state + 0.5 GiB", out["aggregator_maxrss"] <= bound,
                   f"{out['aggregator_maxrss'] / MiB:,.0f} MiB <= {bound / MiB:,.0f} MiB"))  # fmt: skip
    lines.append("targets:")
    for what, ok, val in checks:
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {what}: {val}")
    out["targets"] = {what: {"pass": ok, "value": val} for what, ok, val in checks}
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=2, help="site processes (default %(default)s)")
    p.add_argument("--gib", type=float, default=1.0, help="model size in GiB (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default %(default)s)")
    p.add_argument("--dtype", default="F32", choices=["F32", "BF16", "F16"], help="tensor dtype (default F32)")
    p.add_argument("--tensors", type=int, default=8, help="number of tensors (default %(default)s)")
    p.add_argument("--chunk-mib", type=int, default=4, help="chunk size in MiB (default %(default)s)")
    p.add_argument("--strategy", default="fedavg", choices=STRATEGY_NAMES,
                   help="the aggregator's strategy (default %(default)s)")  # fmt: skip
    p.add_argument("--backend", default="process", choices=["process", "ray"],
                   help="sites as processes (default), or as `fl-plugins run --backend ray` runs them")
    p.add_argument("--plain", action="store_true",
                   help="sites call receive() with no into= (FLARE's examples): new tensors every round")
    p.add_argument("--add-constant", type=float, default=0.0,
                   help="local step: add this constant to every parameter in place (default 0: no-op)")
    p.add_argument("--keep-rounds", type=int, default=None, help="the aggregator's keep_rounds (default: every round)")
    p.add_argument("--accumulator-dir", type=Path, default=None, help="the aggregator's accumulator_dir")
    p.add_argument("--aggregator-memory-gib", type=float, default=0,
                   help="cap the aggregator's memory (page cache included) with a cgroup v1 group (root)")  # fmt: skip
    p.add_argument("--run-dir", type=Path, default=None, help="parent of the scratch run directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed for the whole run")
    p.add_argument("--json", type=Path, help="write all figures here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
