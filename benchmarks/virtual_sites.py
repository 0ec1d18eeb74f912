"""Virtual sites on a local Ray (issue 15): `fl-plugins run --backend ray` with more sites than Ray's slots, each
sampled site running one turn per round (fl_plugins/backends/virtual.py).

    python benchmarks/virtual_sites.py                          # 25, 50 and 100 sites x 5 rounds, 10 per round
    python benchmarks/virtual_sites.py --sites 100 --rounds 5 --sample 10 --json out.json

Each run is a real `fl-plugins run` of a numpy job (a FLARE-style script, a float32 model of `--mib` MiB, a seeded
random step) with `sample_sites: --sample` and `backend: {type: ray, num_cpus: --cpus}` on a Ray it starts on
127.0.0.1 (2 cores here: 2 slots at 1 CPU). Prints per run: rounds per minute (from the first round's start to the
last round's end, the aggregator's clock), turns (site processes started), seconds per turn slot, and the peak RSS
of the `fl-plugins run` process (the aggregator runs in it; sampled every 50 ms) against the run with the fewest
sites: the aggregator's memory should not grow with the number of sites.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

SITE = textwrap.dedent("""
    import hashlib, os
    import numpy as np
    import fl_plugins.client as flare

    site = os.environ["FL_SITE"]
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        seed = int(hashlib.sha256(f"{site}:{model.current_round}".encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng(seed)
        params = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in model.params.items()}
        flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
""")


def _peak_rss(pid: int, stop: threading.Event, out: dict) -> None:
    import psutil

    try:
        p = psutil.Process(pid)
        while not stop.wait(0.05):
            out["peak"] = max(out.get("peak", 0), p.memory_info().rss)
    except psutil.Error:
        pass


def run_one(root: Path, sites: int, rounds: int, sample: int, mib: float, cpus: float, timeout: float) -> dict:
    from safetensors.numpy import save_file

    job = root / f"sites-{sites}"
    job.mkdir()
    n = int(mib * 2**20) // 4
    save_file({"w": np.zeros(n, np.float32)}, str(job / "init.safetensors"))
    (job / "site.py").write_text(SITE)
    (job / "job.yaml").write_text(
        f"name: virtual-{sites}\nscript: site.py\nsites: {sites}\nrounds: {rounds}\ninitial_model: init.safetensors\n"
        f"workflow: {{sample_sites: {sample}, seed: 1}}\nbackend: {{type: ray, num_cpus: {cpus}}}\n"
    )
    cmd = [sys.executable, "-m", "fl_plugins.cli", "run", str(job / "job.yaml"), "--run-dir", str(job / "run")]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, rss = threading.Event(), {}
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, stop, rss), daemon=True)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites: fl-plugins run exited {proc.returncode}:\n{output[-3000:]}")
    records = [json.loads(x) for x in (job / "run" / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("event") == "round"]
    samples = [r for r in records if r.get("event") == "sample"]
    first = min(r["time"] for r in samples)  # the first round's draw: its start
    span = done[-1]["time"] - first
    turns = sum((job / "run" / "sites" / f"site-{k}.log").read_text().count("# fl-plugins run (ray)")
                for k in range(1, sites + 1) if (job / "run" / "sites" / f"site-{k}.log").exists())  # fmt: skip
    slots = next((ln for ln in output.splitlines() if ln.startswith("sites: ")), "")
    return {"sites": sites, "rounds": len(done), "updates": [r["updates"] for r in done], "span_s": span,
            "rounds_per_min": 60 * len(done) / span, "turns": turns, "wall_s": time.monotonic() - t0,
            "runner_peak_rss": rss.get("peak", 0), "slots_line": slots}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, nargs="+", default=[25, 50, 100], help="site counts (default 25 50 100)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sample", type=int, default=10, help="sites sampled per round (default %(default)s)")
    p.add_argument("--mib", type=float, default=4.0, help="model size in MiB (default %(default)s)")
    p.add_argument("--cpus", type=float, default=1.0, help="Ray CPUs per site (default %(default)s)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="flbench-virtual-") as tmp:
        for n in args.sites:
            runs.append(run_one(Path(tmp), n, args.rounds, args.sample, args.mib, args.cpus, args.timeout))
            r = runs[-1]
            print(f"{n:>4} sites: {r['rounds']} rounds in {r['span_s']:.1f} s = {r['rounds_per_min']:.2f} rounds/min; "
                  f"{r['turns']} turns; updates {r['updates']}; fl-plugins run peak RSS "
                  f"{r['runner_peak_rss'] / 2**20:,.0f} MiB; wall {r['wall_s']:.0f} s", flush=True)  # fmt: skip
    print(runs[0]["slots_line"])
    base = runs[0]["runner_peak_rss"]
    for r in runs[1:]:
        ratio = r["runner_peak_rss"] / base if base else float("nan")
        print(f"memory at {r['sites']} sites vs {runs[0]['sites']}: x{ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs,
                                         "cpus": os.cpu_count()}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
