"""Who holds the aggregator's long calls (GetTask long polls, Upload and Download streams): `CallSlots`, the bounds
that keep one site's calls from starving the others' heartbeats (moved out of service.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import grpc

from fl_plugins.errors import BusyError, ConfigError
from fl_plugins.wire import limits


class CallSlots:
    """Who holds the calls that keep a worker thread for long: GetTask long polls, Upload and Download streams.

    Bounds (limits.py): per site one long poll whose caller is still connected (an extra one is refused; one whose
    caller left gives way to a newer one and ends at once) and MAX_TRANSFERS_PER_SITE streams; all
    sites together at most `max_workers - reserved_workers(max_workers)` long calls, so the reserved workers are
    always there for Hello, Heartbeat and the other short calls: one site's calls cannot starve the others'
    heartbeats. A call over a bound is refused at once with BusyError (RESOURCE_EXHAUSTED), which clients retry."""

    def __init__(self, max_workers: int) -> None:
        self.check(max_workers)
        reserved = limits.reserved_workers(max_workers)
        self.max_workers, self.max_long = max_workers, max_workers - reserved
        self._lock = threading.Lock()
        self._long = 0
        self._polls: dict[str, list] = {}  # site -> contexts of its open GetTask calls
        self._transfers: dict[str, int] = {}

    @staticmethod
    def check(max_workers: int) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 4:
            raise ConfigError(
                f"max_workers must be an integer >= 4 (got {max_workers!r}): at least "
                f"{limits.reserved_workers(4)} are kept for heartbeats and the rest serve long polls and "
                "transfers; pass a larger max_workers (default 128)"
            )

    def _take_long(self, site: str, what: str) -> None:
        """Lock held."""
        if self._long >= self.max_long:
            raise BusyError(
                f"{what} of site {site!r} refused: the aggregator already serves {self._long} long calls "
                f"(long polls and transfers), its most ({self.max_workers} workers, "
                f"{self.max_workers - self.max_long} kept for heartbeats); the client retries"
            )
        self._long += 1

    @contextlib.contextmanager
    def poll(self, site: str, context: grpc.ServicerContext) -> Iterator[None]:
        with self._lock:
            mine = self._polls.get(site, [])
            live = sum(1 for c in mine if c.is_active())
            if live >= limits.MAX_POLLS_PER_SITE:
                raise BusyError(
                    f"site {site!r} already has {live} GetTask call waiting for a task, the most a site "
                    f"may (limits.MAX_POLLS_PER_SITE = {limits.MAX_POLLS_PER_SITE}): wait for its answer "
                    "before asking again"
                )
            if len(mine) >= limits.POLL_THREADS_PER_SITE:
                raise BusyError(
                    f"site {site!r}: {len(mine)} earlier GetTask calls whose callers left are still "
                    f"ending (at most {limits.POLL_THREADS_PER_SITE} per site, "
                    f"limits.POLL_THREADS_PER_SITE); ask again in a moment"
                )
            self._take_long(site, "GetTask")
            self._polls.setdefault(site, []).append(context)
        try:
            yield
        finally:
            with self._lock:
                self._long -= 1
                self._polls[site].remove(context)
                if not self._polls[site]:
                    del self._polls[site]

    @contextlib.contextmanager
    def transfer(self, site: str, what: str) -> Iterator[None]:
        with self._lock:
            n = self._transfers.get(site, 0)
            if n >= limits.MAX_TRANSFERS_PER_SITE:
                raise BusyError(
                    f"{what} refused: site {site!r} already has {n} Upload/Download streams open, the most "
                    f"a site may (limits.MAX_TRANSFERS_PER_SITE = {limits.MAX_TRANSFERS_PER_SITE}): wait "
                    "for one to end"
                )
            self._take_long(site, what)
            self._transfers[site] = n + 1
        try:
            yield
        finally:
            with self._lock:
                self._long -= 1
                self._transfers[site] -= 1
                if not self._transfers[site]:
                    del self._transfers[site]

    def transfers(self) -> int:
        """The Upload and Download streams open now, every site's together."""
        with self._lock:
            return sum(self._transfers.values())
