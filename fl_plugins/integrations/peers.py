"""A rank other than 0 of a multi-process run: the job as rank 0 broadcast it (the round driver's `follow()`).

Such a rank never talks to the aggregator. What it knows comes from rank 0 through the trainer's collective: the
round info when a fit or validate opens a task (with the weights, broadcast into the model's own tensors), and
whether the job goes on when a fit ends. Its `receive()` returns an FLModel with that round (params: the model's
weights once a TRAIN task's are broadcast) and its `is_running()` is rank 0's last answer (True before any).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fl_plugins.client.model import FLModel, ParamsType

if TYPE_CHECKING:
    from fl_plugins.integrations.targets import ModelTarget


class Follower:
    def __init__(self) -> None:
        self.running = True
        self.round: int | None = None
        self.total: int | None = None
        self.model: FLModel | None = None

    def follow(self, info: Mapping[str, Any], rank: int, target: ModelTarget | None = None) -> None:
        """Take what rank 0 broadcast: round info when a task opens (a TRAIN task's weights are in `target`), or
        the running flag when a fit ended."""
        if "running" in info:
            self.running = bool(info["running"])
            self.model = None
        if info.get("round") is not None:
            self.round = info["round"]
        if info.get("total_rounds") is not None:
            self.total = info["total_rounds"]
        peer = self.current(rank) if target is not None else None
        if peer is not None and target is not None:
            peer.current_round, peer.total_rounds = self.round, self.total
            peer.meta.update({"current_round": self.round, "total_rounds": self.total})
            peer.params = dict(target.state())

    def current(self, rank: int) -> FLModel | None:
        """This rank's FLModel of the round at hand (None once the job is over)."""
        if not self.running:
            return None
        if self.model is None:
            self.model = FLModel(
                params_type=ParamsType.FULL,
                params=None,
                current_round=self.round,
                total_rounds=self.total,
                meta={"rank": rank, "current_round": self.round, "total_rounds": self.total},
            )
        return self.model
