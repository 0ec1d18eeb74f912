"""The built-in SFT / PEFT task a recipe's `task:` section names; `fl-plugins run` starts it on every site.

    python -m fl_plugins.hf.task --recipe RECIPE.yaml                  # one site (FL_SERVER, FL_SITE from the runner)
    python -m fl_plugins.hf.task --recipe RECIPE.yaml --baselines RUN  # after a run: the pooled validation set

A site builds the model (the same seed everywhere: round 0's global model is whichever site offers first, and
every site loads it), wraps it with PEFT as the recipe says, takes its share of the data (every site computes the
same seeded split and keeps its own part), and runs one `Trainer.train()` with `FLTrainerCallback`: each round
evaluates the global model on the site's validation share, trains `local_steps` (or `local_epochs`), and sends
the adapter (or the trainable weights).

`--baselines RUN_DIR` evaluates the run's final global model on the pooled validation set (every site's share)
and trains each site's local-only model for as many steps as it trained in the federation, then scores it on the
same set; it writes RUN_DIR/baselines.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.data import split_indices
from fl_plugins.errors import ConfigError, FLError
from fl_plugins.hf.spec import TaskSpec

logger = logging.getLogger("fl_plugins.hf.task")

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"


# -- data ----------------------------------------------------------------------------------------------------


@dataclass
class Shares:
    train: list[list[dict]]  # per site
    val: list[list[dict]]  # per site; their union is the pooled validation set
    labels: tuple[str, ...] | None

    @property
    def pooled_val(self) -> list[dict]:
        return [r for part in self.val for r in part]


def load_rows(spec: TaskSpec) -> list[dict]:
    from fl_plugins.hf import demo_data

    if spec.data == "demo:financial-sentiment":
        return demo_data.financial_sentiment(spec.rows, seed=spec.seed)
    if spec.data == "demo:instructions":
        return demo_data.instruction_pairs(spec.rows, seed=spec.seed)
    return demo_data.read_rows(spec.data)


def _label_index(spec: TaskSpec, rows: list[dict]) -> tuple[np.ndarray, tuple[str, ...]]:
    from fl_plugins.hf.demo_data import SENTIMENT_LABELS

    for i, r in enumerate(rows[:1000]):
        if "text" not in r or "label" not in r:
            raise ConfigError(f"{spec.data}: row {i} needs `text` and `label` fields for sequence-classification "
                              f"(got {sorted(r)})")  # fmt: skip
    names = spec.labels or (SENTIMENT_LABELS if spec.data == "demo:financial-sentiment" else None)
    if names is None:
        names = tuple(sorted({str(r["label"]) for r in rows}))
    out = []
    for i, r in enumerate(rows):
        v = r["label"]
        if isinstance(v, str) and v in names:
            out.append(names.index(v))
        elif isinstance(v, int | str) and str(v).isdigit() and int(v) < len(names):
            out.append(int(v))
        else:
            raise ConfigError(f"{spec.data}: row {i} has label {v!r}, which is neither a label name "
                              f"({', '.join(names)}) nor an index below {len(names)}; fix the row or `task.labels`")
    return np.array(out), tuple(names)


def shares(spec: TaskSpec, n_sites: int) -> Shares:
    """Every site's train and validation rows (the same on every site: seeded)."""
    rows = load_rows(spec)
    labels = None
    if spec.type == "sequence-classification":
        keys, labels = _label_index(spec, rows)
        rows = [{"text": r["text"], "label": int(k)} for r, k in zip(rows, keys, strict=True)]
    else:
        for i, r in enumerate(rows[:1000]):
            if "instruction" not in r or "response" not in r:
                raise ConfigError(f"{spec.data}: row {i} needs `instruction` and `response` fields for causal-lm "
                                  f"(got {sorted(r)})")  # fmt: skip
        cats = sorted({str(r.get("category", "")) for r in rows})
        keys = np.array([cats.index(str(r.get("category", ""))) for r in rows])
    alpha = spec.alpha if spec.split == "dirichlet" else None
    parts = split_indices(keys, n_sites, alpha, seed=spec.split_seed, min_per_site=max(8, 2 * spec.batch_size))
    rng = np.random.default_rng(spec.split_seed + 1)
    train, val = [], []
    for p in parts:
        p = rng.permutation(p)
        k = max(1, int(round(len(p) * spec.validation_fraction)))
        val.append([rows[i] for i in p[:k]])
        train.append([rows[i] for i in p[k:]])
    return Shares(train, val, labels)


# -- model ---------------------------------------------------------------------------------------------------


