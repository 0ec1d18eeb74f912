"""The aggregator's settings, each declared once: a field of `AggregatorConfig` whose metadata (a `Setting`) holds
its documentation, its check, its `fl-plugins server` flag and its recipe key. The command line
(fl_plugins/cli/server.py) and the recipe (fl_plugins/recipe.py) derive theirs from here, so a setting has one
default and one check:

    setting                flag                      recipe key                         default
    run_dir                --run-dir                 -                                  (runs/NAME with a recipe)
    rounds                 --rounds                  rounds                             (required)
    min_sites              --min-sites               min_sites                          1 (a recipe: all its sites)
    initial_model          --initial-model           initial_model                      None: a site offers its own
    round_deadline         --round-deadline          round_deadline                     None: no deadline
    min_updates            --min-updates             aggregation.min_updates            1
    idle_timeout           --idle-timeout            transfer.idle_timeout              60
    site_timeout           --site-timeout            aggregation.site_timeout           60
    presence_every         --presence-every          -                                  30 (0: never)
    chunk_bytes            --chunk-bytes             transfer.chunk_mib (in MiB)        4 MiB
    update_compression     --update-compression      transfer.update_compression        "none"
    model_compression      --model-compression       transfer.model_compression         "none"
    job_id                 --job-id                  - (the recipe's `name`)            ""
    linger                 -                         -                                  5
    reject_nonfinite       --allow-nonfinite (off)   aggregation.reject_nonfinite       true
    max_attempts           --max-attempts            aggregation.max_attempts           3
    on_attempts_exhausted  --on-attempts-exhausted   aggregation.on_attempts_exhausted  "fail"
    workflow               --workflow                workflow.type                      "fedavg"
    evaluate_every         --evaluate-every          workflow.evaluate_every            0: never
    evaluate_final         --no-evaluate-final (off) workflow.evaluate_final            true
    sample_sites           --sample-sites            workflow.sample_sites              None: every site
    seed                   --seed                    workflow.seed                      0
    cyclic_order           --cyclic-order            workflow.order                     "fixed"
    evaluate_timeout       --evaluate-timeout        workflow.evaluate_timeout          round_deadline
    swarm_aggregator       --swarm-aggregator        workflow.aggregator                "round_robin"
    swarm_metric           --swarm-metric            workflow.metric                    "accuracy"
    strategy               --strategy                strategy.type                      "fedavg"
    server_lr              --server-lr               strategy.lr                        the strategy's
    server_momentum        --server-momentum         strategy.momentum                  the strategy's
    beta2                  --beta2                   strategy.beta2                     0.99
    tau                    --tau                     strategy.tau                       0.001
    serve_model            --serve-model             task.model: {from_aggregator: P}   None: serve no folder
    accumulator_dir        --accumulator-dir         aggregation.accumulator_dir        None: in memory
    keep_rounds            --keep-rounds             aggregation.keep_rounds            None: every round

A value that breaks a check is a ConfigError naming the key as the user wrote it: ``recipes/x.yaml:
`aggregation.min_updates` must be an integer in 1..3 (got 4)`` from a recipe, ```min_updates` (--min-updates) must
be an integer >= 1 (got 0)`` from the command line or a keyword. Torch-free and gRPC-free."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins.checks import (
    COMPRESSIONS,
    STRATEGIES,
    Boolean,
    Check,
    Choice,
    ChunkSize,
    Folder,
    Integer,
    Invalid,
    Number,
    PathValue,
    SampleSize,
    Text,
    Workflow,
)
from fl_plugins.config_checks import check_swarm
from fl_plugins.errors import ConfigError
from fl_plugins.model_files import model_files
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, short_repr


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a setting that has none (`rounds`, `run_dir`)


@dataclass(frozen=True)
class Setting:
    """How one setting is documented, checked, and given on the command line and in a recipe."""

    doc: str  # what it does: the flag's help, before the default
    check: Check
    flag: str | None = None  # the `fl-plugins server` flag; None: no flag
    key: str | None = None  # the recipe key path (`aggregation.min_updates`); None: no recipe key
    shown: str = ""  # how the default reads where its value does not say (None, "", a switch)
    unit: tuple[str, int] | None = None  # the recipe key's unit, ("MiB", 1 << 20): the value is key * scale
    flag_help: str = ""  # a switch's help (the flag does the opposite of the default)
    name: str = ""  # AggregatorConfig's field (set from the field)
    default: Any = REQUIRED  # (set from the field)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def checked(self, value: Any, label: str) -> Any:
        """`value` as the check returns it, else a ConfigError: ``{label} must be ... (got value)``."""
        if value is None and self.default is None:
            return None
        try:
            return self.check.check(value)
        except Invalid as e:
            raise ConfigError(f"{label} {e} (got {short_repr(value)})") from None

    def flag_label(self) -> str:
        """How a message names a value from the command line: ```min_updates` (--min-updates)``."""
        return f"`{self.name}` ({self.flag})"

    def keyword_label(self) -> str:
        """How a message names a value passed as AggregatorConfig's keyword: the field, and its flag if it has one."""
        return f"`{self.name}` ({self.flag})" if self.flag else f"`{self.name}`"


