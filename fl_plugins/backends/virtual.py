"""Virtual sites: more sites than the cluster runs at once, each running one turn at a time (the package's docstring
says what they keep and what they do not do).

`Turns.tick()`, on the runner's thread at every poll:
  1. reap the turns that ended: a turn that failed is reported with its log's tail, and its site sits the rest of
     the attempt out (told to the aggregator as an exited site, and not vouched for until the attempt changes);
  2. vouch for the other sites (ending.vouch: alive for the round rules; a round starts and draws its sample);
  3. before the global model exists (no initial model: a site offers its weights), run the first site alone;
  4. stop a running turn whose site is no longer wanted (not in the new attempt's sample, and not counted);
  5. start the sampled sites (every site without `sample_sites`) of the current round and attempt that are not
     counted and have not had a turn in it, in name order, while fewer than `slots` turns run.
Once training is done, vouching stops and the sites without a running turn are told to the aggregator as exited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins.aggregator.ending import site_exited, vouch
from fl_plugins.backends.process import SiteRun, tail

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator


class VirtualSite:
    """The runner's view of one virtual site: running while the job trains (`rc` None), then its last turn's exit
    code. `turns` counts its turns, `failed` those that did not exit 0."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        self.rc: int | None = None
        self.run: SiteRun | None = None
        self.last = 0  # the last turn's exit code
        self.turns = self.failed = 0
        self.turn_of: tuple[int, int] | None = None  # the (round, attempt) of its last turn
        self.sits_out: tuple[int, int] | None = None

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
            self.last = self.run.rc if self.run.rc is not None else self.last
            self.run = None
        if self.rc is None:
            self.rc = self.last


@dataclass
class _Now:
    round: int
    attempt: int
    ready: bool  # the global model exists
    training: bool
    wanted: frozenset[str] | None  # the attempt's sample (None: every site)
    counted: frozenset[str]


class Turns:
    """Runs `sites` in turns of at most `slots` (`launch(name)` starts one turn's process)."""

    def __init__(
        self, agg: Aggregator, sites: list[VirtualSite], slots: int, launch: Callable[[str], SiteRun], say: Any
    ) -> None:
        self.agg, self.sites, self.slots, self.launch, self.say = agg, sites, max(1, slots), launch, say

    def running(self) -> list[VirtualSite]:
        return [s for s in self.sites if s.run is not None]

    def tick(self) -> None:
        now = self._now()
        self._reap(now)
        if not now.training:
            self._release()
            return
        vouch(self.agg, [s.name for s in self.sites if s.sits_out != (now.round, now.attempt)])
        now = self._now()  # (vouching may have started the attempt and drawn its sample)
        running = self.running()
        if not now.ready:
            if not running:
                self._start(self.sites[0], now)  # it offers round 0's weights
            return
        for s in running:
            if now.wanted is not None and s.name not in now.wanted and s.name not in now.counted:
                s.run.terminate()  # type: ignore[union-attr]
        for s in self.sites:
            if len(self.running()) >= self.slots:
                break
            if s.run is None and self._due(s, now):
                self._start(s, now)

    def _due(self, s: VirtualSite, now: _Now) -> bool:
        at = (now.round, now.attempt)
        wanted = now.wanted is None or s.name in now.wanted
        return wanted and s.name not in now.counted and s.turn_of != at and s.sits_out != at

    def _start(self, s: VirtualSite, now: _Now) -> None:
        s.run = self.launch(s.name)
        s.turns += 1
        s.turn_of = (now.round, now.attempt)

    def _reap(self, now: _Now) -> None:
        for s in self.running():
            rc = s.run.poll()  # type: ignore[union-attr]
            if rc is None:
                continue
            s.run.kill()  # type: ignore[union-attr]
            s.run, s.last = None, rc
            if rc != 0 and now.training:
                s.failed += 1
                s.sits_out = (now.round, now.attempt)
                site_exited(self.agg, s.name)
                self.say(
                    f"site {s.name}'s turn in round {now.round} exited with code {rc}; it sits the attempt out "
                    f"and the round goes on. Last lines of {s.log_path}:\n{tail(s.log_path)}"
                )

    def _release(self) -> None:
        """Training is done: a site without a running turn is gone for the aggregator, and ends for the runner."""
        for s in self.sites:
            if s.run is None and s.rc is None:
                site_exited(self.agg, s.name)
                s.rc = s.last

    def _now(self) -> _Now:
        agg = self.agg
        with agg.lock:
            rounds, job = agg.rounds, agg.job
            return _Now(
                rounds.round,
                rounds.attempt,
                agg.global_manifest is not None,
                not job.trained and not agg.done and agg.error is None,
                rounds.sample if rounds.started is not None else frozenset(),
                frozenset(rounds.counted),
            )
