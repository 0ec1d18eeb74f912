"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020) on
the aggregator: the control variates travel beside the weights, as tensors of the model.

The global model of a `--strategy scaffold` run holds, for every floating-point tensor NAME, the float32 tensor
`scaffold.c.NAME` of NAME's shape (wire/layout.py `CONTROL_VARIATE`): the server control variate c. Round 0's
model gets them as zeros (`control_variate_shards`), in shards of their own beside the initial model's
(`global/round-00000/scaffold.safetensors`; `scaffold-0000i-of-0000n.safetensors` past 1 GiB): those of
`--initial-model` (store.py `import_initial`) or of a site's offered weights (offer.py `Offer.commit`), before
run.json records the model's tensor table, so a restart checks them as any other tensor. Every update must then
carry them too (uploads.py `check_plan` refuses one without them, saying what to do); the trainer integrations
send the site's new control variate c_i⁺ there (integrations/scaffold.py has the site's rules).

The rules, with update i's weight w_i (its NUM_STEPS_CURRENT_ROUND) and n the round's counted updates:

    model tensors       x⁺ = Σ w_i y_i / Σ w_i      FedAvg's weighted average (fedavg.py), unchanged
    scaffold.c.NAME     c⁺ = Σ c_i⁺ / n             unweighted: every update's control variates fold with weight 1
    (a DIFF update's y_i and c_i⁺ are the global model's values plus its diff, as in fedavg.py)

With every site in every round, c stays the mean of the sites' c_i (all zero at first), so the mean of the c_i⁺
is the paper's c + (1/N) Σ (c_i⁺ - c_i) exactly, and x⁺ is the paper's step with a global step size η_g = 1
(`server_lr` is not used). Where this differs from the paper:

* client sampling (`--sample-sites`), or a site whose update is not counted (late, refused): c⁺ is the mean of
  the c_i⁺ counted, not the paper's c + (|S|/N) mean(Δc_i); the |S|/N damping is not applied, so c follows the
  sites that trained. A site that trained but was not counted has moved its own c_i all the same.
* the model tensors keep FedAvg's weights (NUM_STEPS_CURRENT_ROUND): the paper's plain mean when the sites train
  equal budgets, as its analysis assumes.
* the cyclic workflow (one site a round) has nothing to average and is refused (config.py).

