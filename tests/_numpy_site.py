"""A numpy site for tests/test_ray.py: FLARE's loop with `fl_plugins.client`; its update depends only on the site's
name and the round (seeded), so two backends that run the same rounds reach the same model. FAIL_AT=SITE:ROUND:HOW
makes one site fail in one round: `exit` (its process exits 3 before it sends), `after` (exits 3 after its update
was sent and counted) or `actor` (it kills the Ray actor that started it, as a lost node would, and exits).
HOLD=ROUND:PATH makes every site wait, before it sends its update of round ROUND, until the file PATH exists."""

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import fl_plugins.client as flare

site = os.environ["FL_SITE"]
flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    r = model.current_round
    if os.environ.get("FAIL_AT") == f"{site}:{r}:exit":
        print(f"[{site}] failing in round {r}", flush=True)
        sys.exit(3)
    if os.environ.get("FAIL_AT") == f"{site}:{r}:actor":
        print(f"[{site}] killing my Ray actor in round {r}", flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(9)
    rng = np.random.default_rng(int(hashlib.sha256(f"{site}:{r}".encode()).hexdigest()[:8], 16))
    params = {k: v + (0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in model.params.items()}
    steps = 1 + int(site.rsplit("-", 1)[-1])
    hold = os.environ.get("HOLD", "").split(":", 1)
    if hold[0] == str(r):
        while not Path(hold[1]).exists():  # the test releases it
            time.sleep(0.05)
    print(f"[{site}] round {r}: sending", flush=True)
    flare.send(flare.FLModel(params=params, metrics={"norm": float(np.linalg.norm(params["w"]))},
                             meta={"NUM_STEPS_CURRENT_ROUND": steps}))  # fmt: skip
    if os.environ.get("FAIL_AT") == f"{site}:{r}:after":
        print(f"[{site}] failing after sending round {r}", flush=True)
        sys.exit(3)
