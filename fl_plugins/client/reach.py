"""Reaching the aggregator: why a connection fails, whether waiting can mend it, and what a waiting site says.

A call that does not wait for a connection (`wait_for_ready=False`, as connect's Hello) fails at once with the
channel's last error in its details, as grpcio (1.85) words it:

    failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8443: <reason>

`diagnose` reads <reason>. Only a failure that no amount of waiting mends is fatal (the site fails at once, with
the message that says what to fix); anything else, above all "Connection refused" (an aggregator not up yet), is
waited out:

    <reason> says                        what it means                                            fatal
    Connection refused, DNS errors       nothing answers there (yet)                              no
    WRONG_VERSION_NUMBER                 a site with a kit at a plaintext aggregator              yes
    Hostname Verification Check failed   the aggregator's certificate does not name the host      yes
    CERTIFICATE_VERIFY_FAILED            its certificate is not signed by the kit's CA (a kit of  yes
                                         another project), or it expired
    TLSV1_ALERT_..., SSLV3_ALERT_...     a TLS 1.2 aggregator refused this site's certificate     yes
    Socket closed, with a kit            TLS 1.3: the aggregator refused this site's certificate  if the certificate
                                         after the handshake; or a proxy with nothing behind it   is at fault here
    Socket closed, without a kit         a plaintext site at an mTLS port; or a proxy with        if the port answers
                                         nothing behind it                                        a TLS handshake

"Socket closed" alone is never enough: a TCP proxy whose aggregator is restarting closes connections the same way,
so the site first checks its own certificate (`certificate_problem`) or whether the port speaks TLS (`speaks_tls`).

`Wait` is one call's wait (SiteClient.call): it applies the diagnosis after each failed attempt, logs a line every
NOTICE seconds while it waits, ends the wait once the aggregator has been silent for the site's retry_timeout
(told by the heartbeats, when they run), and words the error when the site gives up.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import grpc

from fl_plugins.errors import TransportError

if TYPE_CHECKING:
    from fl_plugins.client.site import SiteClient
    from fl_plugins.security.tls import SiteKit

log = logging.getLogger(__name__)

NOTICE = 5.0  # seconds between the lines a waiting site logs
PROBE_TIMEOUT = 2.0  # seconds for a probe: a non-waiting Status call, a TLS handshake
CONNECT_KNOBS = "FL_CONNECT_TIMEOUT, init(connect_timeout=...) or `fl-plugins client --connect-timeout`"
RETRY_KNOBS = "FL_RETRY_TIMEOUT, init(retry_timeout=...) or `fl-plugins client --retry-timeout`"
KIT_KNOBS = "FL_KIT, init(kit=...) or `fl-plugins client --kit`"
NOT_THERE = (
    "check that `fl-plugins server` runs there and FL_SERVER points at it; a site waits for it as long as "
    f"connect_timeout says ({CONNECT_KNOBS})"
)
REFUSED_CERT = "the aggregator closed the connection during the TLS handshake: it refuses this site's certificate"
_ALERT = re.compile(r"(tlsv1|tlsv13|sslv3)[ _]alert", re.IGNORECASE)


@dataclass(frozen=True)
class Diagnosis:
    """Why a connection attempt failed. reason: what gRPC reported, shortened; hint: what to check or do; fatal:
    waiting cannot mend it, so the site fails at once."""

    reason: str
    hint: str
    fatal: bool = False


def reason_of(details: str) -> str:
    """The part of a failed call's details that says why: "TLS handshake failed: CERTIFICATE_VERIFY_FAILED: unable
    to get local issuer certificate" rather than gRPC's whole sentence with the address and OpenSSL's codes."""
    text = details.rsplit("last error: ", 1)[-1]
    text = re.sub(r"^[A-Z_]+: ", "", text)  # the status code
    text = re.sub(r"^(ipv4|ipv6|unix|unix-abstract):\S+: ", "", text)  # the address tried
    if "OPENSSL_internal:" in text:
        text = "TLS handshake failed: " + text.rsplit("OPENSSL_internal:", 1)[1]
    return text.removesuffix(": OK").strip() or details


