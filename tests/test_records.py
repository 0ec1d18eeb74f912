"""fl_plugins/records.py: the run directory's records as the aggregator writes them, read back the one way the
runner, the report and the trackers read them."""

from __future__ import annotations

import json

import pytest

from fl_plugins import record_files, records
from fl_plugins.aggregator.store import RunStore
from fl_plugins.record_files import JsonlTail, RunMetrics, read_records
from fl_plugins.records import (
    AttemptRecord,
    Baselines,
    CrossSiteRecord,
    EvaluationRecord,
    LogRecord,
    OtherRecord,
    RefoldRecord,
    RoundRecord,
    RoundSummary,
    RunSummary,
    SampleRecord,
    UpdateLostRecord,
    UpdateRecord,
    parse_log,
    parse_record,
)

# each record kind, and the object the aggregator (or the runner, or a built-in task) writes for it today
WRITTEN = [
    (
        UpdateRecord(
            round=2,
            attempt=1,
            site="site-1",
            weight=19.0,
            params_type="FULL",
            bytes=1084,
            bytes_received=2168,
            corrupted_chunks=1,
            seconds=0.003,
            metrics={"val_acc": 0.92},
            timeline={"upload": 0.003, "download": 0.01, "train": 1.2, "wait": 0.02},
        ),
        {
            "event": "update",
            "round": 2,
            "attempt": 1,
            "site": "site-1",
            "weight": 19.0,
            "params_type": "FULL",
            "bytes": 1084,
            "bytes_received": 2168,
            "corrupted_chunks": 1,
            "seconds": 0.003,
            "metrics": {"val_acc": 0.92},
            "timeline": {"upload": 0.003, "download": 0.01, "train": 1.2, "wait": 0.02},
        },
    ),
    (
        RoundRecord(
            round=2,
            attempt=1,
            updates=2,
            sites=("site-1", "site-2"),
            weight=38.0,
            metrics={"val_acc": 0.9333333},
            refolds=1,
            checkpoint_seconds=0.002,
            seconds=1.664,
            timeline={"write": 0.002, "fold_wait": 0.05, "downloads": 0.3, "last_update": 1.6},
        ),
        {
            "event": "round",
            "round": 2,
            "attempt": 1,
            "updates": 2,
            "sites": ["site-1", "site-2"],
            "weight": 38.0,
            "metrics": {"val_acc": 0.9333333},
            "refolds": 1,
            "checkpoint_seconds": 0.002,
            "seconds": 1.664,
            "timeline": {"write": 0.002, "fold_wait": 0.05, "downloads": 0.3, "last_update": 1.6},
        },
    ),
    (
        AttemptRecord(round=3, attempt=2, counted=("site-2",)),
        {"event": "attempt", "round": 3, "attempt": 2, "counted": ["site-2"]},
    ),
    (
        RefoldRecord(round=3, attempt=0, partial=("site-1",), owed=("site-2", "site-3")),
        {"event": "refold", "round": 3, "attempt": 0, "partial": ["site-1"], "owed": ["site-2", "site-3"]},
    ),
    (
        UpdateLostRecord(round=3, attempt=0, site="site-2", reason="its resend failed"),
        {"event": "update_lost", "round": 3, "attempt": 0, "site": "site-2", "reason": "its resend failed"},
    ),
    (
        SampleRecord(round=3, attempt=1, sites=("site-1", "site-3"), alive=3, seed=7),
        {"event": "sample", "round": 3, "attempt": 1, "sites": ["site-1", "site-3"], "alive": 3, "seed": 7},
    ),
    (
        EvaluationRecord(
            round=4,
            metrics={"mean": 1.75},
            sites={
                "site-1": {"metrics": {"mean": 7.0}, "num_samples": 100.0},
                "site-2": {"error": "the site left before it answered"},
            },
        ),
        {
            "event": "evaluation",
            "round": 4,
            "metrics": {"mean": 1.75},
            "sites": {
                "site-1": {"metrics": {"mean": 7.0}, "num_samples": 100.0},
                "site-2": {"error": "the site left before it answered"},
            },
        },
    ),
    (
        CrossSiteRecord(round=5, means={"global": {"acc": 0.9}, "site-1": {"acc": 0.7}}),
        {"event": "cross_site_eval", "round": 5, "means": {"global": {"acc": 0.9}, "site-1": {"acc": 0.7}}},
    ),
    (
        LogRecord(site="site-1", round=0, key="train_loss", data={"value": 0.41, "data_type": "SCALAR", "step": 7}),
        {"round": 0, "key": "train_loss", "value": 0.41, "data_type": "SCALAR", "step": 7, "site": "site-1"},
    ),
    (
        RunSummary(
            name="quickstart",
            recipe="recipes/quickstart.yaml",
            exit_code=0,
            seconds=5.012,
            rounds_planned=1,
            rounds=(
                RoundSummary(
                    round=0, updates=3, attempt=0, seconds=1.664, uploaded_bytes=3252, metrics={"val_acc": 0.18}
                ),
            ),
            sites={"site-1": {"exit_code": 0, "log": "run/sites/site-1.log"}},
        ),
        {
            "name": "quickstart",
            "recipe": "recipes/quickstart.yaml",
            "exit_code": 0,
            "seconds": 5.012,
            "rounds_planned": 1,
            "rounds": [
                {
                    "round": 0,
                    "updates": 3,
                    "attempt": 0,
                    "seconds": 1.664,
                    "uploaded_bytes": 3252,
                    "metrics": {"val_acc": 0.18},
                }
            ],
            "sites": {"site-1": {"exit_code": 0, "log": "run/sites/site-1.log"}},
        },
    ),
    (
        Baselines(
            round=4, pooled_validation_rows=480, local_only={"site-1": {"loss": 0.9}}, global_metrics={"loss": 0.35}
        ),
        {"round": 4, "pooled_validation_rows": 480, "local_only": {"site-1": {"loss": 0.9}}, "global": {"loss": 0.35}},
    ),
]
EVENTS = [(rec, obj) for rec, obj in WRITTEN if "event" in obj]  # metrics.jsonl's kinds


