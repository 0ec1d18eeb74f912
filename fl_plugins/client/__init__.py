"""The client API, name for name NVIDIA FLARE's: `import fl_plugins.client as flare`."""

from fl_plugins.client.api import (
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    receive_final,
    send,
    shutdown,
    system_info,
)
from fl_plugins.client.decorators import evaluate, submit_model, train
from fl_plugins.client.model import FLModel, MetaKey, ParamsType

__all__ = [
    "FLModel",
    "MetaKey",
    "ParamsType",
    "evaluate",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "receive_final",
    "send",
    "shutdown",
    "submit_model",
    "system_info",
    "train",
]
