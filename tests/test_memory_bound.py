"""What a site declares cannot drive the aggregator's memory (issue 10, item 8): a real `fl-plugins server`
process, a hostile site declaring a 96 MiB shard header (safetensors allows padding) and sending a frame of
15 MiB when the aggregator's chunks are 64 KiB, and a chunk size of 8; the server's peak RSS (VmHWM, Linux)
grows by less than BOUND over what it held once its round was open. Before item 8 it kept the declared header
for the upload's life and buffered frames up to 96 MiB."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import save_numpy
from test_hostile import RawSite, refused

from fl_plugins.tensors import ByteViews, describe
from fl_plugins.wire import frames
from fl_plugins.wire.layout import Manifest, ShardLayout, plan_shards
from fl_plugins.wire.stream import ShardSender, TensorSource

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")]  # fmt: skip

CHUNK = 64 << 10
BOUND = 48 << 20  # a few control messages and chunk buffers; the attacks below declare 96 MiB and more
MODEL = {"w": np.zeros(1 << 18, np.float32)}  # 1 MiB


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def padded(params: dict[str, np.ndarray], header_bytes: int, chunk: int) -> Manifest:
    """An update whose one shard has a valid safetensors header padded with spaces to `header_bytes`."""
    plan = plan_shards(describe(params))[0]
    text = plan.header[8:].rstrip(b" ")
    text += b" " * (header_bytes - 8 - len(text))
    layout = ShardLayout(plan.name, struct.pack("<Q", len(text)) + text, plan.tensors)
    return Manifest([layout], chunk, {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1}})


def test_what_a_site_declares_does_not_drive_the_aggregators_memory(tmp_path):
    init = save_numpy(tmp_path / "init.safetensors", MODEL)
    port_file = tmp_path / "port"
    srv = subprocess.Popen([sys.executable, "-c", (
        "import sys; from fl_plugins.aggregator.core import AggregatorConfig;"
        "from fl_plugins.aggregator.service import AggregatorServer;"
        f"s = AggregatorServer(AggregatorConfig(run_dir={str(tmp_path / 'run')!r}, rounds=1, initial_model="
        f"{str(init)!r}, chunk_bytes={CHUNK}, idle_timeout=30)).start();"
        f"open({str(port_file)!r}, 'w').write(str(s.port)); import time; time.sleep(120)")])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            assert time.monotonic() < deadline and srv.poll() is None, "the aggregator did not start"
            time.sleep(0.05)
        evil = RawSite(f"127.0.0.1:{port_file.read_text()}")
        task = evil.train_task()
        time.sleep(0.5)  # the accumulator is zeroed in the background once the round opens: let it settle
        base = peak_rss(srv.pid)

        # a header of 96 MiB, declared and then streamed
        big = padded({k: v + 1 for k, v in MODEL.items()}, 96 << 20, CHUNK)
        try:
            st = evil.begin(task, big.to_json(), "big")
            evil.send(st.upload_id, ShardSender(big, 0, TensorSource(big, ByteViews(MODEL).get)).frames(0))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in e.details(), e.details()
        stages = {"declared header": peak_rss(srv.pid) - base}
        # a chunk size of 8 (each 8-byte chunk costing a frame, a digest and a call's worth of bookkeeping)
        m = Manifest(plan_shards(describe(MODEL)), 8, {"params_type": "FULL"})
        code, details = refused(evil.begin, task, m.to_json(), "tiny")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "chunk_bytes is 8" in details, details
        # a frame of 15 MiB for an aggregator whose chunks are 64 KiB, five times over
        ok = Manifest(plan_shards(describe(MODEL)), CHUNK, {"params_type": "FULL"})
        st = evil.begin(task, ok.to_json(), "frames")
        for _ in range(5):
            try:
                evil.send(st.upload_id, [frames.encode(0, [bytes(15 << 20)])])
            except grpc.RpcError:
                pass
        stages["oversized frames"] = peak_rss(srv.pid) - base
        print({k: round(v / 2**20, 1) for k, v in stages.items()})
        grown = peak_rss(srv.pid) - base
        assert grown < BOUND, f"the aggregator's peak RSS grew by {grown / 2**20:.0f} MiB"
        evil.close()
    finally:
        srv.kill()
        srv.wait(10)
    print(json.dumps({"rss_growth_mib": round(grown / 2**20, 1)}))
