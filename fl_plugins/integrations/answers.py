"""The round driver's answers to the tasks that do not train: EVALUATE (load the task's model, evaluate, answer
with metrics, put the target's own weights back) and SUBMIT_MODEL (send the target's weights). A mixin of
`driver.RoundDriver`, whose state (lock, rank, model, kept) it uses."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from fl_plugins.client import api
from fl_plugins.client.model import FLModel, ParamsType
from fl_plugins.errors import ConfigError
from fl_plugins.integrations.targets import ModelTarget, gather, is_sharded_target, release, snapshot, spread
from fl_plugins.integrations.tasks import NUM_EVAL_SAMPLES, Collective


class TaskAnswers:
    lock: threading.RLock
    rank: int
    model: FLModel | None
    kept: dict[str, Any] | None
    kept_in: ModelTarget | None = None  # the target begin_evaluation kept the weights of
    loaded: bool
    metrics: dict[str, Any]
    answered: bool

    def _load(self, target: ModelTarget, params: dict[str, Any], what: str) -> dict[str, Any] | None:
        raise NotImplementedError

    @property
    def evaluating(self) -> bool:
        """An EVALUATE task's model is in the target (begin_evaluation), its answer not yet sent."""
        return self.kept is not None

    def begin_evaluation(self, target: ModelTarget, collective: Collective | None = None) -> None:
        """An EVALUATE task opened: every rank keeps the target's own weights (off the accelerator), rank 0 loads
        the task's model into it (checked as a global model is), and with `collective` every rank gets rank 0's."""
        gather(target)
        with self.lock:
            sharded = is_sharded_target(target)  # its gathered copy is already its own (CPU) memory: kept as it is
            self.kept = dict(target.state()) if sharded else snapshot(target.state())
            self.kept_in = target  # restored through it: a sharded target knows its names from this gather
            model = self.model
            if self.rank == 0 and model is not None and model.params is not None:
                owner = (model.meta or {}).get("model_owner", "global")
                self._load(target, model.params, f"the model to evaluate ({owner!r}, round {model.current_round})")
        spread(target, collective)

    def end_evaluation(self, target: ModelTarget, metrics: Mapping[str, Any], num_samples: int | None = None) -> None:
        """The evaluation is done: rank 0 answers with its `metrics` (and NUM_EVAL_SAMPLES when known); every rank
        gets its own weights back. ConfigError (the weights back, no answer) when there is no metric to send."""
        with self.lock:
            self.abort_evaluation(target)
            if self.rank == 0 and self.model is not None:
                if not metrics:  # the aggregator would refuse the answer
                    raise ConfigError("an EVALUATE task's evaluation gave no metrics: log one (self.log('loss', ...))")
                meta = {NUM_EVAL_SAMPLES: int(num_samples)} if num_samples else {}
                api.send(FLModel(metrics=dict(metrics), meta=meta))
            self._answered()

    def abort_evaluation(self, target: ModelTarget) -> None:
        """The target gets its own weights back; the EVALUATE task stays unanswered (the evaluation failed)."""
        with self.lock:
            kept, self.kept = self.kept, None
            into, self.kept_in = self.kept_in or target, None
            if kept is not None:
                into.load(kept, strict=True)
                if is_sharded_target(into):  # every rank's shards (an unsharded rank kept its own)
                    spread(into, None)

    def submit(self, target: ModelTarget) -> None:
        """A SUBMIT_MODEL task: rank 0 sends the target's weights (FULL) as this site's local model."""
        gather(target)
        with self.lock:
            if self.rank == 0 and self.model is not None:
                api.send(FLModel(params_type=ParamsType.FULL, params=dict(target.state())))
            self._answered()
        release(target)

    def _answered(self) -> None:
        self.model, self.loaded, self.metrics, self.answered = None, False, {}, True
