"""Transfers over a long link: fl-plugins' download and upload through a delay proxy, beside the direct figures.

    python benchmarks/delay.py                          # 256 MiB, direct vs proxy at 0 ms and 100 ms round trip
    python benchmarks/delay.py --gib 0.5 --rtt-ms 100 200 --rate-mbps 800
    python benchmarks/delay.py --json /tmp/delay.json

One aggregator process and one site process (SiteClient, torch tensors, receiving into the previous round's
tensors) for `--rounds` rounds; the site connects straight to the aggregator ("direct"), or through a TCP proxy in
this process that holds every piece it forwards for half the round trip in each direction (a delay line: pieces
are timestamped when read and written out when due, so the link stays full) and, with `--rate-mbps`, paces each
direction to that many MB/s. The proxy at 0 ms shows its own ceiling (Python threads on this machine's cores);
the question is whether HTTP/2's flow-control windows cap a long link below it (the seed's users move models from
the US to India). Prints the site's steady download and upload GB/s (median of rounds >= 1) per case.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
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
    GiB,
    MiB,
    aggregator_main,
    environment,
    recv,
    site_client_main,
    tensor_specs,
    write_model,
)

PIECE = 256 * 1024


class DelayProxy:
    """127.0.0.1:port -> `target`, each direction delayed by `one_way` seconds and paced to `rate` bytes/s (0: no
    cap). Threads: one acceptor, and per connection and direction a reader and a writer."""

    def __init__(self, target: str, one_way: float, rate: float = 0.0) -> None:
        host, port = target.rsplit(":", 1)
        self.target, self.one_way, self.rate = (host, int(port)), one_way, rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._line(client, server)
            self._line(server, client)

    def _line(self, src: socket.socket, dst: socket.socket) -> None:
        queue: collections.deque = collections.deque()
        ready = threading.Condition()

        def read() -> None:
            try:
                while data := src.recv(PIECE):
                    with ready:
                        queue.append((time.monotonic() + self.one_way, data))
                        ready.notify()
            except OSError:
                pass
            with ready:
                queue.append((0.0, b""))
                ready.notify()

        def write() -> None:
            sent_at, sent = time.monotonic(), 0
            try:
                while True:
                    with ready:
                        while not queue:
                            ready.wait()
                        due, data = queue.popleft()
                    if not data:
                        break
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    if self.rate:
                        sent += len(data)
                        if (ahead := sent / self.rate - (time.monotonic() - sent_at)) > 0:
                            time.sleep(ahead)
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()


def run_case(root: Path, model: Path, rounds: int, chunk: int, rtt_ms: float | None, rate: float, timeout: float):
    """One federation of one site; rtt_ms None: direct. Returns the site's per-round download/upload seconds."""
    cfg = {"run_dir": root / f"run-{rtt_ms}", "rounds": rounds, "min_sites": 1, "initial_model": model,
           "chunk_bytes": chunk, "linger": 2.0}  # fmt: skip
    proxy = None
    with Children() as ch:
        a_par, a_child = CTX.Pipe()
        ch.start(aggregator_main, a_child, cfg, name="aggregator")
        a_child.close()
        ready = recv(a_par, timeout, "aggregator start")
        address = ready["address"]
        if rtt_ms is not None:
            proxy = DelayProxy(address, rtt_ms / 2000.0, rate)
            address = proxy.address
        try:
            p_par, p_child = CTX.Pipe()
            ch.start(site_client_main, p_child, address, "site-1", "torch", True, name="site-1")
            p_child.close()
            site = recv(p_par, timeout, "site-1")
            done = recv(a_par, timeout, "aggregator finish")
        finally:
            if proxy is not None:
                proxy.close()
    if done.get("rc") != 0:
        raise RuntimeError(f"aggregator exited with rc={done.get('rc')}: {done.get('agg_error')}")
    return site["rounds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=0.25, help="model size in GiB (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per case (default %(default)s)")
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 100.0], help="round trips through the proxy")
    p.add_argument("--rate-mbps", type=float, default=0.0, help="pace each direction to this many MB/s (0: none)")
    p.add_argument("--chunk-mib", type=int, default=4, help="chunk size in MiB (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per case")
    p.add_argument("--json", type=Path, help="write all figures here as JSON")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="flbench-delay-"))
    out: dict = {"gib": args.gib, "rounds": args.rounds, "rate_mbps": args.rate_mbps, "env": environment(),
                 "cases": {}}  # fmt: skip
    try:
        size = write_model(root / "init.safetensors", tensor_specs(int(args.gib * GiB) // 4096 * 4096, "F32", 4))
        out["model_bytes"] = size
        print(f"{size / MiB:,.0f} MiB float32, 1 site, {args.rounds} rounds, chunk {args.chunk_mib} MiB"
              + (f", proxy paced to {args.rate_mbps:g} MB/s" if args.rate_mbps else ""))  # fmt: skip
        print(f"{'link':>16}{'download GB/s':>15}{'upload GB/s':>13}")
        for rtt in [None, *args.rtt_ms]:
            rounds = run_case(root, root / "init.safetensors", args.rounds, args.chunk_mib * MiB, rtt,
                              args.rate_mbps * 1e6, args.timeout)  # fmt: skip
            steady = [r for r in rounds if r["round"] > 0] or rounds
            down = size / statistics.median(r["download_s"] for r in steady) / 1e9
            up = size / statistics.median(r["upload_s"] for r in steady) / 1e9
            label = "direct" if rtt is None else f"proxy {rtt:g} ms"
            out["cases"][label] = {"download_gbps": down, "upload_gbps": up, "rounds": rounds}
            print(f"{label:>16}{down:>15.3f}{up:>13.3f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