def _setting(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(**kw)})


_POSITIVE = Number(0, strict=True)


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator is told at start; checked on construction (ConfigError)."""

    run_dir: Path = _setting(
        doc="checkpoints, metrics and logs go here; an existing run dir resumes its job, and a start with another "
        "job id, recipe or initial model is refused",
        check=PathValue(),
        flag="--run-dir",
        shown="required without a recipe; with one, default: runs/NAME",
    )
    rounds: int = _setting(doc="number of rounds", check=Integer(1), flag="--rounds", key="rounds")
    min_sites: int = _setting(
        1,
        doc="sites needed to start a round",
        check=Integer(1),
        flag="--min-sites",
        key="min_sites",
        shown="1, or all the recipe's sites",
    )
    initial_model: Path | None = _setting(
        None,
        doc="round 0's global model: a .safetensors file or a Hugging Face model folder",
        check=PathValue(),
        flag="--initial-model",
        key="initial_model",
        shown="none, a site offers its weights",
    )
    round_deadline: float | None = _setting(
        None,
        doc="seconds; close a round with the updates it has",
        check=_POSITIVE,
        flag="--round-deadline",
        key="round_deadline",
        shown="none, wait for every site that took the task",
    )
    min_updates: int = _setting(
        1,
        doc="updates a round needs to close at its deadline",
        check=Integer(1),
        flag="--min-updates",
        key="aggregation.min_updates",
    )
    idle_timeout: float = _setting(
        60.0,
        doc="cancel a transfer that moves no bytes for this many seconds",
        check=_POSITIVE,
        flag="--idle-timeout",
        key="transfer.idle_timeout",
    )
    site_timeout: float = _setting(
        60.0,
        doc="a site silent (no heartbeat, no call) this many seconds has left the round",
        check=_POSITIVE,
        flag="--site-timeout",
        key="aggregation.site_timeout",
    )
    presence_every: float = _setting(
        30.0,
        doc="seconds between the log lines that say what a waiting round waits for: which sites are connected, "
        "which are silent and for how long (aggregator/presence.py); 0: never",
        check=Number(0),
        flag="--presence-every",
    )
    chunk_bytes: int = _setting(
        DEFAULT_CHUNK_BYTES,
        doc="bytes per chunk message",
        check=ChunkSize(),
        flag="--chunk-bytes",
        key="transfer.chunk_mib",
        unit=("MiB", 1 << 20),
    )
    update_compression: str = _setting(
        "none",
        doc="how sites encode their updates (wire/quantize.py): bf16, or blockwise int8 / nf4, sent as a DIFF with "
        "error feedback at the site; none: as trained",
        check=Choice(COMPRESSIONS),
        flag="--update-compression",
        key="transfer.update_compression",
    )
    model_compression: str = _setting(
        "none",
        doc="how the global model of a training task travels to the sites: bf16, int8 or nf4 (encoded once per "
        "round; the checkpoint, evaluations and the final model stay full precision); none: as checkpointed",
        check=Choice(COMPRESSIONS),
        flag="--model-compression",
        key="transfer.model_compression",
    )
    job_id: str = _setting(
        "",
        doc="a name for this job, kept in RUN_DIR/run.json, so a restart serves the same job",
        check=Text(128),
        flag="--job-id",
        shown="the run's, else the recipe's name, else a random id",
    )
    linger: float = _setting(
        5.0, doc="seconds after the last round to keep answering END, so sites learn the job is over", check=Number(0)
    )
    reject_nonfinite: bool = _setting(
        True,
        doc="refuse an update holding NaN or Inf (checked on each chunk as it arrives)",
        check=Boolean(),
        flag="--allow-nonfinite",
        key="aggregation.reject_nonfinite",
        flag_help="average updates that hold NaN or Inf",
        shown="refuse such an update",
    )
    max_attempts: int = _setting(
        3,
        doc="attempts a round may take to collect its updates: a new attempt when the deadline passes with too few, "
        "or every site left sits out",
        check=Integer(1),
        flag="--max-attempts",
        key="aggregation.max_attempts",
    )
    on_attempts_exhausted: str = _setting(
        "fail",
        doc="after the last attempt: fail the job, or close the round with the updates it has",
        check=Choice(("fail", "close")),
        flag="--on-attempts-exhausted",
        key="aggregation.on_attempts_exhausted",
    )
    workflow: str = _setting(
        "fedavg",
        doc="the job's workflows, in turn: fedavg or cyclic (training), then optionally cross-site-eval; or "
        "evaluate (every site evaluates --initial-model) or cross-site-eval alone; or swarm (docs/swarm.md)",
        check=Workflow(),
        flag="--workflow",
        key="workflow.type",
    )
    evaluate_every: int = _setting(
        0,
        doc="every site evaluates the global model after every k-th round and after the last (0: never)",
        check=Integer(0),
        flag="--evaluate-every",
        key="workflow.evaluate_every",
        shown="0, never",
    )
    evaluate_final: bool = _setting(
        True,
        doc="at the end of a training job, the sites that sent the global model's metrics with their updates "
        "evaluate the final global model (its record in RUN_DIR/metrics.jsonl is the last point of every plot)",
        check=Boolean(),
        flag="--no-evaluate-final",
        key="workflow.evaluate_final",
        flag_help="skip the evaluation of the final global model at the end of a training job",
        shown="evaluate it",
    )
    sample_sites: float | None = _setting(
        None,
        doc="sites that train each round: a fraction of the connected sites, or a number; a seeded choice",
        check=SampleSize(),
        flag="--sample-sites",
        key="workflow.sample_sites",
        shown="every site",
    )
    seed: int = _setting(
        0,
        doc="the seed of the site sampling and of the cyclic order's shuffle",
        check=Integer(0),
        flag="--seed",
        key="workflow.seed",
    )
    cyclic_order: str = _setting(
        "fixed",
        doc="cyclic: the order the model visits the sites each round",
        check=Choice(("fixed", "shuffle")),
        flag="--cyclic-order",
        key="workflow.order",
    )
    evaluate_timeout: float | None = _setting(
        None,
        doc="seconds an evaluation (or a model's submission) may take at a site before its cell is left empty",
        check=_POSITIVE,
        flag="--evaluate-timeout",
        key="workflow.evaluate_timeout",
        shown="the round deadline; without one, wait while the site is alive",
    )
    swarm_aggregator: str = _setting(
        "round_robin",
        doc="swarm: which site folds each round: in turn, a seeded random one, or the one whose last update "
        "reported the best `swarm_metric`",
        check=Choice(("round_robin", "random", "best_metric")),
        flag="--swarm-aggregator",
        key="workflow.aggregator",
    )
    swarm_metric: str = _setting(
        "accuracy",
        doc="swarm, best_metric: the metric whose highest value picks the aggregator (a leading '-': the lowest)",
        check=Text(128),
        flag="--swarm-metric",
        key="workflow.metric",
    )
    strategy: str = _setting(
        "fedavg",
        doc="how the round's updates become the next global model: fedavg, a server optimizer on their average, "
        "scaffold (control variates beside the weights), or hetlora / flexlora (sites train LoRA adapters of "
        "different ranks, up to the initial model's: zero-padding, or SVD of the averaged product)",
        check=Choice(STRATEGIES),
        flag="--strategy",
        key="strategy.type",
    )
    server_lr: float | None = _setting(
        None,
        doc="the server optimizer's learning rate",
        check=_POSITIVE,
        flag="--server-lr",
        key="strategy.lr",
        shown="1.0 for fedavgm, 0.01 for the adaptive ones",
    )
    server_momentum: float | None = _setting(
        None,
        doc="fedavgm's momentum, the adaptive ones' beta1",
        check=Number(0),
        flag="--server-momentum",
        key="strategy.momentum",
        shown="0.9",
    )
    beta2: float = _setting(
        0.99, doc="the adaptive strategies' second-moment decay", check=Number(0), flag="--beta2", key="strategy.beta2"
    )
    tau: float = _setting(
        1e-3,
        doc="the adaptive strategies' degree of adaptivity (added to the root of the second moment)",
        check=_POSITIVE,
        flag="--tau",
        key="strategy.tau",
    )
    serve_model: Path | None = _setting(
        None,
        doc="a Hugging Face model folder the sites fetch from the aggregator (cached by its digest) and build "
        "their model from: sites without internet access (aggregator/served.py)",
        check=Folder(),
        flag="--serve-model",
        shown="none; a recipe's `task.model: {from_aggregator: PATH}` sets it",
    )
    accumulator_dir: Path | None = _setting(
        None,
        doc="keep the accumulator in a file in this folder instead of memory (a model larger than the aggregator's "
        "memory; the page cache holds what fits): fedavg.py",
        check=PathValue(),
        flag="--accumulator-dir",
        key="aggregation.accumulator_dir",
        shown="in memory",
    )
    keep_rounds: int | None = _setting(
        None,
        doc="keep the checkpoints of round 0 and of this many latest rounds; older ones are deleted once a newer one "
        "is durable (retention.py)",
        check=Integer(1),
        flag="--keep-rounds",
        key="aggregation.keep_rounds",
        shown="every round",
    )
    # the recipe the job runs ({"path", "job"}: fl_plugins.recipe.Recipe.identity()), kept in RUN_DIR/run.json: a
    # restart with another recipe is refused; None: no recipe (then `job_id`, else a random id, names the job)
    recipe: dict[str, Any] | None = None
    # `--run-dir URL` (an object store, aggregator/remote.py): the run lives there; `run_dir` is its working copy
    store_url: str | None = None

    @property
    def total_rounds(self) -> int:
        """The aggregator's rounds: `rounds`, or in a cyclic job one per site visit (`rounds` cycles of `min_sites`
        visits each)."""
        return self.rounds * self.min_sites if self.workflow.startswith("cyclic") else self.rounds

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        for s in SETTINGS.values():
            value = s.checked(getattr(self, s.name), s.keyword_label())
            if s.name == "workflow":  # normalised: "fedavg,cross-site-eval"
                object.__setattr__(self, s.name, value)
        if self.initial_model is not None:  # merge() read a flag's: a model that fails here is the recipe's
            label = SETTINGS["initial_model"].keyword_label()
            model_files(self.initial_model, f"{self.recipe['path']}: `initial_model`" if self.recipe else label)
        if self.workflow in ("evaluate", "cross-site-eval") and self.initial_model is None:
            raise ConfigError(
                f"--workflow {self.workflow} evaluates a given model: start the aggregator with --initial-model PATH "
                "(a .safetensors file or a Hugging Face model folder)"
            )
        if self.workflow.startswith("cyclic") and self.sample_sites is not None:
            raise ConfigError(
                "`sample_sites` (--sample-sites) samples FedAvg's sites; the cyclic workflow trains one site at a "
                "time: drop one of them"
            )
        if self.workflow == "swarm":
            check_swarm(self)
        if self.workflow.startswith("cyclic") and self.strategy == "scaffold":
            raise ConfigError(
                "`strategy` scaffold (--strategy scaffold) averages the control variates of the sites that train "
                "in a round; the cyclic workflow trains one site at a time: use the fedavg workflow with it"
            )


SETTINGS: dict[str, Setting] = {
    f.name: dataclasses.replace(
        f.metadata["setting"], name=f.name, default=REQUIRED if f.default is dataclasses.MISSING else f.default
    )
    for f in dataclasses.fields(AggregatorConfig)
    if "setting" in f.metadata
}


def trains(workflow: str | list[str]) -> bool:
    """Whether the job's `workflow` trains (fedavg, cyclic or swarm): only then does it need `rounds`."""
    names = workflow.split(",") if isinstance(workflow, str) else workflow
    return names[0] in ("fedavg", "cyclic", "swarm")


def merge(
    flags: Mapping[str, Any], recipe_values: Mapping[str, Any] | None = None, /, **fixed: Any
) -> AggregatorConfig:
    """The AggregatorConfig whose settings come from `flags` (given on the command line, by field name; checked
    here, so an error names the flag), else from `recipe_values` (a recipe's, checked when it was read, so an
    error names its key), else their defaults; `fixed` are fields no flag sets (`recipe`)."""
    for name, value in flags.items():
        SETTINGS[name].checked(value, SETTINGS[name].flag_label())
    if flags.get("initial_model") is not None:  # read here, so that an error names the flag
        model_files(flags["initial_model"], "--initial-model")
    return AggregatorConfig(**{**(recipe_values or {}), **flags, **fixed})
