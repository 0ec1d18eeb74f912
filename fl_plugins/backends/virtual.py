"""Virtual sites: more sites than the cluster runs at once, each running one turn at a time (the package's docstring
says what they keep and what they do not do).

`Turns.tick()`, on the runner's thread at every poll:
  1. reap the turns that ended: a turn that failed is reported with its log's tail, and its site sits out the
     attempt it ran for, if that attempt is still on (ending.turn_failed: rounds.py's sit-out, so the site still
     counts for a round's start and nobody waits for it); every turn failing ends in new attempts, bounded by
     `max_attempts`. A turn that fails before round 0's model exists (the site could not offer it) stops the job;
  2. vouch for the sites without a running turn (ending.vouch: alive for the round rules, as if they had called;
     the round starts, draws its sample, and each site that may train takes its task, so the round waits for its
     turn); a running turn's process calls for itself, and its silence counts as a killed site's;
  3. before the global model exists (no initial model: a site offers its weights), run the first site alone;
  4. stop a running turn whose site is not in the started attempt's sample and not counted (its process would
     wait for a task forever); a turn the runner stopped is not a failure;
  5. start the sites that may train the attempt (rounds.py's may_train: sampled, not counted, not sitting out) or
     owe a refolded update, and have not had a turn in this attempt since its last refold, in the recipe's order,
     while fewer than `slots` turns run.
Once training is done, the final evaluation (every site that sent metrics scores the final model) gives each site
it asks one more turn, at most `slots` at once; the sites it does not ask, or has its answer from, are told to the
aggregator as exited and vouched for no more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins.aggregator.ending import site_exited, turn_failed, vouch
from fl_plugins.backends.process import SiteRun, tail

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator


class VirtualSite:
    """The runner's view of one virtual site: running while the job trains (`rc` None), then 0 (a failed turn is
    reported when it ends; the job goes on). `turns` counts its turns, `failed` those that did not exit 0."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        self.rc: int | None = None
        self.run: SiteRun | None = None
        self.turns = self.failed = 0
        self.turn_of: tuple[int, int, int] | None = None  # the (round, attempt, refolds) of its last turn
        self.stopping = False  # the runner stopped its turn (no longer wanted): not a failure
        self.evaluated = False  # it had its turn in the evaluation after training

    def poll(self) -> int | None:
        return self.rc

    def terminate(self) -> None:
        if self.run is not None:
            self.run.terminate()

    def wait(self, timeout: float) -> bool:
        return self.run is None or self.run.wait(timeout)

    def kill(self) -> None:
        if self.run is not None:
            self.run.kill()
            self.run = None
        if self.rc is None:
            self.rc = 0


@dataclass
class _Now:
    round: int
    attempt: int
    refolds: int
    ready: bool  # the global model exists
    training: bool
    started: bool  # the attempt started (its sample is drawn)
    wanted: frozenset[str] | None  # the attempt's sample (None: every site)
    counted: frozenset[str]
    owed: frozenset[str]  # counted, zeroed by a refold, to be sent again
    trainable: frozenset[str]  # may train the attempt (rounds.py's may_train), or owe a refolded update
    cannot_offer: frozenset[str]  # asked for a task and said they cannot offer round 0's weights
    asks: frozenset[str]  # after training: the sites the evaluation phase asks and has no full answer from

    @property
    def at(self) -> tuple[int, int, int]:
        return self.round, self.attempt, self.refolds


