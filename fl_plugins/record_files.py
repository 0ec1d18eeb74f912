"""Reading the run directory's records back (records.py types them): whole JSON lines only, from where the last
read stopped (`JsonlTail`, what runner.py and tracking/ tail), a finished file at once (`read_records`), a JSON file
(`read_object`), and metrics.jsonl's updates and rounds as far as read (`RunMetrics`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins.records import Record, RoundRecord, UpdateRecord, parse_record

Parse = Callable[[Mapping[str, Any]], Record]


def _parse_lines(lines: Iterable[bytes], start: int, parse: Parse) -> list[tuple[int, Record]]:
    """Each line that holds a JSON object, parsed, with the offset where the line ends (`start`: where the first
    begins; each line is followed by one newline)."""
    out = []
    pos = start
    for line in lines:
        pos += len(line) + 1
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # not JSON (or not UTF-8): skipped
            continue
        if isinstance(obj, dict):
            out.append((pos, parse(obj)))
    return out


@dataclass
class JsonlTail:
    """Incremental reader of a JSON-lines file: the whole lines appended since the last read, each parsed by
    `parse` (parse_record for metrics.jsonl, parse_log for logs.jsonl); a line still being written is left for the
    next read, a line that is not a JSON object is skipped. A missing file reads as empty."""

    path: Path
    parse: Parse = parse_record
    offset: int = 0  # where the next read starts: the end of the last whole line read

    def read(self) -> list[Record]:
        """The new records."""
        return [rec for _, rec in self.read_ends()]

    def read_ends(self) -> list[tuple[int, Record]]:
        """The new records, each with the file offset where its line ends."""
        try:
            with Path(self.path).open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        out = _parse_lines(data[:end].split(b"\n")[:-1], self.offset, self.parse)
        self.offset += end
        return out


def read_records(path: str | Path, parse: Parse = parse_record) -> list[Record]:
    """Every record of a JSON-lines file that is no longer written: as JsonlTail reads, but a last line without
    its newline counts when it is a whole JSON object. A missing file reads as empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [rec for _, rec in _parse_lines(data.split(b"\n"), 0, parse)]


def read_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object a file holds (summary.json, baselines.json); None when the file does not exist or holds
    another JSON value. OSError or ValueError when it cannot be read or is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    obj = json.loads(path.read_text())
    return obj if isinstance(obj, dict) else None


@dataclass
class RunMetrics:
    """metrics.jsonl's updates and rounds as far as read: `add` the records of each read."""

    updates: list[UpdateRecord] = field(default_factory=list)  # in the order written
    rounds: dict[int, RoundRecord] = field(default_factory=dict)  # round -> its latest "round" record

    def add(self, records: Iterable[Record]) -> None:
        for rec in records:
            if isinstance(rec, UpdateRecord):
                self.updates.append(rec)
            elif isinstance(rec, RoundRecord):
                self.rounds[rec.round] = rec
