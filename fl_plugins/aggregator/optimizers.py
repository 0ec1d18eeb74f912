"""Server optimizers on the round's average: FedAvgM, FedAdam, FedYogi, FedAdagrad (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021), in the same bounded memory as FedAvg.

The round's counted updates are averaged exactly as FedAvg averages them (fedavg.py's `Accumulator`, folded as
they arrive); at the close the optimizer steps the global model x along the pseudo-gradient

    Δ = average(updates) - x     FULL updates: the average fedavg.py finalizes, minus x; DIFF updates: the
                                 weighted mean diff acc / W; both in one round: (acc - W_full x) / W

with the paper's rules (no bias correction, as in the paper; m starts at 0 and v at τ², Algorithm 2's
initialisation v_-1 = τ², so the first step is not divided by a v of zero):

    strategy     state  moments                                                new global model
    fedavgm      m      m = β m + Δ                                            x + η m  (η = 1, β = 0: FedAvg)
    fedadam      m, v   m = β1 m + (1 - β1) Δ;  v = β2 v + (1 - β2) Δ²           x + η m / (√v + τ)
    fedyogi      m, v   m as fedadam;  v = v - (1 - β2) Δ² sign(v - Δ²)          x + η m / (√v + τ)
    fedadagrad   m, v   m as fedadam;  v = v + Δ²                               x + η m / (√v + τ)

η is `server_lr` (default 1.0 for fedavgm, 0.01 for the adaptive ones), β and β1 `server_momentum` (0.9), β2
`beta2` (0.99), τ `tau` (1e-3); config.py declares them, `hyper_parameters` resolves the defaults and refuses a
β, β1 or β2 outside [0, 1) (ConfigError at start).

Which tensors: the floating-point ones (F32, F16, BF16, F64, float8) get the optimizer, computed in float32
(F64 tensors in float64) and cast to the tensor's dtype as fedavg.py casts its average. Integer and BOOL tensors
keep FedAvg's rules (fedavg.py: the rounded average; the global model's values).

Memory. Resident: fedavg.py's accumulator (float32, one element per model element) and a few blocks of scratch
(BLOCK elements each). The optimizer's state, one (fedavgm) or two (adaptive) float32 buffers with one element
per floating-point model element (`state_nbytes`), lives in files: `finalize` reads and writes it a block at a
time through numpy memmaps of that block only, so a few MiB of it are mapped at once (a map of the whole file
would leave every page it touched in the aggregator's RSS; store.py reads the model with pread for the same
reason). The files' pages sit in the page cache, which the kernel reclaims. Measured (benchmarks/round.py
--gib 0.25 --strategy fedadam, 2 sites, a loaded 2-core VM): the aggregator's peak RSS is 482 MiB with fedadam
and 495 MiB with fedavg (accumulator 256 MiB; state 512 MiB on disk). The price is time: a close writes the
new state as well as the model (three times the bytes for an adaptive strategy on a float32 model), 2.7-2.9 s
per round against 0.1-0.3 s for fedavg; profiled, most of it is dirtying the new state's pages, the rest
numpy's passes over the blocks. A window map per block was faster than pread/pwrite of the same blocks here
(0.5-0.7 s against 1.3-2.1 s for the step alone, 0.25 GiB).

On disk, double-buffered: the state after producing round R's global model is checkpointed with it,

    global/round-R/strategy/state.json   {"format", "strategy", "hyper_parameters", "step": R, "elements"}
    global/round-R/strategy/m.npy        float32[elements]: the floating-point tensors' elements, manifest order
    global/round-R/strategy/v.npy        (fedadam, fedyogi, fedadagrad)

At round R's close, `stage(global/round-R, round-(R+1).tmp)` says where the state is read from and where the
next one is written (nothing is updated in place); store.py makes the staging directory durable and renames it
with the model, so a crash never pairs a model with another round's state and redoes round R from round R's.
Round 0 holds no state: the first step starts from m = 0, v = τ². A start that trains on from round R > 0
resumes round R's state, which must be this strategy's with these hyper-parameters (strategy.check_resume, and
`stage` again: a ConfigError naming both and the fix); a round FedAvg made holds none, and a server optimizer
does not silently start afresh on it. FedAvg keeps no state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fl_plugins.aggregator.fedavg import BLOCK, Accumulator
from fl_plugins.aggregator.files import private_dir, private_opener, write_private
from fl_plugins.config import SETTINGS
from fl_plugins.errors import ConfigError, IntegrityError
from fl_plugins.wire.layout import FLOAT_DTYPES, TensorInfo, numpy_dtype

if TYPE_CHECKING:
    from fl_plugins.config import AggregatorConfig

STATE_DIR = "strategy"  # global/round-R/strategy/: the state after producing round R's model
STATE_FILE = "state.json"
STATE_FORMAT = "fl-plugins-strategy"
_STATE_DTYPE = np.dtype("<f4")


class FedAvg(Accumulator):
    """FedAvg (fedavg.py's Accumulator) as a strategy: no hyper-parameters and no state between rounds."""

    name: ClassVar[str] = "fedavg"
    buffers: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def hyper_parameters(cls, config: AggregatorConfig) -> dict[str, float]:
        """The strategy's hyper-parameters from `config` (defaults resolved), by setting name; ConfigError if
        one is out of its range."""
        return {}

    @classmethod
    def from_config(cls, config: AggregatorConfig, tensors: list[TensorInfo]) -> FedAvg:
        return cls(tensors, config.accumulator_dir)

    @property
    def state_nbytes(self) -> int:
        """The bytes of its state on disk (resident: a block at a time)."""
        return 0

    def stage(self, previous: Path, staging: Path) -> None:
        """FedAvg keeps no state."""


class ServerOptimizer(FedAvg):
    """The average folded by FedAvg, then one optimizer step per round; subclasses give `step`."""

    def __init__(self, tensors: list[TensorInfo], hyper: dict[str, float], directory: Path | None = None) -> None:
        super().__init__(tensors, directory)
        self.hyper = hyper
        self.offsets: dict[str, int] = {}  # a float tensor's first element in the state buffers
        self.elements = 0
        for t in tensors:
            if t.dtype in FLOAT_DTYPES:
                self.offsets[t.name] = self.elements
                self.elements += t.numel
        self._old: StateFiles | None = None  # where this close reads the state from (None: the initial state)
        self._new: StateFiles | None = None  # and writes the next one to

    @classmethod
    def from_config(cls, config: AggregatorConfig, tensors: list[TensorInfo]) -> ServerOptimizer:
        return cls(tensors, cls.hyper_parameters(config), config.accumulator_dir)

    @property
    def state_nbytes(self) -> int:
        return _STATE_DTYPE.itemsize * self.elements * len(self.buffers)

    def stage(self, previous: Path, staging: Path) -> None:
        """Before `finalize`: step from the state checkpointed with `previous` (global/round-R; none there: the
        initial state) into `staging` (round R+1's staging directory)."""
        self.wait_ready()
        old = read_state(previous)
        if old is not None:
            check_made_by(old, self.name, self.hyper, previous)
            if old.get("elements") != self.elements:
                raise IntegrityError(
                    f"{previous / STATE_DIR / STATE_FILE}: state of {old.get('elements')} elements, the model's "
                    f"floating-point tensors hold {self.elements}"
                )
        step = 0 if old is None else int(old["step"])
        self._old = None if old is None else StateFiles(previous / STATE_DIR, self.buffers, self.elements)
        self._new = StateFiles(staging / STATE_DIR, self.buffers, self.elements, create=True)
        meta: dict[str, Any] = {"format": STATE_FORMAT, "strategy": self.name, "hyper_parameters": self.hyper}
        meta |= {
            "step": step + 1,
            "elements": self.elements,
            "initial": dict(zip(self.buffers, self.initial(), strict=True)),
        }
        write_private(staging / STATE_DIR / STATE_FILE, json.dumps(meta, indent=1) + "\n")

    def initial(self) -> list[float]:
        """Each buffer's value before the first step."""
        raise NotImplementedError

    def step(self, delta: np.ndarray, state: list[np.ndarray], out: np.ndarray) -> None:
        """Update `state` (this round's moments, in place) from the pseudo-gradient `delta` (which it may
        overwrite) and write the step to add to the global model into `out`."""
        raise NotImplementedError

    def finalize(
        self, tensor: TensorInfo, read_global: Callable[[int, int], np.ndarray] | None
    ) -> Iterator[np.ndarray]:
        """Blocks of the new global value of `tensor`, in its own dtype; integer and BOOL tensors as FedAvg."""
        if tensor.name not in self.offsets:
            yield from super().finalize(tensor, read_global)
            return
        if read_global is None or self._new is None:
            raise RuntimeError("a server optimizer steps from the global model and its staged state (`stage`)")
        acc = self.arrays[tensor.name]
        ct = acc.dtype.type  # float32 (float64 for F64 tensors)
        inv, full = ct(1.0 / self.weight), ct(self.weight_full / self.weight)
        out_dtype = numpy_dtype(tensor.dtype)
        size = min(BLOCK, tensor.numel)
        x, delta, out, *state = (np.empty(size, ct) for _ in range(3 + len(self.buffers)))
        base = self.offsets[tensor.name]
        for b in range(0, tensor.numel, BLOCK):
            n = min(BLOCK, tensor.numel - b)
            xb, db, ob, sb = x[:n], delta[:n], out[:n], [s[:n] for s in state]
            np.copyto(xb, read_global(b, n), casting="unsafe")
            np.multiply(acc[b : b + n], inv, out=db)  # Δ = acc / W - (W_full / W) x: FedAvg's average minus x
            if full:  # for FULL updates, the mean diff for DIFF ones
                np.multiply(xb, full, out=ob)
                db -= ob
            self._read_state(base + b, sb)
            self.step(db, sb, ob)
            self._new.write(base + b, sb)
            ob += xb
            yield ob.astype(out_dtype, copy=False) if out_dtype != ob.dtype else ob

    def reset(self) -> None:
        super().reset()
        self._old = self._new = None  # a new round stages again: nothing is written where a round was published

    def _read_state(self, e0: int, state: list[np.ndarray]) -> None:
        if self._old is not None:
            self._old.read(e0, state)
            return
        for s, value in zip(state, self.initial(), strict=True):
            s.fill(value)


class FedAvgM(ServerOptimizer):
    """Server momentum: m = β m + Δ; x + η m."""

    name = "fedavgm"
    buffers = ("m",)

    @classmethod
    def hyper_parameters(cls, config: AggregatorConfig) -> dict[str, float]:
        lr = 1.0 if config.server_lr is None else float(config.server_lr)
        momentum = 0.9 if config.server_momentum is None else float(config.server_momentum)
        _below_one("server_momentum", momentum, cls.name)
        return {"server_lr": lr, "server_momentum": momentum}

    def initial(self) -> list[float]:
        return [0.0]

    def step(self, delta: np.ndarray, state: list[np.ndarray], out: np.ndarray) -> None:
        (m,) = state
        ct = m.dtype.type
        m *= ct(self.hyper["server_momentum"])
        m += delta
        np.multiply(m, ct(self.hyper["server_lr"]), out=out)


class Adaptive(ServerOptimizer):
    """The adaptive ones: m = β1 m + (1 - β1) Δ, v as `second_moment` says; x + η m / (√v + τ)."""

    buffers = ("m", "v")

    @classmethod
    def hyper_parameters(cls, config: AggregatorConfig) -> dict[str, float]:
        lr = 0.01 if config.server_lr is None else float(config.server_lr)
        beta1 = 0.9 if config.server_momentum is None else float(config.server_momentum)
        _below_one("server_momentum", beta1, cls.name)
        _below_one("beta2", config.beta2, cls.name)
        return {"server_lr": lr, "server_momentum": beta1, "beta2": float(config.beta2), "tau": float(config.tau)}

    def initial(self) -> list[float]:
        return [0.0, self.hyper["tau"] ** 2]  # v_-1 = τ² (the paper's Algorithm 2)

    def step(self, delta: np.ndarray, state: list[np.ndarray], out: np.ndarray) -> None:
        m, v = state
        ct, h = m.dtype.type, self.hyper
        m *= ct(h["server_momentum"])
        np.multiply(delta, ct(1.0 - h["server_momentum"]), out=out)
        m += out
        np.square(delta, out=delta)
        self.second_moment(v, delta, out)
        np.sqrt(v, out=out)
        out += ct(h["tau"])
        np.divide(m, out, out=out)
        out *= ct(h["server_lr"])

    def second_moment(self, v: np.ndarray, delta2: np.ndarray, scratch: np.ndarray) -> None:
        """v (in place) from Δ² (`delta2`, which it may overwrite)."""
        raise NotImplementedError


class FedAdam(Adaptive):
    """v = β2 v + (1 - β2) Δ²."""

    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta2: np.ndarray, scratch: np.ndarray) -> None:
        ct = v.dtype.type
        v *= ct(self.hyper["beta2"])
        delta2 *= ct(1.0 - self.hyper["beta2"])
        v += delta2


