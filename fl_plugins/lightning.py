"""Federated Lightning, NVIDIA FLARE's way: change the import, add `patch`.

    import fl_plugins.lightning as flare
    flare.patch(trainer)                     # connects from FL_SERVER / FL_SITE; no init() needed
    while flare.is_running():
        input_model = flare.receive()        # this round's FLModel, at once
        trainer.validate(model)              # loads the global model; its metrics go with the update
        trainer.fit(model)                   # one round's budget; the update is sent when fit ends

`receive()` returns the round's FLModel; its weights are loaded into the LightningModule when `validate` or
`fit` starts, with a strict key and shape check (ModelMismatchError lists what differs). From round 1 on they
are received straight into the module's own tensors. When the aggregator has no initial model, round 0's
FLModel has `params=None` until the first validate/fit: the module's weights at that point are offered as round
0's global model, and the FLModel then holds them. Each `fit` trains the trainer's max_epochs / max_steps
again; optimizer, LR scheduler and AMP scaler state carry over between rounds. The update carries
NUM_STEPS_CURRENT_ROUND (optimizer steps of the round) and the explicit validation's metrics.
The same loop answers the other tasks a job may send (`flare.get_task_name()` says which): on an EVALUATE task
("validate") `validate` scores the received model, its metrics are the answer, the module gets its own weights
back, and `fit` trains nothing (a `fit` without a `validate` first validates instead); on SUBMIT_MODEL the
module's weights are sent and `fit` trains nothing. Neither touches the optimizer state carried between rounds.
Multi-process training (Lightning DDP, torchrun): the same script runs on every rank; only global rank 0 talks
to the aggregator and sends. On the other ranks `receive()` returns an FLModel with `params=None` (its
`current_round` is filled in, and `params` holds the module's weights, once validate/fit has broadcast rank 0's
global model), and `is_running()` follows rank 0.
Everything else is the client API (`fl_plugins.client`). Lightning is imported only by `patch`.
"""

from __future__ import annotations

from fl_plugins.client import *  # noqa: F403 - the client API, name for name
from fl_plugins.client import __all__ as _client_api

# the client's is_running/receive/shutdown, routed through the round driver (re-exported: `x as x`)
from fl_plugins.integrations.face import is_running as is_running
from fl_plugins.integrations.face import receive as receive
from fl_plugins.integrations.face import shutdown as shutdown
from fl_plugins.integrations.lightning import patch as patch

__all__ = sorted([*_client_api, "patch"])
