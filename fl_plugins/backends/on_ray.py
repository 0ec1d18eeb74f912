"""Sites on a Ray cluster (the package's docstring): `connect`, `slots`, and `RaySite`, a site's process started
by an actor (`SiteActor`) that holds the site's resources on the node Ray placed it on.

Ray runs here when the recipe names no address. Ray replaces a loopback node address with the machine's own
(`resolve_ip_for_localhost`) unless its cluster mode is off, which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does on
Linux too; then every Ray server binds 127.0.0.1 (tests/test_ray.py checks that nothing else listens). Usage
statistics stay off (nothing is sent anywhere). With an address, fl_plugins and the site's script must be at the
same paths on the cluster's nodes (an image or a shared filesystem), and the aggregator's address
(`aggregator_host`) reachable from them.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import IO, Any

from fl_plugins.backends.spec import BackendSpec
from fl_plugins.errors import ConfigError

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# The site's process dies with its actor's (PR_SET_PDEATHSIG, kept across exec): an actor killed without close()
# (Ray's memory monitor, a lost driver) leaves no site behind to race the next turn under the same name.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; prctl = getattr(ctypes.CDLL(None), 'prctl', None); "
    "prctl and prctl(1, signal.SIGKILL, 0, 0, 0); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)
LOG_PIECE = 1 << 20  # bytes of a site's log fetched per poll
DIED = -1  # the exit code the runner shows for a site whose actor died (its node was lost, or it was killed)


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the Ray backend needs Ray: pip install 'fl-plugins[ray]' (or `backend: process` to run the sites "
            "as processes on this machine)"
        ) from None
    return ray


def connect(spec: BackendSpec) -> dict[str, float]:
    """Join the cluster at `spec.address`, or start Ray on this machine bound to 127.0.0.1; its resources."""
    if spec.address is None or is_loopback(spec.address):
        for k, v in LOCAL_ENV.items():
            os.environ.setdefault(k, v)  # (read when Ray is imported: before it)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = ray_module()
    logging.getLogger("ray").setLevel(logging.ERROR)  # (its start-up notes are not the run's; errors still show)
    if not ray.is_initialized():
        if spec.address is not None:
            ray.init(address=spec.address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(
                address="local",  # a new Ray here, never one a `ray start` left running
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                object_store_memory=256 << 20,  # (sites move weights through the aggregator, not Ray's store)
            )
    return dict(ray.cluster_resources())


def is_loopback(address: str) -> bool:
    """`address` (HOST, HOST:PORT or ray://HOST:PORT) names this machine's loopback interface."""
    host = address.removeprefix("ray://")
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    host = host.strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def disconnect() -> None:
    ray = ray_module()
    if ray.is_initialized():
        ray.shutdown()


def slots(spec: BackendSpec, resources: dict[str, float]) -> int | None:
    """How many sites the cluster runs at once at the recipe's per-site resources (None: no bound)."""
    asks = [("CPU", spec.num_cpus), ("GPU", spec.num_gpus), ("memory", (spec.memory_gib or 0) * 2**30)]
    fits = [int(resources.get(kind, 0) // need) for kind, need in asks if need > 0]
    room = min(fits) if fits else None
    if spec.slots is not None:
        room = spec.slots if room is None else min(room, spec.slots)
    return room


class SiteActor:
    """On a Ray worker: starts the site's process (`python ARGS`, its own session), keeps its output in a private
    temporary file, and answers polls with its exit code and the output from an offset."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.path = ""

    def start(self, args: list[str], env: dict[str, str], cwd: str, name: str) -> str:
        import subprocess
        import sys
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix=f"fl-site-{name}-", suffix=".log")  # 0600
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, *args],
                env={**os.environ, **env},
                cwd=cwd if os.path.isdir(cwd) else None,
                stdout=fd,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        return f"{os.uname().nodename} pid {self.proc.pid}, output in {self.path}"

    def poll(self, offset: int) -> tuple[int | None, bytes]:
        rc = self.proc.poll()  # first: output read after it is complete
        with open(self.path, "rb") as f:
            f.seek(offset)
            return rc, f.read(LOG_PIECE)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # with what it started (e.g. torchrun's ranks)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        if self.path:
            Path(self.path).unlink(missing_ok=True)


class RaySite:
    """A site's process under a `SiteActor`, as the runner sees it (process.SiteRun). Nothing here blocks on Ray:
    the actor may still wait for its resources, and each poll only collects an answer that has arrived."""

    def __init__(
        self, spec: BackendSpec, name: str, args: list[str], env: dict[str, str], log_path: Path, log: IO[bytes]
    ) -> None:
        ray = ray_module()
        self.name, self.log_path, self.log = name, log_path, log
        self.rc: int | None = None
        self.offset = 0
        self.output: Path | None = None  # the process's output file on the actor's node
        options: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": 0}
        if spec.memory_gib:
            options["memory"] = int(spec.memory_gib * 2**30)
        self.actor = ray.remote(SiteActor).options(**options).remote()
        self.pending: Any = self.actor.start.remote(args, env, os.getcwd(), name)

    def poll(self) -> int | None:
        """Collect the answers that have arrived (output appended to the site's log); the exit code once the
        process ended and its output is all here, DIED if the actor died."""
        ray = ray_module()
        while self.rc is None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if not ready:
                return None
            try:
                got = ray.get(self.pending)
            except ray.exceptions.RayError as e:
                self._salvage()
                self._write(f"\n# fl-plugins run: the site's Ray actor died: {type(e).__name__}: {e}\n".encode())
                self.rc = DIED
                break
            if isinstance(got, str):  # start()'s answer: where the process runs
                self.output = Path(got.rsplit(" output in ", 1)[-1])
                self._write(f"# fl-plugins run: on Ray, {got}\n".encode())
            else:
                rc, data = got
                self._write(data)
                self.offset += len(data)
                if rc is not None and len(data) < LOG_PIECE:
                    self.rc = rc
                    break
            self.pending = self.actor.poll.remote(self.offset)
        return self.rc

    def _salvage(self) -> None:
        """The actor died: what its process printed since the last poll, if its output file is on this machine
        (a local cluster's node); a remote node's is lost with the actor."""
        if self.output is None or not self.output.is_file():
            return
        with open(self.output, "rb") as f:
            f.seek(self.offset)
            self._write(f.read())
        self.output.unlink(missing_ok=True)

    def _write(self, data: bytes) -> None:
        if data and not self.log.closed:
            self.log.write(data)
            self.log.flush()

    def terminate(self) -> None:
        if self.rc is None:
            self.actor.signal.remote(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self) -> None:
        ray = ray_module()
        if self.output is not None and self.rc != DIED:  # (an actor still waiting for resources has no process)
            try:
                ray.get(self.actor.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dead actor: killed below either way
                pass
        ray.kill(self.actor)
        if self.rc is None:
            self.rc = -signal.SIGKILL
        if not self.log.closed:
            self.log.close()
