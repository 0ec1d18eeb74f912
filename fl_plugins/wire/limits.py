"""What one site may send and hold: the bounds, and the checks that enforce them.

The aggregator checks these on everything a site sends (core.py's `_parse_update` and `log_records`,
service.py's `Log` and its call slots); the client API runs the same record checks before it sends, so a script
gets the error at once. This module is in `wire/` because both sides use it (client/ may not import
aggregator/); it imports nothing beyond the standard library and errors.py.

An update's `metrics` and `meta` (the FLModel envelope), each:

    MAX_DICT_KEYS       256        keys
    MAX_KEY_CHARS       128        characters of a key
    MAX_STR_CHARS       256        characters of a string value
    MAX_ITEMS           64         a value may also be a flat list or object of at most this many numbers /
                                   short strings (per-class accuracies, say); nothing nested deeper
    MAX_DICT_BYTES      64 KiB     the whole dict as JSON (about: numbers count by their digits)

    Values: numbers (int, float, also NaN/Inf, which the round's mean leaves out), booleans, null, short
    strings. The round's weighted mean (`mean_metrics`) keeps the top-level finite numbers, at most
    MAX_DICT_KEYS of them (those most updates report), each rounded to METRIC_DIGITS = 7 significant digits
    (what a float32 metric carries): the global model's manifest stays small and readable whatever sites send.

`flare.log` records (one Log call carries a list of them):

    MAX_LOG_CALL_CHARS        1 Mi       characters of one call's records JSON
    MAX_LOG_RECORDS           1000       records per call
    MAX_RECORD_FIELDS         16         fields per record; `key` (a string up to MAX_KEY_CHARS) is required
    MAX_LOG_TEXT_CHARS        4096       a string `value` (TEXT records); other fields as metrics values
    LOG_CALLS_PER_SECOND      50         per site, sustained, with bursts of LOG_CALL_BURST = 500 calls: over it
                                         a call is refused as busy (RESOURCE_EXHAUSTED) and the client retries
    MAX_LOG_CHARS_PER_ROUND   32 Mi      characters per site per round (the aggregator's round): over it the
                                         site's further records of that round are refused (ProtocolError)

Calls that hold one of the aggregator's worker threads for long (service.py `CallSlots`):

    MAX_POLL_SECONDS          30         the longest a GetTask long poll waits
    MAX_POLLS_PER_SITE        1          GetTask calls waiting per site whose callers are still connected
    POLL_THREADS_PER_SITE     2          ... plus ones whose callers left and that are ending (woken at once)
    MAX_TRANSFERS_PER_SITE    4          Upload and Download streams open per site (a site sends one at a time)
    reserved_workers(n)       n // 8, at least 2: workers long calls never take, so Hello, Heartbeat, Log,
                                         Status, BeginUpload and CommitUpload always find one

A site over a call limit is refused with RESOURCE_EXHAUSTED (`BusyError`), which the client retries.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from fl_plugins.errors import BusyError, ProtocolError

MAX_DICT_KEYS = 256
MAX_KEY_CHARS = 128
MAX_STR_CHARS = 256
MAX_ITEMS = 64
MAX_DICT_BYTES = 64 << 10
METRIC_DIGITS = 7

MAX_LOG_CALL_CHARS = 1 << 20
MAX_LOG_RECORDS = 1000
MAX_RECORD_FIELDS = 16
MAX_LOG_TEXT_CHARS = 4096
LOG_CALLS_PER_SECOND = 50.0
LOG_CALL_BURST = 500
MAX_LOG_CHARS_PER_ROUND = 32 << 20

MAX_POLL_SECONDS = 30.0
MAX_POLLS_PER_SITE = 1
POLL_THREADS_PER_SITE = 2
MAX_TRANSFERS_PER_SITE = 4


def reserved_workers(max_workers: int) -> int:
    """Worker threads kept for short calls (Hello, Heartbeat, ...): long polls and transfers never take them."""
    return max(2, max_workers // 8)


# -- values -------------------------------------------------------------------------------------------------------
def _show(x: Any, limit: int = 60) -> str:
    """repr of a value from a peer, cut short (a message must not echo megabytes back)."""
    if isinstance(x, str):
        return repr(x if len(x) <= limit else x[: limit - 3] + "...")
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 128:
        return f"<int of about {int(x.bit_length() * 0.30103) + 1} digits>"
    if isinstance(x, (dict, list)):
        return f"<{type(x).__name__} of {len(x)} items>"
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _scalar_size(v: Any, max_str: int, where: Callable[[], str]) -> int:
    """The JSON size of a scalar (numbers by their digits, without printing them), checked."""
    if v is None or isinstance(v, bool):
        return 5
    if isinstance(v, int):
        return int(v.bit_length() * 0.30103) + 2
    if isinstance(v, float):
        return 24
    if isinstance(v, str):
        if len(v) > max_str:
            raise ProtocolError(
                f"{where()}: a string of {len(v)} characters, over the limit of {max_str}: "
                "send a shorter value (long text goes to a file, not to metrics)"
            )
        return len(v) + 2
    raise ProtocolError(f"{where()} must be a number, a boolean, null or a string (got {type(v).__name__})")


def _item(who: str, name: str, key: str) -> str:
    return f"{who}: `{name}[{_show(key)}]`"


def _log_field(who: str, i: int, key: Any, field: str) -> str:
    return f"{who}: log record {i} ({_show(key)}) `{_show(field, 40)}`"


def _value_size(v: Any, max_str: int, where: Callable[[], str]) -> int:
    """A metrics / meta / log value: a scalar, or a flat list or object of at most MAX_ITEMS scalars."""
    if isinstance(v, (list, dict)):
        if len(v) > MAX_ITEMS:
            raise ProtocolError(
                f"{where()}: a {type(v).__name__} of {len(v)} items, over the limit of {MAX_ITEMS} "
                "(limits.MAX_ITEMS): send a summary, or log the values one by one"
            )
        size = 2
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in items:
            if isinstance(k, str) and len(k) > MAX_KEY_CHARS:
                raise ProtocolError(f"{where()}: a key of {len(k)} characters, over the limit of {MAX_KEY_CHARS}")
            if isinstance(x, (list, dict)):
                raise ProtocolError(
                    f"{where()} nests a {type(x).__name__} in a {type(v).__name__}: values may be "
                    "numbers, booleans, null, short strings, or one flat list or object of those; "
                    "flatten it (e.g. 'val/acc' keys)"
                )
            size += _scalar_size(x, max_str, where) + (len(k) + 4 if isinstance(k, str) else 1)
        return size
    return _scalar_size(v, max_str, where)


def check_envelope_dict(who: str, name: str, d: Any) -> None:
    """Check an update's `metrics` or `meta` dict against the bounds above; ProtocolError naming `who` (e.g.
    "site 'site-1'"), the limit and what was got."""
    if not isinstance(d, dict):
        raise ProtocolError(f"{who}: envelope `{name}` must be an object (got {_show(d)})")
    if len(d) > MAX_DICT_KEYS:
        raise ProtocolError(
            f"{who}: `{name}` has {len(d)} keys, over the limit of {MAX_DICT_KEYS} "
            f"(limits.MAX_DICT_KEYS): send fewer {name}; per-step values go to flare.log"
        )
    size = 2
    for k, v in d.items():
        if not isinstance(k, str) or len(k) > MAX_KEY_CHARS:
            raise ProtocolError(
                f"{who}: `{name}` key {_show(k)} is {len(str(k))} characters, over the limit of "
                f"{MAX_KEY_CHARS} (limits.MAX_KEY_CHARS): use a shorter name"
            )
        size += len(k) + 4 + _value_size(v, MAX_STR_CHARS, functools.partial(_item, who, name, k))
    if size > MAX_DICT_BYTES:
        raise ProtocolError(
            f"{who}: `{name}` is about {size} bytes as JSON, over the limit of {MAX_DICT_BYTES} "
            f"(limits.MAX_DICT_BYTES): send fewer or shorter {name}"
        )


def round_metric(x: float) -> float:
    """x to METRIC_DIGITS significant digits (0.123456789 -> 0.1234568)."""
    return float(f"{x:.{METRIC_DIGITS}g}")


def finite_float(x: Any) -> float | None:
    """x as a finite float, or None (not a number, a bool, NaN, infinite, or an int too big for a float)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def mean_metrics(records: list[dict]) -> dict[str, float]:
    """The weighted mean of each top-level numeric metric over `records` (each {"weight", "metrics"}); values
    that are not finite numbers are left out (metrics are informative: never fatal). At most MAX_DICT_KEYS keys,
    those reported by the most updates (then by name), each rounded to METRIC_DIGITS significant digits."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    counts: dict[str, int] = {}
    for rec in records:
        w = finite_float(rec.get("weight"))
        metrics = rec.get("metrics")
        if w is None or w <= 0 or not isinstance(metrics, dict):
            continue
        for k, v in metrics.items():
            f = finite_float(v)
            if f is not None and isinstance(k, str):
                sums[k] = sums.get(k, 0.0) + w * f
                weights[k] = weights.get(k, 0.0) + w
                counts[k] = counts.get(k, 0) + 1
    means = {k: sums[k] / weights[k] for k in sums}
    keep = sorted((k for k, m in means.items() if math.isfinite(m)), key=lambda k: (-counts[k], k))
    return {k: round_metric(means[k]) for k in sorted(keep[:MAX_DICT_KEYS])}


# -- log records ----------------------------------------------------------------------------------------------
def check_log_records(who: str, records: Any) -> list[dict]:
    """`records` (a Log call's parsed JSON) checked: a list of at most MAX_LOG_RECORDS objects, each with a `key`
    and at most MAX_RECORD_FIELDS fields whose values are bounded like metrics values (`value` may be a string of
    up to MAX_LOG_TEXT_CHARS). ProtocolError naming `who`, the limit and what was got."""
    if not isinstance(records, list):
        raise ProtocolError(f"{who}: log records must be a JSON list of objects (got {_show(records)})")
    if len(records) > MAX_LOG_RECORDS:
        raise ProtocolError(
            f"{who}: {len(records)} log records in one call, over the limit of {MAX_LOG_RECORDS} "
            "(limits.MAX_LOG_RECORDS): send them in several calls"
        )
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ProtocolError(f"{who}: log records must be a JSON list of objects (record {i} is {_show(r)})")
        if len(r) > MAX_RECORD_FIELDS:
            raise ProtocolError(
                f"{who}: log record {i} has {len(r)} fields, over the limit of {MAX_RECORD_FIELDS} "
                "(limits.MAX_RECORD_FIELDS): pass fewer keyword arguments to flare.log"
            )
        key = r.get("key")
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            raise ProtocolError(
                f"{who}: log record {i}: `key` must be a name of 1 to {MAX_KEY_CHARS} characters (got {_show(key)})"
            )
        for f, v in r.items():
            if len(f) > MAX_KEY_CHARS:
                raise ProtocolError(
                    f"{who}: log record {i}: a field name of {len(f)} characters, over the limit of {MAX_KEY_CHARS}"
                )
            _value_size(
                v,
                MAX_LOG_TEXT_CHARS if f == "value" else MAX_STR_CHARS,
                functools.partial(_log_field, who, i, key, f),
            )
    return records


def check_log_size(who: str, text: str) -> None:
    """One Log call's records JSON is at most MAX_LOG_CALL_CHARS characters."""
    if len(text) > MAX_LOG_CALL_CHARS:
        raise ProtocolError(
            f"{who}: one Log call of {len(text)} characters, over the limit of {MAX_LOG_CALL_CHARS} "
            "(limits.MAX_LOG_CALL_CHARS): send fewer records per call"
        )


def parse_log_records(who: str, text: str) -> list[dict]:
    """A Log call's records JSON: its size, then the JSON (too deep nesting is a ProtocolError, not a
    RecursionError), then `check_log_records`."""
    import json

    check_log_size(who, text)
    try:
        records = json.loads(text)
    except RecursionError:
        raise ProtocolError(f"{who}: log records are not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, an int too long to convert
        raise ProtocolError(f"{who}: log records are not valid JSON ({_show(str(e), 200)})") from None
    return check_log_records(who, records)


def parse_envelope(who: str, text: str) -> dict[str, Any]:
    """A result's envelope JSON (an EVALUATE task's answer): at most 2 x MAX_DICT_BYTES + 4 KiB of text holding a
    JSON object; its `metrics` and `meta` are checked by whoever takes them (check_envelope_dict)."""
    import json

    if not isinstance(text, str) or len(text) > 2 * MAX_DICT_BYTES + 4096:
        size = len(text) if isinstance(text, str) else 0
        raise ProtocolError(
            f"{who}: a result's envelope of {size} characters, over the limit of {2 * MAX_DICT_BYTES + 4096}"
        )
    try:
        env = json.loads(text or "{}")
    except RecursionError:
        raise ProtocolError(f"{who}: the result's envelope is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise ProtocolError(f"{who}: the result's envelope is not valid JSON ({_show(str(e), 200)})") from None
    if not isinstance(env, dict):
        raise ProtocolError(f"{who}: the result's envelope must be a JSON object (got {_show(env)})")
    return env


class LogBudget:
    """Per site: a token bucket of Log calls (LOG_CALLS_PER_SECOND, bursts of LOG_CALL_BURST) and the characters
    logged in the aggregator's current round (MAX_LOG_CHARS_PER_ROUND). Thread-safe; `clock` for tests."""

    def __init__(
        self,
        *,
        rate: float = LOG_CALLS_PER_SECOND,
        burst: int = LOG_CALL_BURST,
        per_round: int = MAX_LOG_CHARS_PER_ROUND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.per_round, self.clock = rate, burst, per_round, clock
        self._lock = threading.Lock()
        self._sites: dict[str, list[float]] = {}  # site -> [tokens, time, round, chars this round]

    def charge(self, site: str, round_: int, chars: int) -> None:
        """Count one call of `chars` characters in `round_`; BusyError over the rate, ProtocolError over the
        round's total (nothing is counted for a refused call)."""
        now = self.clock()
        with self._lock:
            st = self._sites.get(site)
            if st is None:
                if len(self._sites) >= 4096:  # names of past rounds' sites go first (plaintext: any name)
                    for k in [k for k, v in self._sites.items() if v[2] != round_]:
                        del self._sites[k]
                st = self._sites[site] = [float(self.burst), now, round_, 0]
            tokens = min(float(self.burst), st[0] + (now - st[1]) * self.rate)
            st[1] = now
            if st[2] != round_:
                st[2], st[3] = round_, 0
            if tokens < 1:
                st[0] = tokens
                raise BusyError(
                    f"site {site!r} sends more than {self.rate:g} Log calls a second (bursts of "
                    f"{self.burst}; limits.LOG_CALLS_PER_SECOND): slow down, or send several records "
                    "per call; the client retries"
                )
            if st[3] + chars > self.per_round:
                st[0] = tokens
                raise ProtocolError(
                    f"site {site!r} has logged {st[3]} characters of records in round {round_}; "
                    f"{chars} more would pass the limit of {self.per_round} per site per round "
                    "(limits.MAX_LOG_CHARS_PER_ROUND): log less often, e.g. every N steps"
                )
            st[0], st[3] = tokens - 1, st[3] + chars
