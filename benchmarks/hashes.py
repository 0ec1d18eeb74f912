"""Hash throughput on one core: the numbers behind the chunk and shard hash choice (wire/frames.py).

    python benchmarks/hashes.py                 # 256 MiB, best of 5, pinned to one CPU
    python benchmarks/hashes.py --mib 1024 --json out.json

Hashes a buffer of random bytes (already in memory) in one call and in 4 MiB pieces (how chunks are hashed).
blake3 runs single-threaded (its default); it is skipped if the package is not installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def candidates() -> dict:
    import xxhash

    out = {"sha256": lambda: hashlib.sha256()}
    try:
        import blake3

        out["blake3"] = lambda: blake3.blake3(max_threads=1)
    except ImportError:
        pass
    out["xxh3_64"] = xxhash.xxh3_64
    out["xxh3_128"] = xxhash.xxh3_128
    return out


def measure(make, mv: memoryview, piece: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = make()
        for off in range(0, len(mv), piece):
            h.update(mv[off : off + piece])
        h.digest()
        best = min(best, time.perf_counter() - t0)
    return len(mv) / best / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="buffer size in MiB (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="best of N (default %(default)s)")
    p.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    n = args.mib << 20
    buf = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    mv = memoryview(buf).cast("B")
    out = {"mib": args.mib, "cpu": cpu, "repeats": args.repeats, "gbps": {}}
    print(f"{args.mib} MiB in memory, one core (cpu {cpu}), best of {args.repeats}")
    print(f"{'hash':<10}{'one call GB/s':>15}{'4 MiB pieces GB/s':>20}")
    for name, make in candidates().items():
        whole = measure(make, mv, n, args.repeats)
        pieces = measure(make, mv, 4 << 20, args.repeats)
        out["gbps"][name] = {"one_call": whole, "4mib_pieces": pieces}
        print(f"{name:<10}{whole:>15.2f}{pieces:>20.2f}")
    if "blake3" not in out["gbps"]:
        print("blake3: not installed (pip install blake3)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
