"""`fl-plugins export RUN_DIR [--round N] -o DIR`: a run's global model as a folder Hugging Face tools load.

    adapters (PEFT)   DIR/adapter_config.json + adapter_model.safetensors: `PeftModel.from_pretrained(base, DIR)`
    full fine-tune    DIR/config.json + model.safetensors (+ the tokenizer, when its folder is here):
                      `AutoModelFor...from_pretrained(DIR)`
    both              DIR/README.md, the model card (model_card.py): the federation, its sites, rounds, recipe,
                      per-round metrics and the commit of fl-plugins that ran it

What the tensors belong to comes from the sites: the HF integration sends a description of the model when it
connects (integrations/hf_take_home.py: the config, the adapter's PeftConfig, the base model and tokenizer), which
RUN_DIR/logs.jsonl keeps. With sites of different LoRA ranks (hetlora / flexlora) the description of the site
with the largest rank is the one whose shapes are the global model's. A full fine-tune whose exchanged tensors are
not the whole model (frozen layers stay home) is completed from the base model's weights, which must be on this
machine (`--base PATH` when the path the sites used is not).

torch, transformers and peft are imported here (the `hf` extra); the aggregator itself never needs them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError
from fl_plugins.lora_ranks import rank_of
from fl_plugins.record_files import read_records
from fl_plugins.records import LOGS, LogRecord, parse_log

log = logging.getLogger(__name__)

MODEL_KEY = "fl_plugins.model"  # integrations/hf_take_home.py's records (same value)


@dataclass
class Description:
    """One site's description of the model (hf_take_home.py `description`)."""

    site: str
    info: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] | None = None

    @property
    def rank(self) -> int:
        return int((self.peft or {}).get("r") or 0)


def descriptions(run_dir: Path) -> list[Description]:
    """Every site's latest complete description in RUN_DIR/logs.jsonl, by site name."""
    pieces: dict[str, dict[str, dict[int, str]]] = {}
    counts: dict[tuple[str, str], int] = {}
    for rec in read_records(run_dir / LOGS, parse_log):
        if not isinstance(rec, LogRecord) or rec.key != MODEL_KEY:
            continue
        part, i, n, value = (rec.data.get(k) for k in ("part", "piece", "pieces", "value"))
        if not (isinstance(part, str) and isinstance(i, int) and isinstance(n, int) and isinstance(value, str)):
            continue
        if i == 0:  # a new description (a restarted site sends it again): start over
            pieces.setdefault(rec.site, {})[part] = {}
        pieces.setdefault(rec.site, {}).setdefault(part, {})[i] = value
        counts[(rec.site, part)] = n
    out = []
    for site in sorted(pieces):
        parts = {}
        for part, got in pieces[site].items():
            try:
                value = json.loads("".join(got[i] for i in sorted(got))) if len(got) == counts[(site, part)] else None
            except ValueError:  # a damaged description: another site's may do
                log.warning("site %r's model description (%s) is not JSON; skipped", site, part)
                value = None
            if isinstance(value, dict):
                parts[part] = value
        if "info" in parts:
            out.append(Description(site, parts["info"], parts.get("config") or {}, parts.get("peft")))
    return out


def global_rank(params: dict[str, Any]) -> int:
    """The LoRA rank of the global adapter (its lora_A / lora_B factors' largest); 0 without LoRA factors."""
    return max((rank_of(k, tuple(v.shape)) or 0 for k, v in params.items()), default=0)


def choose(found: list[Description], run_dir: Path, rank: int) -> Description:
    """The description the global tensors fit: a site whose adapter has the global rank (sites may train smaller
    ranks under hetlora / flexlora; what a site claims is not trusted beyond that), first by name."""
    if not found:
        raise ConfigError(
            f"{run_dir}: no site described its model (RUN_DIR/{LOGS} has no {MODEL_KEY!r} records). Export needs "
            "the Hugging Face integration (FLTrainerCallback, patch(trainer) or a recipe's `task:`) of fl-plugins "
            "0.1.0 or later on the sites; a FLARE client-API script's weights are in RUN_DIR/final as safetensors"
        )
    fits = [d for d in found if d.rank == rank]
    return fits[0] if fits else found[0]


def _wire_names(desc: Description, params: dict[str, Any]) -> dict[str, Any]:
    """`params` under the model's own names: the sites' server_key_prefix taken off; a PEFT model's names must be
    the adapter's (PeftModel.save_pretrained's), else a ConfigError says why."""
    prefix = str(desc.info.get("prefix") or "")
    if prefix:
        stray = [k for k in params if not k.startswith(prefix)]
        if stray:
            raise ConfigError(f"global tensors without the sites' server_key_prefix {prefix!r}: {stray[:5]}")
        params = {k[len(prefix) :]: v for k, v in params.items()}
    if desc.peft is None:
        return params
    if desc.info.get("scope") == "model":
        raise ConfigError(
            "the sites exchanged the PEFT model's whole state_dict (params_scope='model'), not its adapter: export "
            "writes adapters; federate with params_scope='auto' (the adapter) to export one"
        )
    odd = [k for k in params if not k.startswith(("base_model.model.", "prompt_encoder.", "prompt_embeddings"))]
    if odd:
        raise ConfigError(f"these global tensors are not a PEFT adapter's (PeftModel.save_pretrained names): {odd[:5]}")
    return params


