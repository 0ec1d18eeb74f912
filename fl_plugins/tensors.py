"""Where tensors become shard bytes and back, without whole-model copies.

Sending: each tensor's own memory is exposed as a byte memoryview (CPU, contiguous: zero-copy; on a GPU or
non-contiguous: that one tensor is copied, one at a time). Receiving: tensors are allocated empty in their
final dtype and shape, and chunks are copied straight into them. torch is imported only when the caller's
params are torch tensors or the params format asks for it; numpy-only sites never load it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.errors import ConfigError
from fl_plugins.wire.layout import TensorInfo, dtype_of_numpy, numpy_dtype

PARAMS_FORMATS = ("torch", "numpy")

_TORCH_OF = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def resolve_params_format(fmt: str | None) -> str:
    """`fmt`, else $FL_PARAMS_FORMAT, else torch if the script has imported torch, else numpy."""
    fmt = fmt or os.environ.get("FL_PARAMS_FORMAT") or ("torch" if "torch" in sys.modules else "numpy")
    fmt = fmt.lower()
    if fmt in ("pytorch", "pt"):
        fmt = "torch"
    if fmt not in PARAMS_FORMATS:
        raise ConfigError(f"params_format must be one of {PARAMS_FORMATS} (got {fmt!r})")
    return fmt


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def dtype_name(x: Any) -> str:
    if _is_torch(x):
        name = str(x.dtype).removeprefix("torch.")
        for k, v in _TORCH_OF.items():
            if v == name:
                return k
        raise ConfigError(f"torch dtype {x.dtype} cannot travel as safetensors; cast the tensor first")
    return dtype_of_numpy(np.asarray(x).dtype)


def describe(params: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for name, x in params.items():
        if not isinstance(name, str):
            raise ConfigError(f"parameter names must be strings (got {name!r})")
        if not _is_torch(x) and not isinstance(x, np.ndarray):
            x = np.asarray(x)
        out.append((name, dtype_name(x), tuple(int(d) for d in x.shape)))
    return out


class ByteViews:
    """`get(name)` returns the bytes of params[name] as a memoryview; keeps one converted tensor cached."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params
        self._cache: tuple[str, Any] | None = None

    def get(self, name: str) -> memoryview:
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        mv = byte_view(self.params[name])
        self._cache = (name, mv)
        return mv

    def clear(self) -> None:
        """Drop the cached conversion (a CPU or contiguous copy of a GPU or strided tensor)."""
        self._cache = None


def byte_view(x: Any) -> memoryview:
    if _is_torch(x):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
    a = np.ascontiguousarray(x)
    return a.reshape(-1).view(np.uint8).data.cast("B")


def allocate(
    tensors: list[TensorInfo], fmt: str, into: Mapping[str, Any] | None = None, pool: Any = None
) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Tensors (torch or numpy) for `tensors`, and a writable byte view of each.

    A tensor of `into` with the same name, dtype and shape (CPU, contiguous, of the requested format) is
    reused: chunks are written straight into its storage, so a round's download touches no fresh memory
    (first touch of fresh pages runs at 0.5-3 GB/s here, below the wire; benchmarks/transfer.py). Others are
    allocated empty; with `pool` (client/buffers.py), a large one is made from a map of an earlier round that
    nothing holds any more."""
    params: dict[str, Any] = {}
    views: dict[str, memoryview] = {}
    if fmt == "torch":
        import torch

        for t in tensors:
            x = _reusable(into, t, fmt)
            if x is None:
                dtype = getattr(torch, _TORCH_OF[t.dtype])
                big = pool is not None and t.nbytes >= pool.MIN_BYTES
                x = _from_map(pool, t, dtype, torch.frombuffer) if big else torch.empty(t.shape, dtype=dtype)
            params[t.name] = x
            views[t.name] = memoryview(x.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")
    else:
        for t in tensors:
            a = _reusable(into, t, fmt)
            if a is None:
                big = pool is not None and t.nbytes >= pool.MIN_BYTES
                dt = numpy_dtype(t.dtype)
                a = _from_map(pool, t, dt, np.frombuffer) if big else np.empty(t.shape, dt)
            params[t.name] = a
            views[t.name] = memoryview(a.reshape(-1).view(np.uint8)).cast("B")
    return params, views


def _from_map(pool: Any, t: TensorInfo, dtype: Any, frombuffer: Any) -> Any:
    """A tensor of `t`'s shape over a map the pool lends (it keeps the map alive, and so do its views)."""
    m = pool.POOL.take(t.nbytes)
    return frombuffer(m, dtype=dtype, count=math.prod(t.shape)).reshape(t.shape)


def _reusable(into: Mapping[str, Any] | None, t: TensorInfo, fmt: str) -> Any:
    x = None if into is None else into.get(t.name)
    if x is None or _is_torch(x) != (fmt == "torch") or tuple(x.shape) != tuple(t.shape):
        return None
    if _is_torch(x):
        ok = x.device.type == "cpu" and x.is_contiguous()
    else:
        ok = isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable
    return x if ok and dtype_name(x) == t.dtype else None


def read_folder(folder: Path, fmt: str) -> dict[str, Any]:
    """Every tensor of the safetensors files in `folder` (a checkpoint folder: global/round-R, a swarm site's
    final/), as torch tensors or numpy arrays (`fmt`)."""
    if fmt == "torch":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file  # type: ignore[assignment]
    out: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out
