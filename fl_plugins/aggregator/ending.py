"""The end of a job: what the aggregator leaves in the run directory when its job is complete, and how a later
start knows the run is finished.

    RUN_DIR/final/          the final global model under a stable name: global/round-R's files (manifest.json, the
                            safetensors shards and their .chunks digests), hard links where the filesystem allows,
                            else copies; written into final.tmp and renamed, so a folder named `final` is whole
    RUN_DIR/summary.json    records.RunSummary: the job id, each round's row, the sites' updates, the final model's
                            folder and its evaluation (the "evaluation" record of round R), exit code 0

`conclude` writes both (the coordinator's `_complete`, lock held), before sites hear END. `fl-plugins run` writes
summary.json again at its end, over the aggregator's, with its sites' exit codes and the baselines; `fl-plugins
server` writes one with its exit code when it stops before the job is complete (`write_summary`).

A start on a finished run does nothing (`finished`, asked by `fl-plugins server` and `fl-plugins run` before they
start anything: "already finished"). An aggregator started on it all the same (a test, a library caller) keeps
what is there: a `final` folder that holds the same manifest is not written again, and a summary that says these
rounds finished is not replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins.aggregator.files import DIR_MODE, FILE_MODE, fsync_dir, write_atomic
from fl_plugins.aggregator.store import RunStore
from fl_plugins.config import AggregatorConfig, trains
from fl_plugins.record_files import RunMetrics, read_object, read_records
from fl_plugins.records import METRICS, SUMMARY, EvaluationRecord, RunSummary, round_rows

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fl_plugins.aggregator.core import Aggregator

log = logging.getLogger(__name__)

FINAL = "final"  # RUN_DIR/final: the final global model


def conclude(agg: Aggregator) -> None:
    """Lock held; the job is complete. A training job's final model goes to RUN_DIR/final; summary.json is written
    (unless it says already that these rounds finished: a start on a finished run)."""
    cfg = agg.config
    final = None
    if agg.job.trains and cfg.workflow != "swarm":  # a swarm's global models are sealed: they are at the sites
        r = agg.store.latest_round()
        if r is not None:
            final = write_final(cfg.run_dir, agg.store.round_dir(r))
            log.info("final model (global/round-%05d) in %s", r, final)
    done = finished(cfg)
    if done is None or done.rounds_planned != _planned(cfg):
        write_summary(agg, 0, final)
    log.info("job %s finished; summary in %s", agg.job_id, cfg.run_dir / SUMMARY)


def write_final(root: Path, source: Path) -> Path:
    """ROOT/final: the files of the checkpoint folder `source` (not its folders: a server optimizer's state is not
    the model), linked, or copied and fsynced where the filesystem cannot link; written into final.tmp, then
    renamed over the old one. A `final` that holds the same manifest is kept as it is."""
    final = root / FINAL
    manifest = (source / "manifest.json").read_bytes()
    try:
        if (final / "manifest.json").read_bytes() == manifest:
            return final
    except OSError:
        pass
    tmp, old = root / f"{FINAL}.tmp", root / f"{FINAL}.old"
    for left in (tmp, old):  # from a start that died while writing
        if left.exists():
            shutil.rmtree(left)
    tmp.mkdir(mode=DIR_MODE)
    for p in sorted(source.iterdir()):
        if p.is_file() and not p.is_symlink():
            _link_or_copy(p, tmp / p.name)
    fsync_dir(tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            if os.name == "posix":
                os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())


def summary(agg: Aggregator, exit_code: int, final: Path | None = None) -> RunSummary:
    """The aggregator's summary.json: what RUN_DIR/metrics.jsonl says of each round, the updates of each site it
    knows, and (a complete training job) the final model's folder and its evaluation. `seconds`: from the run's
    first record to now (restarts included)."""
    cfg = agg.config
    recs = read_records(cfg.run_dir / METRICS)
    ours = RunMetrics()
    ours.add(recs)
    sites: dict[str, dict[str, Any]] = {name: {"updates": 0} for name in sorted(agg.rounds.sites)}
    for u in ours.updates:
        sites.setdefault(u.site, {"updates": 0})["updates"] += 1
    first = next((t for rec in recs if isinstance(t := rec.to_json().get("time"), (int, float))), None)
    evaluations = [rec for rec in recs if isinstance(rec, EvaluationRecord) and rec.round == agg.job.served_round]
    path, evaluation = (cfg.recipe or {}).get("path"), None
    if final is not None and evaluations:
        evaluation = {k: v for k, v in evaluations[-1].to_json().items() if k not in ("time", "event")}
    return RunSummary(
        name=agg.job_id,
        recipe=str(path) if path else None,
        exit_code=exit_code,
        seconds=round(time.time() - first, 3) if first is not None else None,
        rounds_planned=_planned(cfg),
        rounds=round_rows(ours.updates, ours.rounds),
        sites=dict(sorted(sites.items())),
        job_id=agg.job_id,
        final_model=str(final) if final is not None else None,
        final_evaluation=evaluation,
    )


def write_summary(agg: Aggregator, exit_code: int, final: Path | None = None) -> None:
    """Write RUN_DIR/summary.json (atomically), the aggregator's."""
    with agg.lock:
        data = summary(agg, exit_code, final).to_json()
    write_atomic(agg.config.run_dir / SUMMARY, json.dumps(data, indent=2) + "\n")


