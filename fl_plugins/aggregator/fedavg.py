"""FedAvg folded as updates arrive, in bounded memory.

The accumulator holds one float32 array per floating-point tensor (float64 for integer tensors). Each
verified chunk of an update is folded at once: `acc += weight * chunk`, block by block through a small
scratch buffer, so memory is one accumulator plus a few MiB however many sites report. Scratch buffers come
from a small pool shared by the threads folding at once, not one kept per thread that ever folded (the gRPC
server's worker threads live for ever, up to 128 of them).

FULL and DIFF updates share the one accumulator. With weights w_i, FULL values x_i and DIFF values d_i:

    new = (sum_full w_i x_i + sum_diff w_i (g + d_i)) / W  =  (acc + W_diff * g) / W

so a DIFF update needs the global model g only once, at the end (read back from its checkpoint in blocks).

Per dtype (tests/test_fedavg.py pins each rule):
  * float tensors: a float32 accumulator (float64 for F64 tensors: a float32 sum would drop their precision);
    weights are at most MAX_WEIGHT and the totals W are float64. The finished average is checked for NaN/Inf
    before it is written (`checked`): a float32 sum can overflow even when every update was finite.
  * integer tensors (BatchNorm's `num_batches_tracked` is I64): a float64 accumulator, the average rounded to
    the nearest integer and clipped to the dtype's range. float64 holds integers exactly up to 2^53, so an I64 or
    U64 update holding a value beyond +-2^53 is refused (`check`), not silently rounded. In a DIFF update an
    unsigned tensor holds `local - global` wrapped around (what uint8 subtraction gives): it is read as the
    signed integer of the same width, so 3 - 5 = 254 counts as -2.
  * BOOL tensors (attention and causal masks registered as buffers): not averaged: the new global model keeps
    the current global model's values, and the sites' values are verified but ignored.
  * anything else (complex, unknown) is refused when the initial model arrives (`check_averageable`).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fl_plugins.errors import ModelMismatchError
from fl_plugins.wire.layout import FLOAT_DTYPES, INT_DTYPES, TensorInfo, numpy_dtype

if TYPE_CHECKING:
    import numpy.typing as npt

BLOCK = 1 << 18  # elements per fold step: a 1 MiB float32 scratch stays in cache
SCRATCH_BYTES = BLOCK * 8  # a block of the widest element (float64 accumulators of integer tensors)
SCRATCH_KEPT = 8  # scratch buffers the pool keeps; more folds at once allocate and free their own
# The bits that are all set in a NaN or an infinity, and only then (the exponent; F8_E4M3 has no infinity and
# one NaN pattern, S.1111.111): checked on the raw bits, so bf16 needs no conversion (ml_dtypes' isfinite runs
# at ~3 GB/s, the bit test at ~30 GB/s).
_NONFINITE_BITS = {
    "F64": (np.uint64, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7F80_0000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F),
}
MAX_WEIGHT = 1e12  # an update's weight (NUM_STEPS_CURRENT_ROUND): step and sample counts stay far below it
# dtype: (the exponent field's shift, its bias, the largest log2 of weight * |value| folded): a float32
# accumulator holds sums below 2^128, so products up to 2^100 leave room for 2^27 sites. F16 and float8 values
# times MAX_WEIGHT stay far below it, and need no check.
_EXPONENT = {"F32": (23, 127, 100), "BF16": (7, 127, 100), "F64": (52, 1023, 1000)}
_EXACT_INT = 1 << 53  # float64 holds every integer of magnitude up to this exactly
_LOCK_SPAN = 1 << 22  # elements guarded by one lock: concurrent sites fold into different spans in parallel
_N_LOCKS = 256


def check_averageable(tensors: list[TensorInfo], what: str) -> None:
    """Raise ModelMismatchError unless every tensor's dtype has a FedAvg rule (the module docstring)."""
    bad = sorted(f"{t.name} ({t.dtype})" for t in tensors if t.dtype not in FLOAT_DTYPES | INT_DTYPES | {"BOOL"})
    if bad:
        raise ModelMismatchError(
            f"{what} holds tensors FedAvg cannot average: {bad[:10]}; cast them to a float "
            "or integer dtype, or leave them out of the model's state dict"
        )


