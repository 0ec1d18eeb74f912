"""The Lightning example federates for real: 3 label-skewed sites, `fl-plugins run recipes/lightning.yaml`, and a
global model that beats every site's local-only model on the pooled validation set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from fl_plugins.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning"
RECIPE = ROOT / "recipes" / "lightning.yaml"


@pytest.fixture(scope="module")
def blobs():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import blobs

        yield blobs
    finally:
        sys.path.remove(str(EXAMPLE))


def _local_only(blobs, site: str, epochs: int):
    """What examples/lightning/train.py does for one site: plain Lightning on that site's data alone."""
    L.seed_everything(0)
    model = blobs.BlobClassifier()
    train, _ = blobs.loaders(site)
    L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(model, train)  # fmt: skip
    return model


def test_the_three_line_change():
    """train_fl.py is train.py plus the import, patch() and the round loop; nothing else of substance differs."""
    plain = (EXAMPLE / "train.py").read_text()
    fed = (EXAMPLE / "train_fl.py").read_text()
    assert "import fl_plugins.lightning as flare" in fed and "flare.patch(trainer)" in fed
    assert "while flare.is_running():" in fed and "flare.receive()" in fed
    body = plain.split("def main", 1)[1].split("trainer.fit")[0]
    for line in body.splitlines():
        if "--site" not in line and "--epochs" not in line:
            assert line in fed, f"train_fl.py lost a line of train.py: {line!r}"


def test_global_model_beats_every_local_only_model(tmp_path, blobs):
    recipe = load_recipe(RECIPE)
    assert len(recipe.sites) == 3 and recipe.federation.initial_model is None
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "run", str(RECIPE), "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = recipe.federation.rounds
    final = tmp_path / "run" / "global" / f"round-{rounds:05d}" / "model.safetensors"
    model = blobs.BlobClassifier()
    model.load_state_dict(load_file(final))
    _, pooled_val = blobs.site_data("all")
    fed_acc = blobs.accuracy(model, pooled_val)
    # the same number of epochs on each site's own data: rounds x 1 epoch
    local = {s.name: blobs.accuracy(_local_only(blobs, s.name, rounds), pooled_val) for s in recipe.sites}
    print(f"federated {fed_acc:.3f}, local-only {local}")
    assert all(fed_acc > acc + 0.05 for acc in local.values()), (fed_acc, local)
    assert fed_acc > 0.9
    # what the module logs with self.log reaches the aggregator from every site
    logs = [json.loads(x) for x in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert {r["site"] for r in logs if r["key"] == "train_loss"} == {"site-1", "site-2", "site-3"}
