"""The run directory's records, typed, and the one way to read them back.

The aggregator appends JSON lines to two files of the run directory and writes summary.json when its job is
complete; `fl-plugins run` writes summary.json again at its end (with its sites' exit codes and the baselines),
and a built-in task writes baselines.json. runner.py, report.py and tracking/ read the run directory only through
this module.

    file                     class             keys, in the order written
    metrics.jsonl  "update"  UpdateRecord      round attempt site weight params_type bytes bytes_received
                                               corrupted_chunks seconds metrics       (an update was accepted)
                   "round"   RoundRecord       round attempt updates sites weight metrics refolds
                                               checkpoint_seconds seconds             (a round's model was written)
                   "attempt" AttemptRecord     round attempt counted                  (a round started again)
                   "refold"  RefoldRecord      round attempt partial owed             (partial updates were folded)
                   "update_lost" UpdateLostRecord  round attempt site reason          (an owed update was lost)
                   "sample"  SampleRecord      round attempt sites alive seed         (the sites that may train)
                   "evaluation" EvaluationRecord  round metrics sites             (the global model was evaluated)
                   "cross_site_eval" CrossSiteRecord  round means  (RUN_DIR/cross_site_eval.json was written)
                   any other OtherRecord       the object as it is (a newer writer's record, or a damaged one)
    logs.jsonl               LogRecord         round, the site's flare.log record (key value data_type step ...),
                                               site (last: a record cannot pass itself off as another site's)
    summary.json             RunSummary        name recipe exit_code seconds rounds_planned rounds sites [baselines]
                                               job_id final_model final_evaluation
    baselines.json           Baselines         round pooled_validation_rows local_only global

A metrics.jsonl record's `event` comes first after `time`, which the store puts in front of every line
(`RunStore.append`); `to_json()` gives exactly the object written (with `time` when the record has one) and
`from_json()` reads one back: keys it does not know (a newer writer's) are ignored, keys a record lacks (an older
writer's) leave their field None, and `to_json()` leaves None fields out. A value of the wrong type counts as
absent; a record without its required fields (an int `round`; the `site` of an update or a log record) is not
of its kind: `parse_record` keeps it as an OtherRecord, never raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, cast

from fl_plugins.wire.limits import finite_float

METRICS = "metrics.jsonl"
LOGS = "logs.jsonl"
SUMMARY = "summary.json"
BASELINES = "baselines.json"


# -- what a value must be to count (anything else counts as absent) -----------------------------------------------
def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _number(v: Any) -> float | None:
    """A finite number, as written (an int stays an int)."""
    return v if finite_float(v) is not None else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _names(v: Any) -> tuple[str, ...] | None:
    return tuple(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def _object(v: Any) -> dict[str, Any] | None:
    return dict(v) if isinstance(v, dict) else None


def _value(
    check: Callable[[Any], Any], *, key: str | None = None, default: Any = MISSING, factory: Any = MISSING
) -> Any:
    """A field read by `check` from the JSON key `key` (default: the field's name); without a default it is
    required."""
    return field(default=default, default_factory=factory, metadata={"check": check, "key": key})


J = TypeVar("J", bound="_Json")


@dataclass(frozen=True, kw_only=True)
class _Json:
    """to_json / from_json from the fields, in their order: each field's metadata says how a value read is checked
    and under which key it is written (default: the field's name). Lists given for tuple fields become tuples."""

    EVENT: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def to_json(self) -> dict[str, Any]:
        """The object as written: `time` first (when set), then `event` (a metrics.jsonl record), then the fields
        that are not None."""
        time = getattr(self, "time", None)
        out: dict[str, Any] = {} if time is None else {"time": time}
        if self.EVENT is not None:
            out["event"] = self.EVENT
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "time" and v is not None:
                out[f.metadata["key"] or f.name] = _jsonable(v)
        return out

    @classmethod
    def from_json(cls: type[J], data: Mapping[str, Any]) -> J:
        """The record `data` holds; ValueError when a required field is missing or of the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a {cls.__name__} is a JSON object (got {data!r:.60})")
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.metadata["key"] or f.name
            v = f.metadata["check"](data.get(key))
            if v is not None:
                values[f.name] = v
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"a {cls.__name__} needs `{key}` (got {data.get(key)!r:.60})")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class _Line(_Json):
    """A line of a .jsonl file: the store adds the wall-clock `time` (seconds since the epoch) to each."""

    time: float | None = _value(_number, default=None)


def _jsonable(v: Any) -> Any:
    if isinstance(v, _Json):
        return v.to_json()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return dict(v) if isinstance(v, dict) else v


def _site_results(v: Any) -> dict[str, dict[str, Any]] | None:
    return {k: dict(m) for k, m in v.items() if isinstance(m, dict)} if isinstance(v, dict) else None


# -- metrics.jsonl ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class UpdateRecord(_Line):
    """An accepted update (Aggregator.commit). `bytes`: the update's size; `metrics`: the global model's
    metrics at the site (the update's envelope)."""

    EVENT: ClassVar[str] = "update"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    site: str = _value(_str)
    weight: float | None = _value(_number, default=None)
    params_type: str | None = _value(_str, default=None)
    bytes: float | None = _value(_number, default=None)  # an int, as the aggregator writes it
    bytes_received: float | None = _value(_number, default=None)
    corrupted_chunks: int | None = _value(_int, default=None)
    seconds: float | None = _value(_number, default=None)
    metrics: dict[str, Any] = _value(_object, factory=dict)
    timeline: dict[str, Any] = _value(_object, factory=dict)  # wait, download, train, upload (aggregator/timeline.py)


@dataclass(frozen=True, kw_only=True)
class RoundRecord(_Line):
    """A round closed: its global model was written (Aggregator._write_round). `metrics`: the weighted mean of
    the updates' metrics; `seconds`: the round's time, `checkpoint_seconds` the part spent writing."""

    EVENT: ClassVar[str] = "round"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    updates: int | None = _value(_int, default=None)
    sites: tuple[str, ...] | None = _value(_names, default=None)
    weight: float | None = _value(_number, default=None)
    metrics: dict[str, Any] = _value(_object, factory=dict)
    refolds: int | None = _value(_int, default=None)
    checkpoint_seconds: float | None = _value(_number, default=None)
    seconds: float | None = _value(_number, default=None)
    timeline: dict[str, Any] = _value(_object, factory=dict)  # downloads, last_update, fold_wait, write (timeline.py)


@dataclass(frozen=True, kw_only=True)
class AttemptRecord(_Line):
    """A round started again (attempt `attempt`), keeping the updates of the sites in `counted`."""

    EVENT: ClassVar[str] = "attempt"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    counted: tuple[str, ...] = _value(_names, factory=tuple)


@dataclass(frozen=True, kw_only=True)
class RefoldRecord(_Line):
    """Partial updates of the sites in `partial` were folded: the counted updates (`owed`) are sent again."""

    EVENT: ClassVar[str] = "refold"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    partial: tuple[str, ...] = _value(_names, factory=tuple)
    owed: tuple[str, ...] = _value(_names, factory=tuple)


@dataclass(frozen=True, kw_only=True)
class UpdateLostRecord(_Line):
    """An owed update no longer counts: its site could not send it again (`reason`)."""

    EVENT: ClassVar[str] = "update_lost"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    site: str | None = _value(_str, default=None)
    reason: str | None = _value(_str, default=None)


@dataclass(frozen=True, kw_only=True)
class SampleRecord(_Line):
    """The sites that may train in this attempt (`sample_sites`): drawn among the `alive` connected sites with a
    generator seeded by (`seed`, round, attempt); aggregator/rounds.py says which sites a new attempt keeps."""

    EVENT: ClassVar[str] = "sample"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    sites: tuple[str, ...] = _value(_names, factory=tuple)
    alive: int | None = _value(_int, default=None)
    seed: int | None = _value(_int, default=None)


@dataclass(frozen=True, kw_only=True)
class EvaluationRecord(_Line):
    """Every site evaluated round `round`'s global model (`evaluate_every`, or an evaluation-only job): each site's
    cell ({"metrics", "num_samples"} or {"error"}) and the mean (weighted by NUM_EVAL_SAMPLES when all gave one)."""

    EVENT: ClassVar[str] = "evaluation"
    round: int = _value(_int)
    metrics: dict[str, Any] = _value(_object, factory=dict)
    sites: dict[str, dict[str, Any]] = _value(_site_results, factory=dict)


@dataclass(frozen=True, kw_only=True)
class CrossSiteRecord(_Line):
    """The cross-site evaluation of round `round` is written (RUN_DIR/cross_site_eval.json); `means`: per model."""

    EVENT: ClassVar[str] = "cross_site_eval"
    round: int = _value(_int)
    means: dict[str, dict[str, Any]] = _value(_site_results, factory=dict)


@dataclass(frozen=True, kw_only=True)
class SwarmRecord(_Line):
    """A swarm round's aggregator: `site` folds round `round` (attempt `attempt`), chosen by `policy` for `reason`;
    once the round's new global model is sealed, `bytes_relayed` / `bytes_direct` are the sealed bytes that moved
    through the aggregator's relay and between sites directly (updates and the model), and `updates` the sites
    folded in order (aggregator/swarm.py)."""

    EVENT: ClassVar[str] = "swarm"
    round: int = _value(_int)
    attempt: int = _value(_int, default=0)
    site: str = _value(_str)
    policy: str | None = _value(_str, default=None)
    reason: str | None = _value(_str, default=None)
    updates: tuple[str, ...] | None = _value(_names, default=None)
    bytes_relayed: float | None = _value(_number, default=None)
    bytes_direct: float | None = _value(_number, default=None)


@dataclass(frozen=True)
class OtherRecord:
    """A line of another kind (a newer writer's event, or a damaged record), kept as it was."""

    data: dict[str, Any]

    @property
    def event(self) -> Any:
        return self.data.get("event")

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OtherRecord:
        return cls(dict(data))


_KINDS = (
    *(UpdateRecord, RoundRecord, AttemptRecord, RefoldRecord, UpdateLostRecord, SampleRecord),
    *(EvaluationRecord, CrossSiteRecord, SwarmRecord),
)
EVENTS: dict[str, type[_Json]] = {c.EVENT: c for c in _KINDS if c.EVENT}
MetricsRecord = (
    UpdateRecord | RoundRecord | AttemptRecord | RefoldRecord | UpdateLostRecord | SampleRecord | EvaluationRecord
) | (CrossSiteRecord | SwarmRecord | OtherRecord)


def parse_record(data: Mapping[str, Any]) -> MetricsRecord:
    """A metrics.jsonl object as its record class (by `event`); OtherRecord for another event or a damaged
    record. Never raises."""
    event = data.get("event")
    kind = EVENTS.get(event) if isinstance(event, str) else None
    if kind is not None:
        try:
            return cast(MetricsRecord, kind.from_json(data))
        except ValueError:
            pass
    return OtherRecord(dict(data))


# -- logs.jsonl ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LogRecord:
    """A site's `flare.log` record as logs.jsonl holds it. `data`: the record's other fields as the site sent them
    (value, data_type, step and any other keyword argument of flare.log; a `time` or `round` of the wrong type
    too). `to_json()` writes `round` and `key` first: the aggregator's object for the records our client sends
    (key first), the same content for another client's."""

    site: str
    round: int | None  # None: the line has no int round
    key: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float | None = None

    @property
    def value(self) -> Any:
        return self.data.get("value")

    @property
    def step(self) -> float | None:
        """The site's global step: the record's `step`, else its `global_step`; None when not a finite number."""
        return _number(self.data["step"] if "step" in self.data else self.data.get("global_step"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.time is None else {"time": self.time}
        if self.round is not None:
            out["round"] = self.round
        return {**out, "key": self.key, **self.data, "site": self.site}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LogRecord:
        """ValueError without a `site` or a non-empty `key`."""
        site, key = data.get("site"), data.get("key")
        if not isinstance(site, str) or not isinstance(key, str) or not key:
            raise ValueError(f"a LogRecord needs a `site` and a `key` (got {site!r:.60} and {key!r:.60})")
        rnd, time = _int(data.get("round")), _number(data.get("time"))
        taken = {"key", "site", *(["round"] if rnd is not None else []), *(["time"] if time is not None else [])}
        rest = {k: v for k, v in data.items() if k not in taken}
        return cls(site=site, round=rnd, key=key, data=rest, time=time)

    @classmethod
    def from_site(cls, site: str, round_: int, record: Mapping[str, Any]) -> LogRecord:
        """What the aggregator writes for a site's checked flare.log `record`: its round, the record, the site
        last (a `round` of the record's own wins, as it did in the dict the aggregator wrote)."""
        return cls.from_json({"round": round_, **record, "site": site})


def parse_log(data: Mapping[str, Any]) -> LogRecord | OtherRecord:
    """A logs.jsonl object as a LogRecord; OtherRecord when it has no site or key. Never raises."""
    try:
        return LogRecord.from_json(data)
    except ValueError:
        return OtherRecord(dict(data))


Record = MetricsRecord | LogRecord


# -- summary.json and baselines.json ------------------------------------------------------------------------------
def _rows(v: Any) -> tuple[RoundSummary, ...] | None:
    if not isinstance(v, list):
        return None
    rows = []
    for x in v:
        try:
            rows.append(RoundSummary.from_json(x))
        except ValueError:  # not a round's line: left out
            continue
    return tuple(rows)


@dataclass(frozen=True, kw_only=True)
class RoundSummary(_Json):
    """summary.json's line for one round: `uploaded_bytes` counts every update of the round (all attempts)."""

    round: int = _value(_int)
    updates: int | None = _value(_int, default=None)
    attempt: int = _value(_int, default=0)
    seconds: float | None = _value(_number, default=None)
    uploaded_bytes: float | None = _value(_number, default=None)
    metrics: dict[str, Any] = _value(_object, factory=dict)


def round_rows(updates: Iterable[UpdateRecord], rounds: Mapping[int, RoundRecord]) -> tuple[RoundSummary, ...]:
    """summary.json's `rounds`: each finished round (its latest "round" record), with the bytes of every update the
    sites uploaded in it (all attempts)."""
    sent: dict[int, int] = {}
    for u in updates:
        sent[u.round] = sent.get(u.round, 0) + int(u.bytes or 0)
    return tuple(
        RoundSummary(
            round=r,
            updates=rec.updates,
            attempt=rec.attempt,
            seconds=rec.seconds,
            uploaded_bytes=sent.get(r, 0),
            metrics=rec.metrics,
        )
        for r, rec in sorted(rounds.items())
    )


@dataclass(frozen=True, kw_only=True)
class RunSummary(_Json):
    """RUN_DIR/summary.json: written by the aggregator when its job is complete (`sites`: site -> {updates}), and
    by `fl-plugins run` at its end, over it (`sites`: site -> {exit_code, log}; `baselines`: baselines.json's
    object, as it was read). `final_model`: RUN_DIR/final, the final global model (a training job's);
    `final_evaluation`: the final global model's "evaluation" record (round, metrics, sites), when there is one."""

    name: str | None = _value(_str, default=None)
    recipe: str | None = _value(_str, default=None)
    exit_code: int | None = _value(_int, default=None)
    seconds: float | None = _value(_number, default=None)
    rounds_planned: int | None = _value(_int, default=None)
    rounds: tuple[RoundSummary, ...] = _value(_rows, factory=tuple)
    sites: dict[str, dict[str, Any]] = _value(_site_results, factory=dict)
    baselines: dict[str, Any] | None = _value(_object, default=None)
    job_id: str | None = _value(_str, default=None)
    final_model: str | None = _value(_str, default=None)
    final_evaluation: dict[str, Any] | None = _value(_object, default=None)


@dataclass(frozen=True, kw_only=True)
class Baselines(_Json):
    """RUN_DIR/baselines.json (a built-in task's `baselines: true`): the final global model (`global_metrics`,
    JSON key `global`) and each site's local-only model (`local_only`: site -> metrics), scored on the pooled
    validation set."""

    round: int | None = _value(_int, default=None)
    pooled_validation_rows: int | None = _value(_int, default=None)
    local_only: dict[str, dict[str, Any]] = _value(_site_results, factory=dict)
    global_metrics: dict[str, Any] | None = _value(_object, key="global", default=None)