def _ids(cases: list) -> list[str]:
    return [type(rec).__name__ for rec, _ in cases]


@pytest.mark.parametrize(("rec", "obj"), WRITTEN, ids=_ids(WRITTEN))
def test_each_kind_writes_todays_object_and_reads_it_back(rec, obj):
    assert rec.to_json() == obj and list(rec.to_json()) == list(obj)  # the keys in the order written today
    assert type(rec).from_json(obj) == rec
    if isinstance(rec, (RunSummary, Baselines)):
        return  # JSON files, not lines
    line = json.loads(json.dumps({"time": 1.5, **obj}))  # as the store appends it: the time first
    back = type(rec).from_json(line)
    assert back.time == 1.5 and back.to_json() == line and list(back.to_json()) == list(line)


@pytest.mark.parametrize(("rec", "obj"), EVENTS, ids=_ids(EVENTS))
def test_parse_record_dispatches_on_the_event(rec, obj):
    assert parse_record(obj) == rec


def test_lines_appended_by_the_store_round_trip(tmp_path):
    store = RunStore(tmp_path)
    store.append(records.METRICS, [rec.to_json() for rec, _ in EVENTS])
    read = read_records(tmp_path / records.METRICS)
    assert [type(r) for r in read] == [type(rec) for rec, _ in EVENTS]
    lines = [json.loads(x) for x in (tmp_path / records.METRICS).read_text().splitlines()]
    assert [r.to_json() for r in read] == lines and all(isinstance(r.time, float) for r in read)


def test_a_log_record_is_what_the_aggregator_wrote():
    record = {"key": "loss", "value": 0.5, "data_type": "SCALAR", "global_step": 12}
    rec = LogRecord.from_site("site-2", 4, record)
    assert rec.to_json() == {"round": 4, **record, "site": "site-2"}
    assert list(rec.to_json()) == ["round", "key", "value", "data_type", "global_step", "site"]
    assert (rec.value, rec.step) == (0.5, 12)  # `step`, else `global_step`
    assert LogRecord.from_site("site-2", 4, {"key": "x", "round": 9}).round == 9  # the record's own round wins
    assert LogRecord.from_site("s", 1, {"key": "x", "step": True, "global_step": 3}).step is None  # no bool step
    assert parse_log({"round": 1, "key": "x", "value": 1}) == OtherRecord({"round": 1, "key": "x", "value": 1})
    assert parse_log({"key": "", "site": "s"}) == OtherRecord({"key": "", "site": "s"})
    odd = {"round": "one", "value": 1, "key": "k", "site": "s"}  # another client's record, a round not an int
    assert parse_log(odd).round is None and parse_log(odd).to_json() == odd  # its content kept


def test_an_unknown_event_is_kept_as_it_is():
    obj = {"time": 3.0, "event": "site_vote", "round": 2, "site": "site-1", "scores": {"acc": 0.9}}
    rec = parse_record(obj)
    assert rec == OtherRecord(obj) and rec.event == "site_vote" and rec.to_json() == obj
    for odd in ({}, {"event": ["update"]}, {"event": None, "round": 1}, {"event": "round"}):
        assert isinstance(parse_record(odd), OtherRecord)


