"""The relay: sealed transfers between sites, stored and forwarded by the aggregator, which cannot open them.

In a swarm job the sites send weights to each other sealed (security/seal.py) and the aggregator passes them on.
The relay accepts only what the coordinator issued: `expect(transfer_id, sender, recipients, ...)` registers a
transfer; the sender then opens it (RelayOpen: the header and how many records it holds), puts its records in
order (RelayPut), and commits it (RelayCommit); each recipient then gets the header and the records from any
index (RelayGet). The relay reads the names in the header and each record's index (`header_info`,
`record_index`: no keys), and checks who may put and get; the recipients check everything else.

A transfer's records are spooled as they arrive, never held whole in memory:

    RUN_DIR/relay/            0700
        ID.part               0600, while records arrive: each record as u32 LE length + its bytes
        ID.sealed             the same file once committed (renamed): what RelayGet reads, one record at a time
        ID.header             the committed transfer's header (`adopt` serves a transfer again after a restart)

Both ways resume: a re-opened transfer says how many records the relay holds, and a get starts from any record.
After a restart the registry is empty: the coordinator adopts the committed transfers it recorded (the current
global model) and expects the others again (a stale spool file of an expected id is removed). Locks: the relay's
own guards the registry, each transfer's guards its state and its file; neither is held while calling out
(`on_commit` takes the coordinator's lock, and the coordinator calls `expect` and `drop` holding it).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_plugins.aggregator.files import FILE_MODE, private_dir, write_private
from fl_plugins.errors import AuthError, FLError, IntegrityError, ProtocolError, RoundError
from fl_plugins.security.seal import Certificates, header_info, record_index
from fl_plugins.wire.limits import parse_envelope

log = logging.getLogger(__name__)

LENGTH = struct.Struct("<I")  # a spooled record's length prefix
PURPOSES = ("update", "model")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a transfer id is a file name in the relay's folder


@dataclass
class RelayTransfer:
    """One expected transfer: who sends it to whom, what the sender declared, what the relay holds."""

    transfer_id: str
    sender: str
    recipients: frozenset[str]
    purpose: str  # "update" (a site's update, to the round's aggregator site) | "model" (a global model)
    round: int
    attempt: int
    path: Path  # the spool file (ID.part, then ID.sealed)
    header: bytes | None = None  # set by the first RelayOpen
    records_declared: int = 0
    max_bytes: int = 0
    offsets: list[int] = field(default_factory=list)  # record i's offset in the spool file
    committed: bool = False
    bytes_in: int = 0  # sealed record bytes held (without the length prefixes)
    bytes_out: int = 0  # bytes sent to recipients (headers and records)
    message: str | None = None  # on_commit's answer, repeated to a repeated commit
    dropped: bool = False
    direct: bool = False  # its records went straight to the recipient (commit with `direct`): none are here
    limit: int = 0  # the most sealed bytes it may declare (expect's `limit`)
    on_commit: Callable[[RelayTransfer, dict[str, Any]], str] | None = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # its state and its file
    commit_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one on_commit at a time

    @property
    def held(self) -> int:
        return len(self.offsets)

    @property
    def end(self) -> int:
        """The spool file's length: every held record with its prefix."""
        return self.bytes_in + LENGTH.size * len(self.offsets)

    def name(self) -> str:
        return f"transfer {self.transfer_id!r} ({self.purpose} of round {self.round}, from {self.sender!r})"


