"""`fl-plugins run RECIPE.yaml`: a whole federation on this machine.

Starts the aggregator in this process on 127.0.0.1 (a free port), then one process per site running
`python SCRIPT ARGS SITE_ARGS` with FL_SERVER and FL_SITE set, and watches them:

    RUN_DIR/aggregator.log      the aggregator's log (a logging FileHandler on the `fl_plugins` logger)
    RUN_DIR/sites/<site>.log    each site's stdout and stderr
    RUN_DIR/metrics.jsonl       the aggregator's records ("update" per accepted update, "round" per round)
    RUN_DIR/global/round-NNNNN  the global checkpoints (safetensors)
    RUN_DIR/summary.json        per-round metrics, written at the end
    RUN_DIR/report/*.png        the plots of `fl-plugins report` (report.py), written at the end
    RUN_DIR/mlruns, tensorboard, wandb   the recipe's `tracking:` trackers (tracking.py), streamed as the run goes

It stops everything (sites first: SIGTERM to each site's process group, SIGKILL after a grace period; then the
aggregator) when the last round is done, on Ctrl-C, and when a site exits non-zero before the job is finished, in
which case it prints the tail of that site's log and returns 1. Running the same recipe again with the same run
dir resumes (RUN_DIR/run.json, store.py, says which recipe and job the run dir belongs to; another recipe is
refused before anything starts). A start that fails leaves no state behind. The run dir, its folders and the files
written here are private to the user (0700 / 0600), as the startup kits are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fl_plugins.recipe import Recipe

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between checks (and live-view refreshes)
STOP_GRACE = 5.0  # seconds a site gets to exit after SIGTERM before SIGKILL
END_GRACE = 30.0  # seconds the sites get to exit on their own once the last round is done
TAIL_LINES = 30
# Each site's math libraries default to one thread per core; N sites doing that oversubscribe the machine (and
# OpenMP's spin-waits make it several times slower). Unless the environment or the recipe sets them, each site
# gets cores // sites threads.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class _Site:
    name: str
    proc: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    rc: int | None = None


@dataclass
class _Metrics:
    """Incremental reader of RUN_DIR/metrics.jsonl."""

    path: Path
    updates: list[dict] = field(default_factory=list)
    rounds: dict[int, dict] = field(default_factory=dict)  # round -> its latest "round" record

    def __post_init__(self) -> None:
        from fl_plugins.tracking import JsonlTail

        self._tail = JsonlTail(self.path)

    def poll(self) -> list[dict]:
        new = [rec for _, rec in self._tail.read()]
        for rec in new:
            if rec.get("event") == "update":
                self.updates.append(rec)
            elif rec.get("event") == "round":
                self.rounds[rec["round"]] = rec
        return new


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(recipe: Recipe, run_dir: Path, *, live: bool | None = None, tls: bool = False) -> int:
    """Run the recipe's federation; 0 when every round is done and every site exited 0, 1 on a failure,
    130 when interrupted. `live`: the rich live view (default: when stdout is a terminal). `tls`: provision a CA
    and kits into RUN_DIR/kits (kept on resume) and speak mTLS; each site gets FL_KIT."""
    from rich.console import Console

    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.aggregator.store import RunStore, private_dir, private_file, undo_failed_start, write_private

    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    live = console.is_terminal if live is None else live
    run_dir = Path(run_dir)
    if recipe.tracking:
        from fl_plugins.tracking import check_installed

        check_installed(recipe.tracking)  # before anything starts: the error names the install command
    fed = recipe.federation
    config = fed.aggregator_config(run_dir, recipe=recipe.identity())
    # a run directory of another job is refused before anything is made there (the aggregator checks again)
    RunStore(run_dir).open_run(job_id=config.job_id, recipe=config.recipe, initial_model=config.initial_model,
                               check_only=True)  # fmt: skip

    pkg_log = logging.getLogger("fl_plugins")
    saved = pkg_log.level, pkg_log.propagate
    handler: logging.Handler | None = None
    sites: list[_Site] = []
    server = None
    tracking = None
    metrics = _Metrics(run_dir / "metrics.jsonl")
    t0 = time.monotonic()
    code = 1

    def teardown() -> None:  # stop whatever is running; safe to call twice
        nonlocal server, tracking, handler
        _stop_sites(sites)
        if server is not None:
            server.stop(0)
        if tracking is not None:
            tracking.close(code)
        if handler is not None:
            pkg_log.removeHandler(handler)
            handler.close()
            pkg_log.setLevel(saved[0])
            pkg_log.propagate = saved[1]
        server = tracking = handler = None

    try:
        with undo_failed_start(run_dir):  # a start that fails (a bad kit or initial model) leaves no state behind
            try:
                private_dir(run_dir)
                private_dir(run_dir / "sites")
                private_file(run_dir / "aggregator.log").close()  # 0600 before the handler appends to it
                handler = logging.FileHandler(run_dir / "aggregator.log")
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                pkg_log.addHandler(handler)
                pkg_log.setLevel(logging.INFO)
                pkg_log.propagate = False  # the terminal shows the live view; the log goes to the file
                kits = None
                if tls:
                    from fl_plugins.security.provision import provision_local

                    kits = provision_local(run_dir / "kits", [s.name for s in recipe.sites], name=recipe.name)
                if recipe.tracking:
                    from fl_plugins.tracking import Tracking

                    tracking = Tracking(run_dir, recipe.tracking, name=recipe.name,
                                        params=_tracking_params(recipe)).start()  # fmt: skip
                    console.print(f"tracking: {tracking.describe()}", highlight=False)
                server = AggregatorServer(config, "127.0.0.1:0", kit=kits.server if kits else None).start()
            except BaseException:
                teardown()
                raise
        console.print(f"[bold]{recipe.name}[/]: aggregator on {server.address}{' (mTLS)' if kits else ''}, "
                      f"{len(recipe.sites)} sites, {fed.rounds} rounds; job {server.aggregator.job_id}, run dir "
                      f"{run_dir}", highlight=False)  # fmt: skip
        for spec in recipe.sites:
            kit = kits.sites[spec.name] if kits else None
            sites.append(_start_site(recipe, spec.name, spec.args, server.address, run_dir, kit))
        view = _View(recipe, server, sites, metrics, t0)
        if live:
            from rich.live import Live

            with Live(view.render(), console=console, refresh_per_second=2, transient=False) as lv:
                code = _watch(server, sites, metrics, recipe, lambda: lv.update(view.render()), err)
        else:
            code = _watch(server, sites, metrics, recipe, view.print_progress, err)
    except KeyboardInterrupt:
        code = 130
        if not run_dir.is_dir():  # interrupted while starting: nothing to resume
            err.print("interrupted while starting; nothing was left in the run directory", highlight=False)
            return code
        err.print(f"interrupted: stopping the sites and the aggregator; run the same command with --run-dir "
                  f"{run_dir} to resume", highlight=False)  # fmt: skip
    finally:
        teardown()
    metrics.poll()
    baselines = None
    if code == 0 and recipe.task is not None and recipe.task.baselines:
        baselines = _run_baselines(recipe, run_dir, console, err)
        if baselines is None:
            code = 1
    summary = _summary(recipe, metrics, sites, code, time.monotonic() - t0)
    if baselines is not None:
        summary["baselines"] = baselines
    write_private(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if summary["rounds"]:
        console.print(_summary_table(summary))
    if baselines is not None:
        console.print(_baselines_table(recipe, baselines))
    _write_report(run_dir, console, err)
    state = "finished" if code == 0 else "FAILED" if code == 1 else "interrupted"
    console.print(f"{recipe.name} {state} in {summary['seconds']:.1f} s; run dir {run_dir}", highlight=False)
    return code


def _run_baselines(recipe: Recipe, run_dir: Path, console, err) -> dict[str, Any] | None:
    """A built-in task's `baselines: true`: score the final global model and each site's local-only model on the
    pooled validation set (one process, after the federation; RUN_DIR/baselines.log)."""
    from fl_plugins.aggregator.store import private_file

    log_path = run_dir / "baselines.log"
    console.print("baselines: the global model and each site alone, on the pooled validation set ...",
                  highlight=False)  # fmt: skip
    cmd = [sys.executable, str(recipe.script.path), "--recipe", str(recipe.source.resolve()), "--baselines",
           str(run_dir)]  # fmt: skip
    env = {**os.environ, **recipe.script.env, "PYTHONUNBUFFERED": "1"}
    with private_file(log_path, "wb") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        err.print(f"baselines failed (exit {rc}); the last lines of {log_path}:\n{_tail(log_path)}", highlight=False)
        return None
    return json.loads((run_dir / "baselines.json").read_text())


def _tracking_params(recipe: Recipe) -> dict[str, Any]:
    fed = recipe.federation
    return {"recipe": str(recipe.source), "rounds": fed.rounds, "sites": ",".join(s.name for s in recipe.sites),
            "min_sites": fed.min_sites, "initial_model": str(fed.initial_model or ""),
            "round_deadline": fed.round_deadline or "", "script": str(recipe.script.path)}  # fmt: skip


def _write_report(run_dir: Path, console, err) -> None:
    """RUN_DIR/report/*.png (report.py); a failure to plot is a warning on stderr, never a failed run."""
    if not (run_dir / "metrics.jsonl").is_file():
        return  # no update ever arrived: nothing to plot
    try:
        from fl_plugins.report import load_run, write_plots

        written, _ = write_plots(load_run(run_dir))
    except Exception as e:  # noqa: BLE001 - the plots are a convenience; the run's outcome stands
        log.debug("report: the plots were not written", exc_info=True)
        err.print(f"report: the plots were not written ({type(e).__name__}: {e})", highlight=False)
        return
    if written:
        console.print(f"report: {', '.join(p.name for p in written)} in {written[0].parent} (fl-plugins report "
                      f"{run_dir} prints it again)", highlight=False)  # fmt: skip


def _baselines_table(recipe: Recipe, b: dict[str, Any]):
    from rich.table import Table

    keys = list(b["global"])
    t = Table(title=f"{recipe.name}: on the pooled validation set ({b['pooled_validation_rows']} rows)")
    for col in ("model", *keys):
        t.add_column(col, justify="right")
    t.add_row(f"global (round {b['round']})", *(f"{b['global'][k]:.4g}" for k in keys))
    for site, m in b["local_only"].items():
        t.add_row(f"{site} alone", *(f"{m.get(k, float('nan')):.4g}" for k in keys))
    return t


def _start_site(recipe: Recipe, name: str, site_args: tuple[str, ...], address: str, run_dir: Path,
                kit: Path | None = None) -> _Site:  # fmt: skip
    from fl_plugins.aggregator.store import private_file

    log_path = run_dir / "sites" / f"{name}.log"
    f = private_file(log_path, "ab")  # 0600: a site's log can hold its data
    cmd = [sys.executable, str(recipe.script.path), *recipe.script.args, *site_args]
    env = {**os.environ, **recipe.script.env, "FL_SERVER": address, "FL_SITE": name, "PYTHONUNBUFFERED": "1"}
    if kit is not None:
        env["FL_KIT"] = str(kit)
    for var in THREAD_VARS:  # N sites on one machine: share the cores instead of each taking all of them
        env.setdefault(var, str(max(1, (os.cpu_count() or 1) // len(recipe.sites))))
    f.write(f"# fl-plugins run: {' '.join(cmd)}  (FL_SITE={name} FL_SERVER={address})\n".encode())
    f.flush()
    # its own session: the terminal's Ctrl-C reaches only the runner, which stops the sites in order
    proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    return _Site(name, proc, log_path, f)


def _watch(server, sites: list[_Site], metrics: _Metrics, recipe: Recipe, refresh, err) -> int:
    agg = server.aggregator
    done_at: float | None = None
    while True:
        metrics.poll()
        for s in sites:
            if s.rc is None:
                s.rc = s.proc.poll()
        refresh()
        if agg.error is not None:
            err.print(f"[red]the aggregator failed:[/] {agg.error} (see {agg.config.run_dir / 'aggregator.log'})",
                      highlight=False)  # fmt: skip
            return 1
        crashed = [s for s in sites if s.rc not in (None, 0)]
        if crashed and not agg.done:
            s = crashed[0]
            _stop_sites(sites)
            err.print(f"[red]site {s.name} exited with code {s.rc} before the job finished[/]; stopped the other "
                      f"sites and the aggregator. Last lines of {s.log_path}:", highlight=False)  # fmt: skip
            err.print(_tail(s.log_path), markup=False, highlight=False)
            return 1
        running = [s for s in sites if s.rc is None]
        if agg.done:
            done_at = done_at or time.monotonic()
            if not running:
                bad = [s for s in sites if s.rc != 0]
                for s in bad:
                    err.print(f"site {s.name} exited with code {s.rc} after the last round; see {s.log_path}",
                              highlight=False)  # fmt: skip
                return 1 if bad else 0
            if time.monotonic() - done_at > END_GRACE:
                err.print(f"the last round is done but {', '.join(s.name for s in running)} did not exit within "
                          f"{END_GRACE:.0f} s; stopping them", highlight=False)  # fmt: skip
                return 0
        elif len(running) < recipe.federation.min_sites:
            gone = ", ".join(s.name for s in sites if s.rc is not None)
            err.print(f"sites {gone} exited before the last round and fewer than min_sites="
                      f"{recipe.federation.min_sites} are left; stopping", highlight=False)  # fmt: skip
            return 1
        time.sleep(POLL)


def _stop_sites(sites: list[_Site]) -> None:
    """SIGTERM each running site's process group, SIGKILL what is left after STOP_GRACE; reap them all."""
    for s in sites:
        if s.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(s.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for s in sites:
        try:
            s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()
        # the group may hold children of the site (e.g. DDP ranks) that outlive it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.proc.pid, signal.SIGKILL)
        if s.rc is None:
            s.rc = s.proc.returncode
        if not s.log_file.closed:
            s.log_file.close()


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join("    " + ln for ln in lines[-n:])


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class _View:
    """The live view (rich) or, without a terminal, one plain line per finished round."""

    def __init__(self, recipe: Recipe, server, sites: list[_Site], metrics: _Metrics, t0: float) -> None:
        self.recipe, self.server, self.sites, self.metrics, self.t0 = recipe, server, sites, metrics, t0
        self._printed: set[int] = set()
        self._last = (time.monotonic(), 0)
        self.rate = 0.0

    def site_states(self, st: dict[str, Any]) -> dict[str, str]:
        rnd, attempt = st["round"], st["attempt"]
        committed = {u["site"] for u in self.metrics.updates if (u["round"], u["attempt"]) == (rnd, attempt)}
        uploading: dict[str, int] = {}
        for uid, u in st["uploads"].items():
            site, r, a, kind = uid.split(":")[:4]
            if kind == "upd" and (int(r), int(a)) == (rnd, attempt) and site not in committed:
                uploading[site] = uploading.get(site, 0) + u["bytes_received"]
        connected = set(st["sites"])
        out = {}
        for s in self.sites:
            if s.rc is not None:
                out[s.name] = "done" if s.rc == 0 else f"crashed (exit {s.rc})"
            elif st["done"]:
                out[s.name] = "done"
            elif s.name not in connected:
                out[s.name] = "starting"
            elif s.name in uploading:
                out[s.name] = f"uploading ({_human_bytes(uploading[s.name])})"
            elif s.name in committed or len(connected) < self.recipe.federation.min_sites:
                out[s.name] = "waiting"
            else:
                out[s.name] = "training"
        return out

    def _bytes(self, st: dict[str, Any]) -> int:
        moved = st["bytes_received"] + st["bytes_sent"]
        now = time.monotonic()
        t, b = self._last
        if now - t >= 0.4:
            self.rate = (moved - b) / (now - t)
            self._last = (now, moved)
        return moved

    def render(self):
        from rich.console import Group
        from rich.table import Table

        st = self.server.aggregator.status()
        moved = self._bytes(st)
        total = st["total_rounds"]
        head = (f"[bold]{self.recipe.name}[/]  round {min(st['round'], total - 1)} of 0..{total - 1}"
                f"{' (done)' if st['done'] else ''}  attempt {st['attempt']}  "
                f"moved {_human_bytes(moved)} ({self.rate / 1e9:.3f} GB/s)  "
                f"{time.monotonic() - self.t0:.0f} s")  # fmt: skip
        t = Table(show_header=True, header_style="bold", box=None)
        t.add_column("site")
        t.add_column("state")
        for name, state in self.site_states(st).items():
            t.add_row(name, state)
        parts: list[Any] = [head, t]
        if self.metrics.rounds:
            last = self.metrics.rounds[max(self.metrics.rounds)]
            ms = "  ".join(f"{k}={v:.4g}" for k, v in (last.get("metrics") or {}).items())
            parts.append(f"last round {last['round']}: {last['updates']} updates, {last['seconds']:.1f} s  {ms}")
        return Group(*parts)

    def print_progress(self) -> None:
        for r in sorted(self.metrics.rounds):
            if r in self._printed:
                continue
            self._printed.add(r)
            rec = self.metrics.rounds[r]
            ms = " ".join(f"{k}={v:.4g}" for k, v in (rec.get("metrics") or {}).items())
            st = self.server.aggregator.status()
            line = (f"round {r} (of 0..{st['total_rounds'] - 1}) done: {rec['updates']} updates in "
                    f"{rec['seconds']:.1f} s, moved {_human_bytes(self._bytes(st))} {ms}")  # fmt: skip
            print(line.rstrip(), flush=True)


def _summary(recipe: Recipe, metrics: _Metrics, sites: list[_Site], code: int, seconds: float) -> dict[str, Any]:
    sent: dict[int, int] = {}
    for u in metrics.updates:  # bytes the sites uploaded per round (each also downloaded the global model once)
        sent[u["round"]] = sent.get(u["round"], 0) + int(u.get("bytes", 0))
    rounds = [{"round": r, "updates": rec["updates"], "attempt": rec.get("attempt", 0),
               "seconds": rec["seconds"], "uploaded_bytes": sent.get(r, 0), "metrics": rec.get("metrics") or {}}
              for r, rec in sorted(metrics.rounds.items())]  # fmt: skip
    return {"name": recipe.name, "recipe": str(recipe.source), "exit_code": code, "seconds": round(seconds, 3),
            "rounds_planned": recipe.federation.rounds, "rounds": rounds,
            "sites": {s.name: {"exit_code": s.rc, "log": str(s.log_path)} for s in sites}}  # fmt: skip


def _summary_table(summary: dict[str, Any]):
    from rich.table import Table

    keys: list[str] = []
    for r in summary["rounds"]:
        keys += [k for k in r["metrics"] if k not in keys]
    t = Table(title=f"{summary['name']}: per-round metrics")
    for col in ("round", "updates", "seconds", "uploaded", *keys):
        t.add_column(col, justify="right")
    for r in summary["rounds"]:
        vals = [r["metrics"].get(k) for k in keys]
        t.add_row(str(r["round"]), str(r["updates"]), f"{r['seconds']:.2f}", _human_bytes(r["uploaded_bytes"]),
                  *("" if v is None else f"{v:.4g}" for v in vals))  # fmt: skip
    return t
