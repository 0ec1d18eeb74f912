"""`fl-plugins run RECIPE.yaml`: a whole federation on this machine.

Starts the aggregator in this process on 127.0.0.1 (a free port), then one process per site running
`python SCRIPT ARGS SITE_ARGS` with FL_SERVER and FL_SITE set, and watches them. The recipe's `backend:` (or
`--backend ray`) runs each site on a Ray cluster instead, and more sites than the cluster holds as virtual sites
that take turns (fl_plugins/backends); there one failed site is reported and the job goes on without it.

    RUN_DIR/aggregator.log      the aggregator's log (a logging FileHandler on the `fl_plugins` logger)
    RUN_DIR/sites/<site>.log    each site's stdout and stderr
    RUN_DIR/metrics.jsonl       the aggregator's records ("update" per accepted update, "round" per round)
    RUN_DIR/global/round-NNNNN  the global checkpoints (safetensors)
    RUN_DIR/final               the final global model (aggregator/ending.py), written when the job completes
    RUN_DIR/summary.json        per-round metrics: the aggregator's, then this one's at the end (with exit codes)
    RUN_DIR/report/*.png        the plots of `fl-plugins report` (report.py), written at the end
    RUN_DIR/mlruns, tensorboard, wandb   the recipe's `tracking:` trackers (tracking.py), streamed as the run goes

It stops everything (sites first: SIGTERM to each site's process group, SIGKILL after a grace period; then the
aggregator) when the last round is done, on Ctrl-C, and when a site exits non-zero before the job is finished, in
which case it prints the tail of that site's log and returns 1; a site that exits 0 after training is gone for
the aggregator at once (the final evaluation does not wait for it). Running the same recipe again with the same
run dir resumes (RUN_DIR/run.json, store.py, says which recipe and job the run dir belongs to; another recipe is
refused before anything starts), or says that run is finished and starts nothing. A start that fails leaves no
state behind. The run dir, its folders and the files written here are private to the user (0700 / 0600).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins import record_files, records
from fl_plugins._run_view import View as _View
from fl_plugins._run_view import summarize, summary_table
from fl_plugins._text import baselines_table
from fl_plugins.backends.process import SiteRun
from fl_plugins.backends.process import tail as _tail
from fl_plugins.recipe import Recipe

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.backends.launch import Backend

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between checks (and live-view refreshes)
END_GRACE = 30.0  # seconds the sites get to exit on their own once the last round is done


class _Metrics(record_files.RunMetrics):
    """RUN_DIR/metrics.jsonl's updates and rounds, kept up to date: `poll` reads what was appended."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._tail = record_files.JsonlTail(path)

    def poll(self) -> list[records.Record]:
        new = self._tail.read()
        self.add(new)
        return new


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (cli/run.py raises it): the run stops as on Ctrl-C, with exit code 143 instead of 130."""


def run(
    recipe: Recipe, run_dir: Path, *, live: bool | None = None, tls: bool = False, store_url: str | None = None
) -> int:
    """Run the recipe's federation; 0 when every round is done and every site exited 0 (or the run was finished
    already: nothing starts), 1 on a failure, 130 when interrupted (143: SIGTERM). `live`: the rich live view
    (default: when stdout is a terminal). `tls`: provision a CA and kits into RUN_DIR/kits (kept on resume) and
    speak mTLS; each site gets FL_KIT."""
    from rich.console import Console

    from fl_plugins.aggregator import ending

    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    live = console.is_terminal if live is None else live
    run_dir = Path(run_dir)
    remote = None
    if store_url is not None:  # the run lives in an object store; run_dir is its working copy (aggregator/remote.py)
        from fl_plugins.aggregator.remote import RemoteRun

        remote = RemoteRun(store_url, run_dir)
        remote.fetch(catch_up=False)
    config = _check(recipe, run_dir, store_url)
    done = ending.finished(config)
    if done is not None:
        console.print(ending.already_finished(config, done, "the recipe's `rounds`"), highlight=False)
        failed = remote.complete() if remote is not None else None  # the store gets what it lacks of the run
        if failed is not None:
            err.print(f"the run directory's object store: {failed}", markup=False, highlight=False)
        return 0 if failed is None else 1
    fed = _Federation(recipe, run_dir)
    metrics = _Metrics(run_dir / records.METRICS)
    t0 = time.monotonic()
    code = 1
    try:
        fed.start(config, console, tls)
        code = _supervise(fed, metrics, t0, console, err, live=live)
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
        if not run_dir.is_dir():  # interrupted while starting: nothing to resume
            err.print("interrupted while starting; nothing was left in the run directory", highlight=False)
            return code
        err.print(
            f"interrupted: stopping the sites and the aggregator; run the same command with --run-dir "
            f"{run_dir} to resume",
            highlight=False,
        )
    finally:
        fed.stop(code)
    return _conclude(fed, metrics, code, t0, console, err)


def _check(recipe: Recipe, run_dir: Path, store_url: str | None = None) -> Any:
    """Before anything starts: the trackers' libraries (the error names the install command), and that the run
    directory is not another job's (the aggregator checks again). The aggregator's configuration."""
    from fl_plugins.aggregator.store import RunStore

    if recipe.tracking:
        from fl_plugins.tracking import check_installed

        check_installed(recipe.tracking)
    config = recipe.federation.aggregator_config(run_dir, recipe=recipe.identity(), store_url=store_url)
    RunStore(run_dir).open_run(
        job_id=config.job_id, recipe=config.recipe, initial_model=config.initial_model, check_only=True
    )
    return config


class _Federation:
    """What `run` starts: the aggregator's log file, the kits, the trackers, the aggregator and the sites; `stop`
    ends them in order (sites first)."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        self.sites: list[SiteRun] = []
        self.backend: Backend | None = None
        self.server_config: Any = None  # the aggregator's configuration, once started
        self.server: Any = None
        self.tracking: Any = None
        self.kits: Any = None
        self.handler: logging.Handler | None = None
        self.done = False  # the aggregator's job was complete when it stopped
        self._pkg_log = logging.getLogger("fl_plugins")
        self._saved = self._pkg_log.level, self._pkg_log.propagate

    def start(self, config: Any, console: Any, tls: bool) -> None:
        """Everything but the sites; a start that fails (a bad kit or initial model) stops what it started and
        leaves no state behind."""
        self.server_config = config
        from fl_plugins.aggregator.service import AggregatorServer
        from fl_plugins.aggregator.store import undo_failed_start
        from fl_plugins.backends import launch

        recipe, run_dir = self.recipe, self.run_dir
        with undo_failed_start(run_dir):
            try:
                self._open_log()
                if tls or config.workflow == "swarm":  # a swarm's sites seal for each other's certificates
                    from fl_plugins.security.provision import provision_local

                    self.kits = provision_local(run_dir / "kits", [s.name for s in recipe.sites], name=recipe.name)
                if recipe.tracking:
                    from fl_plugins.tracking import Tracking

                    self.tracking = Tracking(
                        run_dir, recipe.tracking, name=recipe.name, params=_tracking_params(recipe)
                    ).start()
                    console.print(f"tracking: {self.tracking.describe()}", highlight=False)
                kit = self.kits.server if self.kits else None
                launch.prepare(recipe)
                host = recipe.backend.aggregator_host if recipe.backend.type == "ray" else "127.0.0.1"
                self.server = AggregatorServer(config, f"{host}:0", kit=kit).start()
            except BaseException:
                self.stop(1)
                raise

    def _open_log(self) -> None:
        from fl_plugins.aggregator.store import private_dir, private_file

        private_dir(self.run_dir)
        private_dir(self.run_dir / "sites")
        private_file(self.run_dir / "aggregator.log").close()  # 0600 before the handler appends to it
        self.handler = logging.FileHandler(self.run_dir / "aggregator.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._pkg_log.addHandler(self.handler)
        self._pkg_log.setLevel(logging.INFO)
        self._pkg_log.propagate = False  # the terminal shows the live view; the log goes to the file

    def start_sites(self, err: Any) -> None:
        from fl_plugins.backends import launch

        say = lambda text: err.print(text, markup=False, highlight=False)  # noqa: E731
        address, agg = self.server.address, self.server.aggregator
        self.backend = launch.start(self.recipe, agg, address, self.run_dir, self.kits, say)
        self.sites = self.backend.sites

    def stop(self, code: int) -> None:
        """Stop whatever is running (the trackers close with `code`); safe to call twice."""
        from fl_plugins.backends import launch

        if self.backend is not None:
            self.backend.stop()
        launch.finish(self.recipe)
        if self.server is not None:
            self.done = self.done or self.server.aggregator.done
            self.server.stop(0)
        if self.tracking is not None:
            self.tracking.close(code)
        if self.handler is not None:
            self._pkg_log.removeHandler(self.handler)
            self.handler.close()
            self._pkg_log.setLevel(self._saved[0])
            self._pkg_log.propagate = self._saved[1]
        self.server = self.tracking = self.handler = None


def _supervise(fed: _Federation, metrics: _Metrics, t0: float, console: Any, err: Any, *, live: bool) -> int:
    """Start the sites and watch the federation to its end (with the live view, or a line per round)."""
    recipe, server = fed.recipe, fed.server
    console.print(
        f"[bold]{recipe.name}[/]: aggregator on {server.address}{' (mTLS)' if fed.kits else ''}, "
        f"{len(recipe.sites)} sites, {recipe.federation.rounds} rounds; job {server.aggregator.job_id}, "
        f"run dir {fed.run_dir}",
        highlight=False,
    )
    fed.start_sites(err)
    assert fed.backend is not None
    if recipe.backend.type != "process":
        console.print(f"sites: {fed.backend.what}", highlight=False)
    view = _View(recipe, server, fed.sites, metrics, t0)
    if not live:
        return _watch(server, fed.backend, metrics, recipe, view.print_progress, err)
    from rich.live import Live

    with Live(view.render(), console=console, refresh_per_second=2, transient=False) as lv:
        return _watch(server, fed.backend, metrics, recipe, lambda: lv.update(view.render()), err)


def _conclude(fed: _Federation, metrics: _Metrics, code: int, t0: float, console: Any, err: Any) -> int:
    """After the federation: the baselines (a built-in task's), summary.json, the tables, the report's plots."""
    from fl_plugins.aggregator.store import write_private

    recipe, run_dir = fed.recipe, fed.run_dir
    metrics.poll()
    baselines = None
    if code == 0 and recipe.task is not None and recipe.task.baselines:
        baselines = _run_baselines(recipe, run_dir, console, err)
        if baselines is None:
            code = 1
    from fl_plugins.aggregator.ending import read_summary

    base = read_summary(run_dir) if fed.done else None  # the aggregator's: the job id, the final model and its score
    summary = summarize(recipe, metrics, fed.sites, code, time.monotonic() - t0, baselines, base)
    write_private(run_dir / records.SUMMARY, json.dumps(summary.to_json(), indent=2) + "\n")
    if summary.rounds:
        scores = summary.final_evaluation  # the final model's scores: the table's last row
        console.print(summary_table(summary, records.EvaluationRecord.from_json(scores) if scores else None))
    if baselines is not None:
        console.print(baselines_table(recipe.name, records.Baselines.from_json(baselines)))
    _write_report(run_dir, console, err)
    if fed.server_config is not None and fed.server_config.store_url:  # this summary.json, too
        from fl_plugins.aggregator.remote import RemoteRun

        failed = RemoteRun(fed.server_config.store_url, run_dir).close()
        if failed is not None:
            err.print(f"the run directory's object store: {failed}", markup=False, highlight=False)
            code = 1
    state = "finished" if code == 0 else "FAILED" if code == 1 else "interrupted"
    final = f"; the final model is in {summary.final_model}" if summary.final_model else ""
    console.print(f"{recipe.name} {state} in {summary.seconds:.1f} s; run dir {run_dir}{final}", highlight=False)
    return code


def _run_baselines(recipe: Recipe, run_dir: Path, console: Console, err: Console) -> dict[str, Any] | None:
    """A built-in task's `baselines: true`: score the final global model and each site's local-only model on the
    pooled validation set (one process, after the federation; RUN_DIR/baselines.log)."""
    from fl_plugins.aggregator.store import private_file

    log_path = run_dir / "baselines.log"
    console.print("baselines: the global model and each site alone, on the pooled validation set ...", highlight=False)
    script, source = str(recipe.script.path), str(recipe.source.resolve())
    cmd = [sys.executable, script, "--recipe", source, "--baselines", str(run_dir)]
    env = {**os.environ, **recipe.script.env, "PYTHONUNBUFFERED": "1"}
    with private_file(log_path, "wb") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        err.print(f"baselines failed (exit {rc}); the last lines of {log_path}:\n{_tail(log_path)}", highlight=False)
        return None
    baselines = record_files.read_object(run_dir / records.BASELINES)
    if baselines is None:
        err.print(f"baselines: the task exited 0 but wrote no {run_dir / records.BASELINES}", highlight=False)
    return baselines


def _tracking_params(recipe: Recipe) -> dict[str, Any]:
    fed = recipe.federation
    return {
        "recipe": str(recipe.source),
        "rounds": fed.rounds,
        "sites": ",".join(s.name for s in recipe.sites),
        "min_sites": fed.min_sites,
        "initial_model": str(fed.initial_model or ""),
        "round_deadline": fed.round_deadline or "",
        "script": str(recipe.script.path),
    }


def _write_report(run_dir: Path, console: Console, err: Console) -> None:
    """RUN_DIR/report/*.png (report.py); a failure to plot is a warning on stderr, never a failed run."""
    if not (run_dir / records.METRICS).is_file():
        return  # no update ever arrived: nothing to plot
    try:
        from fl_plugins.report import load_run, write_plots

        written, _ = write_plots(load_run(run_dir))
    except Exception as e:  # noqa: BLE001 - the plots are a convenience; the run's outcome stands
        log.debug("report: the plots were not written", exc_info=True)
        err.print(f"report: the plots were not written ({type(e).__name__}: {e})", highlight=False)
        return
    if written:
        console.print(
            f"report: {', '.join(p.name for p in written)} in {written[0].parent} (fl-plugins report "
            f"{run_dir} prints it again)",
            highlight=False,
        )


def _watch(
    server: AggregatorServer,
    backend: Backend,
    metrics: _Metrics,
    recipe: Recipe,
    refresh: Callable[[], object],
    err: Console,
) -> int:
    from fl_plugins.aggregator.ending import site_exited

    agg, sites = server.aggregator, backend.sites
    done_at: float | None = None
    left: set[str] = set()  # sites that exited 0 after training: gone for the aggregator
    failed: set[str] = set()  # sites that failed on a backend that goes on without them (Ray's): told already
    while True:
        metrics.poll()
        backend.tick()
        refresh()
        if backend.failure is not None:
            err.print(f"[red]{backend.failure}[/]; stopping", highlight=False)
            return 1
        if agg.error is not None:
            err.print(
                f"[red]the aggregator failed:[/] {agg.error} (see {agg.config.run_dir / 'aggregator.log'})",
                highlight=False,
            )
            return 1
        if not agg.done and _crashed(agg, backend, failed, err):
            return 1
        running = [s for s in sites if s.rc is None]
        for s in [s for s in sites if agg.job.trained and s.rc == 0 and s.name not in left]:
            left.add(s.name)  # (its process ended after its last update: the final evaluation does not wait)
            site_exited(agg, s.name)
        if agg.done:
            done_at = done_at or time.monotonic()
            code = _after_job([s for s in sites if s.name not in failed], running, done_at, err)
            if code is not None:
                return code
        elif len(running) < recipe.federation.min_sites and not agg.job.trained:
            gone = ", ".join(s.name for s in sites if s.rc is not None)
            err.print(
                f"sites {gone} exited before the last round, and fewer sites are left than the "
                f"{recipe.federation.min_sites} a round needs (the recipe's min_sites); stopping",
                highlight=False,
            )
            return 1
        time.sleep(POLL)


def _crashed(agg: Any, backend: Backend, failed: set[str], err: Console) -> bool:
    """Sites that exited with an error before the job was done: on a backend that goes on without them (Ray's),
    each is told to the aggregator (gone at once: the round goes on by its rules) and reported once; else the
    first is reported and everything stops (True)."""
    from fl_plugins.aggregator.ending import site_exited

    crashed = [s for s in backend.sites if s.rc not in (None, 0) and s.name not in failed]
    if crashed and backend.tolerant:
        for s in crashed:
            failed.add(s.name)
            site_exited(agg, s.name)
            err.print(
                f"site {s.name} exited with code {s.rc}; the job goes on without it. Last lines of "
                f"{s.log_path}:\n{_tail(s.log_path)}",
                markup=False,
                highlight=False,
            )
    elif crashed:
        s = crashed[0]
        backend.stop()
        err.print(
            f"[red]site {s.name} exited with code {s.rc} before the job finished[/]; stopped the other "
            f"sites and the aggregator. Last lines of {s.log_path}:",
            highlight=False,
        )
        err.print(_tail(s.log_path), markup=False, highlight=False)
        return True
    return False


def _after_job(sites: list[SiteRun], running: list[SiteRun], done_at: float, err: Console) -> int | None:
    """The job is complete: 0 once every site exited 0 (or END_GRACE passed), 1 if one did not; None: wait."""
    if not running:
        bad = [s for s in sites if s.rc != 0]
        for s in bad:
            err.print(f"site {s.name} exited with code {s.rc} after the last round; see {s.log_path}", highlight=False)
        return 1 if bad else 0
    if time.monotonic() - done_at > END_GRACE:
        err.print(
            f"the last round is done but {', '.join(s.name for s in running)} did not exit within "
            f"{END_GRACE:.0f} s; stopping them",
            highlight=False,
        )
        return 0
    return None