def model_folder(spec: TaskSpec) -> str:
    m = spec.model
    if m.source == "package":
        try:
            mod = importlib.import_module(m.value)
        except ImportError as e:
            raise ConfigError(f"task.model: package {m.value!r} is not installed; pip install it "
                              f"(e.g. pip install {m.value.replace('_', '-')})") from e  # fmt: skip
        for attr in ("get_model_path", "MODEL_DIR"):
            v = getattr(mod, attr, None)
            if v is not None:
                return str(v() if callable(v) else v)
        folder = Path(mod.__file__).parent / "model"
        if folder.is_dir():
            return str(folder)
        raise ConfigError(f"task.model: package {m.value!r} ships no model folder (no get_model_path, MODEL_DIR "
                          "or model/ folder)")  # fmt: skip
    return m.value


class CharTokenizer:
    """A character-level tokenizer for models built from a config (no tokenizer to download)."""

    def __init__(self) -> None:
        self.specials = ["<pad>", "<s>", "</s>", "<unk>"]
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.vocab = {t: i for i, t in enumerate(self.specials + chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(ch, self.unk_token_id) for ch in text]

    def decode(self, ids: list[int]) -> str:
        inv = {i: t for t, i in self.vocab.items()}
        return "".join(inv[i] for i in ids if i >= len(self.specials))


def build_model(spec: TaskSpec, num_labels: int | None) -> tuple[Any, Any]:
    """(model, tokenizer), the same initial weights on every site (seeded), wrapped with PEFT as asked."""
    import torch

    torch.manual_seed(spec.seed)
    if spec.model.source == "build":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = CharTokenizer()
        cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 512, **spec.model.config}  # fmt: skip
        try:
            config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, **cfg)  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ConfigError(f"task.model: cannot build a llama model from {spec.model.config}: {e}") from e
        model = LlamaForCausalLM(config)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        folder = model_folder(spec)
        tok = AutoTokenizer.from_pretrained(folder)
        if spec.type == "sequence-classification":
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
    return _with_peft(spec, model), tok


def _with_peft(spec: TaskSpec, model: Any) -> Any:
    p = spec.peft
    if p.method == "none":
        return model
    import peft

    task_type = "SEQ_CLS" if spec.type == "sequence-classification" else "CAUSAL_LM"
    if p.method == "lora":
        cfg = peft.LoraConfig(task_type=task_type, r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                              target_modules=list(p.target_modules) if p.target_modules else None)  # fmt: skip
    else:
        cfg = peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=p.virtual_tokens,
                                       encoder_hidden_size=p.encoder_hidden_size)  # fmt: skip
    return peft.get_peft_model(model, cfg)


# -- datasets and the trainer --------------------------------------------------------------------------------


