"""A single tensor over 2 GiB travels both ways (offered as round 0's model, downloaded, uploaded, folded)."""

from __future__ import annotations

import numpy as np
import pytest

from fl_plugins.client.site import SiteClient
from fl_plugins.wire.proto import fl_pb2 as pb

N = (2 << 30) // 4 + 4096  # float32 elements: 2 GiB + 16 KiB, past every 32-bit length
PERIOD = 4096


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tensor_over_2_gib_round_trips(server_factory):
    pattern = np.arange(PERIOD, dtype=np.float32)
    big = np.resize(pattern, N)
    srv = server_factory(rounds=1)
    c = SiteClient(srv.address, "big", can_offer_initial=True)
    c.connect()
    try:
        assert c.next_task().kind == pb.Task.OFFER_INITIAL
        c.upload(0, 0, {"big": big, "small": np.ones(3, np.float32)}, {"params_type": "FULL"}, initial=True)
        del big
        task = c.next_task()
        assert task.kind == pb.Task.TRAIN
        _, params = c.download(task, "numpy")
        got = params["big"]
        assert got.shape == (N,)
        for b in range(0, N - PERIOD + 1, 64 * PERIOD * 1024):  # compare in blocks, no second 2 GiB array
            n = min(64 * PERIOD * 1024, N - b)
            np.testing.assert_array_equal(got[b : b + n], np.resize(pattern, n))
        got += 1  # the 'training step', in place in the received tensor
        c.upload(0, task.attempt, params, {"params_type": "FULL"})
        del params, got
    finally:
        c.close()
    assert srv.wait() == 0
    run = srv.aggregator.config.run_dir
    m = srv.aggregator.store.load(1)
    shard = next(s for s in m.shards if any(t.name == "big" for t in s.tensors))
    t = next(t for t in shard.tensors if t.name == "big")
    out = np.memmap(run / "global" / "round-00001" / shard.name, np.float32, "r", shard.data_start + t.start, (N,))
    step = 64 * PERIOD * 1024
    for b in range(0, N, step):
        np.testing.assert_array_equal(out[b : b + step], np.resize(pattern, min(step, N - b)) + 1)