def test_a_newer_or_older_writer_is_read_as_far_as_it_goes():
    newer = {"event": "update", "round": 1, "site": "a", "bytes": 10, "compression": "zstd", "shards": [1, 2]}
    rec = parse_record(newer)
    assert isinstance(rec, UpdateRecord) and rec.bytes == 10 and rec.attempt == 0 and rec.metrics == {}
    assert rec.weight is None and "weight" not in rec.to_json() and "compression" not in rec.to_json()
    older = parse_record({"event": "round", "round": 0, "seconds": 1.5})  # no attempt, updates, sites, ...
    assert older == RoundRecord(round=0, seconds=1.5) and older.updates is None and older.sites is None
    # a value of the wrong type counts as absent; a record without what it needs is not of its kind
    wrong = parse_record({"event": "round", "round": 0, "seconds": "fast", "updates": True, "weight": float("nan")})
    assert (wrong.seconds, wrong.updates, wrong.weight) == (None, None, None)
    for damaged in (
        {"event": "update", "round": 1},
        {"event": "update", "round": "1", "site": "a"},
        {"event": "round", "round": True},
    ):
        assert parse_record(damaged) == OtherRecord(damaged)
    assert RunSummary.from_json({"rounds": [{"round": 0}, "junk", {"updates": 2}]}).rounds == (RoundSummary(round=0),)


def test_lists_become_tuples():
    assert RoundRecord(round=0, sites=["b", "a"]) == RoundRecord(round=0, sites=("b", "a"))
    assert RoundRecord(round=0, sites=["b", "a"]).to_json()["sites"] == ["b", "a"]


def _update(r: int, site: str = "a") -> str:
    return json.dumps(UpdateRecord(round=r, site=site).to_json()) + "\n"


def test_the_tail_reads_whole_lines_only(tmp_path):
    path = tmp_path / records.METRICS
    tail = JsonlTail(path)
    assert tail.read() == []  # no file yet
    line = _update(0)
    path.write_text(line[:17])  # a line being written
    assert tail.read() == [] and tail.offset == 0
    with path.open("a") as f:
        f.write(line[17:] + _update(1)[:5])
    assert tail.read() == [UpdateRecord(round=0, site="a")] and tail.offset == len(line)
    with path.open("a") as f:
        f.write(_update(1)[5:] + "not json\n[1, 2]\n\n" + _update(2, "b"))
    assert [(r.round, r.site) for r in tail.read()] == [(1, "a"), (2, "b")]
    assert tail.read() == [] and tail.offset == path.stat().st_size


def test_the_tail_says_where_each_record_ends(tmp_path):
    path = tmp_path / records.LOGS
    lines = [json.dumps({"round": 0, "key": "k", "value": i, "site": "s"}) + "\n" for i in range(3)]
    path.write_text("".join(lines))
    ends = JsonlTail(path, records.parse_log).read_ends()
    assert [end for end, _ in ends] == [sum(len(x) for x in lines[: i + 1]) for i in range(3)]
    assert [rec.value for _, rec in ends] == [0, 1, 2] and all(isinstance(r, LogRecord) for _, r in ends)


def test_read_records_takes_a_last_line_without_its_newline(tmp_path):
    path = tmp_path / records.METRICS
    path.write_text(_update(0) + _update(1).rstrip("\n"))
    assert [r.round for r in read_records(path)] == [0, 1]
    path.write_text(_update(0) + _update(1)[:20])  # half a line: left out
    assert [r.round for r in read_records(path)] == [0]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_run_metrics_keeps_the_updates_and_each_rounds_latest_record():
    m = RunMetrics()
    first, again = RoundRecord(round=0, attempt=0, seconds=1.0), RoundRecord(round=0, attempt=1, seconds=2.0)
    m.add([UpdateRecord(round=0, site="a"), first, OtherRecord({"event": "x"}), again])
    assert m.updates == [UpdateRecord(round=0, site="a")] and m.rounds == {0: again}


def test_read_object(tmp_path):
    assert record_files.read_object(tmp_path / "summary.json") is None
    (tmp_path / "summary.json").write_text("[1]")
    assert record_files.read_object(tmp_path / "summary.json") is None
    (tmp_path / "summary.json").write_text("{oops")
    with pytest.raises(ValueError):
        record_files.read_object(tmp_path / "summary.json")
