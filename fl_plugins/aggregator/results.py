"""What a closed round (`round_record`) and an evaluation phase (job.py's phases) leave behind: records in
RUN_DIR/metrics.jsonl and, for cross-site evaluation, the matrix RUN_DIR/cross_site_eval.json:

    {"round": 5,                                  # the global model's round
     "models": ["global", "site-1", "site-2"],    # model owners: the global model, then the submitted ones
     "sites": ["site-1", "site-2"],               # the evaluating sites
     "results": {"site-1": {"site-2": {"metrics": {"accuracy": 0.91}, "num_samples": 500},
                            "site-1": {"error": "no answer within evaluate_timeout (60 s)"}}, ...},
     "submissions": {"site-3": {"error": "the site left before it answered"}, ...},   # models that are missing
     "means": {"global": {"accuracy": 0.9}, ...}}                                     # per model, over sites

An evaluation of the global model (`evaluate_every`, and the final evaluation: `evaluate_final`) is one
"evaluation" record: its round, each site's metrics, and their mean (weighted by the sites' NUM_EVAL_SAMPLES when
every site gave one). A training job's cross-site evaluation writes one for the global model's column too, unless
its round has one already.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fl_plugins.aggregator.evaluation import GLOBAL, Sweep
from fl_plugins.aggregator.files import write_atomic
from fl_plugins.aggregator.job import CROSS, EVALUATE, FINAL, SUBMIT
from fl_plugins.aggregator.rounds import RoundState
from fl_plugins.records import CrossSiteRecord, EvaluationRecord, RoundRecord

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator

log = logging.getLogger(__name__)

CROSS_SITE_FILE = "cross_site_eval.json"


def record(agg: Aggregator, phase: str, sweep: Sweep) -> None:
    """Lock held. Write what phase `phase` found."""
    if phase in (EVALUATE, FINAL):
        _evaluation(agg, sweep, "the final global model" if phase == FINAL else "the global model")
    elif phase == SUBMIT:
        missing = {s: row["submit"] for s, row in _rows(sweep).items() if "error" in row["submit"]}
        log.info("cross-site evaluation: %d models submitted, missing: %s", len(sweep.ok_sites()), missing or "none")
    elif phase == CROSS:
        matrix = cross_site_matrix(sweep, agg.job.submissions)
        write_atomic(agg.config.run_dir / CROSS_SITE_FILE, json.dumps(matrix, indent=1))
        agg.record(CrossSiteRecord(round=sweep.round, means=matrix["means"]))
        log.info("cross-site evaluation written to %s", agg.config.run_dir / CROSS_SITE_FILE)
        job = agg.job
        if job.trains and sweep.round not in job.evaluated and not job.evaluated_already(sweep.round):
            _evaluation(agg, sweep, "the final global model")


def _evaluation(agg: Aggregator, sweep: Sweep, what: str) -> None:
    """Lock held. The "evaluation" record of the global model's column of `sweep`."""
    table = sweep.table()[GLOBAL]
    mean = sweep.mean(GLOBAL)
    agg.record(EvaluationRecord(round=sweep.round, metrics=mean, sites=table))
    agg.job.evaluated.add(sweep.round)
    log.info("%s (round %d) evaluated at %d sites: %s", what, sweep.round, len(table), mean)


def _rows(sweep: Sweep) -> dict[str, dict[str, dict[str, Any]]]:
    """{site: {"submit": cell}} of a SUBMIT_MODEL sweep."""
    table = sweep.table()
    model = sweep.models[0]
    return {site: {"submit": cell} for site, cell in table[model].items()}


def cross_site_matrix(sweep: Sweep, submissions: Sweep | None) -> dict[str, Any]:
    table = sweep.table()
    missing = {}
    if submissions is not None:
        missing = {s: row["submit"] for s, row in _rows(submissions).items() if "error" in row["submit"]}
    return {
        "round": sweep.round,
        "models": list(sweep.models),
        "sites": sorted(sweep.cells),
        "results": table,
        "submissions": missing,
        "means": {m: sweep.mean(m) for m in sweep.models},
    }


def round_record(
    rounds: RoundState,
    records: list[dict],
    weight: float,
    metrics: dict,
    checkpoint_s: float,
    seconds: float,
    line: dict | None = None,
) -> RoundRecord:
    """A closed round's record: `seconds` from its first attempt's start (the rules' clock) to its checkpoint;
    `line`: its timeline (timeline.py)."""
    return RoundRecord(
        round=rounds.round,
        attempt=rounds.attempt,
        updates=len(records),
        sites=tuple(sorted(rec["site"] for rec in records)),
        weight=weight,
        metrics=metrics,
        refolds=rounds.refolds(),
        checkpoint_seconds=checkpoint_s,
        seconds=round(seconds, 3),
        timeline=line or {},
    )
