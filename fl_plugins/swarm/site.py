"""A site's part in a swarm job (docs/swarm.md; the aggregator's side is aggregator/swarm.py).

Nothing changes for the training script: its session (client/session.py) hands this class the tasks that carry
sealed transfers, and it does, beside the script's own `receive()` / `send()`:

  * receive: a TRAIN task's global model is a sealed transfer at the relay (`model_transfer`, sealed by
    `model_sender`): it is fetched record by record, each record checked and opened (security/seal.py), and its
    frames land in the script's tensors as a Download's do, and in the site's files (models.py).
  * send: the update is sealed for the round's aggregator site alone (`peers_json`) and put at the relay as
    `transfer_id`; the relay's commit counts it. The update stays referenced (not copied) until the next task, so a
    failover's RESEND seals the same bytes for the new aggregator site without training again.
  * offer: round 0's weights, when the aggregator has no initial model, sealed for every site connected then.
  * aggregate: a second long poll (the aggregator lane, a daemon thread) waits for AGGREGATE. The round's model is
    written to this site's output folder (`FL_OUTPUT_DIR`, default ./fl-output/JOB/SITE: global/round-R), every
    input update is fetched, opened and folded in the task's order by the service's own fold (aggregator/fedavg.py
    through uploads.py's FoldSink: FULL or DIFF, NUM_STEPS_CURRENT_ROUND weights, NaN refused), the new global model
    is written beside it (store.py `write_shard`) and sealed for the next round's sites. Memory: the fold's
    float32 accumulator and one record at a time; the models are files. An update that fails its checks (forged,
    tampered, another model's tensors) is left out with a warning naming its site, and the round goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins import tensors
from fl_plugins.aggregator.offer import FileSink
from fl_plugins.aggregator.optimizers import FedAvg
from fl_plugins.aggregator.store import GlobalReader, write_shard
from fl_plugins.aggregator.uploads import FoldSink, Upload, check_plan, parse_update
from fl_plugins.client.relay import ModelRecords, put_sealed, read_stream, read_update
from fl_plugins.client.transfers import KeptUpdate
from fl_plugins.errors import ConfigError, FLError
from fl_plugins.security.seal import Certificates, Identity, Opener, Sealer, SealError
from fl_plugins.swarm.models import SiteModels
from fl_plugins.swarm.peer import Inbox, dial
from fl_plugins.wire import limits
from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES, Manifest, plan_shards
from fl_plugins.wire.proto import fl_pb2 as pb
from fl_plugins.wire.stream import FileSource, TensorSource

if TYPE_CHECKING:
    from fl_plugins.client.site import SiteClient

log = logging.getLogger(__name__)

DIRECT_RETRY = 10.0  # seconds a direct transfer may make no progress before the relay takes over
TOLD = ("params_type", "metrics", "meta")  # what an update tells the aggregator in plaintext (its records, the pick)


class SwarmSite:
    def __init__(self, client: SiteClient, inbox: Inbox | None = None) -> None:
        if client.kit is None:
            raise ConfigError(
                "this job is a swarm (the aggregator runs --workflow swarm): a site seals its weights for the other "
                "sites' certificates, so it needs its kit: start it with `fl-plugins client --kit kits/SITE` "
                "(or FL_KIT / init(kit=...))"
            )
        self.client = client
        self.me = Identity.from_kit(client.kit)
        self.certs = Certificates(client.kit.ca)
        default = Path("fl-output") / (client.job_id or "job") / client.site
        self.out = Path(os.environ.get("FL_OUTPUT_DIR") or default)
        self.stats = {"aggregated": 0, "refused_updates": 0}
        self.models = SiteModels(self.out, client.best_metric)
        self.made: tuple[int, Path, Manifest] | None = None  # (round, folder, manifest) of the model it folded last
        client.transfers.resend_sealed = self.resend
        self.inbox = inbox  # (FL_INBOUND: started before Hello, which announced it: peer.py)
        if inbox is not None:
            inbox.relay.directory = self.out / "inbox"
        self._busy = threading.Lock()  # held while this site folds a round
        self._lane = threading.Thread(target=self._serve, name="fl-swarm-aggregator", daemon=True)
        self._lane.start()

    # -- the script's side -------------------------------------------------------------------------------------
    def receive(self, task: pb.Task, params_format: str, into: dict[str, Any] | None) -> tuple[Manifest, dict]:
        """A TRAIN task's global model (sealed at the relay, or round 0's plain initial model), opened into tensors
        and written to this site's global/round-R (models.py)."""
        r, params = task.round, {}

        def sink_for(manifest: Manifest) -> Any:
            made, views = tensors.allocate([t for s in manifest.shards for t in s.tensors], params_format, into)
            params.update(made)
            return self.models.sink(r, manifest, views)

        try:
            if task.model_transfer:
                opener = self._opener(task.model_transfer, task.model_sender)
                manifest = read_update(self.client, task.model_transfer, opener, sink_for)
            else:
                manifest = Manifest.from_json(task.manifest_json, f"round {r}'s global model")
                self.client.transfers.download_to(task, manifest, sink_for(manifest))
        except BaseException:
            self.models.abandon(r)
            raise
        return self.models.kept(r, manifest), params

    def finish(self, task: pb.Task) -> Path | None:
        """The job is over (END): keep its final global model in final/ (fetched unless this site folded it or
        received it already) and tell the aggregator, which waits for every site's word before it stops."""
        if not task.model_transfer:
            why = "it was not connected when the last round closed, so the model is not sealed for it"
            log.warning("the job ended without a final model for this site (%s); a site that has final/ has it", why)
            return None
        r = task.round
        try:
            manifest, source = self.models.rounds.get(r), self.models.round_dir(r)
            if manifest is None and self.made is not None and self.made[0] == r:  # this site folded it
                _, source, manifest = self.made
            if manifest is None:
                manifest = self.models.kept(r, self._fetch(task.model_transfer, task.model_sender, r))
                source = self.models.round_dir(r)
            final = self.models.final(r, manifest, source)
            self.client.send_result(r, task.model_transfer, {"meta": {"kept": "final"}})
        except FLError as e:
            log.warning("the final global model could not be kept at this site: %s", e)
            return None
        return final

    def _fetch(self, transfer: str, sender: str, r: int) -> Manifest:
        sinks: list[Any] = []

        def sink_for(manifest: Manifest) -> Any:
            sinks.append(self.models.sink(r, manifest))
            return sinks[-1]

        try:
            return read_update(self.client, transfer, self._opener(transfer, sender), sink_for)
        except BaseException:
            self.models.abandon(r)
            raise

    def send(self, task: pb.Task, params: dict[str, Any], envelope: dict[str, Any]) -> pb.CommitReply:
        """A TRAIN task's update (or an OFFER_INITIAL's weights), sealed for `peers_json` and put as `transfer_id`."""
        c = self.client
        if task.kind == pb.Task.TRAIN and self._refuses(task):  # the round goes on: the next task says how
            return pb.CommitReply(round=task.round, message="not sent: the aggregator site's certificate is refused")
        shards = plan_shards(tensors.describe(params), max_shard_bytes=c.max_shard_bytes)
        manifest = Manifest(shards, c.chunk_bytes or DEFAULT_CHUNK_BYTES, envelope)
        views = tensors.ByteViews(params)
        source = TensorSource(manifest, views.get)
        told: dict[str, Any] = {k: envelope[k] for k in TOLD if k in envelope}  # the aggregator's records: no weights
        reply = self._put(task, ModelRecords(manifest, source), told)
        if task.kind == pb.Task.TRAIN:
            c.transfers.kept = KeptUpdate(task.round, task.attempt, task.transfer_id, manifest, "", source)
            views.clear()
            self.models.scored(task.round, envelope.get("metrics"))  # the received model's score at this site
        return reply

    def resend(self, task: pb.Task, kept: KeptUpdate) -> None:
        """RESEND after a failover: the kept update, sealed for the new aggregator site, as a new transfer."""
        log.info("round %d: sending this site's update again, sealed for site %r", task.round, task.aggregator)
        told: dict[str, Any] = {k: kept.manifest.envelope[k] for k in TOLD if k in kept.manifest.envelope}
        if self._refuses(task):
            return  # kept: the next RESEND names another aggregator site
        try:
            self._put(task, ModelRecords(kept.manifest, kept.source), told)
        except FLError as e:
            log.warning("round %d: the resent update did not arrive: %s", task.round, e)
            self.client.transfers.kept = None
            return
        self.client.transfers.kept = dataclasses.replace(kept, nonce=task.transfer_id)

    def _put(self, task: pb.Task, records: ModelRecords, told: dict[str, Any]) -> pb.CommitReply:
        """An update sealed for the round's aggregator site: straight to its inbound port when the task names one
        (then committed at the aggregator with `direct`), else, or if that fails, through the aggregator's relay."""
        c = self.client
        for peer, address in json.loads(task.direct_json or "{}").items():
            try:
                sent = self._put_direct(task, peer, address, records)
            except FLError as e:
                why = f"site {peer!r}'s inbound port {address} did not take the update ({e})"
                log.warning("round %d: %s; sending it through the aggregator's relay", task.round, why)
                continue
            envelope = json.dumps(told) if told else ""  # (the aggregator's answer, late or counted, is final)
            req = pb.RelayCommit(site=c.site, transfer_id=task.transfer_id, envelope_json=envelope, direct=True)
            req.bytes = sent
            return c.call("RelayCommit", req, "commit of a direct transfer", per_call=60)
        return put_sealed(c, task.transfer_id, self._sealer(task), records, told)

    def _put_direct(self, task: pb.Task, peer: str, address: str, records: ModelRecords) -> int:
        """Put the sealed update at site `peer`'s inbound port; the sealed bytes sent."""
        assert self.client.kit is not None
        to = dial(self.client.kit, peer, address, retry_timeout=min(self.client.retry_timeout, DIRECT_RETRY))
        try:
            put_sealed(to, task.transfer_id, self._sealer(task), records, None)
            return int(to.stats["bytes_sent"])
        finally:
            to.close()

    # -- the aggregator lane -----------------------------------------------------------------------------------
    def _serve(self) -> None:
        c = self.client
        while not c.closed:
            try:
                task = c.next_task(aggregates=True)
            except FLError as e:
                if c.closed:
                    return
                log.warning("swarm: the aggregator lane stopped: %s", e)
                return
            except Exception:  # the channel closed under it as the process ends
                return
            if task.kind == pb.Task.END:
                return
            if task.kind == pb.Task.AGGREGATE:
                with self._busy:
                    self._fold_or_say_why(task)

    def _fold_or_say_why(self, task: pb.Task) -> None:
        try:
            self.aggregate(task)
        except Exception as e:  # noqa: BLE001 - told to the aggregator (a full disk too), which picks another site
            if self.client.closed:
                return
            log.error("round %d: this site could not fold the round: %s: %s", task.round, type(e).__name__, e)
            try:
                self.client.send_result(task.round, task.transfer_id, {"meta": {"error": str(e)[:200]}})
            except FLError as told:
                log.warning("round %d: could not tell the aggregator: %s", task.round, told)

    def close(self, timeout: float = 600.0) -> None:
        """Before the connection closes: let a fold under way finish (the last round's ends as the job does: its
        commit's answer is still on its way when the script hears END)."""
        if self._busy.acquire(timeout=timeout):
            self._busy.release()
        if self.inbox is not None:
            self.inbox.close()

    def aggregate(self, task: pb.Task) -> Manifest:
        """Fold `task`'s sealed updates in its order into the next global model; seal it for `peers_json`."""
        r, c = task.round, self.client
        current, here = self.models.rounds.get(r), self.models.round_dir(r)  # as the script received it
        if current is None:  # (not received here yet: fetched into the fold's own folder)
            here = self.out / "fold" / f"round-{r:05d}"
            current = self._model_files(task, here)
        layout = [t for s in current.shards for t in s.tensors]
        strategy = FedAvg(layout)
        records = self._fold_all(task, current, strategy)
        if not records:
            raise FLError(f"round {r}: no update could be folded (the log names why); the round's model is not made")
        env = {"current_round": r + 1, "metrics": limits.mean_metrics(records)}
        out = self.out / "fold" / f"round-{r + 1:05d}"
        made = self._write(current, here, strategy, out, env, r)
        source = FileSource([out / s.name for s in made.shards])
        folded = {"folded": [rec["site"] for rec in records]}  # the aggregator's records: which updates it holds
        try:
            put_sealed(c, task.transfer_id, self._sealer(task), ModelRecords(made, source), folded)
        finally:
            source.close()
        self.stats["aggregated"] += 1
        self.made = (r + 1, out, made)
        for old in (self.out / "fold").glob("round-*"):  # the fold's folders: only the model it made last stays
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        peers = ", ".join(sorted(json.loads(task.peers_json)))
        log.info("round %d: folded %d updates; round %d's global model sealed for %s", r, len(records), r + 1, peers)
        return made

    def _fold_all(self, task: pb.Task, current: Manifest, strategy: FedAvg) -> list[dict[str, Any]]:
        """Fold the task's inputs in order; one refused mid-way (some chunks folded) starts the fold again without
        it, so no part of a refused update is in the model (at most one restart per input)."""
        inputs = [(item["site"], item["transfer"]) for item in json.loads(task.inputs_json or "[]")]
        refused: set[str] = set()
        while True:
            strategy.reset()
            try:
                return [
                    self._fold_one(task, site, transfer, current, strategy)
                    for site, transfer in inputs
                    if site not in refused
                ]
            except _Refold as e:
                refused.add(e.site)

    def _fold_one(self, task: pb.Task, site: str, transfer: str, current: Manifest, strategy: FedAvg) -> dict:
        """Fold one sealed update; _Refold (after a warning) if it is refused: the round goes on without it."""
        seen: dict[str, Any] = {}

        def sink_for(manifest: Manifest) -> FoldSink:
            m, params_type, weight = parse_update(site, manifest.to_json())
            check_plan(current, m, f"site {site!r}'s update")
            seen.update(weight=weight, params_type=params_type, metrics=m.envelope.get("metrics") or {})
            u = Upload(transfer, site, task.round, task.attempt, m, weight, params_type, initial=False)
            return FoldSink(strategy, weight, u, check_finite=True)

        try:
            if self.inbox is not None and self.inbox.holds(transfer):  # it came straight here (peer.py)
                read_stream(transfer, self._opener(transfer, site), sink_for, self.inbox.records(transfer))
            else:
                read_update(self.client, transfer, self._opener(transfer, site), sink_for)
        except FLError as e:
            self.stats["refused_updates"] += 1
            log.warning("round %d: site %r's sealed update is left out: %s", task.round, site, e)
            raise _Refold(site) from e
        strategy.add_weight(seen["weight"], seen["params_type"])
        return {"site": site, "weight": seen["weight"], "metrics": seen["metrics"]}

    # -- files -------------------------------------------------------------------------------------------------
    def _model_files(self, task: pb.Task, directory: Path) -> Manifest:
        """The round's global model, written to `directory` (the fold reads it: DIFF updates, the layout)."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        sinks: list[FileSink] = []

        def sink_for(manifest: Manifest) -> FileSink:
            sinks.append(FileSink(directory, manifest))
            return sinks[-1]

        try:
            if task.model_transfer:
                opener = self._opener(task.model_transfer, task.model_sender)
                manifest = read_update(self.client, task.model_transfer, opener, sink_for)
            else:  # the job's plain initial model
                manifest = Manifest.from_json(task.manifest_json, f"round {task.round}'s global model")
                self.client.transfers.download_to(task, manifest, sink_for(manifest))
        finally:
            for s in sinks:
                s.close()
        # the shards' headers as written (a manifest read from JSON knows only their sizes): the next model's
        shards = [dataclasses.replace(s, header=sinks[0].headers[i]) for i, s in enumerate(manifest.shards)]
        return Manifest(shards, manifest.chunk_bytes, manifest.envelope)

    def _write(self, current: Manifest, here: Path, strategy: FedAvg, directory: Path, env: dict, r: int) -> Manifest:
        """The fold's result, the next global model, written to `directory` in `current`'s layout (read from
        `here`: a DIFF update is added to it)."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        reader = GlobalReader([here / s.name for s in current.shards], current)
        try:
            shards = []
            for s in current.shards:
                blocks = (
                    b for t in s.tensors for b in strategy.checked(t, strategy.finalize(t, reader.reader(t.name)), r)
                )
                shards.append(write_shard(directory / s.name, s, blocks, current.chunk_bytes))
        finally:
            reader.close()
        return Manifest(shards, current.chunk_bytes, env)

    # -- keys --------------------------------------------------------------------------------------------------
    def _sealer(self, task: pb.Task) -> Sealer:
        peers = {name: pem.encode() for name, pem in json.loads(task.peers_json or "{}").items()}
        return Sealer(self.me, task.transfer_id, peers, self.certs)

    def _refuses(self, task: pb.Task) -> bool:
        """True if the update's recipient (the round's aggregator site) has a certificate this site will not seal
        for (of another project, of another name, expired): this site says so to the aggregator, which picks
        another site to fold the round. The update is not sent; a RESEND's stays kept, a TRAIN's is trained again."""
        for name, pem in json.loads(task.peers_json or "{}").items():
            try:
                self.certs.check(pem.encode(), name, "recipient")
            except SealError as e:
                log.error("round %d: this site will not seal its update for site %r: %s", task.round, name, e)
                try:
                    self.client.send_result(task.round, task.transfer_id, {"meta": {"error": str(e)[:300]}})
                except FLError as told:
                    log.warning("round %d: could not tell the aggregator: %s", task.round, told)
                return True
        return False

    def _opener(self, transfer: str, sender: str) -> Any:
        def opener(header: bytes) -> Opener:
            return Opener(self.me, header, transfer_id=transfer, sender=sender, certs=self.certs)

        return opener


class _Refold(FLError):
    """An update was refused after some of its chunks were folded: the fold starts again without it."""

    def __init__(self, site: str) -> None:
        super().__init__(f"site {site!r}'s update was refused mid-fold")
        self.site = site
