"""`start`: the recipe's sites on its backend, as the runner drives them (`Backend`)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins.backends.process import SiteRun, script_args, site_env, start_site, stop_sites
from fl_plugins.errors import ConfigError

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator
    from fl_plugins.backends.virtual import Turns
    from fl_plugins.recipe import Recipe


class Backend:
    """The sites as the runner sees them. `tolerant`: one failed site does not stop the run (Ray's); `turns`:
    the virtual sites' scheduler, ticked at every poll."""

    def __init__(self, sites: list[Any], what: str, *, tolerant: bool = False, turns: Turns | None = None) -> None:
        self.sites, self.what, self.tolerant, self.turns = sites, what, tolerant, turns

    @property
    def failure(self) -> str | None:
        """Why the job cannot go on (virtual sites: round 0's weights could not be offered), else None."""
        return self.turns.failure if self.turns is not None else None

    def tick(self) -> None:
        if self.turns is not None:
            self.turns.tick()
        for s in self.sites:
            s.poll()

    def stop(self) -> None:
        stop_sites(self.sites)


def prepare(recipe: Recipe) -> None:
    """Before the aggregator starts (its gRPC threads would see Ray's start-up forks): join or start Ray."""
    spec = recipe.backend
    if spec.type != "ray":
        return
    from fl_plugins.backends import on_ray

    if spec.address and not on_ray.is_loopback(spec.address) and on_ray.is_loopback(spec.aggregator_host):
        raise ConfigError(
            f"the sites run on the Ray cluster at {spec.address}, which cannot reach an aggregator on "
            f"{spec.aggregator_host}: set `backend.aggregator_host` to this machine's address on the cluster's "
            "network (and run with --tls)"
        )
    on_ray.connect(spec)


def finish(recipe: Recipe) -> None:
    """After the sites stopped: leave Ray (a Ray started here stops)."""
    if recipe.backend.type == "ray" and "ray" in sys.modules:  # (Ray may be missing: a start that failed)
        from fl_plugins.backends import on_ray

        on_ray.disconnect()


def start(recipe: Recipe, agg: Aggregator, address: str, run_dir: Path, kits: Any, say: Any) -> Backend:
    """Start the sites (a virtual site's first turn waits for the scheduler's first tick)."""
    spec = recipe.backend
    if spec.type == "process":
        return Backend(
            [start_site(recipe, s.name, s.args, address, run_dir, _kit(kits, s.name)) for s in recipe.sites],
            "processes on this machine",
        )
    from fl_plugins.backends import on_ray
    from fl_plugins.backends.virtual import Turns, VirtualSite

    resources = on_ray.connect(spec)
    room = on_ray.slots(spec, resources)
    n = len(recipe.sites)
    if room is not None and room < 1:
        raise ConfigError(f"the Ray cluster ({_text(resources)}) cannot hold one site at {_asks(spec)}; ask for less")
    virtual = spec.virtual == "true" or (spec.virtual == "auto" and room is not None and room < n)
    if not virtual and room is not None and room < n:
        raise ConfigError(
            f"the Ray cluster ({_text(resources)}) runs {room} of the recipe's {n} sites at once at {_asks(spec)}, "
            "and `backend.virtual` is false: ask for less per site, or let the sites run in turns (virtual: auto)"
        )
    if virtual:
        _check_virtual(agg)
    args = {s.name: s.args for s in recipe.sites}
    threads = max(1, math.floor(spec.num_cpus))

    def launch(name: str) -> SiteRun:
        from fl_plugins.aggregator.store import private_file

        log_path = run_dir / "sites" / f"{name}.log"
        log = private_file(log_path, "ab")
        cmd = script_args(recipe, args[name])
        env = site_env(recipe, name, address, run_dir, _kit(kits, name), threads)
        if virtual:
            env["FL_TURN"] = "1"
        log.write(f"# fl-plugins run (ray): python {' '.join(cmd)}  (FL_SITE={name} FL_SERVER={address})\n".encode())
        log.flush()
        return on_ray.RaySite(spec, name, cmd, {**_ray_env(), **env}, log_path, log)

    what = f"Ray actors ({_text(resources)}; {_asks(spec)} per site)"
    if not virtual:
        return Backend([launch(s.name) for s in recipe.sites], what, tolerant=True)
    sites = [VirtualSite(s.name, run_dir / "sites" / f"{s.name}.log") for s in recipe.sites]
    turns = Turns(agg, sites, room or n, launch, say)
    return Backend(sites, f"{what}; virtual sites, {room or n} at once", tolerant=True, turns=turns)


def _check_virtual(agg: Aggregator) -> None:
    """What virtual sites cannot do (the package's docstring), refused before anything runs."""
    c = agg.config
    why = None
    if c.workflow not in ("fedavg", "cyclic"):
        why = f"the workflow {c.workflow!r} (virtual sites train: fedavg or cyclic)"
    elif c.evaluate_every:
        why = "evaluations between rounds (workflow.evaluate_every)"
    elif c.strategy == "scaffold":
        why = "SCAFFOLD (its control variates live in the site's process)"
    if why is not None:
        raise ConfigError(
            f"virtual sites (more sites than the Ray cluster runs at once) cannot run {why}; give the cluster room "
            "for every site, or change the recipe"
        )


def _ray_env() -> dict[str, str]:
    """The runner's own FL_* settings (timeouts, a receive pool) reach a site on Ray as they reach a process."""
    return {k: v for k, v in os.environ.items() if k.startswith("FL_") and k not in ("FL_SERVER", "FL_SITE")}


def _kit(kits: Any, name: str) -> Path | None:
    return kits.sites[name] if kits else None


def _asks(spec: Any) -> str:
    parts = [f"{spec.num_cpus:g} CPU"]
    if spec.num_gpus:
        parts.append(f"{spec.num_gpus:g} GPU")
    if spec.memory_gib:
        parts.append(f"{spec.memory_gib:g} GiB")
    return ", ".join(parts)


def _text(resources: dict[str, float]) -> str:
    gpus = f", {resources['GPU']:g} GPU" if resources.get("GPU") else ""
    return f"{resources.get('CPU', 0):g} CPU{gpus}"