class FedYogi(Adaptive):
    """v = v - (1 - β2) Δ² sign(v - Δ²): v moves toward Δ² by a step that does not grow with v."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta2: np.ndarray, scratch: np.ndarray) -> None:
        np.subtract(v, delta2, out=scratch)
        np.sign(scratch, out=scratch)
        scratch *= delta2
        scratch *= v.dtype.type(1.0 - self.hyper["beta2"])
        v -= scratch


class FedAdagrad(Adaptive):
    """v = v + Δ² (β2 is not used)."""

    name = "fedadagrad"

    def second_moment(self, v: np.ndarray, delta2: np.ndarray, scratch: np.ndarray) -> None:
        v += delta2


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {c.name: c for c in (FedAvgM, FedAdam, FedYogi, FedAdagrad)}


def _below_one(setting: str, value: float, strategy: str) -> None:
    if not 0 <= value < 1:
        raise ConfigError(
            f"{SETTINGS[setting].keyword_label()} must be a number in [0, 1) for {strategy} (got {value})"
        )


class StateFiles:
    """One step's state buffers in `directory` (m.npy, v.npy: float32 .npy files of `elements`), read and written
    a window at a time through a memmap of that window only. `create`: new files (sparse until written)."""

    def __init__(self, directory: Path, names: tuple[str, ...], elements: int, *, create: bool = False) -> None:
        self.paths = [directory / f"{name}.npy" for name in names]
        self.offsets: list[int] = []  # each file's data offset (after the .npy header)
        if create:
            private_dir(directory)
        for path in self.paths:
            self.offsets.append(_create(path, elements) if create else _open(path, elements))

    def read(self, e0: int, out: list[np.ndarray]) -> None:
        """Elements [e0, e0 + n) of each buffer into `out` (n = their length)."""
        for path, offset, o in zip(self.paths, self.offsets, out, strict=True):
            window = np.memmap(path, _STATE_DTYPE, "r", offset + e0 * _STATE_DTYPE.itemsize, (len(o),))
            np.copyto(o, window)
            del window  # unmapped: its pages leave the aggregator's RSS

    def write(self, e0: int, arrays: list[np.ndarray]) -> None:
        for path, offset, a in zip(self.paths, self.offsets, arrays, strict=True):
            window = np.memmap(path, _STATE_DTYPE, "r+", offset + e0 * _STATE_DTYPE.itemsize, (len(a),))
            np.copyto(window, a, casting="same_kind")
            del window  # its dirty pages stay in the page cache; store.py's sync fsyncs the file


def _create(path: Path, elements: int) -> int:
    header = {"descr": np.lib.format.dtype_to_descr(_STATE_DTYPE), "fortran_order": False, "shape": (elements,)}
    with open(path, "wb", opener=private_opener) as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        f.truncate(offset + elements * _STATE_DTYPE.itemsize)
    return offset


def _open(path: Path, elements: int) -> int:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            offset = f.tell()
            size = f.seek(0, 2)
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: the optimizer state cannot be read ({e})") from e
    if shape != (elements,) or dtype != _STATE_DTYPE or size != offset + elements * _STATE_DTYPE.itemsize:
        raise IntegrityError(f"{path}: {dtype}{list(shape)} in {size} bytes, expected float32[{elements}]")
    return offset


def read_state(directory: Path) -> dict[str, Any] | None:
    """The state.json checkpointed with `directory` (global/round-R), None if it holds none."""
    path = directory / STATE_DIR / STATE_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: not a strategy state file ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or not isinstance(meta.get("step"), int):
        raise IntegrityError(f"{path}: not a strategy state file (format {STATE_FORMAT!r} with a step)")
    return meta


def check_made_by(meta: dict[str, Any] | None, name: str, hyper: dict[str, float], directory: Path) -> None:
    """ConfigError unless the state `meta` checkpointed with `directory` (None: none, FedAvg's) was made by the
    strategy `name` with `hyper`: a restart resumes the optimizer it stopped, with its hyper-parameters."""
    made = ("fedavg", {}) if meta is None else (meta.get("strategy"), meta.get("hyper_parameters"))
    if made == (name, hyper):
        return

    def settings(strategy: Any, h: Any, recipe: bool = False) -> str:
        pairs = [("strategy", strategy), *(h.items() if isinstance(h, dict) else [])]
        if recipe:
            return ", ".join(f"{SETTINGS[k].key}: {v}" for k, v in pairs if k in SETTINGS)
        return " ".join(f"{SETTINGS[k].flag} {v}" for k, v in pairs if k in SETTINGS)

    kept = "no optimizer state" if meta is None else "its optimizer state"
    recipe = settings(made[0], made[1], recipe=True)
    raise ConfigError(
        f"{directory} was made by {made[0]} ({settings(*made)}) and holds {kept}; this start asks for {name} "
        f"({settings(name, hyper)}): restart with `{settings(*made)}` (in a recipe: {recipe}) to resume the run "
        "as it was, or pass a new --run-dir to train with the new strategy from the start"
    )
