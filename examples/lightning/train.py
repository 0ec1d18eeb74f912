"""Plain Lightning training: one site's data (`--site site-1`) or all of it (`--site all`).

    python examples/lightning/train.py --site site-1 --epochs 5
"""

import argparse

import lightning as L
from blobs import BlobClassifier, loaders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--site", default="all")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()

    L.seed_everything(0)
    model = BlobClassifier()
    train, val = loaders(args.site)
    # log_every_n_steps: a site takes 17 to 31 steps an epoch; at the default (50) its training loss is no curve
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, log_every_n_steps=4,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, train)
    trainer.validate(model, val)


if __name__ == "__main__":
    main()
