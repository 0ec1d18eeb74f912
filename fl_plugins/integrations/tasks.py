"""The tasks a site answers, as the trainer integrations see them (NVIDIA FLARE's semantics; the client session's
`kind` says which one the aggregator sent):

    TRAIN          load the global model, train one round's budget, send the update (FULL weights,
                   NUM_STEPS_CURRENT_ROUND, the global model's metrics)
    EVALUATE       the task's model (the global one, or another site's during cross-site evaluation) is received
                   apart from the model's own tensors, loaded for the evaluation only (the model's own weights are
                   kept off the accelerator and put back, exactly, once it is over), and the evaluation's metrics
                   are the answer, with NUM_EVAL_SAMPLES when the validation set's size is known
    SUBMIT_MODEL   the model's weights as they are (what a TRAIN update sends: a PEFT model's adapter) are the
                   answer; the final global model that comes with the task is never loaded

ANSWERED is no task: the task of the script's loop iteration (`while flare.is_running(): ...`) was an EVALUATE or
SUBMIT_MODEL task and is answered, so the iteration's other trainer calls (FLARE's `validate` then `fit`) do
nothing until the script asks for the next task (is_running, receive).

Multi-process training: rank 0 broadcasts the task it opened (`task_info`); a TRAIN task's info is the round info
the other ranks always got (`{"round", "total_rounds"}`), another kind's says its kind too (`kind_of`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fl_plugins.client.model import FLModel


class TaskKind(enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    SUBMIT_MODEL = "submit_model"
    ANSWERED = "answered"


NUM_EVAL_SAMPLES = "NUM_EVAL_SAMPLES"  # FLARE's meta key: how many samples an evaluation's metrics cover


class Collective(Protocol):
    """Rank 0's values to every rank of a multi-process run, through the trainer's own means (a strategy's
    broadcast, torch.distributed); every rank calls each method, in the same order."""

    def broadcast(self, value: Any) -> Any: ...

    def broadcast_tensors(self, tensors: Iterable[Any]) -> None: ...


def task_info(kind: TaskKind, model: FLModel) -> dict[str, Any]:
    """Rank 0: what the other ranks learn of an EVALUATE or SUBMIT_MODEL task it opened."""
    return {"round": model.current_round, "total_rounds": model.total_rounds, "kind": kind.value}


def kind_of(info: Mapping[str, Any]) -> TaskKind | None:
    """The kind of the task rank 0 opened, from what it broadcast; None: the job is over."""
    if "kind" in info:
        return TaskKind(info["kind"])
    return TaskKind.TRAIN if info.get("round") is not None else None
