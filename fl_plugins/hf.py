"""Federated Hugging Face `Trainer`, NVIDIA FLARE's way.

    import fl_plugins.hf as flare

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[flare.FLTrainerCallback()])
    trainer.train()                          # every round: receive, (evaluate), train one round's budget, send

or FLARE's loop, one train() per round, with NVIDIA FLARE's `patch()` signature and meaning:

    flare.patch(trainer)                     # restore_state=True, load_state_dict_strict=True, params_scope="auto",
                                             # server_key_prefix=None, local_epochs=None, local_steps=None,
                                             # stream_metrics=False
    while flare.is_running():
        input_model = flare.receive()        # loaded into trainer.model
        trainer.evaluate()                   # the global model's metrics go with the update
        trainer.train()

The same loop answers the other tasks a job may send: on an EVALUATE task evaluate() scores the received model
(its metrics are the answer, the model's own weights come back) and train() does nothing; on SUBMIT_MODEL the
model's weights (what travels: a PEFT model's adapter) are sent. The callback form answers them between rounds
inside train(); cross-site evaluation after training needs `callback.finish(trainer)` after train().

What travels: patch()'s params_scope="auto" sends a PEFT model's adapter, any other model's whole state_dict; the
callback's default ("trainable") sends the adapter, or a plain model's trainable parameters. Details, and what
patch() refuses (DeepSpeed, FSDP, load_best_model_at_end=True): fl_plugins/integrations/hf.py and hf_model.py. The
rest is the client API (`fl_plugins.client`).
"""

from __future__ import annotations

from fl_plugins.client import *  # noqa: F403 - the client API, name for name
from fl_plugins.client import __all__ as _client_api

# the client's is_running/receive/shutdown, routed through the round driver (re-exported: `x as x`)
from fl_plugins.integrations.face import is_running as is_running
from fl_plugins.integrations.face import receive as receive
from fl_plugins.integrations.face import shutdown as shutdown
from fl_plugins.integrations.hf import FLTrainerCallback as FLTrainerCallback
from fl_plugins.integrations.hf import patch as patch
from fl_plugins.integrations.hf_model import exchanged_state as exchanged_state

__all__ = sorted([*_client_api, "FLTrainerCallback", "exchanged_state", "patch"])
