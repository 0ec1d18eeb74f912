"""The built-in SFT / PEFT task a recipe's `task:` section names; `fl-plugins run` starts it on every site.

    python -m fl_plugins.tasks --recipe RECIPE.yaml                  # one site (FL_SERVER, FL_SITE from the runner)
    python -m fl_plugins.tasks --recipe RECIPE.yaml --baselines RUN  # after a run: the pooled validation set

A site builds the model (the same seed everywhere: round 0's global model is whichever site offers first, and
every site loads it), wraps it with PEFT as the recipe says (its own LoRA rank where its `sites:` entry has
`peft:`), takes its data (its own `data:`, split into train and validation; else its share of `task.data`: every
site computes the same seeded split and keeps its own part), and runs one `Trainer.train()` with
`FLTrainerCallback`: each round evaluates the global model on the site's validation share, trains `local_steps`
(or `local_epochs`), and sends the adapter (or the trainable weights).
With `task.model: {from_aggregator: PATH}` the site first connects and fetches the model folder the aggregator
serves into its cache (client/fetch.py), and builds the model from there; `--baselines` runs on the aggregator's
machine and reads PATH itself.

`--baselines RUN_DIR` evaluates the run's final global model on the pooled validation set (every site's share)
and trains each site's local-only model for as many steps as it trained in the federation, then scores it on the
same set; it writes RUN_DIR/baselines.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fl_plugins.errors import ConfigError, FLError
from fl_plugins.tasks.encoding import encode
from fl_plugins.tasks.shares import shares, site_share
from fl_plugins.tasks.spec import TaskSpec, for_site
from fl_plugins.tasks.training import build_model, make_trainer

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments


def federate(recipe: Any, site: str) -> None:
    import fl_plugins.hf as flare

    names = [s.name for s in recipe.sites]
    if site not in names:
        raise ConfigError(f"FL_SITE={site!r} is not one of the recipe's sites ({', '.join(names)})")
    me = recipe.sites[names.index(site)]
    spec: TaskSpec = for_site(recipe.task, me.peft)
    if spec.model.source == "aggregator":  # the aggregator serves the model folder: fetched before it is built
        spec = _fetched(spec, site)
    data = site_share(spec, {s.name: s.data for s in recipe.sites}, site)
    model, tok = build_model(spec, len(data.labels) if data.labels else None)
    train, val = encode(spec, tok, data.train[0], pack=spec.packing), encode(spec, tok, data.val[0])
    print(
        f"[{site}] {len(train)} training rows{' (packed)' if spec.packing else ''}, {len(val)} validation rows"
        + (f" from {me.data}" if me.data else "")
        + (
            f"; labels {np.bincount([r['label'] for r in data.train[0]], minlength=len(data.labels)).tolist()}"
            if data.labels
            else ""
        )
        + (f"; LoRA r={spec.peft.r}, alpha={spec.peft.alpha} (this site's)" if me.peft else ""),
        flush=True,
    )
    ranks = [for_site(recipe.task, s.peft).peft.r for s in recipe.sites]  # LoRA ranks may differ (hetlora)
    cb = flare.FLTrainerCallback(
        local_steps=spec.local_steps,
        local_epochs=spec.local_epochs,
        evaluate=True,
        proximal_mu=spec.proximal_mu,
        save_final=False,  # the final model is RUN_DIR/final (`fl-plugins export`), not a copy per site
        offer_initial=spec.peft.method != "lora" or spec.peft.r == max(ranks),  # round 0 at the largest rank
    )
    with tempfile.TemporaryDirectory(prefix="fl-hf-") as out:
        trainer = make_trainer(spec, model, tok, train, val, out, callbacks=[cb, _print_evaluations(site)])
        print(
            f"[{site}] each round exchanges {_nbytes(model) / 1e6:.3f} MB "
            f"({'adapter' if spec.peft.method != 'none' else 'trainable weights'})",
            flush=True,
        )
        trainer.train()
        cb.finish(trainer)  # evaluations after training (cross-site evaluation): answered with this trainer
    flare.shutdown()


def _fetched(spec: TaskSpec, site: str) -> TaskSpec:
    """`spec` with its model read from this site's cache of the folder the aggregator serves (`task.model:
    {from_aggregator: PATH}`): the site connects first and fetches the folder unless it holds it already."""
    import dataclasses

    import fl_plugins.hf as flare
    from fl_plugins.client import session
    from fl_plugins.client.fetch import fetch_served_model
    from fl_plugins.tasks.spec import ModelSpec

    flare.init()  # the session FLTrainerCallback uses afterwards
    opened = session.current()
    folder = fetch_served_model(opened.client if opened is not None else None)
    print(f"[{site}] model folder from the aggregator: {folder}", flush=True)
    return dataclasses.replace(spec, model=ModelSpec("path", str(folder)))


def _nbytes(model: Any) -> int:
    from fl_plugins.integrations.hf import HFTarget

    return HFTarget(model).nbytes()


def _print_evaluations(site: str) -> Any:
    """A callback printing each evaluation (the global model's, at the start of every round) to the site's log."""
    from transformers import TrainerCallback

    class PrintEvaluations(TrainerCallback):
        def on_evaluate(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            metrics: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            shown = {k: round(v, 4) for k, v in (metrics or {}).items() if k in ("eval_loss", "eval_accuracy")}
            print(f"[{site}] step {state.global_step}: global model {shown}", flush=True)

    return PrintEvaluations()


def baselines(recipe: Any, run_dir: Path) -> dict[str, Any]:
    """The final global model and every site's local-only model (with its own data and LoRA override), on the
    pooled validation set (every site's validation part)."""
    import torch

    from fl_plugins.integrations.hf import HFTarget

    spec: TaskSpec = recipe.task
    data = shares(spec, {s.name: s.data for s in recipe.sites})
    num_labels = len(data.labels) if data.labels else None
    last, params = _global_model(run_dir)
    out: dict[str, Any] = {"round": last, "pooled_validation_rows": len(data.pooled_val), "local_only": {}}
    with tempfile.TemporaryDirectory(prefix="fl-hf-") as tmp:
        gspec = _global_spec(recipe, params)
        model, tok = build_model(gspec, num_labels)
        HFTarget(model).load(params, strict=True)
        pooled = encode(spec, tok, data.pooled_val)
        out["global"] = _metrics(make_trainer(gspec, model, tok, pooled, pooled, tmp).evaluate())
        print(f"global model (round {last}): {out['global']}", flush=True)
        budget = (
            {"max_steps": spec.local_steps * recipe.federation.rounds}
            if spec.local_steps
            else {"num_train_epochs": spec.local_epochs * recipe.federation.rounds}
        )
        for k, site in enumerate(recipe.sites):
            torch.manual_seed(spec.seed)
            sspec = for_site(spec, site.peft)
            model, tok = build_model(sspec, num_labels)
            train = encode(sspec, tok, data.train[k], pack=spec.packing)
            tr = make_trainer(sspec, model, tok, train, pooled, tmp, **budget)
            tr.train()
            out["local_only"][site.name] = _metrics(tr.evaluate())
            print(f"{site.name} alone: {out['local_only'][site.name]}", flush=True)
    (run_dir / "baselines.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _global_model(run_dir: Path) -> tuple[int, dict[str, Any]]:
    """The run's last round and its global model's tensors (SCAFFOLD's control variates left out)."""
    from safetensors.torch import load_file

    from fl_plugins.aggregator.store import RunStore
    from fl_plugins.integrations.targets import pop_control_variates

    store = RunStore(run_dir)
    last = store.latest_round()
    if last is None or last < 1:
        raise ConfigError(f"{run_dir}: no aggregated global model yet (run the recipe first)")
    manifest = store.load(last)
    params: dict[str, Any] = {}
    for path in store.shard_paths(last, manifest):
        params.update(load_file(str(path)))
    pop_control_variates(params)  # SCAFFOLD's (--strategy scaffold) are not part of the model
    return last, params


def _global_spec(recipe: Any, params: dict[str, Any]) -> TaskSpec:
    """The task as the global model was trained: with sites at other LoRA ranks (`sites: [{..., peft: {r: 4}}]`),
    the global adapter has its own rank (its lora_A tensors' first dimension); its alpha is that of a site of
    that rank, else the task's alpha scaled to it (for_site: the same alpha / r as the task's)."""
    spec: TaskSpec = recipe.task
    ranks = {int(v.shape[0]) for k, v in params.items() if "lora_A" in k or "lora_embedding_A" in k}
    if spec.peft.method != "lora" or len(ranks) != 1 or ranks == {spec.peft.r}:
        return spec
    r = ranks.pop()
    return for_site(spec, next((s.peft for s in recipe.sites if s.peft.get("r") == r), {"r": r}))


def _metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k.removeprefix("eval_"): float(v) for k, v in m.items() if k in ("eval_loss", "eval_accuracy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fl_plugins.tasks", description=__doc__.split("\n\n")[0])
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
