"""`fl-plugins report` on a swarm job's run directory (issue 13's check): per round, the site that aggregated it and
the sealed bytes moved through the aggregator's relay and directly, in the table and in bytes.png; a run without
"swarm" records keeps the FedAvg table. The run is real: tests/test_swarm.py's 3-site job over mTLS."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from fl_plugins._text import human_bytes
from fl_plugins.record_files import read_records
from fl_plugins.records import SwarmRecord
from fl_plugins.report import SWARM_COLUMNS, load_run, report, round_rows, write_plots
from fl_plugins.security.provision import provision_local
from tests.test_swarm import ROUNDS, SITES, run_swarm, server

pytestmark = pytest.mark.integration
pytest.importorskip("matplotlib")
pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory) -> Path:
    """A finished 3-site, 3-round swarm job (round robin: site-1, site-2, site-3 aggregate in turn)."""
    tmp = tmp_path_factory.mktemp("report-swarm")
    kits = provision_local(tmp / "kits", list(SITES))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the sites' output folders: ./fl-output/JOB/SITE
        with server(tmp, kits) as srv:
            run_swarm(srv.address, kits)
    return tmp / "run"


def _console():
    from rich.console import Console

    buf = io.StringIO()
    return Console(file=buf, width=250, color_system=None), buf


def _swarm_records(run_dir: Path) -> dict[int, SwarmRecord]:
    return {r.round: r for r in read_records(run_dir / "metrics.jsonl") if isinstance(r, SwarmRecord)}


def test_the_table_says_who_aggregated_each_round_and_the_bytes_relayed_and_direct(swarm_run):
    recs = _swarm_records(swarm_run)
    assert sorted(recs) == list(range(ROUNDS))
    console, buf = _console()
    rep = report(swarm_run, console=console)
    text = buf.getvalue()
    header = next(line for line in text.splitlines() if "aggregated by" in line)
    cols = [c.strip() for c in header.strip("┃│ ").split("┃")]
    assert cols[:9] == ["round", "updates", "seconds", "uploaded", "upload rate", *SWARM_COLUMNS, "metrics of"]
    rows = {int(c[0]): c for c in (_cells(line) for line in text.splitlines()) if c and c[0].isdigit()}
    assert sorted(rows) == list(range(ROUNDS))
    for r, rec in recs.items():
        assert rec.bytes_relayed and rec.bytes_relayed > 0 and rec.bytes_direct == 0
        site, relayed, direct = rows[r][5:8]
        assert (site, relayed, direct) == (SITES[r], human_bytes(rec.bytes_relayed), "0 B")
    assert [row.swarm.site if row.swarm else None for row in round_rows(rep.run)] == list(SITES)
    assert "note:" not in text  # a finished run (the aggregator wrote summary.json)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")] if line.startswith("│") else []


def test_bytes_png_shows_relayed_and_direct_bytes_beside_the_updates(swarm_run):
    from fl_plugins import report_plots

    run = load_run(swarm_run)
    fig = report_plots.bytes_plot(run, report_plots.colors(list(SITES)))
    assert not isinstance(fig, str)
    updates, swarm = fig.axes
    assert "sealed bytes moved in the round" in swarm.get_ylabel()
    assert [t.get_text() for t in swarm.texts] == list(SITES)  # who aggregated, above each round's bar
    assert [t.get_text() for t in swarm.get_legend().get_texts()] == ["through the relay", "direct (none)"]
    heights = [p.get_height() for p in swarm.patches]
    relayed = [rec.bytes_relayed for _, rec in sorted(_swarm_records(swarm_run).items())]
    scale = 1e3 if max(relayed) < 1e6 else 1e6
    assert heights == pytest.approx([v / scale for v in relayed])
    written, skipped = write_plots(run, swarm_run / "report-again")
    assert swarm_run / "report-again" / "bytes.png" in written and not any("bytes.png" in s for s in skipped)
    assert (swarm_run / "report-again" / "bytes.png").stat().st_size > 5_000


def test_a_run_without_swarm_records_keeps_the_fedavg_table(swarm_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(swarm_run, run_dir, ignore=shutil.ignore_patterns("relay", "report", "global"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(ln for ln in lines if json.loads(ln)["event"] != "swarm"))
    console, buf = _console()
    rep = report(run_dir, console=console, plots=False)
    text = buf.getvalue()
    assert "round" in text and "metrics of" in text
    assert "aggregated by" not in text and "relayed" not in text
    assert all(row.swarm is None for row in round_rows(rep.run))
