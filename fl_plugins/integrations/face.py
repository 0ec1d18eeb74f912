"""`receive`, `is_running` and `shutdown` of the trainer faces (`fl_plugins.lightning`, `fl_plugins.hf`): the client
API's, routed through the round driver once `patch()` has created one."""

from __future__ import annotations

from typing import Any

from fl_plugins.client import api as _api
from fl_plugins.client.model import FLModel
from fl_plugins.integrations import driver as _driver


def receive(timeout: float | None = None, *, into: dict[str, Any] | None = None) -> FLModel | None:
    """The task's model, at once; None once the job is over. After patch(), a TRAIN task's weights go straight
    into the model's own tensors where the model is known (see the face's module docstring); an EVALUATE or
    SUBMIT_MODEL task's never do. Like is_running(), it starts the script's next loop iteration: trainer calls act
    on the task at hand again (after an answered evaluation or submission they do nothing)."""
    drv = _driver.current()
    if drv is None:
        return _api.receive(timeout, into=into)
    drv.next_iteration()
    return drv.receive(timeout, into=into)


def is_running() -> bool:
    """True while the job runs. Under multi-process training it agrees on every rank: rank 0 asks the aggregator,
    the other ranks return what rank 0 broadcast (True before the first round)."""
    drv = _driver.current()
    if drv is None or not drv.started:
        return _api.is_running()
    drv.next_iteration()
    return drv.is_running()


def shutdown() -> None:
    """Close the connection and forget the round state; patch() may be called again afterwards."""
    _api.shutdown()
    _driver.reset()
