"""Heterogeneous LoRA ranks: sites train adapters of different ranks (a site's memory decides its rank) and the
aggregator folds them into one global adapter. Two strategies (config.py's `strategy`: `--strategy hetlora`, or
in a recipe `strategy: {type: flexlora}`); which tensors are LoRA factors, and where their rank lies, is
lora_ranks.py's (PEFT's names: `...lora_A.weight` r x in, `...lora_B.weight` out x r, `lora_embedding_A/B`).

The global rank R. The global model's adapter has the rank of round 0's model (`--initial-model`, or the weights
the first site offers), and it is the largest rank a site may train. An update may hold any LoRA factor at a rank
r <= R in that factor's rank dimension (uploads.py `check_plan` -> `fit_plan`); a larger rank is refused, naming
the tensor, both ranks and the fix (start from a model of the largest rank). Under any other strategy an update
whose ranks differ from the global model's is refused with the tensors and these two strategies' names. The two
factors of one module must have the same rank in an update.

A site loads the global adapter cut to its own rank (integrations/targets.py, lora_ranks.py `fit_ranks`): the
first r rows of A, the first r columns of B.

hetlora (zero-padding; Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
2023). Each update's factors are zero-padded to R and folded as they arrive into FedAvg's float32 accumulator
(fedavg.py): rows of A are contiguous, so a rank-r A folds into the first r*in elements; columns of B are strided,
so a rank-r B's element (i, j) folds into (i, j) of the out x R accumulator. The average is the paper's: every
slice j (row j of A, column j of B) is divided by the round's total weight W, so a site of rank r_k <= j counts
as zeros there, and the slices only large-rank sites train shrink by W_j / W each round (W_j: the weight of the
updates that trained slice j). We measured the alternative, dividing slice j by W_j (each slice the mean of the
sites that trained it), on the label-skewed demo with sites at r = 4, 8, 16 (benchmarks/lora_ranks.py, session
8): the rank-16 global model then scored 0.67 on the pooled validation set against 0.885 for the zero-padded
average, because slices trained by one site become that site's local adapter (its own skewed share: 1.0); the
shrinking is what keeps the large-rank slices a federated model. A slice no update trained (W_j = 0) keeps the
global model's value. A DIFF update is the global value plus its step in the slices it trained (zeros beyond,
like a FULL update's padding): slice j's new value is (acc_j + W_diff_j g_j) / W. The slice weights are counted
when an update's first chunk of a tensor (byte 0) is folded; every folded update is counted by the close (an
uncounted one makes the round refold, which resets them), and `finalize` checks that slice 0's weight is the
round's. Memory: FedAvg's accumulator plus two float64 weights per rank slice of each LoRA tensor. (The paper's
rank self-pruning and sparsity-weighted aggregation are not part of this.)

flexlora (SVD redistribution; Bai et al., "FlexLoRA: Federated Fine-Tuning of Large Language Models with
Heterogeneous LoRA Ranks", 2024): per LoRA module the weighted average of the updates' products,
M = sum_k w_k B_k A_k / sum_k w_k, is redistributed at rank R by its truncated SVD, B = U_R sqrt(S_R),
A = sqrt(S_R) V_R^T (lora_flex.py). The out x in product is never formed: with B_cat = [sqrt(w_k/W) B_k] and
A_cat = [sqrt(w_k/W) A_k] (stacked along the rank), M = B_cat A_cat; QR of B_cat and of A_cat^T leaves a small
(sum_k r_k) square core, whose SVD gives M's. A site at rank r < R takes the first r components: M's best rank-r
approximation. Components beyond M's numerical rank (fewer than R) get a zero column of B and keep the global
model's row of A, so the module still computes M and training can grow them again (a zero A row and B column
would get no gradient). This needs each update's A and B together, so the counted updates' LoRA factors are kept
in float32 until the close (`nbytes`: at most sites x the adapter's elements x 4 bytes, beside FedAvg's
accumulator for the other tensors); the SVD runs at the close, in float64, one module at a time. A DIFF update is
made FULL at the close: the global factors (read from the checkpoint the round steps from, in `stage`) cut to the
update's rank, plus the update. A refold's `reset` forgets the kept factors.

Both: tensors that are not LoRA factors (a classifier head, `modules_to_save`) are plain FedAvg. Nothing is kept
between rounds outside the checkpoint: `stage` writes the strategy's name into round R+1's state.json (as
scaffold.py does), so a restart with another strategy is refused (strategy.py `check_resume`).

Scaling. PEFT scales a module's update by alpha / r (alpha / sqrt(r) with `use_rslora`). Both methods combine the
factors as if every site's update B_k A_k were scaled alike: give every site the same scaling, i.e. alpha
proportional to r (lora_alpha = 2 r at every site, say; with rslora, alpha proportional to sqrt(r)). With one
alpha for all ranks, a rank-4 site would apply the global factors 4 times as strongly as a rank-16 site.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from fl_plugins.aggregator.fedavg import BLOCK
from fl_plugins.aggregator.files import private_dir, write_private
from fl_plugins.aggregator.optimizers import STATE_DIR, STATE_FILE, STATE_FORMAT, FedAvg, check_made_by, read_state
from fl_plugins.errors import ModelMismatchError
from fl_plugins.lora_ranks import other_rank, partner, rank_dim, rank_of
from fl_plugins.wire.layout import FLOAT_DTYPES, TensorInfo, numpy_dtype

LORA_STRATEGIES = ("hetlora", "flexlora")


@dataclass
class Factor:
    """A LoRA factor of the global model, seen as (outer, rank, inner) with rank R = `rank`."""

    tensor: TensorInfo
    dim: int
    rank: int
    outer: int
    inner: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # strided folds of this tensor
    full: np.ndarray = field(init=False)  # hetlora: per rank slice, the weight of the FULL updates that trained it
    diff: np.ndarray = field(init=False)  # and of the DIFF ones

    def __post_init__(self) -> None:
        self.full = np.zeros(self.rank, np.float64)
        self.diff = np.zeros(self.rank, np.float64)


def lora_factors(tensors: list[TensorInfo]) -> dict[str, Factor]:
    """The floating-point LoRA factors of the global model `tensors`, by name."""
    out = {}
    for t in tensors:
        dim = rank_dim(t.name)
        if dim is None or t.dtype not in FLOAT_DTYPES or len(t.shape) <= dim:
            continue
        outer, inner = int(np.prod(t.shape[:dim])), int(np.prod(t.shape[dim + 1 :]))
        out[t.name] = Factor(t, dim, int(t.shape[dim]), outer, inner)
    return out


def fit_plan(
    expected: dict[str, TensorInfo], got: dict[str, TensorInfo], what: str, strategy: str, *, submitted: bool = False
) -> dict[str, TensorInfo]:
    """`expected` (the global model's tensors) with each LoRA factor that `got` (an update's) holds at a smaller rank
    replaced by `got`'s, under hetlora and flexlora; the ModelMismatchError a site is told otherwise: a larger
    rank, ranks that differ under another strategy or in a `submitted` model (cross-site evaluation), the two
    factors of a module at different ranks."""
    smaller: list[tuple[str, int, int]] = []
    larger: list[tuple[str, int, int]] = []
    for name, g in got.items():
        e = expected.get(name)
        floats = e is not None and e.dtype == g.dtype and e.dtype in FLOAT_DTYPES
        ranks = other_rank(name, g.shape, e.shape) if floats and e is not None else None
        if ranks is not None:
            (smaller if ranks[0] < ranks[1] else larger).append((name, *ranks))
    if not smaller and not larger:
        return expected
    listed = _few([f"{n}: rank {r} (global model: {big})" for n, r, big in larger + smaller])
    if submitted:
        raise ModelMismatchError(
            f"{what} holds LoRA factors of another rank than the global model's: {listed}. A submitted model is "
            "evaluated at every site, and a site loads only adapters of its own rank or a larger one: leave the "
            "submit_model phase out of a run whose sites train different ranks (evaluating the global model works)"
        )
    if strategy not in LORA_STRATEGIES:
        raise ModelMismatchError(
            f"{what} holds LoRA factors of another rank than the global model's: {listed}. The {strategy} strategy "
            "averages tensors of one shape; to let sites train different LoRA ranks, start the aggregator with "
            "`--strategy hetlora` (zero-padding) or `--strategy flexlora` (SVD of the averaged product) (in a "
            "recipe: `strategy: {type: hetlora}`) from a model of the largest rank, or give every site the global "
            "model's rank"
        )
    if larger:
        rank = max(big for _, _, big in larger)
        raise ModelMismatchError(
            f"{what} holds LoRA factors of a larger rank than the global model's: {listed}. Under {strategy} the "
            f"global model's rank (round 0's model's, {rank} here) is the largest a site may train: start the run "
            "from a model of the largest rank (pass `initial_model` (--initial-model) with that rank, or let the "
            f"site of the highest rank offer round 0's model), or train this site at rank {rank} or less"
        )
    cut = {n: r for n, r, _ in smaller}
    pairs = [
        (n, r, partner(n), rank_of(partner(n), got[partner(n)].shape)) for n, r in cut.items() if partner(n) in got
    ]
    bad = [f"{n}: {r}, {p}: {pr}" for n, r, p, pr in pairs if pr != r]
    if bad:
        raise ModelMismatchError(
            f"{what} holds LoRA modules whose A and B factors have different ranks: {_few(bad)}; send each "
            "module's factors as PEFT makes them (lora_A r x in, lora_B out x r, one r)"
        )
    return {**expected, **{n: got[n] for n in cut}}


def _few(items: list[str], n: int = 5) -> str:
    return "[" + "; ".join(items[:n]) + ("; …" if len(items) > n else "") + "]"


def stage_marker(name: str, previous: Path, staging: Path) -> None:
    """The state of a strategy that keeps none between rounds but its name: state.json in round R+1's staging
    directory says `name` made it (a restart with another strategy is refused, strategy.py `check_resume`)."""
    old = read_state(previous)
    if old is not None:
        check_made_by(old, name, {}, previous)
    meta = {"format": STATE_FORMAT, "strategy": name, "hyper_parameters": {}, "elements": 0}
    meta["step"] = 1 if old is None else int(old["step"]) + 1
    write_private(private_dir(staging / STATE_DIR) / STATE_FILE, json.dumps(meta, indent=1) + "\n")


def check_round_weight(slice0: float, weight: float, name: str) -> None:
    """The weight the strategy saw folded for `name` must be the round's counted weight (module docstring)."""
    if not np.isclose(slice0, weight, rtol=1e-9, atol=0.0):
        raise RuntimeError(f"{name}: updates of weight {slice0:g} were folded, {weight:g} were counted")


