"""Shared pieces of the benchmarks: child processes that are always cleaned up, RSS sampling, model files,
and the aggregator / site entry points that run in their own (spawned) processes.

Nothing here is part of fl_plugins; the benchmarks drive its public classes (AggregatorServer, SiteClient,
the client API) from separate processes, over 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import signal
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

GiB = 1 << 30
MiB = 1 << 20
CTX = mp.get_context("spawn")


# -- process hygiene ---------------------------------------------------------------------------------------
def child_setup(name: str) -> None:
    """Run first in every child: die with the parent, log to stderr quietly, name the process."""
    try:  # PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL when the parent goes away
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    ppid = os.getppid()

    def watch() -> None:  # belt and braces (PDEATHSIG fires on the parent *thread*'s exit)
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
    logging.basicConfig(level=os.environ.get("BENCH_LOG", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")  # fmt: skip


def maxrss() -> int:
    """This process's peak RSS in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Children:
    """Spawned processes that are terminated (then killed) on exit, whatever happened.

    Also turns SIGTERM/SIGHUP into SystemExit in the parent so `finally` blocks run."""

    def __init__(self) -> None:
        self.procs: list[mp.process.BaseProcess] = []

    def start(self, target, *args, name: str) -> mp.process.BaseProcess:
        p = CTX.Process(target=target, args=args, name=name, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def __enter__(self) -> Children:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_exit)
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self, grace: float = 5.0) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()  # SIGTERM to that pid only
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs = [p for p in self.procs if p.is_alive()]


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def recv(conn, timeout: float, what: str) -> Any:
    """One message from a child's pipe, or a clear error (the child died or took too long)."""
    if not conn.poll(timeout):
        raise TimeoutError(f"{what}: no answer within {timeout:.0f} s")
    try:
        msg = conn.recv()
    except EOFError:
        raise RuntimeError(f"{what}: the child process exited without answering (see its stderr)") from None
    if isinstance(msg, dict) and msg.get("error"):
        raise RuntimeError(f"{what}: child failed: {msg['error']}")
    return msg


