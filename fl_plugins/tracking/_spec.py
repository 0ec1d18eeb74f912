"""The recipe's `tracking:` key: which trackers, with which options, and whether their libraries are installed."""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fl_plugins.errors import ConfigError, MissingDependencyError

# tracker -> its options (all optional) and what each means
TRACKERS: dict[str, dict[str, str]] = {
    "mlflow": {
        "tracking_uri": "where MLflow stores runs (default: sqlite in RUN_DIR/mlruns)",
        "experiment": "the MLflow experiment (default: the job's name)",
        "run_name": "the parent run's name (default: the job's name)",
    },
    "tensorboard": {"log_dir": "where the event files go (default: RUN_DIR/tensorboard; relative to RUN_DIR)"},
    "wandb": {
        "project": "the W&B project (default: the job's name)",
        "entity": "the W&B entity (team or user)",
        "name": "the W&B run's name (default: the run directory's name)",
        "group": "the W&B run group",
        "tags": "a list of W&B tags",
    },
}
MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the library it needs


@dataclass(frozen=True)
class TrackerSpec:
    """One tracker of the recipe's `tracking:` key: its name and options (see TRACKERS)."""

    name: str  # "mlflow", "tensorboard" or "wandb"
    options: dict[str, Any] = field(default_factory=dict)


def parse_tracking(value: Any, *, where: str = "", key: str = "tracking") -> tuple[TrackerSpec, ...]:
    """Validate a `tracking:` value: a name or comma-separated names (`mlflow,tensorboard`), a list of names
    (`[mlflow, tensorboard]`) or a mapping of name to options (`{mlflow: {}, wandb: {project: x}}`); None or []
    means no tracking. `where` prefixes each error (e.g. "recipes/x.yaml: "), `key` is the key path shown in it."""
    names = sorted(TRACKERS)
    if value is None:
        return ()
    items: list[tuple[str, Any, str]] = []
    if isinstance(value, str):  # "mlflow" or "mlflow,tensorboard" (the CLI's --tracking)
        items = [(v.strip(), None, key) for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise ConfigError(
                    f"{where}`{key}[{i}]` must be a tracker name, one of {', '.join(names)} (got {v!r}); "
                    f"options go in a mapping: `{key}: {{wandb: {{project: x}}}}`"
                )
            items.append((v, None, f"{key}[{i}]"))
    elif isinstance(value, dict):
        items = [(k, v, f"{key}.{k}") for k, v in value.items()]
    else:
        raise ConfigError(
            f"{where}`{key}` must be a tracker name, a list of them or a mapping of name to options, "
            f"e.g. `{key}: [mlflow, tensorboard]` (got {value!r})"
        )
    out: list[TrackerSpec] = []
    for name, opts, path in items:
        name_s = str(name).strip().lower()
        if name_s not in TRACKERS:
            close = difflib.get_close_matches(name_s, names, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"{where}`{path}` must be one of {', '.join(names)} (got {name!r}){hint}")
        if any(s.name == name_s for s in out):
            raise ConfigError(f"{where}`{key}` names {name_s} twice")
        out.append(TrackerSpec(name_s, _options(name_s, opts, where, f"{key}.{name_s}")))
    return tuple(out)


def _options(name: str, opts: Any, where: str, path: str) -> dict[str, Any]:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise ConfigError(
            f"{where}`{path}` must be a mapping of options ({', '.join(TRACKERS[name])}) or empty (got {opts!r})"
        )
    known = list(TRACKERS[name])
    out: dict[str, Any] = {}
    for k, v in opts.items():
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)
            hint = f"; did you mean `{path}.{close[0]}`?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{where}unknown key `{path}.{k}`{hint}")
        if k == "tags":
            if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
                raise ConfigError(f"{where}`{path}.tags` must be a list of strings (got {v!r})")
            out[k] = tuple(v)
        elif v is not None:
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{where}`{path}.{k}` must be a non-empty string (got {v!r})")
            out[k] = v.strip()
    return out


def check_installed(specs: Iterable[TrackerSpec]) -> None:
    """Raise MissingDependencyError naming the install command for the first tracker whose library is missing."""
    for s in specs:
        mod = MODULES[s.name]
        if not installed(mod) and not (s.name == "tensorboard" and installed("tensorboardX")):
            raise MissingDependencyError(
                f"tracking with {s.name} needs the {mod!r} package, which is not installed; install it with: "
                f"pip install 'fl-plugins[tracking]' (or: pip install {mod})"
            )


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