def _planned(cfg: AggregatorConfig) -> int:
    """The aggregator's rounds a training job plans (a cyclic job's visits); 0 for an evaluation-only job."""
    return cfg.total_rounds if trains(cfg.workflow) else 0


def read_summary(run_dir: Path) -> RunSummary | None:
    """RUN_DIR/summary.json, None when there is none or it cannot be read."""
    try:
        obj = read_object(run_dir / SUMMARY)
    except (OSError, ValueError):
        return None
    return RunSummary.from_json(obj) if obj is not None else None


def finished(cfg: AggregatorConfig) -> RunSummary | None:
    """The summary of a finished run: RUN_DIR/summary.json says it ended with exit code 0 and, for a training job,
    it planned at least `cfg`'s rounds and the checkpoints hold them (a run restarted with more rounds trains on).
    None otherwise (no summary, or an unreadable one: the run resumes)."""
    done = read_summary(cfg.run_dir)
    if done is None or done.exit_code != 0:
        return None
    if trains(cfg.workflow):
        latest = RunStore(cfg.run_dir).latest_round()
        planned = done.rounds_planned if done.rounds_planned is not None else latest
        if latest is None or latest < cfg.total_rounds or (planned or 0) < cfg.total_rounds:
            return None
    return done


def already_finished(cfg: AggregatorConfig, done: RunSummary, rounds_hint: str) -> str:
    """What a start on the finished run `done` says: the run, where its final model is, how to start a new run.
    `rounds_hint`: how this command raises the rounds ("--rounds", "the recipe's `rounds`")."""
    run_dir = cfg.run_dir
    where = done.final_model or (str(run_dir / FINAL) if (run_dir / FINAL).is_dir() else "")
    rounds = f", {done.rounds_planned} rounds" if done.rounds_planned else ""
    model = f"; the final model is in {where}" if where else ""
    more = f"; to train on, raise {rounds_hint}" if trains(cfg.workflow) else ""
    return (
        f"{run_dir}: this run is already finished (job {done.job_id or done.name or '?'}{rounds}){model}: nothing "
        f"to do. `fl-plugins report {run_dir}` shows it; to start a new run, pass another --run-dir (or remove "
        f"{run_dir}){more}"
    )


def site_exited(agg: Aggregator, site: str) -> None:
    """`site`'s process has exited (`fl-plugins run` saw it end): it counts as gone now instead of after
    `site_timeout`, so an evaluation phase closes its cells at once (a later call from it brings it back)."""
    with agg.lock:
        s = agg.rounds.sites.get(site)
        if s is not None:
            s.last_seen = min(s.last_seen, agg.clock() - agg.config.site_timeout)
            agg.presence.exited.add(site)  # its drop is told as an ended process, not as a silence
            agg.lock.notify_all()


def vouch(agg: Aggregator, sites: Iterable[str]) -> None:
    """`fl-plugins run` vouches for its virtual sites between their turns (fl_plugins/backends): each counts as
    alive, as if it had just called, so a round starts and draws its sample over all of them; and each one the
    attempt may train takes its task, as a connected site would at once, so the round waits for its turn (rule (a)
    waits for the sites that took the task; a turn that fails makes its site gone). Vouching stops when training is
    done (the job's phases after it ask connected sites only)."""
    with agg.lock:
        now, rounds, job = agg.clock(), agg.rounds, agg.job
        for name in sites:
            rounds.touch(name, now)
        if job.sweep is None and not job.trained and agg.global_manifest is not None and not agg.done:
            rounds.start_if_ready(now)
            if rounds.started is not None and rounds.closing is None:
                for name in sites:
                    if rounds.may_train(rounds.sites[name]):
                        rounds.sites[name].took = (rounds.round, rounds.attempt)
        agg.lock.notify_all()


def turn_failed(agg: Aggregator, site: str, at: tuple[int, int]) -> None:
    """A virtual site's turn for (round, attempt) `at` exited with an error: if that attempt is still on, the site
    sits it out (rounds.py's sit-out: still alive for the round's start, never waited for, its sends refused)."""
    with agg.lock:
        rounds = agg.rounds
        if (rounds.round, rounds.attempt) == tuple(at) and site in rounds.sites:
            rounds.sit_out(site)
            agg.lock.notify_all()
