"""Records to points: each metrics.jsonl and logs.jsonl record becomes the values the trackers plot (the names
are listed in the package's docstring), and the protocol every tracker implements."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fl_plugins.records import LogRecord, Record, RoundRecord, UpdateRecord, parse_log, parse_record
from fl_plugins.wire.limits import finite_float


@dataclass(frozen=True)
class Point:
    """One value of one series. `site` None: the job's own series (global model, aggregator)."""

    key: str  # e.g. "global/val_acc", "aggregator/round_seconds"; for a site: "train_loss", "global_model/val_acc"
    value: float
    step: int
    site: str | None = None
    axis: str = "round"  # "round": step is the round; "step": step is the site's global training step
    time: float | None = None  # wall-clock seconds since the epoch (the record's time)

    @property
    def name(self) -> str:
        """The flat name (TensorBoard tag, W&B key): `SITE/key` for a site's series."""
        return self.key if self.site is None else f"{self.site}/{self.key}"


class Tracker(Protocol):
    """A tracker backend: `write` a batch of points, `close` with the run's exit code (0 finished, 130
    interrupted, else failed); `where` says where it writes."""

    name: str

    def where(self) -> str: ...

    def write(self, points: list[Point]) -> None: ...

    def close(self, code: int) -> None: ...


def _numbers(key: str, v: Any) -> Iterator[tuple[str, float]]:
    """A record's value: a number, or a mapping of numbers (SCALARS / METRICS) as key/name."""
    f = finite_float(v)
    if f is not None:
        yield key, f
    elif isinstance(v, dict):
        for k, sub in v.items():
            f = finite_float(sub)
            if f is not None:
                yield f"{key}/{k}", f


def _metrics(metrics: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    for name, val in metrics.items():
        yield from _numbers(str(name), val)


def _float(v: float | None) -> float | None:
    return None if v is None else float(v)


class Converter:
    """Turns metrics.jsonl and logs.jsonl records (or their JSON objects) into Points. Keeps what it needs across
    records: the updates of each round (for the round's bytes and sites) and the round each site was last seen in."""

    def __init__(self) -> None:
        self._updates: dict[tuple[int, int], list[UpdateRecord]] = {}
        self._site_round: dict[str, int] = {}

    def metrics_record(self, rec: Record | Mapping[str, Any], *, peak_rss: float | None = None) -> list[Point]:
        if isinstance(rec, Mapping):
            rec = parse_record(rec)
        if isinstance(rec, UpdateRecord):
            return self._update(rec)
        if isinstance(rec, RoundRecord):
            return self._round(rec, peak_rss)
        return []

    def _update(self, rec: UpdateRecord) -> list[Point]:
        rnd, site, t = rec.round, rec.site, _float(rec.time)
        self._updates.setdefault((rnd, rec.attempt), []).append(rec)
        pts = [Point(f"global_model/{k}", v, rnd, site, time=t) for k, v in _metrics(rec.metrics)]
        size, secs, weight = _float(rec.bytes), _float(rec.seconds), _float(rec.weight)
        if size is not None:
            pts.append(Point("update/bytes", size, rnd, site, time=t))
        if secs is not None:
            pts.append(Point("update/seconds", secs, rnd, site, time=t))
            if size is not None and secs > 0:
                pts.append(Point("update/gbps", size / secs / 1e9, rnd, site, time=t))
        if weight is not None:
            pts.append(Point("update/weight", weight, rnd, site, time=t))
        return pts

    def _round(self, rec: RoundRecord, peak_rss: float | None) -> list[Point]:
        rnd, t = rec.round, _float(rec.time)
        pts = [Point(f"global/{k}", v, rnd, time=t) for k, v in _metrics(rec.metrics)]
        updates = self._updates.pop((rnd, rec.attempt), [])
        secs = _float(rec.seconds)
        if secs is not None:
            pts.append(Point("aggregator/round_seconds", secs, rnd, time=t))
        if rec.checkpoint_seconds is not None:
            pts.append(Point("aggregator/checkpoint_seconds", float(rec.checkpoint_seconds), rnd, time=t))
        n = len({u.site for u in updates}) if updates else rec.updates
        if n is not None:
            pts.append(Point("aggregator/sites", float(n), rnd, time=t))
        if updates:
            total = float(sum(_float(u.bytes) or 0.0 for u in updates))
            pts.append(Point("aggregator/bytes", total, rnd, time=t))
            if secs:
                pts.append(Point("aggregator/gbps", total / secs / 1e9, rnd, time=t))
        if peak_rss is not None:
            pts.append(Point("aggregator/peak_rss_mb", peak_rss / 2**20, rnd, time=t))
        return pts

    def log_record(self, rec: Record | Mapping[str, Any]) -> list[Point]:
        if isinstance(rec, Mapping):
            rec = parse_log(rec)
        if not isinstance(rec, LogRecord):
            return []
        site, t, step = rec.site, _float(rec.time), rec.step
        rnd = rec.round if rec.round is not None else self._site_round.get(site, 0)
        pts: list[Point] = []
        if isinstance(step, int):  # a global step: the site's own axis
            if self._site_round.get(site) != rnd:
                pts.append(Point("round", float(rnd), step, site, "step", t))
            axis = "step"
        else:
            step, axis = rnd, "round"
        self._site_round[site] = rnd
        pts += [Point(k, v, int(step), site, axis, t) for k, v in _numbers(rec.key, rec.value)]
        return pts
