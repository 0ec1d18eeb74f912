"""The job's progress as the Status RPC shows it (service.py decides which view a caller gets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator


def view(agg: Aggregator, site: str | None = None) -> dict[str, Any]:
    """Lock held. `site` None: everything (the operator's view: in-process callers, and over the Status RPC the
    server kit's certificate); a site's name: the job and round and that site's own entries only (`sites` lists
    at most itself, `uploads` only its own; no totals over all sites); "": the job and round only."""
    rounds = agg.rounds
    job = {"job_id": agg.job_id, "round": rounds.round, "attempt": rounds.attempt, "done": agg.done}
    job["total_rounds"] = agg.config.total_rounds
    job["phase"] = agg.job.phase or ("training" if agg.job.trains and not agg.job.trained else "")
    uploads = [u for u in agg.uploads.live.values() if site is None or u.site == site]
    names = sorted(rounds.sites) if site is None else [site] if site in rounds.sites else []
    progress = {
        u.id: {
            "site": u.site,
            "round": u.round,
            "attempt": u.attempt,
            "initial": u.initial,
            "bytes_received": u.bytes_received,
            "corrupted_chunks": u.corrupted_chunks,
            "offsets": [rx.offset for rx in u.receivers],
        }
        for u in uploads
    }
    mine = {"sites": names, "uploads": progress}
    if site is None:
        return {**job, **mine, **agg.stats}
    return {**job, "site": site, **mine} if site else job
