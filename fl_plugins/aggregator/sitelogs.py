"""A site's flare.log records: checked, appended to RUN_DIR/logs.jsonl with the caller's site; a policy refusal
among them (the site's own policy refused the job or a task) makes the site gone at once, and its open evaluation
cells say why."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fl_plugins.records import LogRecord
from fl_plugins.wire import limits

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator

log = logging.getLogger(__name__)


def append(agg: Aggregator, site: str, round_: int, records: list[dict]) -> None:
    """Check `records` (limits.check_log_records: ProtocolError naming the limit), then append them."""
    records = limits.check_log_records(f"site {site!r}", records)
    with agg.lock:
        agg.rounds.touch(site, agg.clock())
    # the caller's site last: a record cannot pass itself off as another site's
    agg.store.append("logs.jsonl", [LogRecord.from_site(site, round_, r).to_json() for r in records])
    refusal = next((r for r in records if r.get("key") == "policy_refused"), None)
    if refusal is None:
        return
    with agg.lock:  # the site's own policy refused the job or the task: it is gone, do not wait for it
        s = agg.rounds.sites.get(site)
        if s is not None:
            s.last_seen = float("-inf")
        if agg.job.sweep is not None:  # its open cells say why they stay empty
            agg.job.sweep.refuse(site, f"refused by the site's policy: {refusal.get('value')}")
        log.warning("site %r left: its policy refused: %s", site, refusal.get("value"))
        agg.lock.notify_all()
