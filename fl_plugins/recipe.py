"""Recipes: the YAML file `fl-plugins run` reads, validated on load into one dataclass per concern.

    name: lightning-demo                      # optional; default: the file's stem
    script: ../examples/client_api_train.py   # required; relative to the recipe file; must exist
    sites: 3                                  # a count (site-1..site-N) or a list of names
    rounds: 5                                 # required, >= 1
    min_sites: 3                              # sites needed to start a round; default: all of them
    initial_model: null                       # a .safetensors file or HF model folder, relative to the recipe
    round_deadline: null                      # seconds; close a round with the updates it has
    args: ["--epochs", "1"]                   # passed to every site's script
    site_args: {site-1: ["--shard", "0"]}     # extra arguments for one site, after `args`
    env: {}                                   # extra environment variables for every site
    tracking: [mlflow, tensorboard]           # stream the run to trackers; default: none (fl_plugins/tracking.py)
    aggregation: {min_updates: 1, reject_nonfinite: true, site_timeout: 60,   # FedAvg's round rules
                  max_attempts: 3, on_attempts_exhausted: fail}
    transfer: {chunk_mib: 4, idle_timeout: 60}                                 # how weights travel

Instead of `script:`, a recipe may name a built-in Hugging Face task (SFT / PEFT), `task: {type: ..., model: ...,
data: ...}`: every site then runs `python -m fl_plugins.hf.task RECIPE`; the section is validated by
fl_plugins/hf/spec.py (torch-free).

`tracking:` names the experiment trackers the run's records stream to, in the run directory: `mlflow`,
`tensorboard`, `wandb` (offline), as a list or as a mapping of name to options
(`tracking: {mlflow: {experiment: x}, wandb: {project: y}}`; fl_plugins/tracking.py lists them). Default: none,
so a run starts without importing any tracker.

Every error names the file, the key path, what must hold and what was got, e.g.
``recipes/x.yaml: `rounds` must be an integer >= 1 (got 0)``; an unknown key is an error with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins._config import Checker, load_yaml
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
    """One site: its name (FL_SITE) and the extra arguments only it gets."""

    name: str  # the site's name, exported as FL_SITE; 1-128 characters, no path separators
    args: tuple[str, ...] = ()  # appended after ScriptSpec.args for this site only


@dataclass(frozen=True)
class FederationSpec:
    """The aggregator's side of the job (maps onto AggregatorConfig)."""

    rounds: int  # rounds of FedAvg, >= 1
    min_sites: int  # sites that must be connected before a round starts, 1..number of sites
    initial_model: Path | None = None  # round 0's global model; None: a site must offer its weights
    round_deadline: float | None = None  # seconds; None: a round waits for every site that took its task
    min_updates: int = 1  # `aggregation.min_updates`: updates a round needs to close at its deadline
    reject_nonfinite: bool = True  # `aggregation.reject_nonfinite`: refuse an update holding NaN or Inf
    site_timeout: float = 60.0  # `aggregation.site_timeout`: seconds of silence after which a site has left
    chunk_bytes: int | None = None  # `transfer.chunk_mib`: bytes per chunk message (None: the default, 4 MiB)
    idle_timeout: float = 60.0  # `transfer.idle_timeout`: cancel a transfer that moves no bytes this long
    max_attempts: int = 3  # `aggregation.max_attempts`: attempts a round may take to collect its updates
    on_attempts_exhausted: str = "fail"  # `aggregation.on_attempts_exhausted`: then "fail" the job or "close"

    def aggregator_config(self, run_dir: Path, **kw: Any):
        """The AggregatorConfig these settings make (for `fl-plugins run` and `fl-plugins server RECIPE`)."""
        from fl_plugins.aggregator.core import AggregatorConfig

        extra = {"chunk_bytes": self.chunk_bytes} if self.chunk_bytes else {}
        return AggregatorConfig(run_dir=run_dir, rounds=self.rounds, min_sites=self.min_sites,
                                initial_model=self.initial_model, round_deadline=self.round_deadline,
                                min_updates=self.min_updates, reject_nonfinite=self.reject_nonfinite,
                                site_timeout=self.site_timeout, idle_timeout=self.idle_timeout,
                                max_attempts=self.max_attempts, on_attempts_exhausted=self.on_attempts_exhausted,
                                **extra, **kw)  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with `load_recipe(path)`."""

    name: str  # a name for the job (default: the recipe file's stem)
    source: Path  # the recipe file it was loaded from
    script: ScriptSpec
    sites: tuple[SiteSpec, ...]
    federation: FederationSpec
    task: Any = None  # fl_plugins.hf.spec.TaskSpec when the recipe names a built-in task instead of a script
    tracking: tuple[TrackerSpec, ...] = ()  # the trackers the run streams to (`tracking:`); () for none

    def identity(self) -> dict[str, Any]:
        """What makes this recipe's job this job, kept in the run directory's run.json (store.py): its name,
        what the sites run (`script` and `args`, or `task`), `env`, and the sites with their `site_args`. A
        restart whose recipe differs there is refused; `rounds`, `min_sites`, `round_deadline`, `aggregation`,
        `transfer` and `tracking` may change between restarts, and `initial_model` is compared by content."""
        job: dict[str, Any] = {"name": self.name}
        if self.task is None:
            job["script"] = os.path.relpath(self.script.path, self.source.resolve().parent)
            job["args"] = list(self.script.args)
        else:
            job["task"] = json.loads(json.dumps(dataclasses.asdict(self.task), default=str))
        job["env"] = dict(sorted(self.script.env.items()))
        job["sites"] = [s.name for s in self.sites]
        job["site_args"] = {s.name: list(s.args) for s in self.sites if s.args}
        return {"path": str(self.source), "job": job}


_KEYS = ("name", "script", "task", "sites", "rounds", "min_sites", "initial_model", "round_deadline", "args",
         "site_args", "env", "tracking", "aggregation", "transfer")  # fmt: skip
TASK_SCRIPT = Path(__file__).resolve().parent / "hf" / "task.py"


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
            raise ConfigError(f"{self.source}: `{key}`: {v!r} does not exist (looked for {p}); the path is "
                              "relative to the recipe file's folder")  # fmt: skip
        if file and not p.is_file():
            raise ConfigError(f"{self.source}: `{key}`: {p} is not a file")
        return p


def _site_name_ok(name: Any) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= 128 and not any(c in name for c in "/\\\0")


def parse_recipe(data: Any, source: str | Path) -> Recipe:
    """Validate the parsed YAML `data` of the recipe at `source` (paths resolve against its folder)."""
    source = Path(source)
    c = _Checker(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of keys (name, script, sites, rounds, ...); got "
                          f"{type(data).__name__}")  # fmt: skip
    for k in data:
        if k not in _KEYS:
            raise c.unknown(k, list(_KEYS))
    if data.get("script") is not None and data.get("task") is not None:
        raise ConfigError(f"{source}: give `script` (your own training script) or `task` (a built-in one), not both")
    if data.get("task") is not None:
        for k in ("args", "site_args"):
            if data.get(k):
                raise ConfigError(f"{source}: `{k}` applies to a `script`; a built-in `task` takes its settings "
                                  "from the `task` section")  # fmt: skip
    for k in ("script", "sites", "rounds"):
        if data.get(k) is None and not (k == "script" and data.get("task") is not None):
            raise ConfigError(f"{source}: `{k}` is required (e.g. {_EXAMPLES[k]}){_OR_TASK if k == 'script' else ''}")

    name = data.get("name", source.stem)
    if not isinstance(name, str) or not name.strip():
        raise c.fail("name", "must be a non-empty string", name)

    sites_v = data["sites"]
    if isinstance(sites_v, list):
        if not sites_v:
            raise c.fail("sites", "must be a count >= 1 or a non-empty list of site names", sites_v)
        for i, s in enumerate(sites_v):
            if not _site_name_ok(s):
                raise c.fail(f"sites[{i}]", "must be a name of 1-128 characters without path separators", s)
        dup = sorted({s for s in sites_v if sites_v.count(s) > 1})
        if dup:
            raise c.fail("sites", f"must not repeat a name ({', '.join(dup)} appears twice)", sites_v)
        names = list(sites_v)
    elif isinstance(sites_v, int) and not isinstance(sites_v, bool):
        names = [f"site-{i}" for i in range(1, c.integer("sites", sites_v, 1) + 1)]
    else:
        raise c.fail("sites", "must be a count >= 1 or a list of site names", sites_v)

    site_args_v = data.get("site_args") or {}
    if not isinstance(site_args_v, dict):
        raise c.fail("site_args", "must be a mapping of site name to a list of arguments", site_args_v)
    for s in site_args_v:
        if s not in names:
            raise c.unknown(s, names, "site_args.")
    sites = tuple(SiteSpec(n, c.strings(f"site_args.{n}", site_args_v[n]) if n in site_args_v else ())
                  for n in names)  # fmt: skip

    env_v = data.get("env") or {}
    if not isinstance(env_v, dict):
        raise c.fail("env", "must be a mapping of variable name to value", env_v)
    env = {}
    for k, v in env_v.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise c.fail(f"env.{k}", "must be a variable name (letters, digits, underscore)", k)
        if k in RUNNER_ENV:
            raise ConfigError(f"{source}: `env.{k}` is set by the runner for each site; remove it from the recipe")
        if isinstance(v, bool):
            v = "1" if v else "0"
        if not isinstance(v, (str, int, float)):
            raise c.fail(f"env.{k}", "must be a string or a number", v)
        env[k] = str(v)

    task = None
    if data.get("task") is not None:
        from fl_plugins.hf.spec import parse_task

        task = parse_task(data["task"], source)
        script = ScriptSpec(TASK_SCRIPT, ("--recipe", str(source.resolve())), env)
    else:
        script = ScriptSpec(c.path("script", data["script"], file=True), c.strings("args", data.get("args") or []),
                            env)  # fmt: skip

    rounds = c.integer("rounds", data["rounds"], 1)
    min_sites_v = data.get("min_sites")
    min_sites = len(names) if min_sites_v is None else c.integer("min_sites", min_sites_v, 1, len(names))
    init_v = data.get("initial_model")
    initial = None if init_v is None else c.path("initial_model", init_v, file=False)
    deadline_v = data.get("round_deadline")
    if deadline_v is not None and (isinstance(deadline_v, bool) or not isinstance(deadline_v, (int, float))
                                   or deadline_v <= 0):  # fmt: skip
        raise c.fail("round_deadline", "must be a number of seconds > 0, or null for no deadline", deadline_v)
    deadline = None if deadline_v is None else float(deadline_v)
    tracking = parse_tracking(data.get("tracking"), where=f"{source}: ")
    agg, tr = _section(c, data, "aggregation", _AGGREGATION), _section(c, data, "transfer", _TRANSFER)
    nonfinite = agg.get("reject_nonfinite", True)
    if not isinstance(nonfinite, bool):
        raise c.fail("aggregation.reject_nonfinite", "must be true or false", nonfinite)
    chunk = tr.get("chunk_mib")
    exhausted = agg.get("on_attempts_exhausted", "fail")
    if exhausted not in ("fail", "close"):
        raise c.fail("aggregation.on_attempts_exhausted", "must be 'fail' or 'close'", exhausted)
    fed = FederationSpec(
        rounds, min_sites, initial, deadline,
        min_updates=c.integer("aggregation.min_updates", agg.get("min_updates", 1), 1, len(names)),
        reject_nonfinite=nonfinite,
        site_timeout=c.number("aggregation.site_timeout", agg.get("site_timeout", 60.0), 0.0, open_lo=True),
        chunk_bytes=None if chunk is None else int(c.number("transfer.chunk_mib", chunk, 1 / 16, 64) * (1 << 20)),
        idle_timeout=c.number("transfer.idle_timeout", tr.get("idle_timeout", 60.0), 0.0, open_lo=True),
        max_attempts=c.integer("aggregation.max_attempts", agg.get("max_attempts", 3), 1),
        on_attempts_exhausted=exhausted,
    )  # fmt: skip
    return Recipe(name.strip(), source, script, sites, fed, task, tracking)


_AGGREGATION = ("min_updates", "reject_nonfinite", "site_timeout", "max_attempts", "on_attempts_exhausted")
_TRANSFER = ("chunk_mib", "idle_timeout")


def _section(c: Checker, data: dict, key: str, known: tuple[str, ...]) -> dict:
    v = data.get(key) or {}
    if not isinstance(v, dict):
        raise c.fail(key, f"must be a mapping of {', '.join(known)}", v)
    c.keys(v, known, f"{key}.")
    return v


_EXAMPLES = {"script": "`script: train.py`", "sites": "`sites: 3`", "rounds": "`rounds: 5`"}
_OR_TASK = ", or a built-in `task:` section (fl_plugins/hf/spec.py)"


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe YAML at `path`; raise ConfigError naming the key path and the fix."""
    return parse_recipe(load_yaml(path, "recipe"), Path(path))
