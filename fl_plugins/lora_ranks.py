"""Which exchanged tensors are LoRA factors, along which dimension their rank lies, and how a factor of a larger
rank is cut to a smaller one: shared by the aggregator (aggregator/lora.py: the heterogeneous-rank strategies and
the plan check of an update) and the sites (integrations/targets.py: loading a global adapter of a larger rank).

PEFT's names for a LoRA module's factors (`get_peft_model_state_dict` drops the adapter name, a model's own
state_dict keeps it, e.g. `lora_A.default.weight`):

    NAME.lora_A.weight            r x in   (a Conv layer's: r x in x k x k)   rank along dimension 0
    NAME.lora_B.weight            out x r  (a Conv layer's: out x r x 1 x 1)  rank along dimension 1
    NAME.lora_embedding_A         r x num_embeddings                           rank along dimension 0
    NAME.lora_embedding_B         embedding_dim x r                            rank along dimension 1

Cutting a factor of rank R to r < R keeps its first r rank slices (the first r rows of A, the first r columns of
B): the first r components of the module's update B·A.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_FACTORS = (
    (re.compile(r"(?:^|\.)lora_A(?:\.[^.]+)?\.weight$"), 0),
    (re.compile(r"(?:^|\.)lora_B(?:\.[^.]+)?\.weight$"), 1),
    (re.compile(r"(?:^|\.)lora_embedding_A(?:\.[^.]+)?$"), 0),
    (re.compile(r"(?:^|\.)lora_embedding_B(?:\.[^.]+)?$"), 1),
)
_PARTNER = re.compile(r"lora_(embedding_)?([AB])(?=(?:\.[^.]+)?(?:\.weight)?$)")


def rank_dim(name: str) -> int | None:
    """The dimension that holds the rank of the LoRA factor `name` (0 for A, 1 for B); None: not a LoRA factor."""
    for pattern, dim in _FACTORS:
        if pattern.search(name):
            return dim
    return None


def rank_of(name: str, shape: Sequence[int]) -> int | None:
    """The LoRA rank of tensor `name` of `shape`; None when it is not a LoRA factor (or has too few dimensions)."""
    dim = rank_dim(name)
    return int(shape[dim]) if dim is not None and len(shape) > dim else None


def partner(name: str) -> str:
    """The other factor of the LoRA module of `name` (lora_A <-> lora_B, lora_embedding_A <-> lora_embedding_B)."""
    return _PARTNER.sub(lambda m: f"lora_{m.group(1) or ''}{'B' if m.group(2) == 'A' else 'A'}", name)


def other_rank(name: str, shape: Sequence[int], base: Sequence[int]) -> tuple[int, int] | None:
    """(rank of `shape`, rank of `base`) when the LoRA factor `name` has these two shapes, which differ in its rank
    dimension only (both ranks at least 1); None otherwise (not a LoRA factor, the same shape, or another
    difference)."""
    dim = rank_dim(name)
    if dim is None or len(shape) != len(base) or len(shape) <= dim or tuple(shape) == tuple(base):
        return None
    if any(a != b for i, (a, b) in enumerate(zip(shape, base, strict=True)) if i != dim):
        return None
    if shape[dim] < 1 or base[dim] < 1:
        return None
    return int(shape[dim]), int(base[dim])


def truncate(name: str, tensor: Any, rank: int) -> Any:
    """The first `rank` rank slices of the LoRA factor `tensor` (a numpy array or a torch tensor): a view."""
    dim = rank_dim(name)
    assert dim is not None, name
    return tensor[(slice(None),) * dim + (slice(0, rank),)]


def fit_ranks(received: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """`received` with every LoRA factor whose rank is larger than the local one's cut to the local rank (views);
    every other tensor as it is (a mismatch stays one, for the caller's check)."""
    out = dict(received)
    for k, v in received.items():
        if k in local:
            ranks = other_rank(k, tuple(v.shape), tuple(local[k].shape))
            if ranks is not None and ranks[0] > ranks[1]:
                out[k] = truncate(k, v, ranks[1])
    return out
