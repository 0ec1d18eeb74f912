"""Sites with different LoRA ranks: HetLoRA and FlexLoRA against same-rank FedAvg on the label-skewed demo.

    python benchmarks/lora_ranks.py                        # recipes/peft_sentiment.yaml, 5 runs (~20 min here)
    python benchmarks/lora_ranks.py --rounds 5 --seed 1 --only hetlora,flexlora --out runs/ranks

Runs, one after another (never two at once), `fl-plugins run` on copies of the demo recipe (3 sites, Dirichlet 0.3
label skew, LoRA on MiniLM's query/value), `baselines: false`:

    fedavg-r4 / fedavg-r8 / fedavg-r16   every site at the same rank (alpha = 2r), strategy fedavg
    hetlora / flexlora                   site-1 r=4, site-2 r=8, site-3 r=16 (alpha = 2r), the global adapter at 16

and prints per run: the final global model on the pooled validation set (every site's validation share; the
global adapter at its own rank, evaluated here), each site's final evaluation of the global model as that site
loads it (cut to its rank, on its own skewed validation share: the aggregator's "evaluation" record), and the
bytes the sites uploaded per round. A label whose run directory already holds a finished run is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment  # noqa: E402
from strategies import _absolute, _finished, run_one  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "peft_sentiment.yaml"
MIXED = (4, 8, 16)
RUNS = {
    "fedavg-r4": ("fedavg", (4, 4, 4)),
    "fedavg-r8": ("fedavg", (8, 8, 8)),
    "fedavg-r16": ("fedavg", (16, 16, 16)),
    "hetlora": ("hetlora", MIXED),
    "flexlora": ("flexlora", MIXED),
}


def recipe_text(label: str, args: argparse.Namespace) -> str:
    import yaml

    strategy, ranks = RUNS[label]
    recipe = _absolute(yaml.safe_load(RECIPE.read_text()), RECIPE.parent)
    recipe["name"] = f"lora-ranks-{label}"
    recipe["strategy"] = {"type": strategy}
    top = max(ranks)
    recipe["task"]["peft"] = {**recipe["task"]["peft"], "r": top, "alpha": 2 * top}
    recipe["task"]["baselines"] = False
    recipe["task"]["seed"] = args.seed
    recipe["task"]["split"] = {**recipe["task"]["split"], "seed": args.seed}
    recipe["sites"] = [{"name": f"site-{i + 1}", "peft": {"r": r, "alpha": 2 * r}} for i, r in enumerate(ranks)]
    if args.rounds is not None:
        recipe["rounds"] = args.rounds
    return f"# {RECIPE} with {label} (benchmarks/lora_ranks.py)\n" + yaml.safe_dump(recipe, sort_keys=False)


def pooled(recipe_path: Path, run_dir: Path, rank: int | None = None) -> dict[str, float]:
    """The run's last global model on the pooled validation set: at its own rank, or cut to `rank` (as a site of
    that rank loads it, alpha = 2 rank)."""
    from fl_plugins.export import global_params
    from fl_plugins.integrations.hf import HFTarget
    from fl_plugins.recipe import load_recipe
    from fl_plugins.tasks.encoding import encode
    from fl_plugins.tasks.shares import shares
    from fl_plugins.tasks.spec import for_site
    from fl_plugins.tasks.training import build_model, make_trainer

    recipe = load_recipe(recipe_path)
    spec = recipe.task if rank is None else for_site(recipe.task, {"r": rank, "alpha": 2 * rank})
    data = shares(spec, {s.name: s.data for s in recipe.sites})
    model, tok = build_model(spec, len(data.labels) if data.labels else None)
    HFTarget(model).load(global_params(run_dir, None)[1], strict=True)
    val = encode(spec, tok, data.pooled_val)
    with tempfile.TemporaryDirectory() as tmp:
        m = make_trainer(spec, model, tok, val, val, tmp).evaluate()
    return {k.removeprefix("eval_"): float(v) for k, v in m.items() if k in ("eval_loss", "eval_accuracy")}


def figures(recipe_path: Path, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary.get("final_evaluation") or {}
    views = {s: round(float(c["metrics"]["eval_accuracy"]), 4) for s, c in (final.get("sites") or {}).items()}
    uploaded = [r.get("uploaded_bytes", 0) for r in summary.get("rounds", [])]
    ranks = sorted({int((s.peft or {}).get("r", recipe_rank(recipe_path))) for s in _sites(recipe_path)})
    return {
        "pooled": pooled(recipe_path, run_dir),
        "pooled_at_rank": {r: round(pooled(recipe_path, run_dir, r)["accuracy"], 4) for r in ranks},
        "site_views": views,
        "uploaded_mb_per_round": round(sum(uploaded) / max(1, len(uploaded)) / 1e6, 3),
    }


def _sites(recipe_path: Path) -> Any:
    from fl_plugins.recipe import load_recipe

    return load_recipe(recipe_path).sites


def recipe_rank(recipe_path: Path) -> int:
    from fl_plugins.recipe import load_recipe

    return int(load_recipe(recipe_path).task.peft.r)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds (10)")
    p.add_argument("--seed", type=int, default=0, help="task.seed and task.split.seed")
    p.add_argument("--only", default=",".join(RUNS), help="comma-separated labels: " + ", ".join(RUNS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "lora_ranks")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args()
    labels = [x for x in args.only.split(",") if x]
    bad = [x for x in labels if x not in RUNS]
    if bad:
        raise SystemExit(f"--only: unknown {bad}; known: {', '.join(RUNS)}")
    print(environment())
    out_dir = args.out / f"seed{args.seed}"
    (out_dir / "recipes").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for label in labels:
        recipe_path = out_dir / "recipes" / f"{label}.yaml"
        text = recipe_text(label, args)
        run_dir = out_dir / label
        reuse = _finished(run_dir) and recipe_path.exists() and recipe_path.read_text() == text
        recipe_path.write_text(text)
        seconds = None if reuse else run_one(recipe_path, run_dir, out_dir / f"{label}.log", 3600)
        results[label] = {**figures(recipe_path, run_dir), "seconds": seconds and round(seconds, 1)}
        r = results[label]
        print(
            f"{label:11s} pooled accuracy {r['pooled']['accuracy']:.4f} loss {r['pooled']['loss']:.4f} (cut to each "
            f"site's rank: {r['pooled_at_rank']}); sites' "
            f"views {r['site_views']}; {r['uploaded_mb_per_round']} MB uploaded per round"
            + (" (reused)" if reuse else f" ({seconds:.0f} s)"),
            flush=True,
        )
    base = results.get("fedavg-r8", {}).get("pooled", {}).get("accuracy")
    if base:
        for label, r in results.items():
            print(f"{label:11s} {r['pooled']['accuracy'] / base:.3f}x fedavg-r8's pooled accuracy")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
