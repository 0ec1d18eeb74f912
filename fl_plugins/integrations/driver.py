"""Everything federated that the trainer integrations share, free of any trainer (and of torch).

One `RoundDriver` per process (`get()`), over the client session (`fl_plugins.client.session`). The Lightning and
HF integrations translate their trainer's hooks into these calls and keep no round state of their own:

    start(rank)                connect from the launcher's environment (FL_SERVER, FL_SITE; global rank 0 only)
                               and allow offering the model's weights when the aggregator has no initial model
    plan(budget, whole_run=)   one round's budget (budget.py); whole_run: every round in one fit, rounds end where
                               the budget is spent (the HF callback); else each fit is one round
    use_fedprox(mu)            FedProx, anchored at each round's global model (corrections.py: FedProx, SCAFFOLD)
    attach(target)             the model that receive() writes into, before the first fit
    bind(trainer) / bound()    the trainer this process federates (one per process)
    receive(into=...)          this round's FLModel at once; straight into the model's tensors when known
    open_task(target, step=)   a fit, validate or evaluate starts (or, in one fit, the next round): the task at
                               hand's `TaskKind` (tasks.py), the same on every rank. TRAIN: offer round 0's weights
                               if asked, load the global model once per round (strict key and shape check), anchor
                               FedProx; with a `Collective`, every rank takes rank 0's round info and weights.
                               open_round(): whether a TRAIN round opened; task_kind(): the kind alone
    begin_evaluation(target) / end_evaluation(target, metrics, num_samples) / abort_evaluation(target)
                               EVALUATE (answers.py): keep the weights, load the model; answer, put them back
    submit(target)             SUBMIT_MODEL: the target's weights (FULL) are the answer
    next_iteration()           the script's loop moved on (is_running / receive): ANSWERED no more
    step_began() / step_ended(lr) / epoch_ended()
                               training progress: both ..._ended say whether a round boundary is here (whole_run:
                               the budget is spent); after_step(lr) (also step_ended(lr)): FedProx, SCAFFOLD
    record_metrics(metrics)    the global model's evaluation metrics, sent with the update (`fresh`: no step has
                               begun on the round's global model yet)
    end_round(step=)           the round's training is over: send the update (target state, NUM_STEPS_CURRENT_ROUND,
                               metrics; SCAFFOLD: the site's new control variates), if a round is open
    agree_running(collective)  rank 0 asks the aggregator whether the job goes on; every rank gets the answer
    next_task(target)          inside one fit, the task at hand answered: agree_running, then open_task
    next_round(target)         a round boundary inside one fit: end_round, then next_task; whether training goes on
    total_rounds(collective)   the job's rounds (rank 0's, on every rank)
    log_scalars(values, step)  a training step's scalars to the aggregator as flare.log records

`open_task` and `end_round` are made of `begin(target)` and `finish_round(steps)`, the round's load and send.

What each task kind (TRAIN, EVALUATE, SUBMIT_MODEL) asks of the model, and ANSWERED: tasks.py.

Multi-process training (DDP): only global rank 0 connects and sends (`start(rank)`). The others learn the round
from rank 0's `round_info()` when a round opens and from `after_fit_info()` when it ends (`follow()`), so their
`is_running()` and `receive()` agree with rank 0's without ever talking to the aggregator or needing a process
group outside fit/validate. The trainer's broadcast reaches the driver as a `Collective`. A sharded model (FSDP:
sharded.py) is gathered on rank 0 where its state is read, and scattered to every rank's shards where rank 0 loaded.

Model targets (`state()`, `load(params, strict)`), `PrefixedTarget` (FLARE's `server_key_prefix`) and the strict
check: targets.py. Round 0 without an initial model: `receive()` returns an FLModel with `current_round=0` and
`params=None`; when the first round opens, the target's weights are uploaded as round 0's global model, received
back (into the target's own tensors), and that same FLModel gets its `params`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from fl_plugins.client import api, session
from fl_plugins.client.model import FLModel, MetaKey, ParamsType
from fl_plugins.errors import ConfigError
from fl_plugins.integrations.answers import TaskAnswers
from fl_plugins.integrations.budget import RoundBudget as RoundBudget
from fl_plugins.integrations.budget import RoundProgress
from fl_plugins.integrations.corrections import Corrections
from fl_plugins.integrations.peers import Follower
from fl_plugins.integrations.targets import ModelTarget as ModelTarget
from fl_plugins.integrations.targets import PrefixedTarget as PrefixedTarget
from fl_plugins.integrations.targets import check_params as check_params
from fl_plugins.integrations.targets import gather, is_sharded_target, pop_control_variates, release, spread
from fl_plugins.integrations.targets import matching as matching
from fl_plugins.integrations.tasks import Collective as Collective
from fl_plugins.integrations.tasks import TaskKind as TaskKind
from fl_plugins.integrations.tasks import kind_of, task_info

logger = logging.getLogger(__name__)


class RoundDriver(TaskAnswers):
    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.target: ModelTarget | None = None
        self.model: FLModel | None = None  # the task being worked on (received, not yet answered)
        self.kind = TaskKind.TRAIN  # ... its kind
        self.answered = False  # the script's loop iteration answered an EVALUATE or SUBMIT_MODEL task
        self.kept: dict[str, Any] | None = None  # the target's own weights while an EVALUATE task's model is in it
        self.loaded = False
        self.metrics: dict[str, Any] = {}
        self.lock = threading.RLock()
        self.rank = 0  # global rank of this process
        self.started = False
        self.budget: RoundBudget | None = None
        self.whole_run = False  # every round in one fit: rounds end where the budget is spent
        self.corrections = Corrections()  # FedProx and SCAFFOLD, after each optimizer step
        self.variates: dict[str, Any] | None = None  # SCAFFOLD: the TRAIN task's control variates c (rank 0)
        self.progress = RoundProgress()
        self.owner: weakref.ref[Any] | None = None
        self.peers = Follower()  # ranks != 0 (multi-process training): what rank 0 broadcast

    # -- set-up --------------------------------------------------------------------------------------------
    def start(self, rank: int = 0, offer: bool = True) -> None:
        """Connect (global rank 0 only; other ranks never talk to the aggregator); `offer`: may offer round 0's."""
        api.init(rank=rank)  # a no-op when the script called init() itself
        if rank != 0 and session.get().rank == 0:
            raise ConfigError(
                f"this process is global rank {rank} of a multi-process run, but init() was called here as rank "
                "0: let patch() connect (drop the init() call), or pass init(rank=...) on every rank"
            )
        self.rank = rank
        self.started = True
        if offer:
            session.get().allow_offer_initial()

    def plan(self, budget: RoundBudget | None, *, whole_run: bool = False) -> None:
        """One round's budget; `whole_run`: one fit trains every round, and a round ends where its budget is spent
        (step_ended / epoch_ended say so). Otherwise each fit is one round, and the budget only sets its limits."""
        self.budget, self.whole_run = budget, whole_run

    def use_fedprox(self, mu: float) -> None:
        """FedProx with weight `mu` (0: off): anchored when a round opens, pulled after each step (fedprox.py)."""
        self.corrections.use_fedprox(mu)

    def after_step(self, lr: float | None) -> None:
        """After an optimizer step at learning rate `lr`, while a round is open: FedProx moves the weights toward
        the round's global model (fedprox.py `pull`), SCAFFOLD corrects them by -lr (c - c_i) (scaffold.py)."""
        if self.progress.open:
            self.corrections.step(lr)

    def attach(self, target: ModelTarget) -> None:
        """The model that receive() writes into, before the first round opens."""
        with self.lock:
            self.target = target

    def bind(self, trainer: Any) -> None:
        """Remember (weakly) the trainer this process federates."""
        self.owner = weakref.ref(trainer)

    def bound(self) -> Any | None:
        """The trainer this process federates, while it lives."""
        return self.owner() if self.owner is not None else None

    # -- the job -------------------------------------------------------------------------------------------
    def is_running(self) -> bool:
        """Rank 0: asks the aggregator. Other ranks: what rank 0 said at the end of the last round (True before)."""
        if self.rank != 0:
            return self.peers.running
        return session.get().is_running()

    def total_rounds(self, collective: Collective | None = None) -> int:
        """The job's rounds, as the aggregator said when this site connected: rank 0's, broadcast with
        `collective` (0 on other ranks without one)."""
        total = session.get().total_rounds if self.rank == 0 else 0
        return int(collective.broadcast(total)) if collective is not None else total

    def log_scalars(self, values: dict[str, float], step: int, round_: int | None = None) -> None:
        """Rank 0: a training step's scalars (the trainer's own logs) go to the aggregator as flare.log records;
        `round_`: the round the step belongs to (default: the one at hand)."""
        session.get().log_scalars(values, step, round_)

    # -- a round, as the trainer sees it -------------------------------------------------------------------
    @property
    def in_round(self) -> bool:
        """A round's global model is loaded and its update not yet sent."""
        return self.progress.open

    @property
    def fresh(self) -> bool:
        """... and no training step has begun on it: an evaluation now scores the global model."""
        return self.progress.open and self.progress.fresh

    @property
    def step_round(self) -> int | None:
        """The round of the step being trained (its logs may come after a boundary moved on)."""
        return self.progress.step_round

    def open_round(self, target: ModelTarget, *, step: int = 0, collective: Collective | None = None) -> bool:
        """open_task(), for a caller that only trains: whether a TRAIN round opened."""
        return self.open_task(target, step=step, collective=collective) is TaskKind.TRAIN

    def open_task(self, target: ModelTarget, *, step: int = 0, collective: Collective | None = None) -> TaskKind | None:
        """A trainer call starts at the trainer's global `step`: the task at hand's kind, the same on every rank
        (None: the job is over). TRAIN: its global model is loaded into `target` (rank 0: begin()) and, with
        `collective`, rank 0's round info and weights go to every rank; its round opens. Other kinds load nothing
        here (begin_evaluation, submit); ANSWERED (see next_iteration) asks the aggregator nothing."""
        if self.answered:
            return TaskKind.ANSWERED
        gather(target)  # a sharded model: rank 0 holds its state until spread()
        kind = self._at_hand() if self.rank == 0 else None
        if kind is TaskKind.TRAIN and not self.begin(target):
            kind = None
        scaffold = self.variates is not None
        if collective is not None:
            info = collective.broadcast(self.round_info() if self.rank == 0 else None) or {}
            kind, scaffold = kind_of(info), bool(info.get("scaffold"))
            if self.rank != 0:
                self.follow(info, target if kind is TaskKind.TRAIN else None)
        if kind in (TaskKind.TRAIN, None) or is_sharded_target(target):  # (a sharded one drops its gathered copy)
            spread(target, collective)  # every rank takes rank 0's weights
        opened = kind is TaskKind.TRAIN
        self.progress.restart(opened, step)
        if opened:  # FedProx and SCAFFOLD start from the round's global model
            self.corrections.anchor(target, scaffold, self.variates, collective)
        return kind

    def task_kind(self, collective: Collective | None = None) -> TaskKind | None:
        """The task at hand's kind, not opened (rank 0 receives it; every rank gets its answer with `collective`)."""
        if self.answered:
            return TaskKind.ANSWERED
        kind = self._at_hand() if self.rank == 0 else None
        if collective is not None:
            value = collective.broadcast(kind.value if kind is not None else None)
            kind = TaskKind(value) if value is not None else None
        return kind

    def next_iteration(self) -> None:
        """The script's loop moves on (it called is_running() or receive()): trainer calls act on a task again."""
        self.answered = False

    def step_began(self) -> None:
        self.progress.fresh = False
        self.progress.step_round = self.model.current_round if self.model is not None else None

    def step_ended(self, lr: float | None = None) -> bool:
        """An optimizer step (at learning rate `lr`) is done: FedProx pulls the weights toward the round's global
        model. Returns whether the round's budget is spent here (whole_run only)."""
        p = self.progress
        p.steps += 1
        self.after_step(lr)
        return self.whole_run and self.budget is not None and self.budget.spent(steps=p.steps)

    def epoch_ended(self) -> bool:
        """An epoch is done. Returns whether the round's budget is spent here (whole_run only)."""
        self.progress.epochs += 1
        return self.whole_run and self.budget is not None and self.budget.spent(epochs=self.progress.epochs)

    def end_round(self, step: int | None = None) -> None:
        """The round's training is over (at the trainer's global `step`, or after the step_ended() calls): rank 0
        sends the update, if a round is open."""
        p = self.progress
        if not p.open:
            return
        p.open = False
        if self.target is not None:
            gather(self.target)  # a sharded model: every rank, before rank 0 sends
        self.finish_round(p.steps if step is None else step - p.start_step)
        if self.target is not None:
            release(self.target)

    def agree_running(self, collective: Collective | None = None) -> bool:
        """After a round: rank 0 asks whether the job goes on (and which round is next); with `collective`, every
        rank gets its answer, which the other ranks' is_running() returns from then on."""
        info = self.after_fit_info() if self.rank == 0 else None
        if collective is not None:
            info = collective.broadcast(info)
        if self.rank != 0:
            self.follow(info or {"running": False})
        return bool(info and info["running"])

    def next_task(self, target: ModelTarget, collective: Collective | None = None) -> TaskKind | None:
        """Inside one fit, the task at hand answered (an update, an evaluation, a submission): if the job goes on,
        open the next task (open_task). Returns its kind; None: the job is over."""
        if not self.agree_running(collective):
            return None
        self.answered = False
        return self.open_task(target, collective=collective)

    def next_round(self, target: ModelTarget, collective: Collective | None = None) -> bool:
        """A round boundary inside one fit: send this round's update, and if the job goes on, open the next task.
        Returns whether training goes on (a TRAIN task opened)."""
        self.end_round()
        return self.next_task(target, collective) is TaskKind.TRAIN

    # -- multi-process training: global rank 0 talks to the aggregator, the others follow it ----------------
    def round_info(self) -> dict[str, Any]:
        """Rank 0: what the other ranks learn of the task opened (sent with the strategy's broadcast): a loaded
        TRAIN round's round info, another task's with its kind (tasks.py)."""
        with self.lock:
            model = self.model
            if model is not None and self.kind is not TaskKind.TRAIN:
                return task_info(self.kind, model)
            if model is not None and self.loaded:
                info = {"round": model.current_round, "total_rounds": model.total_rounds}
                return info | ({"scaffold": True} if self.variates is not None else {})  # SCAFFOLD: c - c_i follows
            return {"round": None, "total_rounds": None}

    def after_fit_info(self) -> dict[str, Any]:
        """Rank 0, when a fit has ended (its update sent): is the job still running, and which round is next."""
        sess = session.get()
        running = sess.is_running()
        nxt, total = sess.pending_round() if running else (None, None)
        return {"running": running, "round": nxt, "total_rounds": total}

    def follow(self, info: Mapping[str, Any], target: ModelTarget | None = None) -> None:
        """Rank != 0: take what rank 0 broadcast (peers.py): round info when a task opens, with a TRAIN task's
        weights in `target`, or the running flag when a fit ended."""
        with self.lock:
            if target is not None:
                self.target = target
            self.peers.follow(info, self.rank, target)

    # -- receive, load, send -------------------------------------------------------------------------------
    def receive(self, timeout: float | None = None, *, into: Mapping[str, Any] | None = None) -> FLModel | None:
        """The task's FLModel. A TRAIN task's global model goes straight into the model's tensors (`into`, else the
        target's); an EVALUATE or SUBMIT_MODEL task's never does (its kind is known before its model arrives)."""
        with self.lock:
            if self.rank != 0:  # the round's weights reach this rank when validate/fit starts
                return self.peers.current(self.rank)
            sess = session.get()
            kind = TaskKind(sess.kind) if sess.is_running() else TaskKind.TRAIN
            if kind is not TaskKind.TRAIN:
                into = None
            elif into is None and self.target is not None and not is_sharded_target(self.target):
                into = dict(self.target.state())
            model = api.receive(timeout, into=into)  # type: ignore[arg-type]
            if model is not self.model:
                self.model, self.loaded, self.metrics, self.kind = model, False, {}, kind
            return model

    def _at_hand(self) -> TaskKind | None:
        """Rank 0: the task at hand's kind, received if none is (None: the job is over)."""
        with self.lock:
            if self.model is None and (not session.get().is_running() or self.receive() is None):
                return None
            return self.kind

    def begin(self, target: ModelTarget) -> bool:
        """Rank 0: make sure the round's global model is in `target`.

        Receives the round if the script has not, offers the target's weights as round 0's model if the
        aggregator asked. Returns False when there is no round to work on (the job is over, or rank != 0)."""
        with self.lock:
            self.target = target
            if self.model is None:
                if self.rank != 0 or not session.get().is_running():
                    return False
                if self.receive() is None:
                    return False
            model = self.model
            if model is None or self.kind is not TaskKind.TRAIN:
                return False
            if model.params is None:
                state = dict(target.state())
                session.get().offer_initial(state, into=state)
                if model.params is None:
                    return False
            if not self.loaded:
                self.variates = self._load(target, model.params, f"round {model.current_round}'s global model")
                self.loaded = True
            return True

    def _load(self, target: ModelTarget, params: dict[str, Any], what: str) -> dict[str, Any] | None:
        """Load `params` into `target`; SCAFFOLD's control variates are taken out of `params` and returned."""
        variates = pop_control_variates(params) or None
        local = target.state()  # strict: every key and shape must match; else what matches is loaded
        if self.strict:
            check_params(params, local, what)
            target.load(params, strict=True)
        else:
            target.load(matching(params, local), strict=False)
        return variates

    def record_metrics(self, metrics: Mapping[str, Any]) -> None:
        """An evaluation of the global model: its metrics travel with this round's update."""
        with self.lock:
            if self.model is not None and self.loaded:
                self.metrics.update(metrics)

    def finish_round(self, steps: int) -> None:
        """Rank 0: send the target's weights as this round's update."""
        with self.lock:
            if self.rank != 0 or self.model is None or self.target is None or not self.loaded:
                return
            if steps < 1:
                logger.warning(
                    "round %s: no optimizer step was taken; sending the update with weight 1", self.model.current_round
                )
            meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: max(1, int(steps))}
            state = dict(self.target.state())
            state.update(self.corrections.update(state))  # SCAFFOLD: the site's new control variates
            api.send(FLModel(params_type=ParamsType.FULL, params=state, metrics=dict(self.metrics), meta=meta))
            self.model, self.loaded, self.metrics = None, False, {}


_driver: RoundDriver | None = None
_driver_lock = threading.Lock()


def get(strict: bool | None = None) -> RoundDriver:
    """The process's driver (created on first use)."""
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = RoundDriver()
        if strict is not None:
            _driver.strict = strict
        return _driver


def current() -> RoundDriver | None:
    return _driver


def reset() -> None:
    global _driver
    with _driver_lock:
        _driver = None