class HetLoRA(FedAvg):
    """Zero-padding to the global rank with per-slice weights (the module docstring); FedAvg elsewhere."""

    name: ClassVar[str] = "hetlora"

    def __init__(self, tensors: list[TensorInfo], directory: Path | None = None) -> None:
        super().__init__(tensors, directory)
        self.lora = lora_factors(tensors)
        self._weights_lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(f.full.nbytes + f.diff.nbytes for f in self.lora.values())

    def reset(self) -> None:
        super().reset()
        for f in self.lora.values():
            f.full.fill(0)
            f.diff.fill(0)

    def stage(self, previous: Path, staging: Path) -> None:
        stage_marker(self.name, previous, staging)

    def fold(self, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False) -> None:
        """FedAvg's fold; a LoRA factor of a smaller rank lands zero-padded, and counts toward its slices' weight."""
        f = self.lora.get(tensor.name)
        if f is None:
            return super().fold(tensor, lo, payload, weight, diff=diff)
        rank = tensor.shape[f.dim]
        if lo == 0:  # once per update and tensor
            with self._weights_lock:
                (f.diff if diff else f.full)[:rank] += weight
        if f.outer == 1:  # the rank is the outermost dimension: a smaller rank is a prefix of the elements
            return super().fold(tensor, lo, payload, weight, diff=diff)
        self._fold_strided(f, tensor, lo, payload, weight)

    def _fold_strided(self, f: Factor, tensor: TensorInfo, lo: int, payload: memoryview, weight: float) -> None:
        """Elements [lo / item, ...) of an (outer, r, inner) factor into the (outer, R, inner) accumulator: each of
        the update's rows of r * inner elements is the start of a row of R * inner. Under the tensor's lock (every
        fold of this tensor takes this path)."""
        src_dtype = numpy_dtype(tensor.dtype)
        item = src_dtype.itemsize
        if lo % item or len(payload) % item:
            raise ModelMismatchError(f"tensor {tensor.name!r}: chunk splits an element (offset {lo})")
        self.wait_ready()
        src, acc = np.frombuffer(payload, src_dtype), self.arrays[tensor.name]
        row_in, row_out = tensor.shape[f.dim] * f.inner, f.rank * f.inner
        w = acc.dtype.type(weight)
        pos, e0 = 0, lo // item
        with f.lock:
            while pos < len(src):
                row, col = divmod(e0 + pos, row_in)
                take = min(row_in - col, len(src) - pos)
                if col == 0 and take == row_in:  # whole rows at once
                    rows = (len(src) - pos) // row_in
                    take = rows * row_in
                    dst = acc[row * row_out : (row + rows) * row_out].reshape(rows, row_out)[:, :row_in]
                    seg = src[pos : pos + take].reshape(rows, row_in)
                else:
                    dst = acc[row * row_out + col : row * row_out + col + take]
                    seg = src[pos : pos + take]
                dst += seg.astype(acc.dtype) * w
                pos += take

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """A LoRA factor's new value: each rank slice's sum over the round's weight (the zero-padded average; the
        global value where no update trained the slice); any other tensor's is FedAvg's."""
        f = self.lora.get(tensor.name)
        if f is None:
            yield from super().finalize(tensor, read_global)
            return
        total = f.full + f.diff
        check_round_weight(float(total[0]), self.weight, tensor.name)
        need_global = bool(f.diff.any() or not total.all())
        if need_global and read_global is None:
            raise RuntimeError("DIFF updates or untrained rank slices need the global model, which is not readable")
        self.wait_ready()
        acc = self.arrays[tensor.name]
        inv = np.where(total > 0, 1.0 / float(total[0]), 0.0).astype(acc.dtype)  # 1 / W: zero-padded, as published
        out_dtype = numpy_dtype(tensor.dtype)
        for b in range(0, tensor.numel, BLOCK):
            n = min(BLOCK, tensor.numel - b)
            j = (np.arange(b, b + n) // f.inner) % f.rank  # each element's rank slice
            s = acc[b : b + n] * inv[j]
            if need_global and read_global is not None:
                g = read_global(b, n).astype(acc.dtype)
                s += g * (f.diff[j] * inv[j]).astype(acc.dtype)
                untrained = total[j] == 0
                s[untrained] = g[untrained]
            yield s.astype(out_dtype, copy=False) if out_dtype != s.dtype else s