def _acc_dtype(dtype: str) -> type:
    return np.float32 if dtype in FLOAT_DTYPES and dtype != "F64" else np.float64


class Accumulator:
    def __init__(self, tensors: list[TensorInfo], directory: Path | None = None) -> None:
        """`directory`: keep the sums in a file there (`on_disk`) instead of memory."""
        check_averageable(tensors, "the global model")
        self.tensors = {t.name: t for t in tensors}
        sizes = {t.name: (t.numel if t.dtype != "BOOL" else 0, _acc_dtype(t.dtype)) for t in tensors}
        self.on_disk = None if directory is None else DiskArrays(directory, sizes)
        self.arrays: dict[str, np.ndarray] = (
            self.on_disk.arrays if self.on_disk else {name: np.empty(n, dt) for name, (n, dt) in sizes.items()}
        )
        self.weight_full = 0.0
        self.weight_diff = 0.0
        self._locks = [threading.Lock() for _ in range(_N_LOCKS)]
        self._pool: list[np.ndarray] = []  # free scratch buffers, SCRATCH_BYTES each
        self._pool_lock = threading.Lock()
        # Fresh pages cost a page fault each on first touch (about as slow as the wire on this VM): zero the
        # accumulator in the background now, at low CPU priority, while sites download the global model and
        # train, instead of on the receive thread during the first uploads. A fold waits for its tensor only.
        self._ready = {t.name: threading.Event() for t in tensors}
        if self.on_disk is None:
            threading.Thread(target=self._prefault, name="fl-acc-prefault", daemon=True).start()
        else:  # a new file reads as zeros
            for e in self._ready.values():
                e.set()

    def _prefault(self) -> None:
        try:  # Linux: a thread's own nice value; the gRPC threads come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        for name, a in self.arrays.items():
            for b in range(0, len(a), 1 << 22):
                a[b : b + (1 << 22)].fill(0)
            self._ready[name].set()

    def wait_ready(self) -> None:
        for e in self._ready.values():
            e.wait()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def weight(self) -> float:
        return self.weight_full + self.weight_diff

    def reset(self) -> None:
        self.wait_ready()
        if self.on_disk is not None:
            self.on_disk.zero()
        else:
            for a in self.arrays.values():
                a.fill(0)
        self.weight_full = self.weight_diff = 0.0

    @contextlib.contextmanager
    def _scratch(self, dtype: npt.DTypeLike) -> Iterator[np.ndarray]:
        """A scratch buffer of BLOCK elements of `dtype` (at least), taken from the pool and given back."""
        with self._pool_lock:
            raw = self._pool.pop() if self._pool else None
        if raw is None:
            raw = np.empty(SCRATCH_BYTES, np.uint8)
        try:
            yield raw.view(dtype)
        finally:
            with self._pool_lock:
                if len(self._pool) < SCRATCH_KEPT:
                    self._pool.append(raw)

    def check(
        self, tensor: TensorInfo, lo: int, payload: memoryview, *, finite: bool = True, weight: float = 1.0
    ) -> None:
        """Raise ModelMismatchError if `payload` (bytes [lo, lo + len) of `tensor`) holds what must not be
        folded: a NaN or an infinity, or a value so large that `weight` times it could overflow the accumulator
        (both when `finite`), an I64/U64 value beyond +-2^53."""
        if tensor.dtype in ("I64", "U64"):
            src = np.frombuffer(payload, numpy_dtype(tensor.dtype))
            if len(src) and (int(src.max()) > _EXACT_INT or (tensor.dtype == "I64" and int(src.min()) < -_EXACT_INT)):
                i = int(
                    np.flatnonzero(
                        (src > _EXACT_INT) | (src < -_EXACT_INT) if tensor.dtype == "I64" else src > _EXACT_INT
                    )[0]
                )
                raise ModelMismatchError(
                    f"tensor {tensor.name!r} holds {src[i]} at element {lo // 8 + i} (flat index): FedAvg averages "
                    "integers in float64, exact only up to 2^53; leave such counters out of the state dict sent "
                    "or keep them below 2^53"
                )
        elif finite:
            top = self.check_finite(tensor, lo, payload)
            spec = _EXPONENT.get(tensor.dtype)
            if spec is not None and top:
                shift, bias, limit = spec
                bound = (top >> shift) - bias + 1  # every |value| in the chunk is below 2^bound
                if bound + math.log2(weight) > limit:
                    raise ModelMismatchError(
                        f"tensor {tensor.name!r} holds values up to about 2^{bound}; times the update's weight "
                        f"{weight:g} that is over 2^{limit}, where the running sum could overflow the accumulator: "
                        "check the site's training for divergence, or send a smaller NUM_STEPS_CURRENT_ROUND"
                    )

    def check_finite(self, tensor: TensorInfo, lo: int, payload: memoryview) -> int:
        """Raise ModelMismatchError if `payload` (bytes [lo, lo + len) of `tensor`) holds a NaN or an infinity.
        Runs on the chunk as received, block by block through a reused scratch buffer: nothing model-sized.
        Returns the largest exponent field seen (the bits under the mask), which bounds the chunk's magnitudes
        for free (`check`)."""
        spec = _NONFINITE_BITS.get(tensor.dtype)
        if spec is None:  # integer and bool tensors
            return 0
        utype, mask = spec
        bits = np.frombuffer(payload, utype)
        bad = None
        top = 0
        with self._scratch(utype) as scratch:
            for b in range(0, len(bits), BLOCK):
                n = min(BLOCK, len(bits) - b)
                s = scratch[:n]
                np.bitwise_and(bits[b : b + n], mask, out=s)
                m = int(s.max()) if n else 0
                if m == mask:
                    bad = b + int(np.flatnonzero(s == mask)[0])
                    break
                top = max(top, m)
        if bad is not None:
            i = bad
            value = np.frombuffer(payload, numpy_dtype(tensor.dtype))[i]
            raise ModelMismatchError(
                f"tensor {tensor.name!r} holds {value} at element {lo // bits.itemsize + i} (flat index); "
                "updates must be finite: check the site's training for divergence (a lower learning rate, "
                "gradient clipping), or start the aggregator with --allow-nonfinite to average them anyway"
            )
        return top

    def fold(self, tensor: TensorInfo, lo: int, payload: memoryview, weight: float, *, diff: bool = False) -> None:
        """acc[tensor][elements of payload] += weight * payload. `lo` is the byte offset within the tensor;
        `diff`: the payload is a DIFF update's (unsigned integers are then read as signed: wrapped differences)."""
        if tensor.dtype == "BOOL":
            return  # carried from the global model
        self._ready[tensor.name].wait()
        src_dtype = numpy_dtype(tensor.dtype)
        if diff and src_dtype.kind == "u":
            src_dtype = np.dtype(f"<i{src_dtype.itemsize}")
        item = src_dtype.itemsize
        if lo % item or len(payload) % item:
            raise ModelMismatchError(f"tensor {tensor.name!r}: chunk splits an element (offset {lo})")
        src = np.frombuffer(payload, src_dtype)
        acc = self.arrays[tensor.name]
        e0 = lo // item
        w = acc.dtype.type(weight)
        name_hash = hash(tensor.name)
        pos = 0
        with self._scratch(acc.dtype) if weight != 1.0 else contextlib.nullcontext() as scratch:
            while pos < len(src):
                span = (e0 + pos) // _LOCK_SPAN
                stop = min(len(src), (span + 1) * _LOCK_SPAN - e0)
                with self._locks[(name_hash + span) % _N_LOCKS]:
                    for b in range(pos, stop, BLOCK):
                        n = min(BLOCK, stop - b)
                        dst = acc[e0 + b : e0 + b + n]
                        if scratch is None:
                            np.add(dst, src[b : b + n], out=dst, casting="unsafe")
                        else:
                            s = scratch[:n]
                            np.multiply(src[b : b + n], w, out=s, casting="unsafe")
                            np.add(dst, s, out=dst)
                pos = stop

    def add_weight(self, weight: float, params_type: str) -> None:
        if params_type == "DIFF":
            self.weight_diff += weight
        else:
            self.weight_full += weight

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """Blocks of the new global value of `tensor`, in its own dtype, in order.

        `read_global(e0, n)` returns elements [e0, e0+n) of the current global tensor (needed only when DIFF
        updates were folded)."""
        out_dtype = numpy_dtype(tensor.dtype)
        if tensor.dtype == "BOOL":  # carried unchanged from the global model
            if read_global is None:
                raise RuntimeError("a BOOL tensor is carried from the global model, which is not readable")
            for b in range(0, tensor.numel, BLOCK):
                yield np.array(read_global(b, min(BLOCK, tensor.numel - b)), copy=True)
            return
        self._ready[tensor.name].wait()
        acc = self.arrays[tensor.name]
        inv = acc.dtype.type(1.0 / self.weight)
        lo_hi = (np.iinfo(out_dtype).min, np.iinfo(out_dtype).max) if tensor.dtype in INT_DTYPES else None
        with self._scratch(acc.dtype) as scratch:
            for b in range(0, len(acc), BLOCK):
                n = min(BLOCK, len(acc) - b)
                s = scratch[:n]
                if self.weight_diff:
                    if read_global is None:
                        raise RuntimeError("DIFF updates were folded but the global model is not readable")
                    np.multiply(read_global(b, n), acc.dtype.type(self.weight_diff), out=s, casting="unsafe")
                    np.add(s, acc[b : b + n], out=s)
                else:
                    np.copyto(s, acc[b : b + n])
                s *= inv
                if lo_hi is not None:
                    np.rint(s, out=s)
                    np.clip(s, lo_hi[0], lo_hi[1], out=s)
                yield s.astype(out_dtype, copy=False) if out_dtype != s.dtype else s

    def checked(self, tensor: TensorInfo, blocks: Iterator[np.ndarray], round_: int) -> Iterator[np.ndarray]:
        """`blocks` of the finished average of `tensor`, each checked for NaN/Inf before it is written."""
        pos = 0
        for block in blocks:
            if tensor.dtype in _NONFINITE_BITS:
                f = block.astype(np.float32, copy=False) if block.dtype.kind == "V" or block.itemsize == 1 else block
                ok = np.isfinite(f)
                if not ok.all():
                    i = int(np.flatnonzero(~ok)[0])
                    raise ModelMismatchError(
                        f"round {round_}'s average of tensor {tensor.name!r} holds {f[i]} at element {pos + i} "
                        f"(flat index) although every update was finite: the weighted sum overflowed "
                        f"{self.arrays[tensor.name].dtype} (values near the dtype's limit); the round is not "
                        "written. Check the sites' training for divergence"
                    )
            pos += len(block)
            yield block