class Relay:
    """The registry of expected transfers and their spool files in `directory` (made 0700 when first needed).

    max_bytes: the most sealed bytes one transfer may declare. on_record(transfer_id, record): called with each
    record stored (after it is written, outside the locks): the tests capture what the aggregator sees with it."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 40,
        on_record: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.on_record = on_record
        self.certs: Certificates | None = None  # the project's CA (and revocations): headers are checked against it
        self._lock = threading.Lock()
        self._transfers: dict[str, RelayTransfer] = {}

    # -- the coordinator's side --------------------------------------------------------------------------------
    def expect(
        self,
        transfer_id: str,
        sender: str,
        recipients: Iterable[str],
        purpose: str,
        round_: int,
        attempt: int,
        on_commit: Callable[[RelayTransfer, dict[str, Any]], str],
        limit: int | None = None,
    ) -> None:
        """Register a transfer the coordinator issued. Expecting it again with the same parties keeps what the
        relay holds (and takes the new `on_commit`); with other parties it is refused. `limit`: the most sealed bytes
        this transfer may declare (default the relay's `max_bytes`: a site's update is bounded by its model's)."""
        if not isinstance(transfer_id, str) or not _ID.fullmatch(transfer_id):
            raise ProtocolError(
                f"transfer id {transfer_id!r} must be 1 to 128 letters, digits, '.', '_' or '-' (not first): "
                "it names the relay's spool file"
            )
        if purpose not in PURPOSES:
            raise ProtocolError(f"transfer {transfer_id!r}: purpose must be one of {PURPOSES} (got {purpose!r})")
        who = frozenset(recipients)
        if not who:
            raise ProtocolError(f"transfer {transfer_id!r} from {sender!r}: name at least one recipient")
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                self._remove_files(transfer_id)  # a spool file an earlier run of the aggregator left
                path = self.directory / f"{transfer_id}.part"
                t = RelayTransfer(transfer_id, sender, who, purpose, round_, attempt, path, on_commit=on_commit)
                t.limit = min(limit or self.max_bytes, self.max_bytes)
                self._transfers[transfer_id] = t
                return
        if (t.sender, t.recipients, t.purpose, t.round, t.attempt) != (sender, who, purpose, round_, attempt):
            raise RoundError(
                f"{t.name()} is already expected for {sorted(t.recipients)} (attempt {t.attempt}); a transfer id "
                "names one transfer: issue a new id"
            )
        with t.lock:
            t.on_commit = on_commit

    def adopt(self, transfer_id: str, sender: str, recipients: Iterable[str], purpose: str, round_: int) -> bool:
        """After a restart: serve again a transfer committed before it (its ID.sealed and ID.header in the spool, as
        the coordinator recorded them). False, leaving nothing registered, if its files are gone or damaged."""
        sealed = self.directory / f"{transfer_id}.sealed"
        try:
            header = sealed.with_suffix(".header").read_bytes()
            offsets, pos, size = [], 0, sealed.stat().st_size
            with open(sealed, "rb") as f:
                while pos < size:
                    (n,) = LENGTH.unpack(f.read(LENGTH.size))
                    offsets.append(pos)
                    pos += LENGTH.size + n
                    f.seek(pos)
            named = header_info(header).transfer_id
        except (OSError, struct.error, FLError) as e:
            log.warning("transfer %s cannot be served again after the restart: %s", transfer_id, e)
            return False
        if pos != size or named != transfer_id:
            log.warning("transfer %s cannot be served again after the restart: its spool file is damaged", transfer_id)
            return False
        t = RelayTransfer(transfer_id, sender, frozenset(recipients), purpose, round_, 0, sealed, header=header)
        t.records_declared, t.offsets, t.committed, t.message = len(offsets), offsets, True, "committed"
        t.bytes_in, t.max_bytes = size - LENGTH.size * len(offsets), size
        with self._lock:
            self._transfers[transfer_id] = t
        return True

    def drop(self, transfer_ids: Iterable[str]) -> None:
        """Forget these transfers and delete their spool files (a put or get under way ends with RoundError)."""
        with self._lock:
            gone = [t for t in (self._transfers.pop(i, None) for i in transfer_ids) if t is not None]
        for t in gone:
            with t.lock:
                t.dropped = True
            self._remove_files(t.transfer_id)

    def transfer(self, transfer_id: str) -> RelayTransfer | None:
        """The transfer's record (for the coordinator's records and the status), or None if not expected."""
        with self._lock:
            return self._transfers.get(transfer_id)

    # -- the sender's side -----------------------------------------------------------------------------------
    def open(self, site: str, transfer_id: str, header: bytes, records: int, max_bytes: int) -> RelayTransfer:
        """The sender opens the transfer (or opens it again, to resume): returns it, with how many records the
        relay holds. A re-open must declare the same header, records and max_bytes."""
        t = self._find(transfer_id, site, "open")
        self._as_sender(t, site, "open")
        self._check_header(t, site, header)
        limit = t.limit or self.max_bytes
        if not 1 <= records <= max(1, max_bytes // 64) or not 1 <= max_bytes <= limit:
            raise ProtocolError(
                f"site {site!r}: {t.name()} declares {records} records in at most {max_bytes} bytes: records must "
                f"be 1 or more (at least 64 bytes each) and max_bytes from 1 to {limit} (this transfer's limit: "
                "twice the round's model, or the relay's): send the round's model's tensors, or a bound that holds them"
            )
        with t.lock:
            self._live(t, site)
            if t.committed and (t.header, t.records_declared, t.max_bytes) != (header, records, max_bytes):
                raise ProtocolError(
                    f"site {site!r}: {t.name()} is committed already with another header; it cannot change: ask "
                    "the aggregator for your next task"
                )
            if (t.header, t.records_declared, t.max_bytes) != (header, records, max_bytes):
                # a first open, or the sender sealed it again (its process restarted mid-put): start it over
                private_dir(self.directory)
                fd = os.open(t.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
                os.close(fd)
                t.header, t.records_declared, t.max_bytes = header, records, max_bytes
                t.offsets, t.bytes_in = [], 0
            return t

    def put(self, site: str, transfer_id: str, records: Iterator[bytes]) -> RelayTransfer:
        """Store the sender's records, in order from the number held: each is written to the spool file at
        once. A record the relay holds already (a resend racing its cut stream) is skipped."""
        t = self._find(transfer_id, site, "put records to")
        self._as_sender(t, site, "put records to")
        for record in records:
            index = self._index(t, site, record)
            with t.lock:
                stored = self._store(t, site, index, record)
            if stored and self.on_record is not None:
                self.on_record(transfer_id, record)
        return t

    def _index(self, t: RelayTransfer, site: str, record: bytes) -> int:
        try:
            return record_index(record)
        except FLError as e:
            raise ProtocolError(f"site {site!r}: {t.name()}: a record that is not a sealed record ({e})") from None

    def _store(self, t: RelayTransfer, site: str, index: int, record: bytes) -> bool:
        """Write record `index` (transfer lock held); False for one held already."""
        self._live(t, site)
        if t.header is None:
            raise ProtocolError(f"site {site!r}: {t.name()} is not open: send RelayOpen before its records")
        if index < t.held:
            return False
        if index != t.held or index >= t.records_declared:
            raise ProtocolError(
                f"site {site!r}: {t.name()}: record {index} refused, the relay holds {t.held} of the "
                f"{t.records_declared} declared: send records in order from RelayOpen's count, none beyond the count"
            )
        if t.bytes_in + len(record) > t.max_bytes:
            raise ProtocolError(
                f"site {site!r}: {t.name()}: record {index} ({len(record)} bytes) passes the transfer's declared "
                f"max_bytes ({t.max_bytes}, {t.bytes_in} held): open a new transfer with a bound that holds it"
            )
        fd = os.open(t.path, os.O_WRONLY)
        try:
            pos = t.end
            os.ftruncate(fd, pos)  # whatever a failed write left after the last whole record
            os.pwrite(fd, LENGTH.pack(len(record)), pos)
            if os.pwrite(fd, record, pos + LENGTH.size) != len(record):
                raise OSError(f"short write to {t.path}")
        finally:
            os.close(fd)
        t.offsets.append(pos)
        t.bytes_in += len(record)
        return True

    def commit(self, site: str, transfer_id: str, envelope_json: str, direct: int | None = None) -> str:
        """The sender says the transfer is whole: every declared record held, the file is renamed ID.sealed and
        `on_commit(transfer, envelope)` (outside the relay's locks) says what the coordinator made of it. A
        repeated commit (its answer was lost) gets the same answer without a second on_commit. `direct`: the
        sender put its records straight into the recipient's inbox (swarm/peer.py), that many sealed bytes; the
        relay holds none of them (a single recipient only: it checks them when it opens them)."""
        t = self._find(transfer_id, site, "commit")
        self._as_sender(t, site, "commit")
        envelope = parse_envelope(f"site {site!r}: {t.name()}", envelope_json)
        with t.commit_lock:
            with t.lock:
                self._live(t, site)
                if t.message is not None:
                    return t.message
                if direct is not None:
                    self._direct(t, site, direct)
                elif t.header is None:
                    raise ProtocolError(
                        f"site {site!r}: {t.name()} is not open: send RelayOpen, then its records, then commit"
                    )
                if t.held < t.records_declared:
                    raise ProtocolError(
                        f"site {site!r}: {t.name()} holds {t.held} of its {t.records_declared} records: put the "
                        "rest (RelayOpen says from where) before committing"
                    )
                if not t.committed and not t.direct:
                    sealed = t.path.with_suffix(".sealed")
                    assert t.header is not None
                    write_private(sealed.with_suffix(".header"), t.header)  # (adopt() serves it after a restart)
                    os.replace(t.path, sealed)
                    t.path, t.committed = sealed, True
                t.committed, on_commit = True, t.on_commit
            message = on_commit(t, envelope) if on_commit is not None else "committed"
            with t.lock:
                t.message = message
            return message

    def _direct(self, t: RelayTransfer, site: str, nbytes: int) -> None:
        """Transfer lock held. A direct transfer's commit: one recipient, nothing held here, a size in bounds."""
        limit = t.limit or self.max_bytes
        if len(t.recipients) != 1 or t.header is not None or not 0 < nbytes <= limit:
            raise ProtocolError(
                f"site {site!r}: {t.name()}: a direct commit needs one recipient, no records at the relay and a size "
                f"in 1..{limit} (got {nbytes}); send it through the relay instead"
            )
        t.direct, t.bytes_in = True, nbytes

    # -- the recipients' side --------------------------------------------------------------------------------
    def get(self, site: str, transfer_id: str, from_record: int) -> Iterator[bytes]:
        """The header, then records `from_record`... of a committed transfer sealed for `site`, read from the
        spool file one at a time. The checks run before the first item is asked for."""
        t = self._find(transfer_id, site, "get")
        if t.direct:
            raise RoundError(f"site {site!r}: {t.name()} went to its recipient's inbox: the relay has none of it")
        if site not in t.recipients:
            raise AuthError(
                f"site {site!r} may not get {t.name()}: it is sealed for {sorted(t.recipients)}, not for {site!r}"
            )
        with t.lock:
            self._live(t, site)
            if not t.committed or t.header is None:
                raise RoundError(
                    f"site {site!r}: {t.name()} is not complete yet ({t.held} of {t.records_declared or '?'} "
                    "records held); ask again"
                )
            if not 0 <= from_record <= t.records_declared:
                raise ProtocolError(
                    f"site {site!r}: {t.name()} has records 0 to {t.records_declared - 1}; from_record "
                    f"{from_record} is out of range"
                )
            header, path, offsets, end = t.header, t.path, list(t.offsets), t.end
        return self._read(t, site, header, path, offsets + [end], from_record)

    def _read(
        self, t: RelayTransfer, site: str, header: bytes, path: Path, bounds: list[int], first: int
    ) -> Iterator[bytes]:
        """The header, then records `first`... (`bounds`: each record's offset, then the file's end)."""
        self._count_out(t, len(header))
        yield header
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise RoundError(f"site {site!r}: {t.name()} was dropped (its round ended); ask for a new task") from None
        try:
            for i in range(first, len(bounds) - 1):
                pos = bounds[i]
                (n,) = LENGTH.unpack(os.pread(fd, LENGTH.size, pos))
                if pos + LENGTH.size + n != bounds[i + 1]:
                    raise IntegrityError(f"{t.name()}: the relay's spool file {path} is damaged at record {i}")
                record = os.pread(fd, n, pos + LENGTH.size)
                self._count_out(t, len(record))
                yield record
        finally:
            os.close(fd)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _find(self, transfer_id: str, site: str, what: str) -> RelayTransfer:
        with self._lock:
            t = self._transfers.get(transfer_id)
        if t is None:
            raise RoundError(
                f"site {site!r} cannot {what} transfer {transfer_id!r}: the aggregator does not expect it (never "
                "issued, or its round ended); ask for a new task"
            )
        return t

    @staticmethod
    def _as_sender(t: RelayTransfer, site: str, what: str) -> None:
        if site != t.sender:
            raise AuthError(f"site {site!r} may not {what} {t.name()}: only its sender {t.sender!r} may")

    @staticmethod
    def _live(t: RelayTransfer, site: str) -> None:
        """Transfer lock held."""
        if t.dropped:
            raise RoundError(f"site {site!r}: {t.name()} was dropped (its round ended); ask for a new task")

    def _check_header(self, t: RelayTransfer, site: str, header: bytes) -> None:
        try:
            info = header_info(header, self.certs)  # with the project's CA: the sender's certificate and signature
        except FLError as e:
            raise AuthError(f"site {site!r}: {t.name()}: its header is refused: {e}") from None
        if info.transfer_id != t.transfer_id or info.sender != t.sender or frozenset(info.recipients) != t.recipients:
            raise ProtocolError(
                f"site {site!r}: {t.name()}: the header says transfer {info.transfer_id!r} from {info.sender!r} "
                f"for {sorted(info.recipients)}, the aggregator expects it for {sorted(t.recipients)}: seal it "
                "for the peers the task named, under its transfer id"
            )

    def _count_out(self, t: RelayTransfer, n: int) -> None:
        with t.lock:
            t.bytes_out += n

    def _remove_files(self, transfer_id: str) -> None:
        for suffix in (".part", ".sealed", ".header"):
            try:
                (self.directory / f"{transfer_id}{suffix}").unlink()
            except FileNotFoundError:
                pass
