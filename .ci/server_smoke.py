"""One round against the aggregator installed with `pip install '.[server]'` (no torch): a numpy site."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fl_plugins.aggregator.store import RunStore
from fl_plugins.wire.layout import Manifest, numpy_dtype, plan_shards

tmp = Path(tempfile.mkdtemp())
# the initial model: a safetensors file written with our own layout code (no torch, no safetensors package)
w = np.arange(12, dtype=np.float32).reshape(3, 4)
(shard,) = plan_shards([("w", "F32", (3, 4))])
(tmp / "init.safetensors").write_bytes(shard.header + w.tobytes())
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "fl_plugins.cli", "server", "--address", f"127.0.0.1:{port}",
                           "--run-dir", str(tmp / "run"), "--rounds", "1", "--initial-model",
                           str(tmp / "init.safetensors")])
site = """
import fl_plugins.client as flare
flare.init(params_format="numpy")
while flare.is_running():
    m = flare.receive()
    flare.send(flare.FLModel(params={"w": m.params["w"] + 1}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""
try:
    subprocess.run([sys.executable, "-c", site], check=True, timeout=120,
                   env={**os.environ, "FL_SERVER": f"127.0.0.1:{port}", "FL_SITE": "site-1"})
    assert server.wait(timeout=60) == 0
finally:
    if server.poll() is None:
        server.kill()
m: Manifest = RunStore(tmp / "run").load(1)
raw = (tmp / "run" / "global" / "round-00001" / m.shards[0].name).read_bytes()[m.shards[0].data_start :]
got = np.frombuffer(raw, numpy_dtype("F32")).reshape(3, 4)
assert np.array_equal(got, w + 1), got
print("torch-free aggregator: one round OK")
