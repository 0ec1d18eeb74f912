"""The aggregator's settings: one frozen-in-spirit dataclass whose fields the CLI flags and the recipe keys map
onto (fl_plugins/cli.py, fl_plugins/recipe.py). Torch-free and gRPC-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, short_repr


def _check_number(name: str, value: Any, *, low: float, integer: bool = False, strict: bool = False) -> None:
    """`value` must be a number >= low (> low when `strict`), an int when `integer`: else a ConfigError naming
    the setting (and its flag), the rule and the value."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and (integer or math.isfinite(value))
    if not ok or (value <= low if strict else value < low):
        rule = f"{'>' if strict else '>='} {low:g}"
        raise ConfigError(f"`{name}` (--{name.replace('_', '-')}) must be {kind} {rule} (got {short_repr(value)})")


@dataclass
class AggregatorConfig:
    run_dir: Path
    rounds: int
    min_sites: int = 1
    initial_model: Path | None = None
    round_deadline: float | None = None  # seconds; None: wait for every site that took the task
    min_updates: int = 1  # at the deadline, close the round only with at least this many updates
    idle_timeout: float = 60.0  # a transfer that moves no bytes for this long is cancelled
    site_timeout: float = 60.0  # a site silent (no heartbeat, no call) for this long has left the round
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    job_id: str = ""  # "": the run's (run.json), else the recipe's name, else a new random id; kept on restart
    linger: float = 5.0  # after the last round, keep answering END this long so sites learn the job is over
    reject_nonfinite: bool = True  # refuse an update holding NaN or Inf (checked on each chunk as it arrives)
    max_attempts: int = 3  # attempts a round may take to collect its updates (see the module docstring)
    on_attempts_exhausted: str = "fail"  # then: "fail" the job, or "close" the round with the updates it has
    # the recipe the job runs ({"path", "job"}: fl_plugins.recipe.Recipe.identity()), kept in RUN_DIR/run.json: a
    # restart with another recipe is refused; None: no recipe (then `job_id`, else a random id, names the job)
    recipe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        _check_number("rounds", self.rounds, low=1, integer=True)
        _check_number("min_sites", self.min_sites, low=1, integer=True)
        _check_number("min_updates", self.min_updates, low=1, integer=True)
        _check_number("max_attempts", self.max_attempts, low=1, integer=True)
        if self.round_deadline is not None:
            _check_number("round_deadline", self.round_deadline, low=0, strict=True)
        _check_number("idle_timeout", self.idle_timeout, low=0, strict=True)
        _check_number("site_timeout", self.site_timeout, low=0, strict=True)
        _check_number("linger", self.linger, low=0)
        _check_number("chunk_bytes", self.chunk_bytes, low=64 << 10, integer=True)
        if self.chunk_bytes % 8 or not 64 << 10 <= self.chunk_bytes <= 64 << 20:
            raise ConfigError(f"`chunk_bytes` must be a multiple of 8 in 64 KiB..64 MiB (got {self.chunk_bytes})")
        if self.on_attempts_exhausted not in ("fail", "close"):
            raise ConfigError("`on_attempts_exhausted` must be 'fail' or 'close' (got "
                              f"{short_repr(self.on_attempts_exhausted)})")  # fmt: skip
        if not isinstance(self.reject_nonfinite, bool):
            raise ConfigError(f"`reject_nonfinite` must be true or false (got {short_repr(self.reject_nonfinite)})")
        if not isinstance(self.job_id, str) or len(self.job_id) > 128:
            raise ConfigError(f"`job_id` (--job-id) must be a string of at most 128 characters "
                              f"(got {short_repr(self.job_id)})")  # fmt: skip
