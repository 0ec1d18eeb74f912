"""FlexLoRA (lora.py's docstring has the method, its memory and its rules): the counted updates' LoRA factors, kept
per update until the close, and the SVD that redistributes their weighted average product at the global rank."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from fl_plugins.aggregator.fedavg import BLOCK
from fl_plugins.aggregator.lora import check_round_weight, lora_factors, stage_marker
from fl_plugins.aggregator.optimizers import FedAvg
from fl_plugins.errors import ConfigError, IntegrityError, ModelMismatchError
from fl_plugins.lora_ranks import partner, truncate
from fl_plugins.wire.layout import MAX_HEADER_BYTES, TensorInfo, numpy_dtype, parse_header


@dataclass
class Kept:
    """One update's LoRA factors, float32, flat, at the update's shapes."""

    weight: float
    diff: bool
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def redistribute(
    weights: list[float], bs: list[np.ndarray], as_: list[np.ndarray], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, A, dead) with B A the best rank-`rank` approximation of sum_k w_k B_k A_k / sum_k w_k, B = U sqrt(S),
    A = sqrt(S) V^T, from the factors B_k (out x r_k) and A_k (r_k x in), without forming the out x in product:
    QR of the stacked, weighted factors leaves a (sum r_k) square core whose SVD is the product's. `dead`: the
    components beyond the product's numerical rank (zero in B and A)."""
    total = float(sum(weights))
    roots = [np.sqrt(w / total) for w in weights]
    b_cat = np.concatenate([s * b for s, b in zip(roots, bs, strict=True)], axis=1)  # out x S
    a_cat = np.concatenate([s * a for s, a in zip(roots, as_, strict=True)], axis=0)  # S x in
    qb, rb = np.linalg.qr(b_cat)
    qa, ra = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)  # B_cat A_cat = qb (rb ra^T) qa^T
    k = min(rank, len(s))
    tol = s[0] * max(b_cat.shape[0], a_cat.shape[1]) * np.finfo(np.float64).eps if len(s) else 0.0
    live = np.zeros(rank, bool)
    live[:k] = s[:k] > tol
    root = np.sqrt(s[:k])
    b = np.zeros((b_cat.shape[0], rank))
    a = np.zeros((rank, a_cat.shape[1]))
    b[:, :k] = (qb @ u[:, :k]) * root
    a[:k] = root[:, None] * (vt[:k] @ qa.T)
    b[:, ~live] = 0.0
    a[~live] = 0.0
    return b, a, ~live


