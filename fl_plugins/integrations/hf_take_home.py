"""What a Hugging Face site does so that a federated run can be taken home (`fl-plugins export`, export.py).

At connect, `describe` tells the aggregator what the exchanged tensors belong to: `flare.log` records with key
MODEL_KEY in RUN_DIR/logs.jsonl, one per part, a part's JSON cut into pieces of at most PIECE characters (the
log's text bound):

    info     {"library": "peft" | "transformers", "class": "BertForSequenceClassification", "base_model": the
              config's _name_or_path, "tokenizer": its name_or_path, "scope": what travels, "task_type": ...}
    config   the model's config, `to_diff_dict()` (what differs from the architecture's defaults)
    peft     the active adapter's PeftConfig, `to_dict()` (absent for a plain model)

At the end of the job, `take_home` loads the job's final global model (the aggregator's last round, which END
names: client/session.py `final_model`) into the trainer's model and, when `args.output_dir` is set, saves it
there as `trainer.save_model()` would (the adapter for a PEFT model; the tokenizer beside it), on the process that
saves. Under multi-process training rank 0 fetches and every rank loads the same weights.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fl_plugins.client import session
from fl_plugins.integrations.hf_model import is_peft, unwrap
from fl_plugins.integrations.targets import (
    ModelTarget,
    check_params,
    gather,
    is_sharded_target,
    matching,
    pop_control_variates,
    spread,
)

logger = logging.getLogger(__name__)

MODEL_KEY = "fl_plugins.model"
PIECE = 4000  # characters of JSON per record (limits.MAX_LOG_TEXT_CHARS is 4096)


def description(model: Any, tokenizer: Any = None, scope: str = "", prefix: str = "") -> dict[str, Any]:
    """The parts `describe` sends, as objects (`prefix`: the callback's server_key_prefix, before every name)."""
    model = unwrap(model)
    peft = is_peft(model)
    base = model.get_base_model() if peft else model
    config = getattr(base, "config", None)
    info = {
        "library": "peft" if peft else "transformers",
        "class": type(base).__name__,
        "base_model": str(getattr(config, "_name_or_path", "") or ""),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
        "scope": scope,
        "prefix": prefix or "",
    }
    parts: dict[str, Any] = {"info": info}
    if config is not None:
        parts["config"] = config.to_diff_dict()
    if peft:
        cfg = model.peft_config[model.active_adapter]
        parts["peft"] = cfg.to_dict()
        info["task_type"] = str(getattr(cfg, "task_type", "") or "")
    return parts


def records(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """`parts` as log records: each part's JSON in pieces of at most PIECE characters."""
    out = []
    for name, value in parts.items():
        text = json.dumps(value, sort_keys=True, default=_jsonable)
        pieces = [text[i : i + PIECE] for i in range(0, len(text), PIECE)] or [""]
        for i, piece in enumerate(pieces):
            out.append({"key": MODEL_KEY, "part": name, "piece": i, "pieces": len(pieces), "value": piece})
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v, key=str)
    return str(v)


def describe(model: Any, tokenizer: Any = None, scope: str = "", prefix: str = "") -> None:
    """Rank 0: send the model's description to the aggregator (once per connection). A model that cannot be
    described (no config) is logged and skipped: training does not depend on it."""
    s = session.current()
    if s is None or s.client is None:
        return
    try:
        recs = records(description(model, tokenizer, scope, prefix))
    except (AttributeError, TypeError, ValueError) as e:
        logger.warning("this model cannot be described for `fl-plugins export` (%s); training goes on", e)
        return
    for r in recs:
        s.log(r.pop("key"), r.pop("value"), "TEXT", **r)


def take_home(driver: Any, target: ModelTarget, model: Any, args: Any, tokenizer: Any, collective: Any) -> int | None:
    """Load the job's final global model into `target` (every rank) and save `model` to `args.output_dir` on the
    process that saves. Returns the final model's round, or None when the job ended without one here (then the
    model is left as training left it, and a warning says why)."""
    final = session.get().final_model() if driver.rank == 0 else None
    round_ = final.current_round if final is not None and final.params is not None else None
    if collective is not None:
        round_ = collective.broadcast(round_ if driver.rank == 0 else None)
    if round_ is None:
        return None
    gather(target)  # a sharded model (FSDP): rank 0 checks against the gathered state, spread() scatters
    if final is not None and final.params is not None:
        params = dict(final.params)
        pop_control_variates(params)  # SCAFFOLD's c is not part of the model
        if driver.strict:
            check_params(params, target.state(), f"the final global model (round {round_})")
        else:  # what matches, as each round's load does
            params = matching(params, target.state())
        target.load(params, strict=driver.strict)
        session.get().forget_final()  # loaded: no second copy kept
    spread(target, collective)
    out = getattr(args, "output_dir", None)  # (args None: not saved)
    if out and is_sharded_target(target):
        logger.info("the final model (round %d) is in trainer.model; under FSDP trainer.save_model() saves it", round_)
    elif out and getattr(args, "should_save", driver.rank == 0):
        _save(unwrap(model), out)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        logger.info("the final global model (round %d) is in trainer.model and saved to %s", round_, out)
    return round_


def _save(model: Any, out: str) -> None:
    """`model` into `out` as Trainer.save_model() would: save_pretrained (a PEFT model: its adapter), else the
    state_dict as model.safetensors (a plain torch module; shared tensors saved once)."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out, safe_serialization=True)
        return
    from pathlib import Path

    from safetensors.torch import save_model

    Path(out).mkdir(parents=True, exist_ok=True)
    save_model(model, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
