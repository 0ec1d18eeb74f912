"""Revoked site certificates: the denylist in the aggregator's kit, checked at every call.

`fl-plugins provision PROJECT.yaml -o kits --revoke SITE` writes kits/server/revoked.json:

    {
      "revoked": [
        {"serial": "5f3a09c1...", "site": "site-1", "revoked_at": "2025-03-01T09:30:00Z",
         "not_after": "2026-02-28T09:25:00Z"}
      ]
    }

    serial      the certificate's serial number in hex (unique per CA, as in a CRL; ':' and a 0x prefix are
                accepted in hand edits)
    site        the site it was issued to, for messages
    revoked_at  when, UTC, for messages
    not_after   when the certificate expires anyway (after that the TLS handshake refuses it too)

Why a serial-number denylist rather than a CRL signed by the CA: gRPC Python's server credentials take no CRL,
so the aggregator checks revocation itself (`SiteAuth`, tls.py) either way, and it is the list's only reader. It
reads the list from its own kit folder, which also holds server.key and the ca.crt it trusts: whoever can write
revoked.json there can replace the CA, so a CA signature would protect nothing, while a JSON file can be read,
diffed and copied by the admin as it is. The list names certificates, not sites: a revoked site gets a new
certificate by provisioning again, and that one is admitted.

The aggregator reads the list when it starts (a list that cannot be read stops it there) and re-reads it when
the file changes: every call costs one `os.stat` of the file (about a microsecond), and the file is parsed only
when its inode, size or mtime differ, so an aggregator that runs for weeks picks up a revocation at the next call
of the revoked site. A list that becomes unreadable while it serves is logged as an error and the last list read
stays in force. Writers replace the file atomically (write aside, fsync, rename), so a reader never sees half a
list. Checking a listed serial needs `cryptography` (the aggregator's `[server]` extra) to read the caller's
certificate; an empty or missing list costs nothing and needs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError, require

log = logging.getLogger(__name__)

REVOKED_FILE = "revoked.json"
_CACHE = 4096  # certificates whose serial is kept (one per site in practice): a bound, not a tuning knob


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate."""

    serial: int
    site: str
    revoked_at: str = ""
    not_after: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "serial": f"{self.serial:x}",
            "site": self.site,
            "revoked_at": self.revoked_at,
            "not_after": self.not_after,
        }


def read_revocations(path: str | Path) -> dict[int, Revoked]:
    """The revoked certificates in `path` by serial; none when the file does not exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} cannot be read ({e}); restore it, or revoke again with `fl-plugins provision "
            "PROJECT.yaml -o kits --revoke SITE`"
        ) from None
    items = data.get("revoked") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConfigError(
            f"{path}: must be a mapping with a `revoked` list (got {_short(data)}); revoke again with "
            "`fl-plugins provision PROJECT.yaml -o kits --revoke SITE`"
        )
    out: dict[int, Revoked] = {}
    for i, item in enumerate(items):
        serial = _parse_serial(item.get("serial") if isinstance(item, dict) else None)
        if serial is None or not isinstance(item.get("site", ""), str):
            raise ConfigError(
                f"{path}: `revoked[{i}]` must be {{serial: HEX, site: NAME, ...}} with the "
                f"certificate's serial number in hex (got {_short(item)})"
            )
        out[serial] = Revoked(
            serial, item.get("site", ""), str(item.get("revoked_at", "")), str(item.get("not_after", ""))
        )
    return out


def write_revocations(path: str | Path, entries: Iterable[Revoked]) -> None:
    """Replace the list at `path` atomically (a reader sees the old list or the new one, never a mix)."""
    path = Path(path)
    text = (
        json.dumps(
            {"revoked": [e.to_json() for e in sorted(entries, key=lambda e: (e.revoked_at, e.serial))]}, indent=1
        )
        + "\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class RevocationList:
    """The revoked certificates of a server kit, re-read when the file changes (see the module's docstring).

    Safe to call from every gRPC thread: lookups read one immutable dict; a reload swaps it under a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        self._entries = read_revocations(self.path)  # at start, a broken list is an error
        self._serials: dict[bytes, int] = {}  # a caller's certificate (PEM) -> its serial
        if self._entries:
            require("cryptography", "server")
            log.info("%s: %d revoked certificate(s) are refused", self.path, len(self._entries))

    def __len__(self) -> int:
        self._refresh()
        return len(self._entries)

    def lookup(self, cert_pem: bytes) -> Revoked | None:
        """The revocation of the certificate `cert_pem` (the caller's, as gRPC's auth context gives it), or None."""
        self._refresh()
        entries = self._entries
        if not entries:
            return None
        serial = self._serials.get(cert_pem)
        if serial is None:
            require("cryptography", "server")
            from cryptography import x509

            serial = x509.load_pem_x509_certificate(cert_pem).serial_number
            if len(self._serials) >= _CACHE:
                self._serials.clear()
            self._serials[cert_pem] = serial
        return entries.get(serial)

    def _refresh(self) -> None:
        if _stamp(self.path) == self._stamp:
            return
        with self._lock:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            try:
                entries = read_revocations(self.path)
                if entries:
                    require("cryptography", "server")
            except Exception as e:  # noqa: BLE001 - logged; the last list read stays in force
                log.error(
                    "%s; the aggregator keeps refusing the %d certificate(s) it read before", e, len(self._entries)
                )
            else:
                log.warning(
                    "%s changed: %d revoked certificate(s) are refused from now on (was %d)",
                    self.path,
                    len(entries),
                    len(self._entries),
                )
                self._entries = entries
            self._stamp = stamp


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _parse_serial(v: Any) -> int | None:
    if not isinstance(v, str):
        return None
    s = v.strip().lower().replace(":", "")
    s = s[2:] if s.startswith("0x") else s
    try:
        return int(s, 16) if s else None
    except ValueError:
        return None


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
