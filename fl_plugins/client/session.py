"""A site's client session: what the client API's module functions act on, and what the integrations call.

One session per process is current: `flare.init()` opens it (`ClientSession.open`, over gRPC) and makes it
current, `flare.shutdown()` closes it; every module function of fl_plugins.client.api is a method of
`get()`. A test (or any in-process caller) can make its own current, e.g. over the in-memory transport:

    client = SiteClient(None, "site-1", transport=InMemoryTransport(Servicer(agg)))
    session.activate(ClientSession(client, params_format="numpy"))   # flare.receive() etc. now use it

The session holds the task at hand (received, not yet sent), its FLModel (cached until send), and the offer of
round 0's weights: an integration that holds a model calls `allow_offer_initial()`; when the aggregator has no
initial model it then asks this site for one, `receive()` returns round 0's FLModel with params None, and
`offer_initial(weights)` uploads them and fills that FLModel in.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from fl_plugins import tensors
from fl_plugins.client.current import activate, current, deactivate, get
from fl_plugins.client.model import FLModel, ParamsType, final_of, jsonable
from fl_plugins.errors import ConfigError, FLError, IntegrityError, RoundError

if TYPE_CHECKING:
    from fl_plugins.client.site import SiteClient
    from fl_plugins.security.tls import SiteKit
    from fl_plugins.wire.proto import fl_pb2 as pb

__all__ = ["ClientSession", "activate", "current", "deactivate", "get"]  # the current session: current.py

logger = logging.getLogger(__name__)


_STALE_TASKS = 3  # receive(): tasks whose model stopped being served before receive() asks what to do again


class ClientSession:
    """One process's part in the federation. `client`: its connection (connected here), None on ranks other than
    0: they never talk to the aggregator (receive() returns None, send() does nothing, is_running() is True).
    `site`: the site's name (default the client's; `rank-N` without one). `params_format`: "torch" or "numpy"
    for received params (default: tensors.resolve_params_format, torch when the script imported torch)."""

    def __init__(
        self, client: SiteClient | None, *, site: str | None = None, rank: int = 0, params_format: str | None = None
    ) -> None:
        self.client = client
        self.rank = rank
        self.params_format = tensors.resolve_params_format(params_format)
        self.site = site or (client.site if client is not None else f"rank-{rank}")
        self.task: pb.Task | None = None  # the task being worked on (received, not yet sent)
        self.model: FLModel | None = None
        self.finished, self.last_round = False, -1
        self.one_turn = os.environ.get("FL_TURN") == "1"  # a virtual site (fl_plugins/backends): one answer, then done
        self.can_offer = False  # an integration can offer its model's weights as round 0's global model
        self.offer_pending = False  # the aggregator asked this site for round 0's weights
        self.lock = threading.RLock()
        self.offer_task: pb.Task | None = None
        self.swarm: Any = None  # swarm/site.py's SwarmSite, in a swarm job
        self.ended: pb.Task | None = None  # END, which names the final global model
        self.kept_final: Any = None  # a swarm site's final/ folder (swarm/models.py), kept at END
        self.final: FLModel | None = None
        self.wants_final = False  # fetch the final model as soon as END names it (an integration that loads it)
        if client is not None:  # (the one place the client loads the layer above it: swarm/)
            inbox = None
            if os.environ.get("FL_INBOUND"):  # the first Hello tells the aggregator where this site listens
                from fl_plugins.swarm.peer import Inbox

                inbox = Inbox.before_hello(client)
            client.connect()
            if client.workflow == "swarm":
                from fl_plugins.swarm.site import SwarmSite

                self.swarm = SwarmSite(client, inbox)
            elif inbox is not None:
                inbox.close()

    @classmethod
    def open(
        cls,
        server: str,
        site: str,
        *,
        rank: int = 0,
        params_format: str | None = None,
        connect_timeout: float = 60.0,
        retry_timeout: float = 60.0,
        kit: SiteKit | None = None,
        insecure: bool = False,
    ) -> ClientSession:
        """A session over gRPC to `server` ("host:port"); on rank 0 only it connects (see SiteClient): waiting up
        to `connect_timeout` seconds for an aggregator that is not up yet, and giving up a call once the aggregator
        has been silent for `retry_timeout`. The arguments are checked before any client (and its channel) exists."""
        params_format = tensors.resolve_params_format(params_format)
        client = None
        if rank == 0:
            from fl_plugins.client.site import SiteClient

            client = SiteClient(
                server or None,
                site,
                kit=kit,
                connect_timeout=connect_timeout,
                retry_timeout=retry_timeout,
                insecure=insecure,
            )
        return cls(client, site=site, rank=rank, params_format=params_format)

    # -- what the job and the task at hand are -----------------------------------------------------------
    @property
    def total_rounds(self) -> int:
        return self.client.total_rounds if self.client else 0

    @property
    def job_id(self) -> str:
        return self.client.job_id if self.client else ""

    @property
    def task_name(self) -> str:
        """The task at hand's name (FLARE's get_task_name): "train", "validate" or "submit_model"; "train" when
        none is at hand."""
        task = self.task
        return task.task_name or "train" if task is not None else "train"

    @property
    def kind(self) -> str:
        """What the task at hand asks: "train", "evaluate" or "submit_model" ("train" when none is at hand), for
        the integrations (FLARE scripts use is_train / is_evaluate / is_submit_model on task_name)."""
        from fl_plugins.wire.proto import fl_pb2 as pb

        task = self.task
        if task is None:
            return "train"
        return {pb.Task.EVALUATE: "evaluate", pb.Task.SUBMIT_MODEL: "submit_model"}.get(task.kind, "train")

    def system_info(self) -> dict[str, Any]:
        return {"site_name": self.site, "job_id": self.job_id}

    def pending_round(self) -> tuple[int | None, int]:
        """(the round of the task at hand, or 0 while round 0's weights are asked for, or None; total rounds)."""
        with self.lock:
            if self.task is not None:
                return self.task.round, self.total_rounds
            return (0 if self.offer_pending else None), self.total_rounds

    # -- the FLARE verbs ---------------------------------------------------------------------------------
    def is_running(self) -> bool:
        """True while the job runs, for this process alone (no collective): rank 0 asks the aggregator (and
        fetches the next task), other ranks always say True."""
        with self.lock:
            if self.client is None:
                return True
            self._fetch()
            return not self.finished

    def receive(self, *, into: dict[str, Any] | None = None) -> FLModel | None:
        """This round's global model (cached until send()); None once the job is over or on ranks other than 0.
        into: tensors to receive into in place (see fl_plugins.client.api.receive)."""
        with self.lock:
            for tries_left in reversed(range(_STALE_TASKS)):
                if self.client is None:
                    return None
                self._fetch()
                if self.finished:
                    return None
                if self.offer_pending:  # params stay None until the integration offers the model's weights
                    if self.model is None:
                        self.model = self._round_zero()
                    return self.model
                if self.model is None and self.task is not None:
                    try:
                        self.model = self._download(self.client, self.task, into)
                    except RoundError as e:  # not served any more: the aggregator moved on, or restarted earlier
                        if not tries_left:
                            raise
                        logger.warning(
                            "round %d's model is not served (%s); asking for the task at hand", self.task.round, e
                        )
                        self.task = None
                        continue
                return self.model
            return None

    def final_model(self, *, into: dict[str, Any] | None = None) -> FLModel | None:
        """The job's final global model, once the job is over: fetched from the aggregator (END names it; a swarm
        site reads the final/ folder it kept), cached. None before the end, on ranks other than 0, when the
        job ended without one (an evaluation-only job) or when it cannot be fetched (a warning says why)."""
        with self.lock:
            if self.client is None or not self.finished or self.ended is None:
                return None
            if self.final is None:
                try:
                    self.final = final_of(self.client, self.ended, self.kept_final, self.params_format, into)
                except (FLError, ConnectionError) as e:
                    logger.warning("the final global model could not be fetched: %s", e)
            return self.final

    def forget_final(self) -> None:
        """Drop the cached final model's params (its caller loaded them into its model: no second copy stays in
        memory); final_model() then returns it with params None."""
        with self.lock:
            if self.final is not None:
                self.final.params = None

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        """Answer the task at hand: a TRAIN task's update (returns once the aggregator has verified and counted
        it), an EVALUATE task's metrics (params, if any, stay here), a SUBMIT_MODEL task's local model (FULL
        params). An answer it refuses (late, duplicate, a round that runs again) is logged as a warning, and the
        site goes on."""
        with self.lock:
            if self.client is None:
                return
            task = self._sendable(model)
            env = {
                "params_type": str(model.params_type or ParamsType.FULL),
                "current_round": task.round,
                "metrics": jsonable(model.metrics or {}),
                "meta": jsonable(model.meta or {}),
            }
            try:
                self._answer(self.client, task, model, env)
            except (RoundError, IntegrityError) as e:  # late, duplicate, or a round that will run again
                logger.warning("round %d: the aggregator refused this %s: %s", task.round, self.kind, e)
            self.last_round = max(self.last_round, task.round)
            self.finished = self.finished or self.one_turn  # is_running() is False after a virtual site's turn
            if clear_cache:
                self.task = None
                self.model = None

    def log(self, key: str, value: Any, data_type: Any = "SCALAR", **kwargs: Any) -> None:
        """A metric record for the aggregator's RUN_DIR/logs.jsonl (see fl_plugins.client.api.log): checked
        against the aggregator's bounds first, on every rank; sent from rank 0."""
        from fl_plugins.wire import limits

        dt = getattr(data_type, "name", str(data_type))
        record = jsonable({"key": key, "value": value, "data_type": dt, **kwargs})
        limits.check_log_records(f"flare.log({key!r:.60})", [record])
        if self.client is None:
            return
        self.client.log(self._round(), [record])

    def log_scalars(self, values: dict[str, float], step: int, round_: int | None = None) -> None:
        """Several scalars of one training step in one record batch (the trainer integrations forward their logs
        so); `round_`: the round the step belongs to (default: the current one)."""
        if self.client is None or not values:
            return
        rnd = round_ if round_ is not None else self._round()
        records = [{"key": k, "value": float(v), "data_type": "SCALAR", "step": int(step)} for k, v in values.items()]
        self.client.log(rnd, records)

    def close(self) -> None:
        if self.swarm is not None:
            self.swarm.close()
        if self.client is not None:
            self.client.close()

    # -- round 0's weights from an integration -----------------------------------------------------------
    def allow_offer_initial(self) -> None:
        """This site can offer its model's weights as round 0's global model (the Lightning/HF integrations).

        An aggregator without an initial model then answers OFFER_INITIAL; `receive()` returns round 0's FLModel
        with params None until `offer_initial()` is called with the model's weights."""
        with self.lock:
            self.can_offer = True
            if self.client is not None:
                self.client.can_offer_initial = True

    def offer_initial(self, params: dict[str, Any], into: dict[str, Any] | None = None) -> FLModel | None:
        """Upload `params` as round 0's global model if the aggregator asked for it, then receive round 0 (into
        `into`). The FLModel that receive() returned while the offer was pending gets the params and stays the
        one cached until send(). Returns the round's model; a no-op (returns receive()) otherwise."""
        with self.lock:
            if self.client is None:
                return None
            for _ in range(3):  # the aggregator asks again only if the offer failed its final check
                if not self.offer_pending:
                    break
                pending = self.model
                env = {"params_type": str(ParamsType.FULL), "current_round": 0}
                if self.swarm is not None and self.offer_task is not None:
                    self.swarm.send(self.offer_task, params, env)  # sealed for the sites
                else:
                    self.client.upload(0, 0, params, env, initial=True)
                logger.info("offered this site's weights as round 0's global model")
                self.offer_pending = False
                self.model = None
                got = self.receive(into=into)
                if pending is not None and got is not None and not self.offer_pending:
                    pending.params, pending.metrics, pending.meta = got.params, got.metrics, got.meta
                    pending.current_round, pending.total_rounds = got.current_round, got.total_rounds
                    pending.start_round = got.start_round
                    self.model = pending
            return self.receive(into=into)

    # -- inside ------------------------------------------------------------------------------------------
    def _fetch(self) -> None:
        """Make sure a task is at hand, or mark the job finished. Lock held."""
        from fl_plugins.wire.proto import fl_pb2 as pb

        if self.task is not None or self.finished or self.offer_pending or self.client is None:
            return
        # After the last round the aggregator may already be gone: then a short wait is enough.
        evaluations = self.client.evaluates_after  # then the aggregator is not done after the last round
        last = self.total_rounds and self.last_round >= self.total_rounds - 1 and not evaluations
        try:
            task = self.client.next_task(give_up_after=15.0 if last else None)
        except ConnectionError:
            if last:
                self.finished = True
                return
            raise
        if task.kind == pb.Task.END:
            self.finished, self.ended = True, task
            if self.swarm is not None:
                self.kept_final = self.swarm.finish(task)  # the final global model, kept at this site
            if self.wants_final:  # at once: the aggregator serves it `linger` seconds after the end, and open streams
                self.final_model()
        elif task.kind == pb.Task.OFFER_INITIAL and self.can_offer:
            self.offer_pending = True  # the integration uploads the weights when it has the model (offer_initial)
            self.offer_task = task  # (a swarm's names whom to seal them for)
        elif task.kind == pb.Task.OFFER_INITIAL:
            raise ConfigError(
                "the aggregator asked this site for its initial weights, but the client API has none to offer: "
                "start the aggregator with --initial-model PATH"
            )
        else:
            self.task = task

    def _round_zero(self) -> FLModel:
        """Round 0's FLModel while its weights are asked of this site (params None until offered)."""
        meta = {
            "job_id": self.job_id,
            "site_name": self.site,
            "attempt": 0,
            "current_round": 0,
            "total_rounds": self.total_rounds,
        }
        return FLModel(
            params_type=ParamsType.FULL,
            params=None,
            current_round=0,
            total_rounds=self.total_rounds,
            start_round=0,
            meta=meta,
        )

    def _download(self, client: SiteClient, task: pb.Task, into: dict[str, Any] | None) -> FLModel:
        """`task`'s global model, received (into `into` where its tensors fit)."""
        from fl_plugins.wire.proto import fl_pb2 as pb

        if self.swarm is not None and task.kind == pb.Task.TRAIN:
            manifest, params = self.swarm.receive(task, self.params_format, into)
        else:
            manifest, params = client.download(task, self.params_format, into=into)
        meta: dict[str, Any] = {
            "job_id": task.job_id,
            "site_name": self.site,
            "attempt": task.attempt,
            "current_round": task.round,
            "total_rounds": task.total_rounds,
        }
        if task.kind == pb.Task.EVALUATE:
            meta["model_owner"] = task.model or "global"
        elif task.kind == pb.Task.SUBMIT_MODEL:
            meta["submit_model_name"] = "best_model"  # FLARE's ModelName.BEST_MODEL
        return FLModel(
            params_type=ParamsType.FULL,
            params=params,
            current_round=task.round,
            total_rounds=task.total_rounds,
            start_round=task.start_round,
            metrics=manifest.envelope.get("metrics") or None,
            meta=meta,
        )

    def _answer(self, client: SiteClient, task: pb.Task, model: FLModel, env: dict[str, Any]) -> None:
        from fl_plugins.wire.proto import fl_pb2 as pb

        if task.kind == pb.Task.EVALUATE:
            if model.params is not None:
                logger.debug("an EVALUATE task's answer carries metrics only; its params stay at the site")
            reply = client.send_result(task.round, task.task_id, {"metrics": env["metrics"], "meta": env["meta"]})
            if reply.message != "result accepted":
                logger.warning("the evaluation of model %r: %s", task.model or "global", reply.message)
        elif task.kind == pb.Task.SUBMIT_MODEL:
            client.upload(task.round, 0, self._full(model), {**env, "params_type": "FULL"}, task_id=task.task_id)
        elif task.transfer_id and self.swarm is not None:
            self.swarm.send(task, model.params or {}, env)
        else:
            client.upload(task.round, task.attempt, model.params or {}, env)

    def _full(self, model: FLModel) -> dict[str, Any]:
        """A SUBMIT_MODEL answer's params as FULL weights: a DIFF is added to the model receive() returned (FLARE's
        client computes its DIFF transfers against that model too)."""
        params = model.params or {}
        if str(model.params_type or ParamsType.FULL) != str(ParamsType.DIFF):
            return params
        received = self.model.params if self.model is not None else None
        missing = [k for k in params if received is None or k not in received]
        if missing:
            raise ConfigError(f"send(): a DIFF submission needs the received model's {missing[:3]}; send FULL params")
        assert received is not None
        return {k: received[k] + v for k, v in params.items()}

    def _sendable(self, model: FLModel) -> pb.Task:
        """The task `model` answers, after the checks of send(). Lock held."""
        if self.task is None and self.offer_pending:
            raise RoundError(
                "send() before round 0's global model exists: the aggregator is waiting for this site's "
                "initial weights (the integration offers them as fit/validate starts)"
            )
        if self.task is None:
            raise RoundError("send() without a received task: call flare.receive() first")
        if not isinstance(model, FLModel):
            raise ConfigError(f"send() takes an FLModel (got {type(model).__name__})")
        if model.params is None and self.kind != "evaluate":
            raise ConfigError("send(): FLModel.params is None; put the model's state_dict in params")
        if model.params is None and model.metrics is None:
            raise ConfigError("send(): the FLModel has neither params nor metrics; an evaluation sends metrics")
        return self.task

    def _round(self) -> int:
        """The round a metric belongs to: the task at hand's, else the last one sent."""
        task = self.task
        return task.round if task is not None else self.last_round
