"""NVIDIA FLARE's decorator form of the client API: `@flare.train`, `@flare.evaluate` and `@flare.submit_model` on
plain functions, as FLARE's tutorials write them (FLARE marks them deprecated in favour of receive/send; its
scripts still use them).

    @flare.train
    def train(input_model=None, epochs=2):      # the round's global model comes in as the first argument
        ...
        return flare.FLModel(params=net.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": steps})

    @flare.evaluate
    def evaluate(input_model=None):
        ...
        return accuracy                          # a number, or a dict of metrics

    while flare.is_running():
        input_model = flare.receive()
        evaluate(input_model=input_model)        # the global model's metrics ride with this round's update
        train(input_model=input_model)           # sends the FLModel train returns

    @flare.submit_model
    def submit(input_model=None):                # cross-site evaluation asks for the site's local model
        return flare.FLModel(params=torch.load("best.pt"))    # (or the params dict itself)

    ... if flare.is_submit_model(): submit(input_model=input_model)

Each wrapper calls `flare.receive()` (the round's model, cached until it is sent) and passes it as the function's
first parameter (in place of a first positional argument, else by name); the other arguments as given.
`evaluate` during a TRAIN task keeps its result for the next `train`, whose update carries it as metrics (a
number becomes `{"metric": value}`, as FLModel.metrics is a dict here); during another task it sends the
metrics on their own (an EVALUATE task's answer: the final evaluation at the end of a job, for one). A `train`
once the job is over (the loop's EVALUATE task was its last, answered by `evaluate`) does nothing and returns None,
so the tutorial's loop ends as it does in FLARE. `submit_model` sends what it returns, during a SUBMIT_MODEL task
only. A `train` that does not return an FLModel, an `evaluate` that returns None, a `submit_model` that returns
neither an FLModel nor a dict of params or is called during another task, is a ConfigError saying so.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any, TypeVar, cast

from fl_plugins.client import api
from fl_plugins.client.model import FLModel
from fl_plugins.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

_pending: dict[str, Any] = {}  # the metrics an evaluate() during a TRAIN task keeps for the next train()


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], model: Any = None) -> Any:
    """fn with the round's model (`model`, else flare.receive()) as its first parameter: in place of a first
    positional argument, else by name; the other arguments as given."""
    params = list(inspect.signature(fn).parameters)
    if not params:
        raise ConfigError(f"@flare decorators pass the round's model as the first parameter; {fn.__name__}() has none")
    model = api.receive() if model is None else model
    if args:
        return fn(model, *args[1:], **kwargs)
    return fn(**{**kwargs, params[0]: model})


def _as_metrics(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return {"metric": value}
    raise ConfigError(f"{what} returned {type(value).__name__}; return a number or a dict of metrics")


def train(fn: F) -> F:
    """The function trains on the round's model (its first parameter) and returns the update, which is sent."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> FLModel | None:
        model = api.receive()
        if model is None:  # the job is over (its last task, an evaluation, was answered): nothing to train
            _pending.clear()
            return None
        out = _call(fn, args, kwargs, model)
        if not isinstance(out, FLModel):
            raise ConfigError(f"@flare.train: {fn.__name__}() must return an FLModel (got {type(out).__name__})")
        if "metrics" in _pending:
            out.metrics = {**_pending.pop("metrics"), **(out.metrics or {})}
        api.send(out)
        return out

    return cast(F, wrapper)


def evaluate(fn: F) -> F:
    """The function evaluates the round's model (its first parameter) and returns its metrics."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = _call(fn, args, kwargs)
        if out is None:
            raise ConfigError(f"@flare.evaluate: {fn.__name__}() returned None; return a number or a dict of metrics")
        metrics = _as_metrics(out, f"@flare.evaluate: {fn.__name__}()")
        if api.is_train():
            _pending["metrics"] = metrics
        else:
            api.send(FLModel(metrics=metrics))
        return out

    return cast(F, wrapper)


def submit_model(fn: F) -> F:
    """The function returns the site's local model (an FLModel with params, or the params dict) for a
    SUBMIT_MODEL task (cross-site evaluation); it is sent, as FULL params. Its first parameter gets the task's
    FLModel (`meta["submit_model_name"]`: which model is asked for, "best_model")."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> FLModel:
        if not api.is_submit_model():
            raise ConfigError(
                f"@flare.submit_model: {fn.__name__}() was called during a {api.get_task_name()!r} task; call it when "
                "flare.is_submit_model() is true"
            )
        out = _call(fn, args, kwargs)
        if isinstance(out, dict):
            out = FLModel(params=out)
        if not isinstance(out, FLModel) or out.params is None:
            got = type(out).__name__
            raise ConfigError(f"@flare.submit_model: {fn.__name__}() must return an FLModel with params (got {got})")
        api.send(out)
        return out

    return cast(F, wrapper)
