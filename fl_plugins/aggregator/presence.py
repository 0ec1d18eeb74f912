"""What the aggregator's operator reads about the sites while a job runs: what a waiting round waits for, who is
connected, who went silent, who was dropped and who came back.

    round 3 waiting for 1 more site (2 of 3 connected); connected: site-1, site-2; silent: site-3 for 42 s
    round 3 attempt 0 waiting for updates from site-2 (1 of 2 counted); connected: site-1, site-2
    site 'site-3' dropped: silent for 61 s (--site-timeout 60 s); the job no longer waits for it
    site 'site-3' reconnected after 75 s (it had been dropped)

A site is *connected* while it was heard from (any call, or a heartbeat: sites send one every 5 s, and a site
waiting for a task polls) within the last quarter of `site_timeout`, *silent* after that (the line says for how
long), and *dropped* once silent for `site_timeout` (the round rules no longer wait for it, rounds.py).

* The waiting line (INFO) comes every `presence_every` seconds while the round (or an evaluation phase) waits,
  the first one `presence_every` seconds after the wait began: a round that closes sooner says nothing more than
  its own lines do.
* A drop is a WARNING when the background step first sees it, naming how long the site was silent.
* A site that is heard from again after it was dropped, or that says Hello again (a new process, or a new
  connection after its old one was lost), is an INFO line saying how long it was silent.
* Once the job is done, sites leave on their own: no drop is logged then.

Driven by the coordinator with its clock (core.py: `Aggregator._decide` calls `step`, `Aggregator.hello` calls
`hello`), under its lock, so tests move a fake clock and never sleep. Pure otherwise: it reads the round's state
and logs; it decides nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fl_plugins.aggregator.rounds import Close

if TYPE_CHECKING:
    from fl_plugins.aggregator.core import Aggregator

log = logging.getLogger(__name__)

SILENT_SHARE = 0.25  # a site not heard from for this share of `site_timeout` is silent
LISTED = 20  # names listed in a line; the rest are counted


class Presence:
    """This module's log lines, for one aggregator."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.dropped: dict[str, float] = {}  # site -> when it was last heard from before it was dropped
        self.waits: tuple[int, int, str | None] | None = None  # (round, attempt, phase) of the wait being told
        self.next_line: float | None = None  # when the next waiting line is due
        self.exited: set[str] = set()  # sites whose process was seen to end (ending.site_exited: `fl-plugins run`)

    def hello(self, site: str, now: float) -> None:
        """Lock held, before the site is touched: a site already known says Hello again, so it reconnects."""
        s = self.agg.rounds.sites.get(site)
        if s is None:
            return  # its first connection: rounds.py logs it
        if not self.agg.done:
            self._drops(now)  # a drop the background step has not seen yet is told first
        self.exited.discard(site)
        how = "it had been dropped" if self.dropped.pop(site, None) is not None else "a new process or connection"
        log.info("site %r reconnected after %s (%s)", site, _seconds(now - s.last_seen), how)

    def step(self, now: float) -> None:
        """Lock held, at each step of the background thread: the heartbeats noted while the lock was held by a long
        write (core.py `heartbeat`), then drops, returns, and the waiting line when due."""
        rounds = self.agg.rounds
        while self.agg.heard:
            site, at = self.agg.heard.popitem()
            if site in rounds.sites:  # (a known site only: a new name is checked by a call that takes the lock)
                rounds.touch(site, max(rounds.sites[site].last_seen, at))
        if self.agg.done:
            self.next_line = None
            return
        self._drops(now)
        self._waiting_line(now)

    def _drops(self, now: float) -> None:
        rounds, timeout = self.agg.rounds, self.agg.config.site_timeout
        for s in rounds.sites.values():
            alive = rounds.alive(s, now)
            if not alive and s.name not in self.dropped:
                self.dropped[s.name] = s.last_seen
                if s.name in self.exited:
                    log.info("site %r is gone: its process ended", s.name)
                    continue
                log.warning(
                    "site %r dropped: silent for %s (--site-timeout %s); the job no longer waits for it",
                    s.name,
                    _seconds(now - s.last_seen),
                    _seconds(timeout),
                )
            elif alive and s.name in self.dropped:
                silent = s.last_seen - self.dropped.pop(s.name)
                self.exited.discard(s.name)
                log.info("site %r reconnected after %s (it had been dropped)", s.name, _seconds(silent))

    def _waiting_line(self, now: float) -> None:
        every = self.agg.config.presence_every
        what = self.waiting_for(now) if every > 0 else None
        rounds = self.agg.rounds
        waits = (rounds.round, rounds.attempt, self.agg.job.phase)
        if what is None or waits != self.waits or self.next_line is None:
            self.waits = waits if what is not None else None
            self.next_line = now + every if what is not None else None
            return
        if now >= self.next_line:
            log.info("%s; %s", what, self.sites(now))
            self.next_line = now + every

    def waiting_for(self, now: float) -> str | None:
        """Lock held. What the job waits for now, in words; None when it waits for no site (it is closing the
        round, writing the global model, or done)."""
        agg, rounds = self.agg, self.agg.rounds
        r = rounds.round
        if agg.job.phase is not None and agg.job.sweep is not None:
            rows = agg.job.sweep.cells.items()
            open_ = sorted(site for site, row in rows if not all(c.filled for c in row.values()))
            done = len(rows) - len(open_)
            return f"the {agg.job.phase} phase waiting for {_names(open_)} ({done} of {len(rows)} sites done)"
        if not agg.job.trains or agg.job.trained:
            return None
        if rounds.started is None:
            alive, need = rounds.alive_count(now), agg.config.min_sites
            if alive >= need:
                return None if agg.global_manifest is not None else f"round {r} waiting for a site's initial weights"
            more = need - alive
            return f"round {r} waiting for {more} more site{'s' if more != 1 else ''} ({alive} of {need} connected)"
        if rounds.closing is not None:
            return f"round {r} waiting for {_names(sorted(rounds.owed))} to send again" if rounds.owed else None
        took = [s for s in rounds.participants() if rounds.may_train(s) and s.not_waited != r]
        waiting = sorted(s.name for s in took if rounds.alive(s, now))
        counted = f"{len(rounds.counted)} of {rounds.needed(Close.ALL_IN)} counted"
        if not waiting:
            return f"round {r} attempt {rounds.attempt} waiting for sites to take its task ({counted})"
        return f"round {r} attempt {rounds.attempt} waiting for updates from {_names(waiting)} ({counted})"

    def sites(self, now: float) -> str:
        """Lock held. "connected: A, B; silent: C for 42 s, D for 310 s (dropped)"."""
        rounds, timeout = self.agg.rounds, self.agg.config.site_timeout
        connected, silent = [], []
        for name in sorted(rounds.sites):
            quiet = now - rounds.sites[name].last_seen
            if quiet < SILENT_SHARE * timeout:
                connected.append(name)
            else:
                silent.append(f"{name} for {_seconds(quiet)}{' (dropped)' if quiet >= timeout else ''}")
        return f"connected: {_names(connected)}" + (f"; silent: {_names(silent)}" if silent else "")


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    more = len(names) - LISTED
    return ", ".join(names[:LISTED]) + (f" and {more} more" if more > 0 else "")


def _seconds(s: float) -> str:
    """A duration as the log says it: "42 s", "1.5 s" under 10 s."""
    return f"{s:.0f} s" if s >= 10 or s == int(s) else f"{s:.1f} s"
