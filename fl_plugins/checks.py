"""The checks a setting's value passes (config.py's `Setting.check`): each returns the value or raises `Invalid`
saying what must hold, and parses the flag's text. Torch-free and gRPC-free."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fl_plugins.wire.limits import finite_float


class Invalid(ValueError):
    """A value breaks a check; the message says what must hold ("must be an integer >= 1")."""


class Check(Protocol):
    """A setting's rule: `check(value)` returns the value (a number from a recipe as float) or raises Invalid;
    `parse` turns the flag's text into the value's type (argparse's `type=`)."""

    def check(self, value: Any) -> Any: ...

    def parse(self, text: str) -> Any: ...


@dataclass(frozen=True)
class Integer:
    """An int (not a bool) in low..high."""

    low: int
    high: int | None = None

    def check(self, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < self.low or (self.high is not None and v > self.high):
            span = f">= {self.low}" if self.high is None else f"in {self.low}..{self.high}"
            raise Invalid(f"must be an integer {span}")
        return v

    def parse(self, text: str) -> int:
        return int(text)


@dataclass(frozen=True)
class Number:
    """A finite int or float above `low` (or at it, unless `strict`)."""

    low: float
    strict: bool = False  # > low, else >= low

    def check(self, v: Any) -> float:
        if finite_float(v) is None or (v <= self.low if self.strict else v < self.low):
            raise Invalid(f"must be a number {'>' if self.strict else '>='} {self.low:g}")
        return float(v)

    def parse(self, text: str) -> float:
        return float(text)


@dataclass(frozen=True)
class ChunkSize:
    """Bytes per chunk message: a whole number of float64 values, 64 KiB..64 MiB (gRPC's message cap)."""

    def check(self, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v % 8 or not 64 << 10 <= v <= 64 << 20:
            raise Invalid("must be a multiple of 8 bytes in 64 KiB..64 MiB")
        return v

    def parse(self, text: str) -> int:
        return int(text)


@dataclass(frozen=True)
class Choice:
    """One of `options` (on the command line, argparse's `choices`)."""

    options: tuple[str, ...]

    def check(self, v: Any) -> str:
        if v not in self.options:
            quoted = [repr(o) for o in self.options]
            either = " or ".join(quoted) if len(quoted) == 2 else f"one of {', '.join(quoted)}"
            raise Invalid(f"must be {either}")
        return v

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class Boolean:
    """True or false (on the command line, a switch that turns the default over: fl_plugins/cli/server.py)."""

    def check(self, v: Any) -> bool:
        if not isinstance(v, bool):
            raise Invalid("must be true or false")
        return v

    def parse(self, text: str) -> bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"not true or false: {text!r}")
        return text.lower() == "true"


@dataclass(frozen=True)
class Text:
    """A string of at most `max_len` characters."""

    max_len: int

    def check(self, v: Any) -> str:
        if not isinstance(v, str) or len(v) > self.max_len:
            raise Invalid(f"must be a string of at most {self.max_len} characters")
        return v

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class PathValue:
    """A file or folder (a recipe's is relative to the recipe's folder and must exist: fl_plugins/recipe.py)."""

    def check(self, v: Any) -> Any:
        if not isinstance(v, (str, os.PathLike)):
            raise Invalid("must be a path")
        return v

    def parse(self, text: str) -> Path | str:
        return text if "://" in text else Path(text)  # (a run directory's object-store URL: aggregator/remote.py)


@dataclass(frozen=True)
class Folder(PathValue):
    """An existing folder on this machine (`serve_model`: the model folder the aggregator serves its sites)."""

    def check(self, v: Any) -> Any:
        if not isinstance(v, (str, os.PathLike)) or not Path(v).is_dir():
            raise Invalid("must be an existing folder on the aggregator's machine (a Hugging Face model folder)")
        return Path(v)


STRATEGIES = (  # strategy.py's
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "scaffold",
    "hetlora",
    "flexlora",
)
COMPRESSIONS = ("none", "bf16", "int8", "nf4")  # transfer compression: none, or one of wire/quantize.py's ENCODINGS


@dataclass(frozen=True)
class Workflow:
    """The job's workflows, in turn: a training one (fedavg or cyclic) and/or cross-site-eval, or evaluate alone;
    as text ("fedavg,cross-site-eval") or a list. The value is the text, normalised."""

    def check(self, v: Any) -> str:
        names = v.split(",") if isinstance(v, str) else v if isinstance(v, (list, tuple)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise Invalid(self.must)
        names = [n.strip() for n in names]
        ok = names in (["evaluate"], ["cross-site-eval"], ["swarm"]) or (
            names[0] in ("fedavg", "cyclic") and names[1:] in ([], ["cross-site-eval"])
        )
        if not ok:
            raise Invalid(self.must)
        return ",".join(names)

    must = (
        "must be fedavg or cyclic, either followed by cross-site-eval (`fedavg,cross-site-eval`), or "
        "cross-site-eval, evaluate or swarm alone"
    )

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class SampleSize:
    """Sites per round: a fraction in (0, 1), or a whole number of sites >= 1."""

    def check(self, v: Any) -> float:
        ok = finite_float(v) is not None and not isinstance(v, bool) and (0 < v < 1 or (v >= 1 and v == int(v)))
        if not ok:
            raise Invalid("must be a fraction of the sites in (0, 1) or a whole number of sites >= 1")
        return float(v)

    def parse(self, text: str) -> float:
        return float(text)
