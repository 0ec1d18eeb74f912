"""Shared fixtures: a real aggregator on 127.0.0.1 port 0, and site threads that use the real gRPC client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.errors import IntegrityError, RoundError


def save_numpy(path: Path, params: dict[str, np.ndarray]) -> Path:
    """Write a safetensors file with torch (covers bf16, which safetensors.numpy cannot write)."""
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.array(v, order="C").view(np.uint16)).view(torch.bfloat16)
               if v.dtype.name == "bfloat16" else torch.from_numpy(np.array(v, order="C"))
               for k, v in params.items()}, str(path))  # fmt: skip
    return path


def load_round(run_dir: Path, r: int) -> dict[str, np.ndarray]:
    """The global model checkpointed for round r, as numpy (bf16 via ml_dtypes), read with our own parser."""
    from fl_plugins.aggregator.store import RunStore
    from fl_plugins.wire.layout import numpy_dtype

    store = RunStore(run_dir)
    m = store.load(r)
    out = {}
    for shard, path in zip(m.shards, store.shard_paths(r, m), strict=True):
        raw = path.read_bytes()
        for t in shard.tensors:
            b = raw[shard.data_start + t.start : shard.data_start + t.end]
            out[t.name] = np.frombuffer(b, numpy_dtype(t.dtype)).reshape(t.shape).copy()
    return out


@pytest.fixture
def server_factory(tmp_path):
    servers: list[AggregatorServer] = []

    def make(rounds: int = 3, min_sites: int = 1, initial: dict[str, np.ndarray] | None = None,
             **kw: Any) -> AggregatorServer:  # fmt: skip
        init_path = save_numpy(tmp_path / "initial.safetensors", initial) if initial is not None else None
        kw.setdefault("linger", 0.5)
        cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=rounds, min_sites=min_sites,
                               initial_model=init_path, **kw)  # fmt: skip
        srv = AggregatorServer(cfg).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(0)


Step = Callable[[int, dict[str, np.ndarray]], tuple[dict[str, np.ndarray], str, float]]


class SiteThread(threading.Thread):
    """A site's loop in a thread over a real SiteClient: step(round, params) -> (params, params_type, weight).

    Keeps what it received per round, the client's stats, and the error that ended it (if any)."""

    def __init__(self, address: str, name: str, step: Step, **client_kw: Any) -> None:
        super().__init__(daemon=True, name=name)
        self.address, self.site, self.step, self.client_kw = address, name, step, client_kw
        self.received: dict[int, dict[str, np.ndarray]] = {}
        self.stats: dict[str, int] = {}
        self.error: BaseException | None = None
        self.refused: list[Exception] = []

    def run(self) -> None:
        from fl_plugins.client.site import SiteClient
        from fl_plugins.wire.proto import fl_pb2 as pb

        c = SiteClient(self.address, self.site, **self.client_kw)
        try:
            c.connect()
            while True:
                task = c.next_task(poll=2.0)
                if task.kind == pb.Task.END:
                    break
                try:
                    _, params = c.download(task, "numpy")
                except RoundError:  # not served any more (the aggregator restarted earlier): ask again, as receive()
                    continue
                self.received[task.round] = {k: np.array(v) for k, v in params.items()}
                new, ptype, weight = self.step(task.round, params)
                try:
                    c.upload(task.round, task.attempt, new,
                             {"params_type": ptype, "meta": {"NUM_STEPS_CURRENT_ROUND": weight}})  # fmt: skip
                except (RoundError, IntegrityError) as e:  # refused: the site goes on, as flare.send() does
                    self.refused.append(e)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.stats = dict(c.stats)
            c.close()


def join_sites(*sites: SiteThread, timeout: float = 120) -> None:
    """Start the sites, wait for them, and raise the first error one of them met."""
    for s in sites:
        s.start()
    for s in sites:
        s.join(timeout)
        assert not s.is_alive(), f"{s.site} did not finish within {timeout} s"
    for s in sites:
        if s.error is not None:
            raise s.error


def run_sites(address: str, steps: dict[str, Step], timeout: float = 120, **client_kw: Any) -> dict[str, Any]:
    """Run one SiteThread per step; returns each site's client stats."""
    sites = [SiteThread(address, name, step, **client_kw) for name, step in steps.items()]
    join_sites(*sites, timeout=timeout)
    return {s.site: s.stats for s in sites}


@pytest.fixture
def site(monkeypatch):
    """For the trainer integrations: point the launcher's environment (FL_SERVER, FL_SITE) at an aggregator, as
    `fl-plugins run` does; shut the flare module (and its round driver) down afterwards."""
    from fl_plugins.integrations import face

    def connect_to(srv, name: str = "site-1") -> None:
        monkeypatch.setenv("FL_SERVER", srv.address)
        monkeypatch.setenv("FL_SITE", name)

    yield connect_to
    face.shutdown()


@pytest.fixture
def no_sockets(monkeypatch):
    """Opening a socket, a gRPC channel or a gRPC server fails the test (tests over the in-memory transport)."""
    from _inmemory import forbid_sockets

    forbid_sockets(monkeypatch)


@pytest.fixture
def in_memory(tmp_path):
    """make(**config) -> an InMemoryFederation (tests/_inmemory.py); all are closed, and flare shut down, after."""
    from _inmemory import InMemoryFederation

    import fl_plugins.client as flare

    feds: list[InMemoryFederation] = []

    def make(**kw: Any) -> InMemoryFederation:
        feds.append(InMemoryFederation(tmp_path, **kw))
        return feds[-1]

    yield make
    flare.shutdown()
    for f in feds:
        f.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher that needs a port number before it binds)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_env(**extra: str) -> dict[str, str]:
    """This process's environment for a multi-process launch on loopback: no rank variables inherited from an
    outer launcher, the master on 127.0.0.1, gloo on the loopback interface; `extra` on top."""
    import os
    from pathlib import Path

    drop = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1", **extra)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env
