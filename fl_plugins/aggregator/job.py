"""The job: its workflows in turn (`config.workflow`), and the evaluation phases between and after them.

    workflow                  phases
    fedavg                    training rounds (workflow.py), each site evaluating the global model after every
                              `evaluate_every`-th round and after the last (a barrier: the next round's training
                              starts once every site answered or its cell closed); without `evaluate_every`, the
                              final evaluation (`evaluate_final`, the default): the final global model, at the
                              sites that sent the global model's metrics with an update (a site that never sent
                              any has no evaluation to run: it is not asked, and waits for END)
    fedavg,cross-site-eval    the same, then SUBMIT_MODEL (each site sends its local model), then every site
                              evaluates every submitted model and the global one: RUN_DIR/cross_site_eval.json
                              (its global column is the final evaluation's record, unless the round has one)
    cross-site-eval           the last two on the initial model (--initial-model) and the sites' own models
    evaluate                  every site evaluates the initial model, once

Each evaluation phase is an evaluation.py `Sweep`. `Job.next_task` hands out the phase's tasks while one runs, the
training workflow's otherwise; `step` (on the coordinator's background thread) closes cells nobody will answer,
ends a phase that is over and starts the next; `complete` says the job has nothing left. The coordinator holds its
lock around every call, records finished phases (`drain`) and serves the submitted models' files (models.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fl_plugins.aggregator.evaluation import GLOBAL, Sweep
from fl_plugins.aggregator.rounds import RoundState, SiteState
from fl_plugins.aggregator.workflow import TASK_NAMES, Task, TaskKind, Workflow
from fl_plugins.config import AggregatorConfig, trains
from fl_plugins.errors import ProtocolError, RoundError
from fl_plugins.record_files import read_records
from fl_plugins.records import METRICS, EvaluationRecord, UpdateRecord
from fl_plugins.wire.layout import Manifest

log = logging.getLogger(__name__)

EVALUATE, SUBMIT, CROSS, FINAL = "evaluate", "submit", "cross-site", "final evaluation"  # the phases


class Job:
    def __init__(self, config: AggregatorConfig, rounds: RoundState, training: Workflow) -> None:
        names = config.workflow.split(",")
        self.config, self.rounds = config, rounds
        self.training: Workflow | None = training if trains(names) else None
        self.cross_site = "cross-site-eval" in names
        self.trained = False  # training is over (or there is none) and the final global model is served
        self.phase: str | None = None
        self.sweep: Sweep | None = None
        self.queue: list[str] = []  # phases to run once the current one is over
        self.submitted: dict[str, Manifest] = {}  # site -> its local model (SUBMIT_MODEL)
        self.done: list[tuple[str, Sweep]] = []  # phases over, not yet recorded (drain)
        self.submissions: Sweep | None = None  # the SUBMIT_MODEL phase, once over (its cells name failures)
        self.complete = False
        self.served_round = 0
        self.only: set[str] | None = None  # the sites the current phase asks (the final evaluation's); None: all
        self.join_by: float | None = None  # a final evaluation nobody joined yet ends empty at this time
        self.evaluated: set[int] = set()  # rounds whose global model this process recorded an evaluation of

    @property
    def trains(self) -> bool:
        return self.training is not None

    @property
    def visits(self) -> int:
        """The aggregator's rounds per round of the job: a cyclic job's cycle has `min_sites` visits."""
        return self.config.min_sites if self.config.workflow.startswith("cyclic") else 1

    @property
    def after_training(self) -> bool:
        """Whether evaluation phases follow the last round for every site (sites must not take a silence then for
        the job's end). Not the final evaluation: it asks only the sites that report metrics, and a site that finds
        the aggregator gone after the last round takes the job as over, as it would without it."""
        return self.cross_site or bool(self.config.evaluate_every)

    # -- what happens next --------------------------------------------------------------------------------------
    def opened(self, r: int, last: bool, now: float) -> None:
        """Round `r`'s global model is served; `last`: no training follows (the rounds are done, or none)."""
        self.served_round = r
        k = self.config.evaluate_every * self.visits  # a cyclic job's rounds are visits: k counts cycles
        due = self.trains and r > 0 and k and (r % k == 0 or last)
        final = last and self.trains and r > 0 and self.config.evaluate_final and not self.cross_site
        if (due or (last and not self.trains and not self.cross_site)) and not self.evaluated_already(r):
            self.queue.append(EVALUATE)
        elif final and not due and not self.evaluated_already(r):
            self.queue.append(FINAL)
        if last:
            self.trained = True
            if self.cross_site and not self._cross_evaluated_already(r):
                self.queue += [SUBMIT, CROSS]
        self._advance(now)

    def evaluated_already(self, r: int) -> bool:
        """An aggregator restarted after round `r`'s global model was evaluated (its "evaluation" record is in
        RUN_DIR/metrics.jsonl): not again. Only the round a restart finds checkpointed can have been (the file is
        read then, not at every evaluation)."""
        if r != self.rounds.restarted_at:
            return False
        recs = read_records(self.config.run_dir / METRICS)
        return any(isinstance(rec, EvaluationRecord) and rec.round == r for rec in recs)

    def _cross_evaluated_already(self, r: int) -> bool:
        """A restart of a job whose cross-site evaluation of round `r`'s model is written: not again."""
        path = self.config.run_dir / "cross_site_eval.json"
        try:
            done = json.loads(path.read_text()).get("round") == r
        except (OSError, ValueError, AttributeError):
            return False
        if done:
            log.info("the cross-site evaluation of round %d is in %s already", r, path)
        return done

    def reporting(self) -> set[str]:
        """The sites that sent the global model's metrics with an update in this job (RUN_DIR/metrics.jsonl): the
        final evaluation asks these. Read once, when it starts."""
        recs = read_records(self.config.run_dir / METRICS)
        return {rec.site for rec in recs if isinstance(rec, UpdateRecord) and rec.metrics}

    def _advance(self, now: float) -> None:
        while self.sweep is None and self.queue:  # (a final evaluation with nobody to ask does not start)
            self._start(self.queue.pop(0), now)
        if self.sweep is None and self.trained:
            self.complete = True

    def _start(self, phase: str, now: float) -> None:
        models = [GLOBAL] if phase != CROSS else [GLOBAL, *sorted(self.submitted)]
        kind = TaskKind.SUBMIT_MODEL if phase == SUBMIT else TaskKind.EVALUATE
        only = self.reporting() if phase == FINAL else None
        if only is not None and not only:
            log.info("the final global model is not evaluated: no site sent its metrics with an update")
            return
        # the sites connected now take part (and any that ask before it is over); with none connected (a job that
        # starts with this phase, or an aggregator restarted after training) it waits for `min_sites` of them
        alive = [s.name for s in self.rounds.sites.values() if self.rounds.alive(s, now)]
        alive = [name for name in alive if only is None or name in only]
        # after training, a phase never waits for a site that may be gone: the connected ones, or the first one to
        # come back when none is connected now (they died, were silent a moment, or this aggregator restarted)
        # within site_timeout; after that an empty phase ends (step)
        needed = min(self.config.min_sites, len(alive)) if alive else 1 if self.trains else self.config.min_sites
        self.join_by = now + self.config.site_timeout if self.trains and not alive else None
        self.phase, self.only = phase, only
        timeout = self.config.evaluate_timeout or self.config.round_deadline  # (a live site that never answers)
        self.sweep = Sweep(kind.value, models, needed, timeout, self.served_round)
        for name in alive:
            self.sweep.join(name, now)
        log.info(
            "%s of round %d's models %s: %d sites", phase, self.served_round, ", ".join(models), len(self.sweep.cells)
        )

    def next_task(self, s: SiteState, now: float, holds: str, global_model: Manifest | None) -> Task | None:
        if self.sweep is not None:
            return self._sweep_task(self.sweep, s, now, global_model)
        if self.training is not None and not self.trained:
            return self.training.next_task(s, now, holds, global_model)
        return None

    def _sweep_task(self, sweep: Sweep, s: SiteState, now: float, global_model: Manifest | None) -> Task | None:
        if self.only is not None and s.name not in self.only:
            return None  # not asked: it waits for the phase's end
        got = sweep.next_task(s.name, now)
        if got is None:
            return None
        model, task_id = got
        kind = TaskKind(sweep.kind)
        manifest = global_model if model == GLOBAL else self.submitted[model]
        shown = model if kind is TaskKind.EVALUATE else ""
        return Task(kind, sweep.round, manifest=manifest, task_id=task_id, model=shown, name=TASK_NAMES[kind])

    def step(self, now: float) -> None:
        """Close the cells nobody will answer; end the phase once it is over and start the next."""
        sweep = self.sweep
        if sweep is None:
            return
        sweep.expire(now, {name: self.rounds.alive(s, now) for name, s in self.rounds.sites.items()})
        if self.join_by is not None and not sweep.cells and now >= self.join_by:
            asked = f"the sites that sent metrics ({', '.join(sorted(self.only))})" if self.only else "the sites"
            log.warning(
                "the %s phase ends without results: none of %s connected within --site-timeout (%g s)",
                self.phase,
                asked,
                self.config.site_timeout,
            )
            self.sweep, self.phase, self.only, self.join_by = None, None, None, None
            self._advance(now)
            return
        if not sweep.over():
            return
        assert self.phase is not None
        self.done.append((self.phase, sweep))
        if self.phase == SUBMIT:
            self.submissions = sweep
            self.submitted = {k: v for k, v in self.submitted.items() if k in sweep.ok_sites()}
        self.sweep, self.phase, self.only, self.join_by = None, None, None, None
        self._advance(now)

    def answer(self, site: str, task_id: str, envelope: dict[str, Any], now: float) -> str:
        """An EVALUATE task's answer (the coordinator's `result`): the reply's message. An answer without metrics
        fills the cell with that reason and is no error for the site (a script that sent params only)."""
        sweep = self.sweep
        if sweep is None or sweep.kind != TaskKind.EVALUATE.value:
            raise RoundError(f"site {site!r}: no evaluation is running; the result of task {task_id!r} is late")
        try:
            model = sweep.answer(site, task_id, envelope, now)
        except ProtocolError as e:
            log.warning("%s", e)
            return f"result not counted: {e}"
        log.info("site %r evaluated model %r: %s", site, model, envelope.get("metrics"))
        return "result accepted"

    def drain(self) -> list[tuple[str, Sweep]]:
        done, self.done = self.done, []
        return done
