"""The round driver's model targets: what of a model travels, under which names, and whether a global model fits.

A model target is anything with `state() -> Mapping[str, tensor]` (the live state, sharing storage with the model)
and `load(params, strict)`: `_torch.ModuleTarget` (a torch module), `hf_model.HFTarget` (what a transformers or
PEFT model exchanges), `PrefixedTarget` (another target's tensors under the aggregator's names: FLARE's
`server_key_prefix`). `check_params` (strict loading) names every key that is missing, unexpected or mis-shaped;
`matching` picks what fits (lenient loading). A target may also tell which of its tensors an optimizer trains
(`trainable()`, read with `trainable_names`; SCAFFOLD corrects only those). `pop_control_variates` takes SCAFFOLD's
control variates out of a received model: they travel beside it and are never loaded into it.

A received LoRA factor of a larger rank than the local one (a global adapter of rank 16 at a site that trains
rank 4: `--strategy hetlora` or `flexlora`, aggregator/lora.py) fits: it is cut to the local rank when loaded (the
first r rows of lora_A, the first r columns of lora_B; lora_ranks.py `fit_ranks`). Any other shape mismatch, a
smaller rank included, stays one.

A sharded model (FSDP: sharded.py's `ShardedTarget`) holds its state on rank 0 only between two collective calls
every rank makes: `gather(target)` before the state is read, `spread(target, collective)` after rank 0 loaded
(for an unsharded model: rank 0's tensors broadcast in place), `release(target)` when it was only read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from fl_plugins.errors import ModelMismatchError
from fl_plugins.lora_ranks import fit_ranks, other_rank
from fl_plugins.wire.layout import CONTROL_VARIATE

logger = logging.getLogger(__name__)


class ModelTarget(Protocol):
    def state(self) -> Mapping[str, Any]: ...

    def load(self, params: Mapping[str, Any], strict: bool) -> None: ...


class PrefixedTarget:
    """A model target whose tensor names carry `prefix` on the wire (FLARE's `server_key_prefix`): the server's
    model wraps the site's one level down (`model.` + the site's names). `state()` adds the prefix, so the driver
    checks, receives into, offers and sends the wire names; `load()` strips it before the inner target loads."""

    def __init__(self, inner: ModelTarget, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def state(self) -> dict[str, Any]:
        return {self.prefix + k: v for k, v in self.inner.state().items()}

    def load(self, params: Mapping[str, Any], strict: bool) -> None:
        n = len(self.prefix)
        self.inner.load({k[n:] if k.startswith(self.prefix) else k: v for k, v in params.items()}, strict)

    def trainable(self) -> set[str] | None:
        names = trainable_names(self.inner)
        return None if names is None else {self.prefix + k for k in names}

    def __getattr__(self, name: str) -> Any:  # the inner target's other attributes (kind, nbytes, ...)
        return getattr(self.inner, name)


def check_params(received: Mapping[str, Any], local: Mapping[str, Any], what: str = "the global model") -> None:
    """Raise ModelMismatchError listing missing, unexpected and mis-shaped keys of `received` vs `local` (a LoRA
    factor of a larger rank than the local one fits: the target's `load` cuts it, `fit_ranks`)."""
    received = fit_ranks(received, local)
    missing = [k for k in local if k not in received]
    unexpected = [k for k in received if k not in local]
    shapes = [
        f"{k}: {tuple(received[k].shape)} vs local {tuple(local[k].shape)}"
        for k in local
        if k in received and tuple(received[k].shape) != tuple(local[k].shape)
    ]
    smaller = [k for k in local if k in received and _rank_below(k, received[k].shape, local[k].shape)]
    if smaller and len(smaller) == len(shapes) and not missing and not unexpected:
        k = smaller[0]
        raise ModelMismatchError(
            f"{what} has a smaller LoRA rank than this site's adapter ({k}: {tuple(received[k].shape)} vs local "
            f"{tuple(local[k].shape)}): the global adapter's rank is round 0's, the largest a site "
            "may train. Let the site with the largest rank offer round 0's model (FLTrainerCallback(offer_initial="
            "False) on the others; the built-in task does this), or start the aggregator with an initial model at "
            "the largest rank"
        )
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing}" if missing else "",
            f"unexpected {unexpected}" if unexpected else "",
            f"mis-shaped [{'; '.join(shapes)}]" if shapes else "",
        ]
        raise ModelMismatchError(
            f"{what} does not fit this site's model: {', '.join(p for p in parts if p)}. Build the same "
            "architecture on every site as the aggregator's initial model (or pass patch(..., "
            "load_state_dict_strict=False) to load only the tensors that match)"
        )


def matching(received: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """The received tensors whose name and shape match the local model (non-strict loading); LoRA factors of a
    larger rank cut to the local one (`fit_ranks`)."""
    fitted = fit_ranks(received, local)
    out = {k: v for k, v in fitted.items() if k in local and tuple(v.shape) == tuple(local[k].shape)}
    if len(out) != len(received) or len(out) != len(local):
        logger.warning(
            "loading %d of %d received tensors into a model with %d (non-strict)", len(out), len(received), len(local)
        )
    return out


def snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a target's `state()` that nothing else writes to, kept off the accelerator (torch tensors are
    copied to CPU memory, numpy arrays copied): what an evaluation puts back into the model afterwards."""
    return {k: v.detach().to("cpu", copy=True) if hasattr(v, "detach") else v.copy() for k, v in state.items()}


def trainable_names(target: ModelTarget) -> set[str] | None:
    """The names in `target.state()` that an optimizer trains, if the target knows (`trainable()`); else None."""
    names = getattr(target, "trainable", None)
    return names() if callable(names) else None


def pop_control_variates(params: dict[str, Any] | None) -> dict[str, Any]:
    """Take SCAFFOLD's control variates (`scaffold.c.NAME`) out of a received model's `params`, in place; returns
    them by name (empty: the global model holds none)."""
    if not params:
        return {}
    return {k: params.pop(k) for k in [k for k in params if k.startswith(CONTROL_VARIATE)]}


def is_sharded_target(target: ModelTarget) -> bool:
    return bool(getattr(target, "sharded", False))


def gather(target: ModelTarget) -> None:
    """Collective for a sharded target (every rank): rank 0 gets the state to read; nothing for any other."""
    if is_sharded_target(target):
        target.gather()  # type: ignore[attr-defined]


def spread(target: ModelTarget, collective: Any) -> None:
    """Every rank takes rank 0's weights: a sharded target scatters what rank 0 loaded; an unsharded one has
    rank 0's tensors broadcast in place (with `collective`: multi-process training)."""
    if is_sharded_target(target):
        target.scatter()  # type: ignore[attr-defined]
    elif collective is not None:
        collective.broadcast_tensors(target.state().values())


def release(target: ModelTarget) -> None:
    """A sharded target's gathered state was only read: drop it."""
    if is_sharded_target(target):
        target.release()  # type: ignore[attr-defined]


def _rank_below(name: str, got: Any, local: Any) -> bool:
    """The LoRA factor `name` was received with a smaller rank than the local one."""
    ranks = other_rank(name, tuple(got), tuple(local))
    return ranks is not None and ranks[0] < ranks[1]
