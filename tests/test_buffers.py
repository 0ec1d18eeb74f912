"""Receive buffers kept across rounds for plain `receive()` calls (fl_plugins/client/buffers.py): a round's large
tensors are made from an earlier round's memory only once nothing references it; what a script still holds is
never written over."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from fl_plugins import tensors
from fl_plugins.client import buffers
from fl_plugins.client.buffers import BufferPool
from fl_plugins.wire.layout import TensorInfo

torch = pytest.importorskip("torch")
MiB = 1 << 20


def _infos() -> list[TensorInfo]:
    return [TensorInfo("w", "F32", (512, 1024), 0, 2 * MiB), TensorInfo("b", "F32", (16,), 2 * MiB, 2 * MiB + 64)]


def test_a_map_is_lent_again_only_when_nothing_holds_it(monkeypatch):
    pool = BufferPool()
    monkeypatch.setattr(buffers, "POOL", pool)
    first, _ = tensors.allocate(_infos(), "torch", None, buffers)
    assert len(pool.maps) == 1 and tuple(first["w"].shape) == (512, 1024)  # the small one is the allocator's
    ptr_a = first["w"].data_ptr()
    pool.round_done()
    view = first["w"][3]  # a view keeps map A: the next round must not write into it
    view.fill_(7.0)
    del first
    second, _ = tensors.allocate(_infos(), "torch", None, buffers)
    assert len(pool.maps) == 2 and second["w"].data_ptr() != ptr_a  # map B
    second["w"].fill_(1.0)
    assert bool((view == 7.0).all())
    pool.round_done()  # A and B both held: both kept
    del second, view
    gc.collect()
    third, _ = tensors.allocate(_infos(), "torch", None, buffers)
    assert third["w"].data_ptr() == ptr_a  # A, free again, lent again
    pool.round_done()  # B stayed free through this round: given back to the OS
    assert len(pool.maps) == 1 and pool.held_bytes() == 2 * MiB
    arrays, _ = tensors.allocate(_infos(), "numpy", None, buffers)  # numpy too: A is held, so a new map
    assert arrays["w"].flags.writeable and len(pool.maps) == 2 and arrays["w"].ctypes.data != ptr_a


@pytest.mark.integration
def test_plain_receive_reuses_a_dropped_rounds_memory_and_never_a_held_one(server_factory, monkeypatch):
    from fl_plugins.client.site import SiteClient

    monkeypatch.delenv("FL_RECEIVE_POOL", raising=False)
    assert not buffers.enabled()  # off unless asked (its figures: buffers.py)
    monkeypatch.setenv("FL_RECEIVE_POOL", "1")
    assert buffers.enabled()
    from fl_plugins.wire.proto import fl_pb2 as pb

    srv = server_factory(rounds=4, initial={"w": np.zeros((512, 1024), np.float32)})
    c = SiteClient(srv.address, "site-1")
    c.connect()
    held, ptrs = {}, []
    try:
        while (task := c.next_task(poll=2.0)).kind != pb.Task.END:
            _, params = c.download(task, "torch")
            w = params["w"]
            assert bool((w == task.round).all()), task.round  # the round's model, whatever memory it came in
            ptrs.append(w.data_ptr())
            if task.round == 1:
                held = params  # the script keeps round 1's tensors: round 2 and 3 must not touch them
            c.upload(task.round, task.attempt, {"w": w + 1}, {"params_type": "FULL", "meta": {}})
            del params, w
    finally:
        c.close()
    assert srv.wait() == 0
    assert bool((held["w"] == 1).all())  # written over by no later round
    assert ptrs[1] == ptrs[0]  # round 0's tensors were dropped: round 1 came into their memory
    assert ptrs[2] != ptrs[1]  # round 1's are held: round 2 got other memory
    assert ptrs[3] == ptrs[2]  # and round 3 round 2's, dropped again


def test_a_forked_process_writes_its_own_copy_never_the_pools_pages(monkeypatch):
    """A DataLoader worker forked while it holds round r's tensors must not share their pages with the pool."""
    import os

    pool = BufferPool()
    monkeypatch.setattr(buffers, "POOL", pool)
    params, _ = tensors.allocate(_infos(), "numpy", None, buffers)
    params["w"][0, 0] = 1.0
    pid = os.fork()
    if pid == 0:  # the child writes into its view of the map and leaves at once
        params["w"][0, 0] = 42.0
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and params["w"][0, 0] == 1.0