class RSSSampler:
    """Samples the RSS of named pids every `interval` s; keeps each one's peak, the peak of their sum, and each
    one's samples as (wall time, RSS) in `series` (so peaks can be split by round)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_sum = 0
        self.series: dict[str, list[tuple[float, int]]] = {}
        self._procs: dict[str, Any] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid
            with contextlib.suppress(self._psutil.Error):
                self._procs[name] = self._psutil.Process(pid)

    def start(self) -> RSSSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            total = 0
            with self._lock:
                items = list(self._procs.items())
            for name, p in items:
                try:
                    rss = p.memory_info().rss
                except self._psutil.Error:
                    continue
                total += rss
                self.series.setdefault(name, []).append((time.time(), rss))
                if rss > self.peak.get(name, 0):
                    self.peak[name] = rss
            self.peak_sum = max(self.peak_sum, total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- model files ------------------------------------------------------------------------------------------
def tensor_specs(model_bytes: int, dtype: str, n_tensors: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """A few large tensors totalling about `model_bytes` (rows of 4096 elements where possible)."""
    item = {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    per = model_bytes // item // n_tensors
    specs = []
    for i in range(n_tensors):
        shape = (per // 4096, 4096) if per >= 4096 else (per,)
        specs.append((f"layers.{i}.weight", dtype, shape))
    return specs


def write_model(path: Path, specs, seed: int = 0) -> int:
    """Stream a safetensors file for `specs` without holding it in memory; returns its size."""
    from fl_plugins.wire.layout import TensorInfo, build_header, numpy_dtype

    infos, pos = [], 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * numpy_dtype(dtype).itemsize
        infos.append(TensorInfo(name, dtype, shape, pos, pos + n))
        pos += n
    header = build_header(infos, {"format": "pt"})
    rng = np.random.default_rng(seed)
    block_elems = 4 * MiB
    with open(path, "wb") as f:
        f.write(header)
        for t in infos:
            dt = numpy_dtype(t.dtype)
            block = (rng.standard_normal(block_elems, dtype=np.float32) * 0.02).astype(dt)
            left = t.numel
            while left:
                k = min(left, block_elems)
                f.write(memoryview(block[:k].view(np.uint8)))
                left -= k
    return len(header) + pos


# -- aggregator and site processes ----------------------------------------------------------------------
def aggregator_main(conn, cfg: dict) -> None:
    """Child: run an AggregatorServer until its job ends; report address, accumulator size, peak RSS."""
    child_setup("aggregator")
    try:
        from fl_plugins.aggregator.core import AggregatorConfig
        from fl_plugins.aggregator.service import AggregatorServer

        cfg = dict(cfg)
        rss_before = rss_now()
        srv = AggregatorServer(AggregatorConfig(**cfg), "127.0.0.1:0").start()
        acc = srv.aggregator.strategy
        conn.send({"address": srv.address, "acc_bytes": acc.nbytes if acc is not None else 0,
                   "rss_at_start": rss_before, "rss_ready": rss_now(), "maxrss_ready": maxrss()})  # fmt: skip
        rc = srv.wait()
        stats = dict(srv.aggregator.stats)
        err = repr(srv.aggregator.error) if srv.aggregator.error is not None else None
        srv.stop(0)
        conn.send({"rc": rc, "maxrss": maxrss(), "stats": stats, "agg_error": err})
    except BaseException as e:  # report, then exit non-zero
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


def site_client_main(conn, address: str, name: str, fmt: str, reuse_buffers: bool = False) -> None:
    """Child: one site on SiteClient; per round: time download and upload (until the commit is acknowledged).

    reuse_buffers: download(into=...) receives into the previous round's tensors (what `flare.receive(into=)`
    and the Lightning/HF integrations do); without it every round allocates new tensors."""
    child_setup(name)
    try:
        if fmt == "torch":
            import torch  # noqa: F401  (loaded before the clock starts, as in a training script)
        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        prev = None

        rss_idle = rss_now()
        c = SiteClient(address, name)
        c.connect()
        rounds = []
        while True:
            task = c.next_task()
            if task.kind == pb.Task.END:
                break
            t0 = time.perf_counter()
            manifest, params = c.download(task, fmt, into=prev)
            t1 = time.perf_counter()
            rss_after_download = rss_now()
            env = {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1}}
            c.upload(task.round, task.attempt, params, env)
            t2 = time.perf_counter()
            rounds.append({"round": task.round, "bytes": manifest.total_bytes, "download_s": t1 - t0,
                           "upload_s": t2 - t1, "rss_after_download": rss_after_download})  # fmt: skip
            prev = params if reuse_buffers else None
            del params, manifest
        c.close()
        conn.send({"rounds": rounds, "maxrss": maxrss(), "rss_idle": rss_idle, "stats": dict(c.stats)})
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


def site_api_main(conn, address: str, name: str, add_constant: float, plain: bool = False) -> None:
    """Child: one site written like a user script on the FLARE-style client API (torch params), receiving into
    its own weights (`flare.receive(into=net.state_dict())`), or with `plain` as FLARE's examples do: `receive()`
    with no argument, new tensors every round."""
    child_setup(name)
    try:
        import torch

        import fl_plugins.client as flare

        rss_idle = rss_now()
        flare.init(server=address, site=name, params_format="torch")
        rounds = []
        weights = None  # the site's model weights, as `net.state_dict()` would give them
        while flare.is_running():
            t0 = time.perf_counter()
            model = flare.receive() if plain else flare.receive(into=weights)
            t1 = time.perf_counter()
            if add_constant:
                with torch.no_grad():
                    for p in model.params.values():
                        p.add_(add_constant)
            t2 = time.perf_counter()
            flare.send(flare.FLModel(params=model.params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
            t3 = time.perf_counter()
            rounds.append({"round": model.current_round, "receive_s": t1 - t0, "step_s": t2 - t1,
                           "send_s": t3 - t2})  # fmt: skip
            weights = model.params
            del model
        flare.shutdown()
        conn.send({"rounds": rounds, "maxrss": maxrss(), "rss_idle": rss_idle})
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


def environment() -> dict:
    """What the figures were measured on: commit, whether fl_plugins had local changes, malloc settings."""
    import platform
    import subprocess

    repo = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_head": git("rev-parse", "HEAD"), "fl_plugins_dirty": bool(git("status", "--porcelain", "fl_plugins")),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX")}  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 1e9


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f} MiB"


def pack_u64(n: int) -> bytes:
    return struct.pack("<Q", n)
