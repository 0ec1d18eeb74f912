"""Where a round's time goes (aggregator/timeline.py): each update's wait / download / train / upload and each
round's downloads / last_update / fold_wait / write, in metrics.jsonl, from the aggregator's own clock."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_sites

from fl_plugins.aggregator.timeline import Timeline
from fl_plugins.records import RoundRecord, UpdateRecord


def test_the_timeline_of_an_update_and_of_its_round_from_the_aggregators_clock():
    t = Timeline(clock=lambda: 0.0)
    t.download("a", 3, 10.0, 11.0)  # shard 0, then a resumed shard 1: one span from the first start to the last end
    t.download("a", 3, 10.5, 12.5)
    t.download("b", 3, 10.2, 11.2)
    t.download("a", 4, 99.0, 99.5)  # the next round: kept apart
    assert t.update("a", 3, began=9.0, upload_started=20.0, now=21.0) == {
        "upload": 1.0, "download": 2.5, "train": 7.5, "wait": 1.0}  # fmt: skip
    assert t.update("b", 3, began=9.0, upload_started=15.0, now=16.0)["train"] == 3.8
    assert t.update("c", 3, began=9.0, upload_started=1.0, now=2.0) == {"upload": 1.0}  # offered: no download
    line = t.close(3, ["a", "b"], began=9.0, closing=21.5, write=0.25)
    assert line == {"write": 0.25, "fold_wait": 0.5, "downloads": 3.5, "last_update": 12.0}
    assert ("a", 3) not in t.downloads and ("a", 4) in t.downloads and 3 not in t.commits
    assert t.close(5, [], began=None, closing=1.0, write=0.1) == {"write": 0.1}  # nothing known: nothing made up


@pytest.mark.integration
def test_metrics_jsonl_says_where_each_round_went(server_factory):
    srv = server_factory(rounds=2, min_sites=2, initial={"w": np.zeros(64, np.float32)})

    def step(r, p):
        return {"w": p["w"] + 1}, "FULL", 1.0

    run_sites(srv.address, {"site-1": step, "site-2": step})
    assert srv.wait() == 0
    lines = [json.loads(x) for x in (srv.aggregator.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [UpdateRecord.from_json(x) for x in lines if x["event"] == "update"]
    rounds = {x["round"]: RoundRecord.from_json(x) for x in lines if x["event"] == "round"}
    assert sorted(rounds) == [0, 1] and len(updates) == 4
    for u in updates:
        assert set(u.timeline) == {"wait", "download", "train", "upload"}, u
        assert u.timeline["upload"] == u.seconds
    for r, rec in rounds.items():
        assert set(rec.timeline) == {"downloads", "last_update", "fold_wait", "write"}, rec
        assert rec.timeline["write"] == rec.checkpoint_seconds
        ups = [u for u in updates if u.round == r]
        # one clock: the start-to-commit of each update adds up to at most its round's last update (3 ms rounding)
        ends = [sum(u.timeline.values()) for u in ups]
        assert max(ends) == pytest.approx(rec.timeline["last_update"], abs=0.004)
        assert rec.timeline["downloads"] == pytest.approx(
            max(u.timeline["wait"] + u.timeline["download"] for u in ups), abs=0.003)  # fmt: skip
        assert rec.timeline["last_update"] <= rec.seconds

    from io import StringIO

    from rich.console import Console

    from fl_plugins.report import report
    from fl_plugins.report_timeline import timeline_rows

    rows = timeline_rows(rounds, updates)
    assert [row[0] for row in rows] == ["0", "1"] and all(len(row) == 9 and all(row) for row in rows)
    out = StringIO()
    report(srv.aggregator.config.run_dir, console=Console(file=out, width=200), plots=False, partial=True)
    assert "where each round went" in out.getvalue() and "fold wait" in out.getvalue()