class Turns:
    """Runs `sites` in turns of at most `slots` (`launch(name)` starts one turn's process). `failure` says why the
    job cannot go on (the runner then stops it)."""

    def __init__(
        self, agg: Aggregator, sites: list[VirtualSite], slots: int, launch: Callable[[str], SiteRun], say: Any
    ) -> None:
        self.agg, self.sites, self.slots, self.launch, self.say = agg, sites, max(1, slots), launch, say
        self.failure: str | None = None

    def running(self) -> list[VirtualSite]:
        return [s for s in self.sites if s.run is not None]

    def tick(self) -> None:
        self._reap(self._now())
        now = self._now()
        if not now.training:
            self._evaluate(now)
            return
        vouch(self.agg, [s.name for s in self.sites if s.run is None])  # (a running turn's process calls itself)
        now = self._now()  # (vouching may have started the attempt and drawn its sample)
        if not now.ready:
            first = self.sites[0]
            if first.name in now.cannot_offer:  # (with processes, the aggregator says so once min_sites asked)
                self.failure = (
                    f"site {first.name} cannot offer round 0's weights (the plain client API has none to offer); "
                    "give the recipe an initial_model"
                )
            elif not self.running() and self.failure is None:
                self._start(first, now)  # it offers round 0's weights
            return
        for s in self.running():
            if now.started and now.wanted is not None and s.name not in now.wanted and s.name not in now.counted:
                s.stopping = True  # not in this attempt's sample: its process would wait for a task forever
                s.run.terminate()  # type: ignore[union-attr]
        for s in self.sites:
            if len(self.running()) >= self.slots:
                break
            if s.run is None and self._due(s, now):
                self._start(s, now)

    def _due(self, s: VirtualSite, now: _Now) -> bool:
        """A turn of its own in this attempt (after a refold, another: a new process holds no update to resend,
        so the aggregator drops the old one at once and the site trains again)."""
        return now.started and s.name in now.trainable and s.turn_of != now.at

    def _start(self, s: VirtualSite, now: _Now) -> None:
        s.run = self.launch(s.name)
        s.turns += 1
        s.turn_of, s.stopping = now.at, False

    def _reap(self, now: _Now) -> None:
        for s in self.running():
            rc = s.run.poll()  # type: ignore[union-attr]
            if rc is None:
                continue
            s.run.kill()  # type: ignore[union-attr]
            s.run = None
            if s.stopping or not now.training:
                if rc != 0 and not s.stopping and s.evaluated:
                    self.say(f"site {s.name}'s evaluation turn exited with code {rc}; see {s.log_path}")
                continue
            at = s.turn_of or now.at
            after = self._now()  # (its update may have been counted since `now`)
            if rc == 0 and (s.name in after.counted or s.name in after.owed or after.at[:2] != at[:2]):
                continue
            # exited with an error, or with 0 but nothing counted in the attempt it ran for (a script that ends
            # without answering): vouched for, it would be waited for until the deadline
            s.failed += 1
            turn_failed(self.agg, s.name, at[:2])
            why = f"exited with code {rc}" if rc else "ended without an update counted"
            self.say(
                f"site {s.name}'s turn in round {at[0]} {why}; it sits that attempt out and the round goes on. "
                f"Last lines of {s.log_path}:\n{tail(s.log_path)}"
            )
            if not now.ready:
                self.failure = (
                    f"site {s.name} could not offer round 0's weights (its turn exited with code {rc}); give the "
                    "recipe an initial_model, or see its log"
                )

    def _evaluate(self, now: _Now) -> None:
        """Training is done: while an evaluation phase (the final model's) asks sites, the ones it still waits for
        get a turn each (vouched for until then), at most `slots` at once; the others are released."""
        asks = now.asks - {s.name for s in self.sites if s.evaluated}
        if asks:
            vouch(self.agg, [s.name for s in self.sites if s.run is None and s.name in asks])
            for s in self.sites:
                if len(self.running()) >= self.slots:
                    break
                if s.run is None and s.name in asks:
                    s.run, s.evaluated, s.stopping = self.launch(s.name), True, False
                    s.turns += 1
        self._release(keep=asks)

    def _release(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Training is done: a site without a running turn is gone for the aggregator, and ends for the runner."""
        for s in self.sites:
            if s.run is None and s.rc is None and s.name not in keep:
                site_exited(self.agg, s.name)
                s.rc = 0

    def _now(self) -> _Now:
        agg = self.agg
        with agg.lock:
            rounds, job = agg.rounds, agg.job
            return _Now(
                rounds.round,
                rounds.attempt,
                rounds.refolds(),
                agg.global_manifest is not None,
                not job.trained and not agg.done and agg.error is None,
                rounds.started is not None,
                rounds.sample,
                frozenset(rounds.counted),
                frozenset(rounds.owed),
                frozenset(n for n, st in rounds.sites.items() if rounds.may_train(st) or n in rounds.owed),
                frozenset(n for n, st in rounds.sites.items() if st.asked and not st.can_offer),
                self._asks(),
            )

    def _asks(self) -> frozenset[str]:
        """Lock held. The sites the running evaluation phase asks and has no full row of answers from."""
        job = self.agg.job
        sweep = job.sweep
        if sweep is None or not job.trained:
            return frozenset()
        names = job.only if job.only is not None else {s.name for s in self.sites}
        rows = sweep.cells
        return frozenset(n for n in names if n not in rows or not all(c.filled for c in rows[n].values()))
