"""A real aggregator in this process, reached over InMemoryTransport: no socket, no gRPC server.

    fed = InMemoryFederation(tmp_path, rounds=2, initial={"w": np.ones(4, np.float32)})
    fed.activate("site-1")              # the current client session: flare.receive() etc. now reach `fed`
    client = fed.client("site-2")       # a SiteClient of another site
    ...
    fed.close()

`forbid_sockets(monkeypatch)` makes opening a socket, a gRPC channel or a gRPC server fail the test.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from safetensors.numpy import save_file

from fl_plugins.aggregator.core import Aggregator
from fl_plugins.aggregator.service import Servicer
from fl_plugins.client import session
from fl_plugins.client.session import ClientSession
from fl_plugins.client.site import SiteClient
from fl_plugins.client.transport import InMemoryTransport
from fl_plugins.config import AggregatorConfig


def forbid_sockets(monkeypatch: Any) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test over the in-memory transport opened a socket or a gRPC channel")

    monkeypatch.setattr(socket, "socket", refuse)
    for name in ("insecure_channel", "secure_channel", "server"):
        monkeypatch.setattr(grpc, name, refuse)


class InMemoryFederation:
    """An `Aggregator` (started) and its `Servicer`; sites reach it through their own InMemoryTransport."""

    def __init__(
        self, tmp_path: Path, *, rounds: int = 2, initial: dict[str, np.ndarray] | None = None, **config: Any
    ) -> None:
        path = None
        if initial is not None:
            path = tmp_path / "initial.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in initial.items()}, str(path))
        config.setdefault("linger", 0.1)
        self.config = AggregatorConfig(run_dir=tmp_path / "run", rounds=rounds, initial_model=path, **config)
        self.aggregator = Aggregator(self.config)
        self.aggregator.start()
        self.servicer = Servicer(self.aggregator)
        self.clients: list[SiteClient] = []

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    def transport(self) -> InMemoryTransport:
        return InMemoryTransport(self.servicer)

    def client(self, site: str, **kw: Any) -> SiteClient:
        """A SiteClient of `site` (not connected yet)."""
        c = SiteClient(None, site, transport=self.transport(), **kw)
        self.clients.append(c)
        return c

    def activate(self, site: str, *, params_format: str = "numpy", **kw: Any) -> ClientSession:
        """Connect `site` and make its session the current one (what flare.init() would do over gRPC)."""
        return session.activate(ClientSession(self.client(site, **kw), params_format=params_format))

    def wait(self, timeout: float = 30.0) -> None:
        """Until the job is over (every round checkpointed and `linger` passed); raises the aggregator's error."""
        deadline = time.monotonic() + timeout
        while not self.aggregator.finished():
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.02)
        assert self.aggregator.error is None, self.aggregator.error

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The run directory's metrics.jsonl records of one kind ("update", "round", "refold", ...)."""
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r.get("event") == kind]

    def logs(self) -> list[dict[str, Any]]:
        """The flare.log records the aggregator wrote (RUN_DIR/logs.jsonl)."""
        path = self.run_dir / "logs.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        session.deactivate()
        for c in self.clients:
            c.close()
        self.aggregator.stop()
