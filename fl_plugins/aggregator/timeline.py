"""Where a round's time goes, as the aggregator sees it (its own clock: no site's clock is trusted or needed).

Each accepted update's record ("update" in metrics.jsonl) gets `timeline`, in seconds:

    wait        from the round's start to the site's first request for the round's global model
    download    from that request to the end of the site's last Download call for it (all shards, resumes too)
    train       from there to the site's BeginUpload: its local work (training, evaluation, encoding)
    upload      from BeginUpload to the commit (what `seconds` has always said)

and each round's record ("round") gets `timeline`:

    downloads   from the round's start until the last of its updates' sites had the global model
    last_update from the round's start to the last counted update's commit
    fold_wait   from that commit to the close starting (the decision's tick, the previous checkpoint's fsync)
    write       the new global model made before the next round opens (`checkpoint_seconds`): finalize into the
                accumulator's memory, its files written behind the next round (finished.py); the last round's, and
                flexlora's, finalize + files

A site that offered round 0's model downloaded nothing: its update has no wait/download/train. `fl-plugins
report` prints the per-round view (report_timeline.py). Download times are kept per (site, round) for the rounds
still open and dropped when a round closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Timeline:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.downloads: dict[tuple[str, int], list[float]] = {}  # (site, round) -> [first start, last end]
        self.commits: dict[int, float] = {}  # round -> its last commit

    def download(self, site: str, round_: int, start: float, end: float) -> None:
        """A Download call for round `round_`'s global model ran from `start` to `end` (the clock's times)."""
        with self.lock:
            seen = self.downloads.setdefault((site, round_), [start, end])
            seen[0], seen[1] = min(seen[0], start), max(seen[1], end)

    def update(self, site: str, round_: int, began: float | None, upload_started: float, now: float) -> dict:
        """An update of `site` in `round_` was committed at `now`: its timeline (module docstring). `began`: the
        round's start."""
        with self.lock:
            self.commits[round_] = max(self.commits.get(round_, now), now)
            seen = tuple(self.downloads.get((site, round_)) or ()) or None  # a copy: Downloads may still end
        out = {"upload": _s(now - upload_started)}
        if seen is not None:
            start, end = seen
            out["download"], out["train"] = _s(end - start), _s(upload_started - end)
            if began is not None:
                out["wait"] = _s(start - began)
        return out

    def close(self, round_: int, sites: list[str], began: float | None, closing: float, write: float) -> dict:
        """Round `round_` closed with the updates of `sites`: its close started at `closing` (the clock's time)
        and the new global model took `write` seconds. Its download times are dropped."""
        with self.lock:
            ends = [self.downloads[(s, round_)][1] for s in sites if (s, round_) in self.downloads]
            last = self.commits.pop(round_, None)
            for key in [k for k in self.downloads if k[1] <= round_]:
                del self.downloads[key]
        out = {"write": _s(write)}
        if last is not None:
            out["fold_wait"] = _s(closing - last)
        if began is not None:
            if ends:
                out["downloads"] = _s(max(ends) - began)
            if last is not None:
                out["last_update"] = _s(last - began)
        return out


def _s(seconds: float) -> float:
    return round(max(0.0, seconds), 3)