def diagnose(details: str, kit: SiteKit | None, address: str) -> Diagnosis:
    """The diagnosis of a failed connection to `address` from its call's details (see the module docstring).
    May check the kit's certificate, or make one TLS handshake with the address, when the details leave it open."""
    low, reason = details.lower(), reason_of(details)
    connecting = "failed to connect" in low  # not a connection that dropped mid-call
    if "wrong_version_number" in low:
        hint = "the aggregator does not speak TLS: it was started without --kit, or another server listens there"
        return Diagnosis(reason, hint, fatal=connecting and kit is not None)
    if "hostname verification" in low or "peer name" in low:
        host = _host_port(address)
        named = repr(host[0]) if host else "dialled"
        hint = (
            f"the aggregator's certificate does not name the host {named}: connect to the address the kit names "
            "(`server` in kit.yaml), or add the host to `server.host` / `alt_names` in the project file and "
            "provision again"
        )
        return Diagnosis(reason, hint, fatal=connecting)
    if "certificate has expired" in low:
        hint = "the aggregator's certificate expired: its admin provisions its kit again and restarts it"
        return Diagnosis(reason, hint, fatal=connecting)
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        hint = (
            "the TLS handshake failed: the aggregator's certificate did not verify against the kit's ca.crt (a kit "
            "of another project, or a host that is not in the aggregator's certificate: `server.host` and "
            "`alt_names` in the project file)"
        )
        return Diagnosis(reason, hint, fatal=connecting)
    if _ALERT.search(details):
        return Diagnosis(reason, f"{REFUSED_CERT}: ask the project's admin for a current kit", fatal=connecting)
    if "socket closed" in low or "connection reset" in low:
        return _closed(reason, kit, address, connecting)
    if "handshake" in low or "ssl" in low:
        return Diagnosis(reason, "the TLS handshake failed: check that the kit is this project's, and its date")
    return Diagnosis(reason, NOT_THERE)


def _closed(reason: str, kit: SiteKit | None, address: str, connecting: bool) -> Diagnosis:
    """The aggregator (or whatever listens there) closed the connection: fatal only with evidence of why."""
    if kit is not None:
        problem = certificate_problem(kit) if connecting else None
        if problem is not None:
            return Diagnosis(reason, f"{REFUSED_CERT}: {problem}", fatal=True)
        hint = (
            f"{REFUSED_CERT} (not signed by the project's CA, expired, or not yet valid; the aggregator's log names "
            "the reason), or a proxy in front of it has no aggregator behind it: ask the project's admin"
        )
        return Diagnosis(reason, hint)
    if connecting and speaks_tls(address):
        hint = (
            "the aggregator closed this plaintext connection and answers a TLS handshake: if it serves with mTLS "
            f"(`fl-plugins server --kit`), this site needs its startup kit: {KIT_KNOBS}"
        )
        return Diagnosis(reason, hint, fatal=True)
    hint = (
        "the aggregator closed the connection: if it serves with mTLS (`fl-plugins server --kit`), this site needs "
        f"its startup kit: {KIT_KNOBS}"
    )
    return Diagnosis(reason, hint)


def certificate_problem(kit: SiteKit) -> str | None:
    """What is wrong with the certificate the kit presents, as the end of a sentence, or None when nothing is seen
    here (also without `cryptography`): missing, expired, not yet valid, or not signed by the kit's CA."""
    if not kit.cert:
        return "the kit has no client certificate (client.crt): ask the project's admin for the site's kit"
    try:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
    except ImportError:
        return None
    try:
        cert, ca = x509.load_pem_x509_certificate(kit.cert), x509.load_pem_x509_certificate(kit.ca)
    except ValueError:
        return None
    now = datetime.now(timezone.utc)
    if now > cert.not_valid_after_utc:
        return (
            f"it expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: ask the project's admin for a new kit "
            "(`fl-plugins provision` again)"
        )
    if now < cert.not_valid_before_utc:
        return f"it is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this machine's clock"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return (
            "it is not signed by the kit's CA (ca.crt): the certificate and the CA come from different "
            "projects or provisionings; ask the project's admin for the site's kit"
        )
    return None


