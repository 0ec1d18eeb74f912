"""A round's participants as rounds.py keeps them: each site's state (`SiteState`) and each counted update
(`Counted`). Moved out of rounds.py, which imports them again, to keep that module within its size bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SiteState:
    name: str
    last_seen: float
    can_offer: bool = False
    took: tuple[int, int] | None = None  # (round, attempt) of the task it was given last
    asked: bool = False  # has asked for a task (and so said whether it can offer round 0's weights)
    sits_out: tuple[int, int] | None = None  # (round, attempt) it sits out: it left a partial update behind
    not_waited: int | None = None  # a round whose update from it was invalid: it may send another, unwaited for


@dataclass
class Counted:
    """A committed update: what a refold needs to take it again and to check that a resend is the same update
    (the chunk digests are 16 bytes per chunk: 4 KiB per GiB at 4 MiB chunks). Owed while a refold waits for it."""

    site: str
    attempt: int  # the attempt it was sent in (a resend names it)
    nonce: str
    manifest_sha: bytes
    weight: float
    params_type: str
    shard_digests: list[str]
    chunk_digests: list[list[bytes]]
    record: dict[str, Any]
    asked: float = 0.0  # when a refold asked for it again
