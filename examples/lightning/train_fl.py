"""train.py, federated: the import, `flare.patch(trainer)` and the round loop are the only changes.

`fl-plugins run recipes/lightning.yaml` runs it on 3 sites; each site reads its name from FL_SITE. Each round
trains `--epochs` epochs (the trainer's max_epochs) from the global model.
"""

import argparse
import os

import lightning as L
from blobs import BlobClassifier, loaders

import fl_plugins.lightning as flare  # (1) the client API plus patch()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--site", default=os.environ.get("FL_SITE", "all"))
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()

    L.seed_everything(0)
    model = BlobClassifier()
    train, val = loaders(args.site)
    # log_every_n_steps: a site takes 17 to 31 steps an epoch; at the default (50) its training loss is no curve
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, log_every_n_steps=4,
                        enable_checkpointing=False, enable_progress_bar=False)
    flare.patch(trainer)  # (2) connects to the aggregator named by FL_SERVER / FL_SITE
    while flare.is_running():  # (3) one iteration per round
        input_model = flare.receive()
        print(f"[{flare.get_site_name()}] round {input_model.current_round}", flush=True)
        trainer.validate(model, val)  # the global model's metrics travel with the update
        trainer.fit(model, train)  # the update is sent when fit ends


if __name__ == "__main__":
    main()
