"""Load: 50 sites at once against one aggregator process, 3 rounds, on 127.0.0.1.

The aggregator is `fl-plugins server` in a subprocess (so its RSS is its own); the sites are threads of this
process over the real SiteClient with numpy params (torch-free), each adding its own constant per round. Checks:
every update is counted exactly once (metrics.jsonl), the result equals a numpy FedAvg reference bit for bit
(values are multiples of 1/16 and the weights sum to 64, so float32 sums are exact in any order), and the
aggregator's RSS stays flat across rounds: the last round's peak within RSS_MARGIN of the first's.

The margin: the first rounds warm up (native memory: glibc's heap holding 50 concurrent transfers' messages, gRPC's
per-connection state; no Python object of ours grows, tracemalloc shows): +2-5 MiB a round at first, ~+14 MiB by
round 10, then it levels off (`benchmarks/load.py --chunk-kib 64 --rounds 120`). The model is a quarter MB so
that a leak of one copy of it per update (12.5 MiB a round, 25 by round 3 on top of the warm-up) is well over the
margin, while the warm-up (3-9 MiB by round 3 here) is under it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import SiteThread, free_port, join_sites
from safetensors.numpy import load_file, save_file

SITES = 50
ROUNDS = 3
RSS_MARGIN = 12 << 20


def weight(i: int) -> int:
    return 2 if i < 14 else 1  # 14 * 2 + 36 * 1 = 64: dividing by the total weight is exact


def offset(i: int, r: int) -> float:
    return ((i % 7) - 3) / 16 + r / 8


def model() -> dict[str, np.ndarray]:
    """A quarter MB: a few tensors of multiples of 1/16 in [-32, 32)."""
    rng = np.random.default_rng(0)
    shapes = {"embed.weight": (160, 256), "layers.0.weight": (96, 256), "layers.0.bias": (256,), "head.bias": (10,)}
    return {k: (rng.integers(-512, 512, s) / 16).astype(np.float32) for k, s in shapes.items()}


def reference(g: dict[str, np.ndarray], rounds: int) -> dict[str, np.ndarray]:
    for r in range(rounds):
        g = {k: (sum(weight(i) * (v.astype(np.float64) + offset(i, r)) for i in range(SITES)) / 64).astype(np.float32)
             for k, v in g.items()}  # fmt: skip
    return g


class RSSSampler(threading.Thread):
    """(wall time, RSS) of a process every 20 ms."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(daemon=True, name="rss-sampler")
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.02):
            try:
                self.samples.append((time.time(), self.proc.memory_info().rss))
            except psutil.Error:
                return


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_fifty_sites_three_rounds(tmp_path):
    g0 = model()
    save_file(g0, str(tmp_path / "initial.safetensors"))
    run, port = tmp_path / "run", free_port()
    log = open(tmp_path / "aggregator.out", "wb")  # noqa: SIM115 - closed below
    agg = subprocess.Popen([sys.executable, "-m", "fl_plugins.cli", "server", "--address", f"127.0.0.1:{port}",
                            "--run-dir", str(run), "--rounds", str(ROUNDS), "--min-sites", str(SITES),
                            "--initial-model", str(tmp_path / "initial.safetensors"), "--chunk-bytes", str(64 << 10),
                            "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    sampler = RSSSampler(agg.pid)
    sampler.start()
    try:
        sites = [SiteThread(f"127.0.0.1:{port}", f"site-{i:02d}",
                            lambda r, p, i=i: ({k: v + np.float32(offset(i, r)) for k, v in p.items()}, "FULL",
                                               weight(i)), connect_timeout=60)
                 for i in range(SITES)]  # fmt: skip
        join_sites(*sites, timeout=120)
        assert all(s.refused == [] for s in sites), [s.refused for s in sites if s.refused]
    finally:
        sampler.stop.set()
        agg.send_signal(signal.SIGTERM)  # the job is over; skip the linger
        rc = agg.wait(30)
        log.close()
    out = (tmp_path / "aggregator.out").read_text(errors="replace")
    assert rc == 0, out[-3000:]

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["event"] == "round"]
    updates = [r for r in recs if r["event"] == "update"]
    assert [(r["round"], r["attempt"], r["updates"], r["weight"]) for r in rounds] == [
        (r, 0, SITES, 64) for r in range(ROUNDS)]  # fmt: skip
    seen = sorted((u["round"], u["site"]) for u in updates)
    assert seen == sorted((r, f"site-{i:02d}") for r in range(ROUNDS) for i in range(SITES)), "not exactly once"

    final = load_file(str(run / "global" / f"round-{ROUNDS:05d}" / "initial.safetensors"))
    want = reference(g0, ROUNDS)
    assert sorted(final) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(final[k], want[k], err_msg=k)

    # RSS per round: samples up to each round's close (the "round" event's time)
    ends = [r["time"] for r in rounds]
    peaks = []
    for r, end in enumerate(ends):
        start = ends[r - 1] if r else 0.0
        peaks.append(max((rss for t, rss in sampler.samples if start < t <= end), default=0))
    assert all(peaks), f"no RSS sample in some round: {peaks}"
    mib = [round(p / (1 << 20), 1) for p in peaks]
    print(f"aggregator peak RSS per round (MiB): {mib}")
    assert peaks[-1] <= peaks[0] + RSS_MARGIN, f"aggregator RSS grew across rounds: {mib} MiB"
