"""The process backend (the default): one OS process per site on this machine, in its own session, its stdout and
stderr in RUN_DIR/sites/SITE.log. Also what every backend's sites share with the runner: `SiteRun`, `stop_sites`,
`site_env` and `tail`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fl_plugins.recipe import Recipe

STOP_GRACE = 5.0  # seconds a site gets to exit after SIGTERM before SIGKILL
TAIL_LINES = 30
# Each site's math libraries default to one thread per core; N sites doing that oversubscribe the machine (and
# OpenMP's spin-waits make it several times slower). Unless the environment or the recipe sets them, each site
# gets cores // sites threads.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class SiteRun(Protocol):
    """A site as the runner sees it, whatever runs it."""

    name: str
    log_path: Path
    rc: int | None  # its exit code once it ended (None while it runs)

    def poll(self) -> int | None: ...  # the exit code if it ended (and `rc` set), else None
    def terminate(self) -> None: ...  # ask it to stop (SIGTERM)
    def wait(self, timeout: float) -> bool: ...  # True once it ended
    def kill(self) -> None: ...  # stop it now, with what it started


def script_args(recipe: Recipe, site_args: tuple[str, ...]) -> list[str]:
    """`SCRIPT ARGS SITE_ARGS`: what a site's Python runs."""
    return [str(recipe.script.path), *recipe.script.args, *site_args]


def site_env(recipe: Recipe, name: str, address: str, run_dir: Path, kit: Path | None, threads: int) -> dict[str, str]:
    """What the runner adds to a site's environment (the recipe's `env` first; FL_SERVER and FL_SITE win)."""
    env = {**recipe.script.env, "FL_SERVER": address, "FL_SITE": name, "PYTHONUNBUFFERED": "1"}
    if kit is not None:
        env["FL_KIT"] = str(kit)
    if "FL_OUTPUT_DIR" not in os.environ:
        env.setdefault("FL_OUTPUT_DIR", str(run_dir / "sites" / name))  # (a swarm site's global models)
    for var in THREAD_VARS:  # N sites on one machine: share the cores instead of each taking all of them
        if var not in os.environ:
            env.setdefault(var, str(max(1, threads)))
    return env


class ProcessSite:
    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, log_file: IO[bytes]) -> None:
        self.name, self.proc, self.log_path, self.log_file = name, proc, log_path, log_file
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is None:
            self.rc = self.proc.poll()
        return self.rc

    def terminate(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group may hold children of the site (e.g. DDP ranks)
        self.proc.wait()
        if self.rc is None:
            self.rc = self.proc.returncode
        if not self.log_file.closed:
            self.log_file.close()


def start_site(
    recipe: Recipe, name: str, site_args: tuple[str, ...], address: str, run_dir: Path, kit: Path | None = None
) -> ProcessSite:
    from fl_plugins.aggregator.store import private_file

    log_path = run_dir / "sites" / f"{name}.log"
    f = private_file(log_path, "ab")  # 0600: a site's log can hold its data
    cmd = [sys.executable, *script_args(recipe, site_args)]
    threads = (os.cpu_count() or 1) // len(recipe.sites)
    env = {**os.environ, **site_env(recipe, name, address, run_dir, kit, threads)}
    f.write(f"# fl-plugins run: {' '.join(cmd)}  (FL_SITE={name} FL_SERVER={address})\n".encode())
    f.flush()
    # its own session: the terminal's Ctrl-C reaches only the runner, which stops the sites in order
    proc = subprocess.Popen(
        cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    return ProcessSite(name, proc, log_path, f)


def stop_sites(sites: list[SiteRun], grace: float = STOP_GRACE) -> None:
    """Ask every running site to stop, stop what is left after `grace` seconds; reap them all."""
    for s in sites:
        if s.poll() is None:
            s.terminate()
    deadline = time.monotonic() + grace
    for s in sites:
        s.wait(deadline - time.monotonic())
        s.kill()


def tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join("    " + ln for ln in lines[-n:])
