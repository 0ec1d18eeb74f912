"""Federated Hugging Face `Trainer`, NVIDIA FLARE's way.

    import fl_plugins.hf as flare

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[flare.FLTrainerCallback()])
    trainer.train()                          # every round: receive, (evaluate), train one round's budget, send

or FLARE's loop, one train() per round:

    flare.patch(trainer)
    while flare.is_running():
        input_model = flare.receive()        # loaded into trainer.model
        trainer.evaluate()                   # the global model's metrics go with the update
        trainer.train()

PEFT models exchange only their adapter weights; other models their trainable parameters. Details:
fl_plugins/integrations/hf.py. The rest is the client API (`fl_plugins.client`).
"""

from __future__ import annotations

from fl_plugins.client.api import (
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_submit_model,
    is_train,
    log,
    send,
    system_info,
)
from fl_plugins.client.model import FLModel, MetaKey, ParamsType
from fl_plugins.integrations.face import is_running, receive, shutdown
from fl_plugins.integrations.hf import FLTrainerCallback, exchanged_state, patch

__all__ = [
    "FLModel",
    "FLTrainerCallback",
    "MetaKey",
    "ParamsType",
    "exchanged_state",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "shutdown",
    "system_info",
]
