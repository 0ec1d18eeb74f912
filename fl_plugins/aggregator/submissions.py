"""A SUBMIT_MODEL task's answer coming in (cross-site evaluation): the site's local model, checked before its first
byte (FULL params of the global model's tensors, the aggregator's chunk size, an open cell of the running submit
phase), streamed into its folder (models.py) and served once committed. Whatever is wrong with it fills the site's
cell with the reason. The committed upload stays until the phase ends (a retried commit is "already committed").
intake.py hands these uploads here: `begin` takes the coordinator's lock, `commit` is called with it held.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fl_plugins.aggregator.uploads import Upload, check_chunk_bytes, check_plan, parse_update, upload_key
from fl_plugins.errors import FLError, ProtocolError, RoundError

if TYPE_CHECKING:
    from fl_plugins.aggregator.intake import Intake

log = logging.getLogger(__name__)


def begin(intake: Intake, site: str, round_: int, manifest_json: str, nonce: str, task_id: str) -> Upload:
    """A SUBMIT_MODEL task's answer: the site's local model, FULL params of the global model's tensors, kept
    for cross-site evaluation (models.py). What is wrong with it fills the site's cell with the reason."""
    sha = upload_key(site, manifest_json, nonce)
    with intake.lock:
        s = intake.rounds.touch(site, intake.agg.clock())
        sweep = intake.agg.job.sweep
        if sweep is None or sweep.kind != "submit_model":
            raise RoundError(f"site {site!r}: no model submission is running; the model is not taken")
        sweep.cell(s.name, task_id)
        upload_id = f"{site}:{round_}:0:sub:{nonce}"
        existing = intake.uploads.get(upload_id)
        if existing is not None and not existing.dead and existing.manifest_sha == sha:
            return existing  # a resume
        try:
            manifest, params_type, _ = parse_update(site, manifest_json)
            check_chunk_bytes(site, manifest, intake.config.chunk_bytes)
            if params_type != "FULL":
                raise ProtocolError(
                    f"site {site!r}: a submitted model must be FULL params (its best or last local model), got "
                    "DIFF: send the model's weights, not their difference"
                )
            assert intake.agg.global_manifest is not None
            check_plan(intake.agg.global_manifest, manifest, f"the model submitted by site {site!r}", submitted=True)
        except FLError as e:
            sweep.fail(site, task_id, str(e))
            intake.lock.notify_all()
            raise
        for old in [x for x in intake.uploads.live.values() if x.site == site and x.task_id]:
            intake.uploads.kill(old, intake.rounds)
        u = Upload(upload_id, site, round_, 0, manifest, 1.0, "FULL", False, nonce, sha, task_id=task_id)
        u.started = u.last_progress = intake.agg.clock()
        u.epoch = intake.uploads.epoch  # (its chunks are checked against the epoch, as an update's are)
        intake.agg.models.begin(u)
        intake.uploads.add(u)
        log.info("site %r uploading its local model (%.1f MB)", site, manifest.total_bytes / 1e6)
        return u


def commit(intake: Intake, u: Upload, digests: list[str]) -> dict[str, Any]:
    """Lock held. A submitted model arrived whole: served to the sites for cross-site evaluation. The upload
    stays (committed) until the phase ends, so a retried commit is answered "already committed"."""
    sweep = intake.agg.job.sweep
    try:
        if sweep is None or sweep.kind != "submit_model":
            raise RoundError(f"site {u.site!r}: the model submission ended before this model arrived; not taken")
        sweep.cell(u.site, u.task_id)
    except RoundError:
        intake.uploads.kill(u, intake.rounds)
        raise
    u.committed = True
    intake.rounds.touch(u.site, intake.agg.clock())
    try:
        manifest = intake.agg.models.commit(u, digests)
    except BaseException as e:
        intake.uploads.kill(u, intake.rounds)
        sweep.fail(u.site, u.task_id, f"the aggregator could not keep the model: {e}")
        raise
    finally:
        intake.lock.notify_all()
    intake.agg.job.submitted[u.site] = manifest
    sweep.submitted(u.site, u.task_id, intake.agg.clock())
    log.info("site %r submitted its local model for cross-site evaluation", u.site)
    return {"round": u.round, "message": "model accepted for cross-site evaluation"}
