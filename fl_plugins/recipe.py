"""Recipes: the YAML file `fl-plugins run` reads, validated on load into one dataclass per concern.

    name: lightning-demo                      # optional; default: the file's stem
    script: ../examples/client_api_train.py   # required; relative to the recipe file; must exist
    sites: 3                                  # a count (site-1..site-N) or a list of names (or, with a `task:`,
                                              # of {name: site-1, data: PATH, peft: {r: 4, alpha: 8}})
    rounds: 5                                 # required, >= 1
    min_sites: 3                              # sites needed to start a round; default: all of them
    initial_model: null                       # a .safetensors file or HF model folder, relative to the recipe
    round_deadline: null                      # seconds; close a round with the updates it has
    args: ["--epochs", "1"]                   # passed to every site's script
    site_args: {site-1: ["--shard", "0"]}     # extra arguments for one site, after `args`
    env: {}                                   # extra environment variables for every site
    tracking: [mlflow, tensorboard]           # stream the run to trackers; default: none (fl_plugins/tracking/)
    backend: process                          # where the sites run: process, or {type: ray, ...} (backends/spec.py)
    aggregation: {min_updates: 1, reject_nonfinite: true, site_timeout: 60,   # FedAvg's round rules
                  max_attempts: 3, on_attempts_exhausted: fail}
    transfer: {chunk_mib: 4, idle_timeout: 60}                                 # how weights travel

The aggregator's keys (`rounds` ... `transfer`) are declared, with their defaults and checks, next to the
settings they set in fl_plugins/config.py; `min_sites` and `aggregation.min_updates` may not exceed the sites, and
an explicit `null` is the same as leaving a key out.

Instead of `script:`, a recipe may name a built-in Hugging Face task (SFT / PEFT), `task: {type: ..., model: ...,
data: ...}`: every site then runs `python -m fl_plugins.tasks RECIPE`; the section is validated by
fl_plugins/tasks/spec.py (torch-free).

`tracking:` names the experiment trackers the run's records stream to, in the run directory: `mlflow`,
`tensorboard`, `wandb` (offline), as a list or as a mapping of name to options
(`tracking: {mlflow: {experiment: x}, wandb: {project: y}}`; fl_plugins/tracking/ lists them). Default: none,
so a run starts without importing any tracker.

Every error names the file, the key path, what must hold and what was got, e.g.
``recipes/x.yaml: `rounds` must be an integer >= 1 (got 0)``; an unknown key is an error with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins._config import Checker, load_yaml
from fl_plugins.backends.spec import BackendSpec, parse_backend
from fl_plugins.config import SETTINGS, AggregatorConfig, Integer, Invalid, PathValue, Setting
from fl_plugins.errors import ConfigError
from fl_plugins.tracking import TrackerSpec, parse_tracking

RUNNER_ENV = ("FL_SERVER", "FL_SITE")  # set by the runner for each site; a recipe may not override them
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ScriptSpec:
    """What every site runs: `python PATH *args`."""

    path: Path  # absolute path of the site script (the recipe's `script:` resolved against the recipe's folder)
    args: tuple[str, ...] = ()  # arguments passed to every site's script
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables for every site


@dataclass(frozen=True)
class SiteSpec:
    """One site: its name (FL_SITE), the extra arguments only it gets, and (a built-in `task` only) its own data
    and LoRA rank."""

    name: str  # the site's name, exported as FL_SITE; 1-128 characters, no path separators
    args: tuple[str, ...] = ()  # appended after ScriptSpec.args for this site only
    data: str | None = None  # its own data (an absolute path; tasks/datafiles.py): None takes a share of task.data
    peft: dict[str, int] = field(default_factory=dict)  # its LoRA override: {"r": 4, "alpha": 8} (either or both)


@dataclass(frozen=True)
class FederationSpec:
    """The aggregator's side of the job: the settings the recipe gives, checked, by AggregatorConfig's field names.
    An attribute reads the recipe's value, else the setting's default (`fed.min_updates`: the recipe's
    `aggregation.min_updates`, else 1); `min_sites` is always there (default: all the recipe's sites)."""

    values: Mapping[str, Any]  # e.g. {"rounds": 5, "min_sites": 3, "chunk_bytes": 1 << 19}

    def __getattr__(self, name: str) -> Any:
        setting = SETTINGS.get(name)
        if setting is None or setting.key is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.values.get(name, setting.default)

    def aggregator_config(self, run_dir: Path, **kw: Any) -> AggregatorConfig:
        """The AggregatorConfig these settings make (`fl-plugins run`); `kw` sets fields no recipe key sets."""
        return AggregatorConfig(run_dir=run_dir, **{**self.values, **kw})


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with `load_recipe(path)`."""

    name: str  # a name for the job (default: the recipe file's stem)
    source: Path  # the recipe file it was loaded from
    script: ScriptSpec
    sites: tuple[SiteSpec, ...]
    federation: FederationSpec
    task: Any = None  # fl_plugins.tasks.spec.TaskSpec when the recipe names a built-in task instead of a script
    tracking: tuple[TrackerSpec, ...] = ()  # the trackers the run streams to (`tracking:`); () for none
    backend: BackendSpec = BackendSpec()  # where `fl-plugins run` runs the sites (may change between restarts)

    def identity(self) -> dict[str, Any]:
        """What makes this recipe's job this job, kept in the run directory's run.json (store.py): its name,
        what the sites run (`script` and `args`, or `task`), `env`, and the sites with their `site_args`, their own
        `data` paths and LoRA overrides. A restart whose recipe differs there is refused; `rounds`, `min_sites`,
        `round_deadline`, `aggregation`, `transfer` and `tracking` may change between restarts, and `initial_model`
        is compared by content (a site's data file is compared by its path only)."""
        job: dict[str, Any] = {"name": self.name}
        if self.task is None:
            job["script"] = os.path.relpath(self.script.path, self.source.resolve().parent)
            job["args"] = list(self.script.args)
        else:
            job["task"] = json.loads(json.dumps(dataclasses.asdict(self.task), default=str))
        job["env"] = dict(sorted(self.script.env.items()))
        job["sites"] = [s.name for s in self.sites]
        job["site_args"] = {s.name: list(s.args) for s in self.sites if s.args}
        folder = self.source.resolve().parent
        if any(s.data for s in self.sites):  # (left out when no site has any: older run.json files stay equal)
            job["site_data"] = {s.name: os.path.relpath(s.data, folder) for s in self.sites if s.data}
        if any(s.peft for s in self.sites):
            job["site_peft"] = {s.name: dict(sorted(s.peft.items())) for s in self.sites if s.peft}
        return {"path": str(self.source), "job": job}


# the aggregator's keys, declared in config.py: {"rounds": its Setting, ..., "aggregation.min_updates": ...}
_RECIPE_KEYS = {s.key: s for s in SETTINGS.values() if s.key is not None}
_SECTIONS = {  # {"aggregation": ("min_updates", ...), "transfer": ("idle_timeout", "chunk_mib")}
    section: tuple(k.removeprefix(f"{section}.") for k in _RECIPE_KEYS if k.startswith(f"{section}."))
    for section in ("aggregation", "transfer", "workflow", "strategy")
}
_FEDERATION_KEYS = tuple(dict.fromkeys(k.split(".")[0] for k in _RECIPE_KEYS))  # rounds, ..., aggregation, transfer
_KEYS = ("name", "script", "task", "sites", *_FEDERATION_KEYS, "args", "site_args", "env", "tracking", "backend")
_AT_MOST_SITES = ("min_sites", "min_updates")  # a recipe knows its sites: these may not exceed them
TASK_SCRIPT = Path(__file__).resolve().parent / "tasks" / "__main__.py"


class _Checker(Checker):
    def strings(self, key: str, v: Any) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise self.fail(key, 'must be a list of strings, e.g. ["--epochs", "1"]', v)
        out = []
        for i, a in enumerate(v):
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise self.fail(f"{key}[{i}]", "must be a string (quote it in YAML)", a)
            out.append(str(a))
        return tuple(out)

    def path(self, key: str, v: Any, *, file: bool) -> Path:
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, "must be a path relative to the recipe file", v)
        p = Path(v).expanduser()
        p = (p if p.is_absolute() else self.source.resolve().parent / p).resolve()
        if not p.exists():
            raise ConfigError(
                f"{self.source}: `{key}`: {v!r} does not exist (looked for {p}); the path is relative to the "
                "recipe file's folder"
            )
        if file and not p.is_file():
            raise ConfigError(f"{self.source}: `{key}`: {p} is not a file")
        return p


def _site_name_ok(name: Any) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= 128 and not any(c in name for c in "/\\\0")


def parse_recipe(data: Any, source: str | Path) -> Recipe:
    """Validate the parsed YAML `data` of the recipe at `source` (paths resolve against its folder)."""
    source = Path(source)
    c = _Checker(source)
    _check_keys(c, data)
    name = data.get("name", source.stem)
    if not isinstance(name, str) or not name.strip():
        raise c.fail("name", "must be a non-empty string", name)
    sites = _sites(c, data)
    env = _env(c, data)
    task = None
    if data.get("task") is not None:
        from fl_plugins.tasks.spec import parse_task

        task = parse_task(data["task"], source, {s.name: s.data for s in sites})
        _check_site_peft(c, sites, task.peft.method)
        script = ScriptSpec(TASK_SCRIPT, ("--recipe", str(source.resolve())), env)
    else:
        for s in sites:
            if s.data or s.peft:
                raise ConfigError(
                    f"{source}: site {s.name!r}: `{'data' if s.data else 'peft'}` applies to a built-in `task`; a "
                    "`script` reads its own data and settings (give them to one site with `site_args`)"
                )
        args = c.strings("args", data.get("args") or [])
        script = ScriptSpec(c.path("script", data["script"], file=True), args, env)
    federation = _federation(c, data, len(sites))
    if task is not None:
        _check_site_ranks(c, sites, task, federation.strategy)
    if task is not None and task.model.source == "aggregator":  # the aggregator serves the sites' model folder
        federation = FederationSpec({**federation.values, "serve_model": Path(task.model.value)})
    tracking = parse_tracking(data.get("tracking"), where=f"{source}: ")
    backend = parse_backend(c, data.get("backend"))
    return Recipe(name.strip(), source, script, sites, federation, task, tracking, backend)


def _check_keys(c: _Checker, data: Any) -> None:
    """`data` is a mapping of known keys, with a `script` or a `task` (not both), `sites` and `rounds`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{c.source}: a recipe must be a mapping of keys (name, script, sites, rounds, ...); got "
            f"{type(data).__name__}"
        )
    for k in data:
        if k not in _KEYS:
            raise c.unknown(k, list(_KEYS))
    if data.get("script") is not None and data.get("task") is not None:
        raise ConfigError(f"{c.source}: give `script` (your own training script) or `task` (a built-in one), not both")
    if data.get("task") is not None:
        for k in ("args", "site_args"):
            if data.get(k):
                raise ConfigError(
                    f"{c.source}: `{k}` applies to a `script`; a built-in `task` takes its settings from the `task` "
                    "section"
                )
    for k in ("script", "sites", "rounds"):
        if data.get(k) is None and not (k == "script" and data.get("task") is not None):
            or_task = _OR_TASK if k == "script" else ""
            raise ConfigError(f"{c.source}: `{k}` is required (e.g. {_EXAMPLES[k]}){or_task}")


def _site_entries(c: _Checker, v: Any) -> list[SiteSpec]:
    """`sites:`, a count (site-1..site-N) or a list of names or {name, data, peft} mappings (no `site_args` yet)."""
    if isinstance(v, list):
        if not v:
            raise c.fail("sites", "must be a count >= 1 or a non-empty list of site names", v)
        sites = [_site_entry(c, i, s) for i, s in enumerate(v)]
        names = [s.name for s in sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise c.fail("sites", f"must not repeat a name ({', '.join(dup)} appears twice)", v)
        return sites
    if isinstance(v, int) and not isinstance(v, bool):
        return [SiteSpec(f"site-{i}") for i in range(1, c.integer("sites", v, 1) + 1)]
    raise c.fail("sites", "must be a count >= 1 or a list of site names", v)


def _site_entry(c: _Checker, i: int, v: Any) -> SiteSpec:
    """One `sites:` entry: a name, or {name: site-1, data: PATH, peft: {r: 4, alpha: 8}} (a built-in task's)."""
    entry = v if isinstance(v, dict) else {"name": v}
    c.keys(entry, _SITE_KEYS, f"sites[{i}].")
    name = entry.get("name")
    if not _site_name_ok(name):
        key = f"sites[{i}].name" if isinstance(v, dict) else f"sites[{i}]"
        raise c.fail(key, "must be a name of 1-128 characters without path separators", name)
    path = entry.get("data")
    if path is not None:
        if not isinstance(path, str) or not path.strip() or path.startswith("demo:"):
            must = "must be the path of the site's own data, relative to the recipe file (demo data: `task.data`)"
            raise c.fail(f"sites[{i}].data", must, path)
        p = Path(path).expanduser()
        path = str((p if p.is_absolute() else c.source.resolve().parent / p).resolve())
    peft = entry.get("peft") or {}
    if not isinstance(peft, dict):
        raise c.fail(f"sites[{i}].peft", "must be a mapping like {r: 4, alpha: 8} (this site's LoRA rank)", peft)
    c.keys(peft, ("r", "alpha"), f"sites[{i}].peft.")
    return SiteSpec(str(name), data=path, peft={k: c.integer(f"sites[{i}].peft.{k}", n, 1) for k, n in peft.items()})


def _check_site_peft(c: _Checker, sites: tuple[SiteSpec, ...], method: str) -> None:
    """A site's `peft:` overrides the LoRA rank/alpha: the task must train LoRA adapters."""
    for i, s in enumerate(sites):
        if s.peft and method != "lora":
            must = f"sets this site's LoRA rank, but `task.peft` is {method}: use lora or remove it"
            raise c.fail(f"sites[{i}].peft", must, s.peft)


def _check_site_ranks(c: _Checker, sites: tuple[SiteSpec, ...], task: Any, strategy: str) -> None:
    """Sites of different LoRA ranks (`sites: [{..., peft: {r: 4}}]`) need a strategy that folds adapters of
    different shapes: FedAvg and the others average tensors of one shape, and would refuse every round."""
    from fl_plugins.tasks.spec import for_site

    ranks = {s.name: for_site(task, s.peft).peft.r for s in sites}
    if len(set(ranks.values())) > 1 and strategy not in ("hetlora", "flexlora"):
        raise ConfigError(
            f"{c.source}: the sites train LoRA adapters of different ranks "
            f"({', '.join(f'{n} r={r}' for n, r in ranks.items())}), which `strategy.type` {strategy} cannot "
            "average; set `strategy: {type: hetlora}` (zero-padding) or `strategy: {type: flexlora}` (SVD "
            "redistribution), or give every site the same `peft.r`"
        )


def _sites(c: _Checker, data: dict) -> tuple[SiteSpec, ...]:
    """The sites, each with its `site_args`."""
    sites = _site_entries(c, data["sites"])
    names = [s.name for s in sites]
    site_args = data.get("site_args") or {}
    if not isinstance(site_args, dict):
        raise c.fail("site_args", "must be a mapping of site name to a list of arguments", site_args)
    for n in site_args:
        if n not in names:
            raise c.unknown(n, names, "site_args.")
    return tuple(
        dataclasses.replace(s, args=c.strings(f"site_args.{s.name}", site_args[s.name])) if s.name in site_args else s
        for s in sites
    )


def _env(c: _Checker, data: dict) -> dict[str, str]:
    """`env:`, every value as a string (true/false as 1/0); the runner's own variables may not be set."""
    env_v = data.get("env") or {}
    if not isinstance(env_v, dict):
        raise c.fail("env", "must be a mapping of variable name to value", env_v)
    env = {}
    for k, v in env_v.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise c.fail(f"env.{k}", "must be a variable name (letters, digits, underscore)", k)
        if k in RUNNER_ENV:
            raise ConfigError(f"{c.source}: `env.{k}` is set by the runner for each site; remove it from the recipe")
        if isinstance(v, bool):
            v = "1" if v else "0"
        if not isinstance(v, (str, int, float)):
            raise c.fail(f"env.{k}", "must be a string or a number", v)
        env[k] = str(v)
    return env


def _federation(c: _Checker, data: dict, sites: int) -> FederationSpec:
    """The aggregator's settings the recipe gives, each checked by config.py's check (a null: left out)."""
    sections = {section: _section(c, data, section, known) for section, known in _SECTIONS.items()}
    values: dict[str, Any] = {"min_sites": sites}  # the default: all the sites
    for key, s in _RECIPE_KEYS.items():
        section, _, leaf = key.rpartition(".")
        v = (sections[section] if section else data).get(leaf)
        if v is not None:
            values[s.name] = _setting_value(c, key, s, v, sites)
    return FederationSpec(values)


def _setting_value(c: _Checker, key: str, s: Setting, v: Any, sites: int) -> Any:
    """The value `v` given at `key` for setting `s`, checked: a path resolves against the recipe's folder, a value
    in a unit (`transfer.chunk_mib`) is scaled to the setting's, a count of sites is at most the recipe's sites."""
    if isinstance(s.check, PathValue):
        return c.path(key, v, file=False)
    check = s.check
    if s.name in _AT_MOST_SITES and isinstance(check, Integer):
        check = Integer(check.low, high=sites)
    value, unit = v, ""
    if s.unit is not None:
        unit = f"a number of {s.unit[0]} that is "
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1 << 20
        value = int(v * s.unit[1]) if ok else None  # whole bytes, rounded down
    try:
        return check.check(value)
    except Invalid as e:
        must = str(e).replace("must be ", f"must be {unit}", 1) + (", or null" if s.default is None else "")
        raise c.fail(key, must, v) from None


def _section(c: Checker, data: dict, key: str, known: tuple[str, ...]) -> dict:
    v = data.get(key) or {}
    if not isinstance(v, dict):
        raise c.fail(key, f"must be a mapping of {', '.join(known)}", v)
    c.keys(v, known, f"{key}.")
    return v


_SITE_KEYS = ("name", "data", "peft")
_EXAMPLES = {"script": "`script: train.py`", "sites": "`sites: 3`", "rounds": "`rounds: 5`"}
_OR_TASK = ", or a built-in `task:` section (fl_plugins/tasks/spec.py)"


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe YAML at `path`; raise ConfigError naming the key path and the fix."""
    return parse_recipe(load_yaml(path, "recipe"), Path(path))