def read_factors(directory: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The tensors `names` of the checkpoint in `directory` (global/round-R, or its staging directory), float64, read
    from its safetensors shards (their headers: a staging directory has no manifest.json yet)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            for t in parse_header(head + f.read(n) if n <= MAX_HEADER_BYTES else head, str(path)):
                if t.name in names:
                    f.seek(8 + n + t.start)
                    raw = f.read(t.end - t.start)
                    out[t.name] = np.frombuffer(raw, numpy_dtype(t.dtype)).astype(np.float64).reshape(t.shape)
    if names - out.keys():
        missing = sorted(names - out.keys())[:5]
        raise IntegrityError(f"{directory}: the global model's LoRA factors {missing} are not in its shards")
    return out


class FlexLoRA(FedAvg):
    """Each LoRA module's weighted average product redistributed by SVD at the global rank; FedAvg elsewhere."""

    name: ClassVar[str] = "flexlora"

    def __init__(self, tensors: list[TensorInfo], directory: Path | None = None) -> None:
        super().__init__(tensors, directory)
        self.lora = lora_factors(tensors)
        lonely = sorted(n for n in self.lora if partner(n) not in self.lora)
        if lonely:
            raise ConfigError(
                f"flexlora redistributes each LoRA module's product B·A, but the global model holds {lonely[:5]} "
                f"without their other factor ({partner(lonely[0])!r}): exchange whole adapters (both lora_A and "
                "lora_B of every module), or use `--strategy hetlora`, which folds each factor on its own"
            )
        uneven = sorted(n for n in self.lora if self.lora[n].rank != self.lora[partner(n)].rank)
        if uneven:
            raise ConfigError(
                f"the global model's LoRA factors {uneven[:4]} have another rank than their module's other factor: "
                "start from an adapter as PEFT makes it (one rank r per module: lora_A r x in, lora_B out x r)"
            )
        self.kept: dict[str, Kept] = {}  # by upload: the counted updates' factors (an uncounted one: a refold)
        self._lock = threading.Lock()
        self._global: dict[str, np.ndarray] = {}  # the global factors, read in `stage` when DIFF updates came
        self._made: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # the close's results, by factor

    @property
    def nbytes(self) -> int:
        kept = sum(a.nbytes for k in list(self.kept.values()) for a in list(k.factors.values()))
        return super().nbytes + kept

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.kept.clear()
        self._global.clear()
        self._made.clear()

    def stage(self, previous: Path, staging: Path) -> None:
        """The state marker (lora.py `stage_marker`); the global factors, if a DIFF update must be made FULL."""
        stage_marker(self.name, previous, staging)
        if any(k.diff for k in self.kept.values()):
            self._global = read_factors(previous, set(self.lora))

    def fold(self, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False) -> None:
        if tensor.name in self.lora:
            raise RuntimeError("flexlora keeps each update's LoRA factors together: fold them with fold_update")
        super().fold(tensor, lo, payload, weight, diff=diff)

    def fold_update(
        self, key: str, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False
    ) -> None:
        """Bytes [lo, lo + len) of the update `key`'s `tensor`: a LoRA factor's are kept (float32) for the close;
        any other tensor's are folded by FedAvg."""
        if tensor.name not in self.lora:
            return super().fold(tensor, lo, payload, weight, diff=diff)
        dtype = numpy_dtype(tensor.dtype)
        if lo % dtype.itemsize or len(payload) % dtype.itemsize:
            raise ModelMismatchError(f"tensor {tensor.name!r}: chunk splits an element (offset {lo})")
        with self._lock:
            kept = self.kept.setdefault(key, Kept(weight, diff))
            a = kept.factors.get(tensor.name)
            if a is None:
                a = kept.factors[tensor.name] = np.zeros(tensor.numel, np.float32)
                kept.shapes[tensor.name] = tensor.shape
        src = np.frombuffer(payload, dtype)
        e0 = lo // dtype.itemsize
        a[e0 : e0 + len(src)] = src

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """A LoRA factor's new value (its module is redistributed when the first of its two factors is asked
        for); any other tensor's is FedAvg's."""
        f = self.lora.get(tensor.name)
        if f is None:
            yield from super().finalize(tensor, read_global)
            return
        if tensor.name not in self._made:
            self._redistribute(tensor.name)
        value, dead = self._made.pop(tensor.name)
        if dead is not None and dead.any():  # A's rows of the components M lacks: the global model's
            if read_global is None:
                raise RuntimeError("flexlora keeps the global A rows of unused components; the model is not readable")
            g = read_global(0, tensor.numel).astype(np.float64).reshape(tensor.shape)
            np.moveaxis(value, f.dim, 0)[dead] = np.moveaxis(g, f.dim, 0)[dead]
        flat, out_dtype = value.reshape(-1), numpy_dtype(tensor.dtype)
        for b in range(0, tensor.numel, BLOCK):
            yield flat[b : b + BLOCK].astype(out_dtype)

    def _factor(self, kept: Kept, name: str) -> np.ndarray:
        """`kept`'s factor `name` at its shape, float64, made FULL if the update was a DIFF."""
        if name not in kept.factors:
            raise RuntimeError(f"an update counted without its LoRA factor {name!r}")
        x = kept.factors[name].reshape(kept.shapes[name]).astype(np.float64)
        if kept.diff:
            if name not in self._global:
                raise RuntimeError("DIFF updates were kept, but the global factors were not read (`stage`)")
            x += truncate(name, self._global[name], kept.shapes[name][self.lora[name].dim])
        return x

    def _redistribute(self, name: str) -> None:
        """The new A and B of `name`'s module, into `_made`."""
        a_name, b_name = (name, partner(name)) if self.lora[name].dim == 0 else (partner(name), name)
        fa, fb = self.lora[a_name], self.lora[b_name]
        kept = [self.kept[k] for k in sorted(self.kept)]  # by upload id, i.e. by site: the same result every time
        check_round_weight(sum(k.weight for k in kept), self.weight, name)
        as_ = [np.moveaxis(self._factor(k, a_name), fa.dim, 0) for k in kept]
        bs = [np.moveaxis(self._factor(k, b_name), fb.dim, -1) for k in kept]
        b2, a2, dead = redistribute(
            [k.weight for k in kept],
            [b.reshape(-1, b.shape[-1]) for b in bs],
            [a.reshape(a.shape[0], -1) for a in as_],
            fa.rank,
        )
        a_shape = [s for i, s in enumerate(fa.tensor.shape) if i != fa.dim]
        b_shape = [s for i, s in enumerate(fb.tensor.shape) if i != fb.dim]
        self._made[a_name] = (np.moveaxis(a2.reshape(fa.rank, *a_shape), 0, fa.dim), dead)
        self._made[b_name] = (np.moveaxis(b2.reshape(*b_shape, fb.rank), -1, fb.dim), None)