class DiskArrays:
    """The accumulator's arrays in one file in `directory` (`accumulator_dir`), mapped shared: the page cache holds
    what fits in memory and the kernel writes the rest back, so a model larger than the aggregator's memory can be
    averaged. The file is unlinked as soon as it is created (nothing is left behind, whatever ends the process), its
    blocks reserved (posix_fallocate: a full disk fails there, not as a SIGBUS in a fold), and zeroed by punching it
    out (MADV_REMOVE: no write of the model's size) and reserving again. Arrays start 8-aligned. A tmpfs folder
    saves no memory (its pages are memory)."""

    def __init__(self, directory: Path, sizes: dict[str, tuple[int, type]]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        offsets, end = {}, 0
        for name, (n, dt) in sizes.items():
            offsets[name] = end
            end += -(-n * np.dtype(dt).itemsize // 8) * 8
        fd, path = tempfile.mkstemp(prefix="fl-accumulator-", suffix=".bin", dir=directory)
        os.unlink(path)
        self.fd, self.nbytes = fd, end
        self._allocate()
        self.map = mmap.mmap(fd, max(end, 1), flags=mmap.MAP_SHARED)
        self.arrays: dict[str, np.ndarray] = {
            name: np.frombuffer(self.map, dt, count=n, offset=offsets[name]) for name, (n, dt) in sizes.items()
        }

    def _allocate(self) -> None:
        """The file's blocks, reserved: a full disk is an error here, not a SIGBUS at a fold's first touch."""
        try:
            os.posix_fallocate(self.fd, 0, max(self.nbytes, 1))
        except OSError as e:
            raise OSError(
                e.errno, f"the accumulator's file in accumulator_dir ({self.nbytes} bytes): {e.strerror}"
            ) from e

    def zero(self) -> None:
        try:
            self.map.madvise(mmap.MADV_REMOVE)
        except (AttributeError, OSError):  # a file system that cannot punch holes: write zeros
            for a in self.arrays.values():
                for b in range(0, len(a), BLOCK):
                    a[b : b + BLOCK] = 0
            return
        self._allocate()