class Encoded:
    """A list of tokenized examples as a torch map-style dataset."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def encode(spec: TaskSpec, tok: Any, rows: list[dict]) -> Encoded:
    if spec.type == "sequence-classification":
        enc = tok([r["text"] for r in rows], truncation=True, max_length=spec.max_length)
        return Encoded([{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "labels": r["label"]} for i, r in enumerate(rows)])  # fmt: skip
    items = []
    for r in rows:
        prompt = PROMPT.format(instruction=r["instruction"])
        p_ids = _ids(tok, prompt)
        r_ids = _ids(tok, r["response"]) + [tok.eos_token_id]
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + p_ids + r_ids
        n_prompt = len(ids) - len(r_ids)
        ids = ids[: spec.max_length]
        labels = ([-100] * n_prompt + r_ids)[: spec.max_length]  # the loss covers the response only
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Encoded(items)


def _ids(tok: Any, text: str) -> list[int]:
    if isinstance(tok, CharTokenizer):
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def collator(spec: TaskSpec, tok: Any):
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def collate(batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            mask[i, : len(b["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if spec.type == "sequence-classification":
            out["labels"] = torch.tensor([b["labels"] for b in batch])
        else:
            labels = torch.full((len(batch), n), -100, dtype=torch.long)
            for i, b in enumerate(batch):
                labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
            out["labels"] = labels
        return out

    return collate


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def training_args(spec: TaskSpec, out_dir: str, **kw: Any):
    import torch
    from transformers import TrainingArguments

    budget = {"max_steps": spec.local_steps} if spec.local_steps else {"num_train_epochs": spec.local_epochs}
    budget.update(kw)
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    budget["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = spec.warmup_ratio
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=spec.batch_size, per_device_eval_batch_size=64,
        learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, lr_scheduler_type="linear",
        bf16=spec.precision == "bf16", fp16=spec.precision == "fp16", use_cpu=not torch.cuda.is_available(),
        logging_steps=max(1, (spec.local_steps or 10) // 2), save_strategy="no", eval_strategy="no",
        report_to=[], seed=spec.seed, disable_tqdm=True, remove_unused_columns=False, **budget,
    )  # fmt: skip


def make_trainer(spec: TaskSpec, model: Any, tok: Any, train: Encoded, val: Encoded, out_dir: str,
                 callbacks: list | None = None, **kw: Any):  # fmt: skip
    from transformers import Trainer

    return Trainer(model=model, args=training_args(spec, out_dir, **kw), train_dataset=train, eval_dataset=val,
                   data_collator=collator(spec, tok), callbacks=callbacks,
                   compute_metrics=accuracy if spec.type == "sequence-classification" else None)  # fmt: skip


# -- the two entry points ------------------------------------------------------------------------------------


def federate(recipe: Any, site: str) -> None:
    import fl_plugins.hf as flare

    spec: TaskSpec = recipe.task
    names = [s.name for s in recipe.sites]
    if site not in names:
        raise ConfigError(f"FL_SITE={site!r} is not one of the recipe's sites ({', '.join(names)})")
    data = shares(spec, len(names))
    k = names.index(site)
    model, tok = build_model(spec, len(data.labels) if data.labels else None)
    train, val = encode(spec, tok, data.train[k]), encode(spec, tok, data.val[k])
    print(f"[{site}] {len(train)} training rows, {len(val)} validation rows"
          + (f"; labels {np.bincount([r['label'] for r in data.train[k]], minlength=len(data.labels)).tolist()}"
             if data.labels else ""), flush=True)  # fmt: skip
    cb = flare.FLTrainerCallback(local_steps=spec.local_steps, local_epochs=spec.local_epochs, evaluate=True,
                                 proximal_mu=spec.proximal_mu)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fl-hf-") as out:
        trainer = make_trainer(spec, model, tok, train, val, out, callbacks=[cb, _print_evaluations(site)])
        print(f"[{site}] each round exchanges {_nbytes(model) / 1e6:.3f} MB "
              f"({'adapter' if spec.peft.method != 'none' else 'trainable weights'})", flush=True)  # fmt: skip
        trainer.train()
    flare.shutdown()


def _nbytes(model: Any) -> int:
    from fl_plugins.integrations.hf import HFTarget

    return HFTarget(model).nbytes()


def _print_evaluations(site: str) -> Any:
    """A callback printing each evaluation (the global model's, at the start of every round) to the site's log."""
    from transformers import TrainerCallback

    class PrintEvaluations(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            shown = {k: round(v, 4) for k, v in (metrics or {}).items() if k in ("eval_loss", "eval_accuracy")}
            print(f"[{site}] step {state.global_step}: global model {shown}", flush=True)

    return PrintEvaluations()


def baselines(recipe: Any, run_dir: Path) -> dict[str, Any]:
    """The final global model and every site's local-only model, on the pooled validation set."""
    import torch

    from fl_plugins.aggregator.store import RunStore
    from fl_plugins.integrations.hf import HFTarget

    spec: TaskSpec = recipe.task
    names = [s.name for s in recipe.sites]
    data = shares(spec, len(names))
    num_labels = len(data.labels) if data.labels else None
    store = RunStore(run_dir)
    last = store.latest_round()
    if last is None or last < 1:
        raise ConfigError(f"{run_dir}: no aggregated global model yet (run the recipe first)")
    from safetensors.torch import load_file

    manifest = store.load(last)
    params: dict[str, Any] = {}
    for path in store.shard_paths(last, manifest):
        params.update(load_file(str(path)))
    out: dict[str, Any] = {"round": last, "pooled_validation_rows": len(data.pooled_val), "local_only": {}}
    with tempfile.TemporaryDirectory(prefix="fl-hf-") as tmp:
        model, tok = build_model(spec, num_labels)
        HFTarget(model).load(params, strict=True)
        pooled = encode(spec, tok, data.pooled_val)
        out["global"] = _metrics(make_trainer(spec, model, tok, pooled, pooled, tmp).evaluate())
        print(f"global model (round {last}): {out['global']}", flush=True)
        budget = {"max_steps": spec.local_steps * recipe.federation.rounds} if spec.local_steps else \
            {"num_train_epochs": spec.local_epochs * recipe.federation.rounds}  # fmt: skip
        for k, name in enumerate(names):
            torch.manual_seed(spec.seed)
            model, tok = build_model(spec, num_labels)
            tr = make_trainer(spec, model, tok, encode(spec, tok, data.train[k]), pooled, tmp, **budget)
            tr.train()
            out["local_only"][name] = _metrics(tr.evaluate())
            print(f"{name} alone: {out['local_only'][name]}", flush=True)
    (run_dir / "baselines.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k.removeprefix("eval_"): float(v) for k, v in m.items()
            if k in ("eval_loss", "eval_accuracy")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fl_plugins.hf.task", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="the recipe YAML with a `task:` section")
    p.add_argument("--baselines", metavar="RUN_DIR", help="score the run's global model and local-only models")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fl_plugins").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from fl_plugins.recipe import load_recipe

    try:
        recipe = load_recipe(a.recipe)
        if recipe.task is None:
            raise ConfigError(f"{a.recipe}: has no `task:` section; run its script instead")
        if a.baselines:
            baselines(recipe, Path(a.baselines))
        else:
            site = os.environ.get("FL_SITE")
            if not site:
                raise ConfigError("FL_SITE is not set: fl-plugins run sets it for each site")
            federate(recipe, site)
    except FLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
