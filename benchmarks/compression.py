"""Compression in a run: bytes per round and the final model's quality of a recipe at each setting.

    python benchmarks/compression.py                                   # the demo and the SFT recipe, 6 settings each
    python benchmarks/compression.py --recipes sft_causal_lm --settings none/none,int8/int8 --out runs/comp

Runs, one after another (never two at once), `fl-plugins run` on copies of each recipe with `transfer:
{update_compression: U, model_compression: M}` and `baselines: false`, and prints per run: the bytes of one
site's update and of one site's model download (from the round-1 manifests), a round's traffic for all sites,
and the final global model's evaluation at the sites (the "evaluation" record: the mean over the sites' validation
shares, weighted by their sizes: accuracy and loss for classification, loss for SFT). A label whose run directory
holds a finished run of the same recipe copy is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment  # noqa: E402
from strategies import _absolute, _finished, run_one  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = "none/none,bf16/none,int8/none,nf4/none,int8/int8,nf4/nf4"


def recipe_text(name: str, update: str, model: str) -> str:
    import yaml

    source = ROOT / "recipes" / f"{name}.yaml"
    recipe = _absolute(yaml.safe_load(source.read_text()), source.parent)
    recipe["name"] = f"{recipe['name']}-{update}-{model}"
    recipe["transfer"] = {**recipe.get("transfer", {}), "update_compression": update, "model_compression": model}
    recipe["task"]["baselines"] = False
    return f"# {source} with {update}/{model} (benchmarks/compression.py)\n" + yaml.safe_dump(recipe, sort_keys=False)


def _sizes(run_dir: Path, encoded: bool) -> tuple[int, int]:
    """(one site's update bytes of round 1, one site's model download bytes: the round-1 checkpoint's, or with a
    model encoding the encoded copy the aggregator kept, the last round's: the same size every round)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    sites = max(1, len(summary.get("sites") or {}))
    update = summary["rounds"][1]["uploaded_bytes"] // sites if len(summary["rounds"]) > 1 else 0
    folder = next(iter(sorted(run_dir.glob("global/round-*.*"))), None) if encoded else None  # the kept encoded copy
    manifest = json.loads(((folder or run_dir / "global" / "round-00001") / "manifest.json").read_text())
    return update, sum(int(s.get("size", 0)) for s in manifest["shards"])


def figures(run_dir: Path, model: str) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    update, download = _sizes(run_dir, model != "none")
    sites = max(1, len(summary.get("sites") or {}))
    final = (summary.get("final_evaluation") or {}).get("metrics") or {}
    return {
        "update_kb": round(update / 1e3, 1),
        "download_kb": round(download / 1e3, 1),
        "round_kb": round(sites * (update + download) / 1e3, 1),
        "final": {k: round(float(v), 4) for k, v in final.items() if isinstance(v, (int, float))},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="peft_sentiment,sft_causal_lm", help="recipes/NAME.yaml, comma-separated")
    p.add_argument("--settings", default=SETTINGS, help="UPDATE/MODEL pairs, comma-separated")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compression")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    print(environment())
    results: dict[str, Any] = {}
    for name in [x for x in args.recipes.split(",") if x]:
        base = None
        for setting in [x for x in args.settings.split(",") if x]:
            update, model = setting.split("/")
            label = f"{name}-{update}-{model}"
            (args.out / "recipes").mkdir(parents=True, exist_ok=True)
            recipe_path, run_dir = args.out / "recipes" / f"{label}.yaml", args.out / label
            text = recipe_text(name, update, model)
            reuse = _finished(run_dir) and recipe_path.exists() and recipe_path.read_text() == text
            recipe_path.write_text(text)
            if not reuse:
                run_one(recipe_path, run_dir, args.out / f"{label}.log", 3600)
            r = results[label] = figures(run_dir, model)
            base = base or r["round_kb"]
            print(
                f"{name:15s} {update:>4s}/{model:<4s} update {r['update_kb']:9.1f} KB  download "
                f"{r['download_kb']:9.1f} "
                f"KB  round {r['round_kb']:10.1f} KB ({r['round_kb'] / base:.2f}x)  final {r['final']}"
                + (" (reused)" if reuse else ""),
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
