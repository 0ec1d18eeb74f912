"""The recipe's `backend:` section: where `fl-plugins run` runs the sites (the package's docstring).

    backend: process                        # the default: one process per site on this machine
    backend:
      type: ray
      address: null        # a running cluster (ray://HOST:10001 or HOST:6379); null: start Ray here on 127.0.0.1
      num_cpus: 1          # per site: what Ray reserves for each site's actor (and its OMP/MKL threads)
      num_gpus: 0          # per site; a fraction shares a GPU (0.25: four sites on one)
      memory_gib: null     # per site, Ray's memory resource (scheduling only: Ray does not cap it)
      slots: null          # sites at once; default: what the cluster holds at these resources
      virtual: auto        # auto: virtual sites (one turn each, run in turns) when the sites exceed the slots
      aggregator_host: 127.0.0.1   # the address the aggregator binds and the sites dial (a cluster's sites
                                   # need one they can reach; use --tls off this machine)

`fl-plugins run --backend ray [--ray-address ADDRESS]` overrides `type` and `address`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fl_plugins._config import Checker

TYPES = ("process", "ray")
_KEYS = ("type", "address", "num_cpus", "num_gpus", "memory_gib", "slots", "virtual", "aggregator_host")


@dataclass(frozen=True)
class BackendSpec:
    type: str = "process"
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gib: float | None = None
    slots: int | None = None
    virtual: str = "auto"  # "auto", "true" or "false"
    aggregator_host: str = "127.0.0.1"

    def with_cli(self, backend: str | None, address: str | None) -> BackendSpec:
        """The recipe's section with `--backend` / `--ray-address` applied (an address implies Ray)."""
        spec = replace(self, type=backend) if backend else self
        if address:
            spec = replace(spec, type="ray", address=address)
        return spec


def parse_backend(c: Checker, v: Any) -> BackendSpec:
    """`backend:` as a type name or a mapping; errors name the key and what it must be."""
    if v is None:
        return BackendSpec()
    if isinstance(v, str):
        return BackendSpec(type=c.choice("backend", v, TYPES))
    if not isinstance(v, dict):
        raise c.fail("backend", "must be a type (process, ray) or a mapping like {type: ray, num_cpus: 1}", v)
    c.keys(v, _KEYS, "backend.")
    kind = c.choice("backend.type", v.get("type", "ray"), TYPES)
    spec = BackendSpec(type=kind)
    if kind == "process":
        extra = [k for k in v if k != "type"]
        if extra:
            raise c.fail(f"backend.{extra[0]}", "applies to `type: ray` only", v[extra[0]])
        return spec
    address = v.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise c.fail(
            "backend.address", "must be a Ray address like ray://HOST:10001, or null to start Ray here", address
        )
    host = v.get("aggregator_host", "127.0.0.1")
    if not isinstance(host, str) or not host.strip():
        raise c.fail("backend.aggregator_host", "must be a host name or address the sites can reach", host)
    virtual = v.get("virtual", "auto")
    virtual = {True: "true", False: "false"}.get(virtual, virtual) if isinstance(virtual, bool) else virtual
    return BackendSpec(
        type=kind,
        address=address,
        num_cpus=c.number("backend.num_cpus", v.get("num_cpus", 1), 0),
        num_gpus=c.number("backend.num_gpus", v.get("num_gpus", 0), 0),
        memory_gib=None if v.get("memory_gib") is None else c.number("backend.memory_gib", v["memory_gib"], 0),
        slots=None if v.get("slots") is None else c.integer("backend.slots", v["slots"], 1),
        virtual=c.choice("backend.virtual", virtual, ("auto", "true", "false")),
        aggregator_host=host.strip(),
    )