def global_params(run_dir: Path, round_: int | None) -> tuple[int, dict[str, Any]]:
    """(round, tensors) of the run's global model: `round_`'s, or the last one written."""
    from safetensors.torch import load_file

    from fl_plugins.aggregator.store import RunStore
    from fl_plugins.integrations.targets import pop_control_variates

    store = RunStore(run_dir)
    last = store.latest_round()
    if last is None:
        why = "a swarm's models stay at the sites (SITE_OUTPUT/final)" if (run_dir / "swarm.json").exists() else ""
        raise ConfigError(f"{run_dir}: no global model was written here{'; ' + why if why else ''}")
    r = last if round_ is None else round_
    if not store.round_dir(r).is_dir():
        kept = sorted(int(p.name[6:]) for p in store.global_dir.glob("round-*") if p.name[6:].isdecimal())
        raise ConfigError(f"{run_dir}: round {r}'s global model is not kept (kept rounds: {kept}); pick one of them")
    manifest = store.load(r)
    params: dict[str, Any] = {}
    for path in store.shard_paths(r, manifest):
        params.update(load_file(str(path)))
    pop_control_variates(params)  # SCAFFOLD's are not part of the model
    return r, params


def export(run_dir: Path, out: Path, round_: int | None = None, base: str | None = None) -> Path:
    """Write the folder (see the module docstring); returns `out`."""
    from fl_plugins.model_card import write_card

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory (give the RUN_DIR of `fl-plugins run` or `server`)")
    _check_output(out)
    r, params = global_params(run_dir, round_)
    desc = choose(descriptions(run_dir), run_dir, global_rank(params))
    if base:  # the card names it too
        desc = replace(desc, info={**desc.info, "base_model": base})
    params = _wire_names(desc, params)
    out.mkdir(parents=True, exist_ok=True)
    if desc.peft is not None:
        _write_adapter(desc, params, out, base)
    else:
        _write_full(desc, params, out, base)
    _copy_tokenizer(desc, out)
    write_card(run_dir, out, r, desc)
    return out


def _check_output(out: Path) -> None:
    """`out` is new, empty, an earlier export or a model folder (config.json / adapter_config.json: written
    over, as save_pretrained would); any other folder is refused, not mixed into."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file: give a folder to export into (-o DIR)")
    card = out / "README.md"
    earlier = card.is_file() and "fl-plugins]" in card.read_text(errors="replace")[:2000]
    earlier = earlier or (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    if any(out.iterdir()) and not earlier:
        raise ConfigError(
            f"{out} is not empty and holds no model or earlier export: give a new or empty folder (-o DIR), so "
            "that no file of yours is written over or mixed into the model's folder"
        )


def _write_adapter(desc: Description, params: dict[str, Any], out: Path, base: str | None) -> None:
    from safetensors.torch import save_file

    cfg = dict(desc.peft or {})
    rank = global_rank(params)
    if rank and cfg.get("r") and rank != cfg["r"] and not cfg.get("rank_pattern"):  # the adapter's rank, same scaling
        cfg["lora_alpha"] = cfg.get("lora_alpha", cfg["r"]) * rank / cfg["r"]
        cfg["r"] = rank
    if base is not None:
        cfg["base_model_name_or_path"] = base
    elif not cfg.get("base_model_name_or_path"):
        cfg["base_model_name_or_path"] = desc.info.get("base_model", "")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / "adapter_model.safetensors"), {"format": "pt"})


def _model_class(desc: Description) -> Any:
    import transformers

    name = str(desc.info.get("class", ""))
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ConfigError(f"the sites' model class {name!r} is not in this transformers ({transformers.__version__})")
    return cls


def _write_full(desc: Description, params: dict[str, Any], out: Path, base: str | None) -> None:
    """config.json + model.safetensors straight from the global tensors when they are the whole model (no model
    is built: a 7B export needs the global model's memory once); else the base model completed with them."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cls = _model_class(desc)
    cfg = dict(desc.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"site {desc.site!r} described a model config without `model_type`; cannot rebuild it")
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = [cls.__name__]
    with torch.device("meta"):  # names and shapes only, no memory
        meta = cls(config)
    unexpected = sorted(set(params) - set(meta.state_dict()))
    if unexpected:
        raise ConfigError(f"the global model has tensors a {cls.__name__} lacks: {unexpected[:5]}")
    missing = sorted({n for n, _ in meta.named_parameters()} - set(params))
    if not missing:
        config.save_pretrained(str(out))
        tensors = {k: v.contiguous() for k, v in params.items()}
        save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
        return
    source = base or str(desc.info.get("base_model") or "")
    if not (source and Path(source).is_dir()):
        raise ConfigError(
            f"the global model lacks {len(missing)} of the model's weights, which the sites kept home ({missing[:5]} "
            "...); give the base model's folder with --base PATH to fill them in"
        )
    model = cls.from_pretrained(source, config=config)
    with torch.no_grad():
        model.load_state_dict(params, strict=False)
    model.save_pretrained(str(out), safe_serialization=True)


def _copy_tokenizer(desc: Description, out: Path) -> None:
    """The sites' tokenizer (else the base model's) beside the model, when its folder is on this machine."""
    path = next((p for p in (desc.info.get("tokenizer"), desc.info.get("base_model")) if _has_tokenizer(p)), None)
    if path is None:
        return  # a hub id or a tokenizer built in code: the card says where the model came from
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(path).save_pretrained(str(out))


def _has_tokenizer(path: Any) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    return bool(path) and Path(str(path)).is_dir() and any((Path(str(path)) / n).is_file() for n in names)
