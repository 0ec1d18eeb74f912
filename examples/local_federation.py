"""`make demo`: a whole federation on this machine: the aggregator and 3 sites on 127.0.0.1.

Starts `fl-plugins server` and three processes of examples/client_api_train.py, waits for the last round,
and prints the per-round metrics the aggregator recorded. A later issue replaces this with `fl-plugins run`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITES = 3
ROUNDS = 5


def main() -> int:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    run = Path(os.environ.get("FL_DEMO_RUN_DIR") or tempfile.mkdtemp(prefix="fl-demo-"))
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))  # the sites' architecture
    save_file(net.state_dict(), str(run / "initial.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "fl_plugins.cli", "server", "--address", address,
                               "--run-dir", str(run / "run"), "--rounds", str(ROUNDS), "--min-sites", str(SITES),
                               "--initial-model", str(run / "initial.safetensors"),
                               "--log-level", "WARNING"])  # fmt: skip
    sites = [subprocess.Popen([sys.executable, str(HERE / "client_api_train.py")],
                              env={**os.environ, "FL_SERVER": address, "FL_SITE": f"site-{i}"})
             for i in range(1, SITES + 1)]  # fmt: skip
    t0 = time.monotonic()
    try:
        codes = [p.wait(timeout=600) for p in sites]
        code = server.wait(timeout=60)
    finally:
        for p in [*sites, server]:
            if p.poll() is None:
                p.kill()
    print(f"\nfederation finished in {time.monotonic() - t0:.1f} s; site exit codes {codes}, aggregator {code}")
    print(f"run directory: {run / 'run'}\n\nround  updates  mean val_acc of the global model (weighted)")
    for line in (run / "run" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "round":
            print(f"{rec['round']:>5}  {rec['updates']:>7}  {rec['metrics'].get('val_acc', float('nan')):.3f}")
    return 0 if code == 0 and not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
