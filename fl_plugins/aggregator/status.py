"""The job's progress as the Status RPC shows it (service.py decides which view a caller gets).

The operator's view adds each site's state and last contact and each upload's progress. Its times are relative,
in seconds, taken with the aggregator's clock when the view is made (`last_contact_s`: how long ago the site's
last call came; an upload's `seconds`: since it began), so a caller on another machine needs no clock of its
own; two views made a moment apart differ in them. A site's `state` is one word for the operator (`fl-plugins
status`), for the current round or evaluation phase:

    silent        no call for `site_timeout` or longer: the aggregator no longer waits for it
    sent          its update of this round is counted
    uploading     an upload of it is in flight (`uploads` has its progress)
    resend asked  a refold asked for its counted update again
    sitting out   it left a partial update behind and sits out this attempt
    training      it took this round's task and has not sent yet
    evaluating    (an evaluation phase) it has a task of the phase not answered yet; `evaluated`: all answered
    connected     none of these: it waits for a task
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator
    from fl_plugins.aggregator.rounds import SiteState


def view(agg: Aggregator, site: str | None = None) -> dict[str, Any]:
    """Lock held. `site` None: everything (the operator's view: in-process callers, and over the Status RPC the
    operator's certificate or the server kit's), with each site's state and last contact and each upload's
    progress; a site's name: the job and round and that site's own entries only (`sites` lists at most itself,
    `uploads` only its own; no totals over all sites); "": the job and round only."""
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
        return {**job, **operator_details(agg, progress), **mine, **agg.stats}
    return {**job, "site": site, **mine} if site else job


def operator_details(agg: Aggregator, progress: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What only the operator's view holds: `site_timeout`, `site_states` (every site's state and last contact),
    and in each entry of `progress` (the uploads, added in place) `bytes_verified`, `bytes_planned`, `seconds`
    and `committed`. Lock held."""
    now = agg.clock()
    for uid, entry in progress.items():
        u = agg.uploads.live[uid]
        entry["bytes_verified"] = sum(rx.offset for rx in u.receivers)
        entry["bytes_planned"] = u.manifest.total_bytes
        entry["seconds"] = round(max(0.0, now - u.started), 1)
        entry["committed"] = u.committed
    states = {n: site_state(agg, s, now) for n, s in sorted(agg.rounds.sites.items())}
    return {"site_timeout": agg.config.site_timeout, "site_states": states}


def site_state(agg: Aggregator, s: SiteState, now: float) -> dict[str, Any]:
    """One site's `state` (the module docstring) and `last_contact_s`. Lock held."""
    rounds = agg.rounds
    uploading = any(u.site == s.name and not u.committed and not u.dead for u in agg.uploads.live.values())
    sweep = agg.job.sweep
    row = sweep.cells.get(s.name) if sweep is not None else None
    if not rounds.alive(s, now):
        state = "silent"
    elif row:
        state = "evaluated" if all(c.filled for c in row.values()) else "evaluating"
    elif s.name in rounds.counted:
        state = "sent"
    elif uploading:
        state = "uploading"
    elif s.name in rounds.owed:
        state = "resend asked"
    elif s.sits_out == (rounds.round, rounds.attempt):
        state = "sitting out"
    elif s.took == (rounds.round, rounds.attempt) and not agg.job.trained:
        state = "training"
    else:
        state = "connected"
    return {"state": state, "last_contact_s": round(max(0.0, now - s.last_seen), 1)}
