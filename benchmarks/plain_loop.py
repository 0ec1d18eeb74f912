"""Issue 16's yardstick: the plain FLARE loop (`receive()` with no `into=`), median of three runs, against targets.

    python benchmarks/plain_loop.py                    # 1 GiB x 2 sites x 4 rounds, 3 runs, then 3 GiB x 2 sites
    python benchmarks/plain_loop.py --runs 1 --no-large
    python benchmarks/plain_loop.py --json /tmp/plain.json

Each run is `benchmarks/round.py --plain` (an aggregator process and site processes written like FLARE's examples:
`flare.receive()`, an in-place step, `flare.send()`), one after another, never two at once. Per run: the best of
its last three rounds' seconds (the aggregator's round record: start to the new global model written), the
sampled peak RSS of the whole process tree, and the aggregator's own peak. Reported: each run, the medians, and
the targets of issue 16: steady round <= 3 s, tree <= 4 GiB, aggregator <= accumulator + 0.5 GiB (1 GiB x 2
sites), and the tree <= 12 GiB at 3 GiB x 2 sites (2 rounds). FL_RECEIVE_POOL in the environment reaches the
sites. No test asserts on these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import round as round_bench  # noqa: E402
from _common import GiB, MiB  # noqa: E402


def one_run(gib: float, rounds: int, timeout: float) -> dict:
    args = round_bench.build_parser().parse_args(
        ["--plain", "--gib", str(gib), "--rounds", str(rounds), "--timeout", str(timeout)]
    )
    out = round_bench.run(args)
    secs = [r["seconds"] for r in out["per_round"]]
    return {
        "best_of_last_three_s": min(secs[-3:]),
        "rounds_s": secs,
        "timeline": [r.get("timeline") for r in out["per_round"]],
        "peak_tree_rss": out["peak_tree_rss"],
        "aggregator_maxrss": out["aggregator_maxrss"],
        "acc_bytes": out["acc_bytes"],
        "site_maxrss": out["site_maxrss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs at 1 GiB (default %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run at 1 GiB (default %(default)s)")
    p.add_argument("--no-large", action="store_true", help="skip the 3 GiB x 2 sites run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    p.add_argument("--json", type=Path, help="write all figures here as JSON")
    args = p.parse_args(argv)
    out: dict = {"runs": []}
    try:
        for k in range(args.runs):
            r = one_run(1.0, args.rounds, args.timeout)
            out["runs"].append(r)
            print(f"run {k + 1}: rounds {', '.join(f'{s:.2f}' for s in r['rounds_s'])} s; best of the last three "
                  f"{r['best_of_last_three_s']:.2f} s; tree {r['peak_tree_rss'] / GiB:.2f} GiB; aggregator "
                  f"{r['aggregator_maxrss'] / MiB:,.0f} MiB", flush=True)  # fmt: skip
        steady = statistics.median(r["best_of_last_three_s"] for r in out["runs"])
        tree = statistics.median(r["peak_tree_rss"] for r in out["runs"])
        agg = statistics.median(r["aggregator_maxrss"] for r in out["runs"])
        acc = out["runs"][0]["acc_bytes"]
        checks = [
            ("1 GiB x 2 sites: steady round <= 3 s", steady <= 3.0, f"{steady:.2f} s"),
            ("1 GiB x 2 sites: tree <= 4 GiB", tree <= 4 * GiB, f"{tree / GiB:.2f} GiB"),
            ("aggregator <= accumulator + 0.5 GiB", agg <= acc + GiB // 2,
             f"{agg / MiB:,.0f} MiB vs {(acc + GiB // 2) / MiB:,.0f} MiB"),
        ]  # fmt: skip
        if not args.no_large:
            big = one_run(3.0, 2, args.timeout)
            out["large"] = big
            print(f"3 GiB x 2 sites: rounds {', '.join(f'{s:.2f}' for s in big['rounds_s'])} s; tree "
                  f"{big['peak_tree_rss'] / GiB:.2f} GiB", flush=True)  # fmt: skip
            checks.append(("3 GiB x 2 sites: tree <= 12 GiB", big["peak_tree_rss"] <= 12 * GiB,
                           f"{big['peak_tree_rss'] / GiB:.2f} GiB"))  # fmt: skip
        print(f"median of {len(out['runs'])} runs: steady {steady:.2f} s, tree {tree / GiB:.2f} GiB, aggregator "
              f"{agg / MiB:,.0f} MiB")  # fmt: skip
        print("targets (issue 16):")
        for what, ok, val in checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {what}: {val}")
        out["targets"] = {what: {"pass": ok, "value": val} for what, ok, val in checks}
    finally:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