Cost: c, and every update's c_i⁺, are float32 tensors of the model's floating-point size: a round moves twice the
bytes of a float32 model (three times a bf16 model's), downloads and uploads both, and checkpoints and the
accumulator grow alike (the paper's cost: twice the communication of FedAvg). For a PEFT model only the adapter
travels, and only the adapter has control variates.

Restarts: each round after round 0 is checkpointed with a state.json (the server optimizers' format with no
buffers, `stage`), so a restart with another strategy is refused (strategy.py `check_resume`); a global model
without control variates under scaffold, or with them under another strategy, is a ConfigError when the strategy
is made (`check_control_variates`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

from fl_plugins.aggregator.fedavg import BLOCK
from fl_plugins.aggregator.files import private_dir, write_private
from fl_plugins.aggregator.optimizers import STATE_DIR, STATE_FILE, STATE_FORMAT, FedAvg, check_made_by, read_state
from fl_plugins.aggregator.store import write_shard
from fl_plugins.errors import ConfigError
from fl_plugins.wire.layout import CONTROL_VARIATE, FLOAT_DTYPES, ShardLayout, TensorInfo, plan_shards


def is_control_variate(name: str) -> bool:
    return name.startswith(CONTROL_VARIATE)


class Scaffold(FedAvg):
    """FedAvg on the model's tensors; the unweighted mean of the updates on the control variates."""

    name: ClassVar[str] = "scaffold"

    def __init__(self, tensors: list[TensorInfo], directory: Path | None = None) -> None:
        super().__init__(tensors, directory)
        self.count_full = 0  # updates counted since `reset`, FULL and DIFF
        self.count_diff = 0

    def check(
        self, tensor: TensorInfo, lo: int, payload: memoryview, *, finite: bool = True, weight: float = 1.0
    ) -> None:
        weight = 1.0 if is_control_variate(tensor.name) else weight
        super().check(tensor, lo, payload, finite=finite, weight=weight)

    def fold(self, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False) -> None:
        super().fold(tensor, lo, payload, 1.0 if is_control_variate(tensor.name) else weight, diff=diff)

    def add_weight(self, weight: float, params_type: str) -> None:
        super().add_weight(weight, params_type)
        if params_type == "DIFF":
            self.count_diff += 1
        else:
            self.count_full += 1

    def reset(self) -> None:
        super().reset()
        self.count_full = self.count_diff = 0

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """Blocks of the new global value of `tensor`: a control variate's is the mean of the counted updates'
        (the global one plus the diff for DIFF updates); any other tensor's is FedAvg's."""
        if not is_control_variate(tensor.name):
            yield from super().finalize(tensor, read_global)
            return
        if self.count_diff and read_global is None:
            raise RuntimeError("DIFF updates were folded but the global model is not readable")
        self.wait_ready()
        acc = self.arrays[tensor.name]  # float32: control variates are F32
        inv = acc.dtype.type(1.0 / (self.count_full + self.count_diff))
        for b in range(0, tensor.numel, BLOCK):
            n = min(BLOCK, tensor.numel - b)
            out = acc[b : b + n].copy()
            if self.count_diff and read_global is not None:
                out += read_global(b, n) * acc.dtype.type(self.count_diff)
            out *= inv
            yield out

    def stage(self, previous: Path, staging: Path) -> None:
        """No state but its name: state.json says SCAFFOLD made the round (a restart with another strategy is
        refused, as for the server optimizers)."""
        old = read_state(previous)
        if old is not None:
            check_made_by(old, self.name, {}, previous)
        meta = {"format": STATE_FORMAT, "strategy": self.name, "hyper_parameters": {}, "elements": 0}
        meta["step"] = 1 if old is None else int(old["step"]) + 1
        write_private(private_dir(staging / STATE_DIR) / STATE_FILE, json.dumps(meta, indent=1) + "\n")


def control_variate_shards(directory: Path, shards: list[ShardLayout], chunk_bytes: int) -> list[ShardLayout]:
    """Round 0 of a SCAFFOLD run: a zero control variate for every floating-point tensor of `shards` that has none
    yet, written into `directory` as shards of their own (named so as not to clash with `shards`). Returns them;
    the control variates are then checked whole (`check_control_variates`)."""
    tensors = [t for s in shards for t in s.tensors]
    names = {t.name for t in tensors}
    specs = [
        (CONTROL_VARIATE + t.name, "F32", t.shape)
        for t in tensors
        if t.dtype in FLOAT_DTYPES and not is_control_variate(t.name) and CONTROL_VARIATE + t.name not in names
    ]
    prefix = "scaffold"
    while any(s.name.startswith(prefix) for s in shards):
        prefix += "-c"
    zeros = np.zeros(BLOCK, np.float32)
    made = []
    for s in plan_shards(specs, prefix=prefix) if specs else []:
        blocks = (zeros[: min(BLOCK, t.numel - b)] for t in s.tensors for b in range(0, t.numel, BLOCK))
        made.append(write_shard(directory / s.name, s, blocks, chunk_bytes))
    check_control_variates(Scaffold.name, [*tensors, *(t for s in made for t in s.tensors)])
    return made


def check_control_variates(strategy: str, tensors: list[TensorInfo]) -> None:
    """ConfigError unless the global model's control variates fit `strategy`: with scaffold, a float32
    `scaffold.c.NAME` of NAME's shape for every floating-point tensor NAME and no other; with another, none."""
    by_name = {t.name: t for t in tensors}
    variates = sorted(n for n in by_name if is_control_variate(n))
    if strategy != Scaffold.name:
        if variates:
            raise ConfigError(
                f"the global model holds {len(variates)} SCAFFOLD control variates ({_few(variates)}), but the "
                f"strategy is {strategy}: restart with `--strategy scaffold` (in a recipe: strategy: {{type: "
                "scaffold}) to go on with them, or pass a new --run-dir (and an initial model without them)"
            )
        return
    models = [t for t in tensors if t.dtype in FLOAT_DTYPES and not is_control_variate(t.name)]
    missing = [CONTROL_VARIATE + t.name for t in models if CONTROL_VARIATE + t.name not in by_name]
    if missing:
        raise ConfigError(
            f"the global model has no SCAFFOLD control variates for {len(missing)} of its floating-point tensors "
            f"({_few(missing)}): it was made by another strategy (round 0 gets them only with --strategy scaffold); "
            "restart with the strategy it was made with, or pass a new --run-dir to train with scaffold from round 0"
        )
    bad = [
        n
        for n in variates
        if (base := by_name.get(n[len(CONTROL_VARIATE) :])) is None
        or base.dtype not in FLOAT_DTYPES
        or (by_name[n].dtype, by_name[n].shape) != ("F32", base.shape)
    ]
    if bad:
        raise ConfigError(
            f"the global model's tensors {_few(bad)} are named as SCAFFOLD control variates but are not float32 "
            "tensors of the shape of a floating-point tensor NAME of the model (`scaffold.c.NAME`): rename them, "
            "or leave them out of the initial model"
        )


def missing_message(what: str, missing: list[str], total: int) -> str:
    """What an update that lacks control variates is told (uploads.py `check_plan`)."""
    return (
        f"{what} lacks SCAFFOLD's control variates {_few(missing)} ({len(missing)} of {total}): this aggregator "
        "runs --strategy scaffold, whose updates carry each floating-point tensor NAME's control variate c_i as "
        "the float32 tensor `scaffold.c.NAME`. Train with the Lightning or HF integrations (fl_plugins.lightning, "
        "fl_plugins.hf), which keep c_i and send it, or send the `scaffold.c.*` tensors yourself (the paper's "
        "option II: c_i - c + (x - y) / (the sum of the round's learning rates))"
    )


def _few(names: list[str], n: int = 5) -> str:
    return str(names[:n])[:-1] + (", …]" if len(names) > n else "]")
