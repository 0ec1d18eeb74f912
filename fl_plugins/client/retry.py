"""One retry policy for a site's calls and transfers: try, and after a transient failure pause and try again.

`retry()` is the only backoff loop of the client (`SiteClient.call` and the resumable transfers both use it);
what differs between them is said in its arguments, not in another loop:

    what               gives up after                                   the pause restarts from `first`
    a call (call())    `window` seconds in all, or once `stopped()`      never
                       (the aggregator silent for retry_timeout, reach.py)
    a transfer         `window` seconds without progress                 when an attempt got further

The pauses are `Backoff`'s: `first` seconds, then `factor` times the last one, at most `most`. A call starts at
0.1 s (`CALLS`), a transfer at 0.05 s (`TRANSFERS`: its pauses restart whenever it got further); connect's
attempts, which fail at once while nothing answers, pause at most 1 s (`CONNECTS`), so a site finds an aggregator
that came up within about a second and overshoots its connect_timeout by at most that much.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from fl_plugins.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """The pauses between attempts: `first` seconds, then `factor` times the last pause, at most `most`."""

    first: float = 0.05
    factor: float = 2.0
    most: float = 2.0

    def pauses(self) -> Iterator[float]:
        pause = self.first
        while True:
            yield pause
            pause = min(pause * self.factor, self.most)


CALLS = Backoff(first=0.1)  # SiteClient.call: 0.1, 0.2, 0.4, ... 2 s
CONNECTS = Backoff(first=0.1, most=1.0)  # connect's attempts, which do not wait for a connection: ... 1 s
TRANSFERS = Backoff(first=0.05)  # the resumable transfers: 0.05, 0.1, ... 2 s, from 0.05 again after progress


def check_timeout(value: object, where: str) -> float:
    """`value` as seconds to wait: a finite number > 0 (a number in a string too, as an environment variable holds
    it). ConfigError naming `where` (the argument, flag or variable the value came from) otherwise."""
    seconds = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except ValueError:
            pass
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{where} must be a number of seconds > 0, e.g. 120 (got {value!r})")
    return seconds


def _never() -> bool:
    return False


def retry(
    attempt: Callable[[], T],
    *,
    fatal: Callable[[Exception], BaseException | None],
    window: float,
    give_up: Callable[[Exception], BaseException],
    progress: Callable[[], object] | None = None,
    stopped: Callable[[], bool] = _never,
    on_retry: Callable[[Exception], None] | None = None,
    backoff: Backoff = TRANSFERS,
) -> T:
    """`attempt()`'s result, trying again after transient failures.

    fatal: for a failure, the exception to raise at once (the failure itself is re-raised as it is), or None
    when it is transient. window: how long to keep trying, in seconds: in all, or, with `progress` (a value that
    changes whenever an attempt got further), since the last progress, which also restarts the pauses.
    give_up: the exception to raise for the last failure once the window has passed or `stopped()` is true.
    on_retry: called before each pause (to count retries, to log). backoff: the pauses (CALLS for a call)."""
    pauses = backoff.pauses()
    mark = progress() if progress is not None else None
    since = time.monotonic()
    while True:
        try:
            return attempt()
        except Exception as e:
            err = fatal(e)
            if err is e:
                raise
            if err is not None:
                raise err from None
            if progress is not None and progress() != mark:
                mark, since, pauses = progress(), time.monotonic(), backoff.pauses()
            if time.monotonic() - since >= window or stopped():
                raise give_up(e) from None
            if on_retry is not None:
                on_retry(e)
            time.sleep(next(pauses))