def speaks_tls(address: str) -> bool:
    """Whether `address` ("host:port") answers a TLS handshake (nothing verified, no certificate presented)."""
    target = _host_port(address)
    if target is None:
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT) as raw, ctx.wrap_socket(raw):
            return True
    except ssl.SSLError as e:
        return "alert" in str(e).lower()  # a TLS server that refused the handshake in TLS's own words
    except OSError:
        return False


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a gRPC target ("host:port", "[::1]:port", "ipv4:...", "dns:///..."); None for others."""
    target = address.split(",")[0]
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host or target.startswith("unix"):
        return None
    return host.strip("[]"), int(port)


class Wait:
    """One call's wait for the aggregator (SiteClient.call, one per call): whether a failure is fatal, the lines a
    waiting site logs, when it gives up and the error it gives up with.

    `window`: how long the call may wait in all. A call that may wait `retry_timeout` (`silence` True) also ends
    once the aggregator has been silent that long, as the heartbeats tell while they run, though never before it
    tried for NOTICE seconds itself: a site learns within its retry_timeout that an aggregator is gone, also when
    it went while the site was training."""

    def __init__(self, client: SiteClient, what: str, window: float, silence: bool) -> None:
        self.client, self.what, self.window, self.silence = client, what, window, silence
        self.start = self.logged = self.probed = time.monotonic()
        self.connecting = client.last_heard is None  # it never reached the aggregator: it may be starting
        self.last: Diagnosis | None = None
        self._seen: dict[str, Diagnosis] = {}

    def until(self) -> float:
        """When this call gives up (time.monotonic())."""
        end = self.start + self.window
        heard = self.client.last_heard
        if self.silence and heard is not None and self.client.heartbeating:
            end = min(end, max(heard + self.client.retry_timeout, self.start + min(self.window, NOTICE)))
        return end

    def fatal(self, e: Any) -> TransportError | None:
        """The error to fail with at once for a failed connection that waiting cannot mend, else None. A call that
        waited for a connection ends with a bare "Deadline Exceeded": then, every NOTICE seconds, one call that
        does not wait tells why."""
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - self.probed >= NOTICE:
            self.probed = time.monotonic()
            e = self.client.probe() or e
        d = self._diagnose(e)
        if d is None or not d.fatal:
            return None
        where = f"{self.what}: cannot connect to the aggregator at {self.client.address}"
        return TransportError(f"{where} ({d.reason}); {d.hint}")

    def _diagnose(self, e: Any) -> Diagnosis | None:
        """The diagnosis of a failed connection (UNAVAILABLE with details; each distinct one made once), kept as
        `last`; None for other failures."""
        details = e.details() or ""
        if e.code() != grpc.StatusCode.UNAVAILABLE or not details:
            return None
        d = self._seen.get(details)
        if d is None:
            d = self._seen[details] = diagnose(details, self.client.kit, self.client.address)
        self.last = d
        return d

    def again(self, e: Any) -> None:
        """Before each pause: count the retry, and every NOTICE seconds say on the site's log what it waits for."""
        c = self.client
        c.stats["retries"] += 1
        now = time.monotonic()
        if now - self.logged < NOTICE:
            return
        self.logged = now
        left, why = max(0.0, self.until() - now), self._why(e)
        if self.connecting:
            log.warning("site %r: waiting for the aggregator at %s, %.0f s left (%s)", c.site, c.address, left, why)
        else:
            silent = self.silent()
            msg = "site %r: %s: the aggregator at %s has not answered for %.0f s; %.0f s left (%s)"
            log.warning(msg, c.site, self.what, c.address, silent, left, why)

    def silent(self) -> float:
        """Seconds since the aggregator last answered this site (since this call began, if it never did)."""
        heard = self.client.last_heard  # without heartbeats, an answer before this call says nothing of now
        known = heard is not None and (self.client.heartbeating or heard > self.start)
        return time.monotonic() - (heard if known and heard is not None else self.start)

    def give_up(self, e: Any) -> TransportError:
        """The error once the call gives up: what the last connection attempt reported, and what to do."""
        if self.last is None and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            probe = self.client.probe()
            if probe is not None:
                self._diagnose(probe)
        c, why = self.client, self._why(e)
        if self.connecting:
            hint = self.last.hint if self.last is not None else NOT_THERE
            return TransportError(
                f"{self.what}: the aggregator at {c.address} did not answer within {self.window:g} s ({why}); {hint}"
            )
        return TransportError(
            f"{self.what}: the aggregator at {c.address} has not answered for {self.silent():.0f} s ({why}); if it "
            "restarted with the same run directory, run this site again: it rejoins the job where the aggregator "
            f"resumes it (a site gives up after {c.retry_timeout:g} s of silence: {RETRY_KNOBS})"
        )

    def _why(self, e: Any) -> str:
        code = e.code().name if hasattr(e, "code") else type(e).__name__
        if self.last is not None and (code == "DEADLINE_EXCEEDED" or code == "UNAVAILABLE"):
            return f"UNAVAILABLE: {self.last.reason}"
        return f"{code}: {reason_of(e.details() or '') if hasattr(e, 'details') else e}"
