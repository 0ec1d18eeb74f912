"""Startup kits on disk, the gRPC credentials made from them, and who is calling.

A kit is a folder written by `fl-plugins provision` (provision.py):

    kits/server/   ca.crt  server.crt  server.key  kit.yaml   (role: server; project, address, sites)
                   [revoked.json]                             (certificates refused: `provision --revoke`)
    kits/site-1/   ca.crt  client.crt  client.key  kit.yaml   (role: site; project, site, server)
    kits/admin/    ca.crt  client.crt  client.key  kit.yaml   (role: admin; project, name, server): the operator's
                                                              certificate, for `fl-plugins status`

With a kit the aggregator serves mTLS only: the TLS handshake refuses a caller without a certificate signed by
the project's CA (or with an expired one), and `SiteAuth` takes the site a call speaks for from the
certificate's common name, never from what the request claims. A certificate of a site that is not in the
project, a revoked certificate (kits/server/revoked.json, revocation.py), or a request that claims another
site's name, is refused with PERMISSION_DENIED (AuthError on the client). The operator's certificate (its subject
carries the role marker OU=OPERATOR_OU, provision.py) is never a site: `SiteAuth.site_of` refuses it, and
`SiteAuth.operator` recognizes it for the Status RPC. This module needs only grpc;
`cryptography`, when installed, lets a kit's expired certificate be named on load instead of surfacing as a
failed handshake (the aggregator needs it to check a non-empty revocation list).

Without a kit a site speaks plaintext, so, like the aggregator, it only dials loopback addresses unless told
otherwise (`check_plaintext_target`): the explicit opt-out is init(insecure=True), FL_INSECURE=1 or
`fl-plugins client --insecure`, and it logs a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from fl_plugins.errors import AuthError, ConfigError
from fl_plugins.security.refusals import RefusalLog, logs_refusals
from fl_plugins.security.revocation import REVOKED_FILE, RevocationList

log = logging.getLogger(__name__)

KIT_FILE = "kit.yaml"
CA_CERT = "ca.crt"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"
OPERATOR_OU = "fl-plugins-operator"  # the operator certificate's role marker: its subject's organizational unit


@dataclass(frozen=True)
class SiteAuth:
    """Who may call the aggregator, and as which site, when it serves with mTLS."""

    project: str  # the project's name, for messages
    sites: frozenset[str]  # the site names in the project: a certificate of any other name is refused
    revoked: RevocationList | None = field(default=None, compare=False)  # certificates refused by serial number
    # each refusal is a WARNING at the aggregator (its caller's address, certificate and reason), rate-limited
    refusals: RefusalLog = field(default_factory=RefusalLog, compare=False, repr=False)

    @staticmethod
    def certificate(context: grpc.ServicerContext) -> bytes | None:
        """The caller's certificate (PEM), as its TLS handshake presented it (swarm hands it to the other sites)."""
        return ((context.auth_context() or {}).get("x509_pem_cert") or [None])[0]

    @logs_refusals
    def site_of(self, context: grpc.ServicerContext, claimed: str = "") -> str:
        """The site the call speaks for: its certificate's common name. `claimed` is the site name the request
        carries; a different one is refused, so a site cannot speak for another. A revoked certificate is
        refused at every call, also on a connection made before it was revoked."""
        auth = context.auth_context() or {}
        cn = _first(auth.get("x509_common_name"))
        if cn is None:
            raise AuthError(
                "the call carries no client certificate; the aggregator serves with mTLS: connect with "
                "this site's startup kit (`fl-plugins client --kit`, FL_KIT or init(kit=...))"
            )
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        gone = self.revoked.lookup(pem) if self.revoked is not None and pem else None
        if gone is not None:
            raise AuthError(
                f"site {cn!r}: its certificate (serial {gone.serial:x}) was revoked by the admin of project "
                f"{self.project!r}{f' on {gone.revoked_at}' if gone.revoked_at else ''}, so the aggregator refuses "
                f"it for good; ask the admin for a new kit (`fl-plugins provision PROJECT.yaml -o kits` issues "
                f"{cn} a new certificate) and replace this site's kit folder with it"
            )
        if is_operator_certificate(auth):
            raise AuthError(operator_is_not_a_site(cn))
        if cn not in self.sites:
            listed = ", ".join(sorted(self.sites)[:10]) + (", ..." if len(self.sites) > 10 else "")
            raise AuthError(
                f"site {cn!r} is not in project {self.project!r} (its sites: {listed}); to add it, list it under "
                "`sites:` in the project file, run `fl-plugins provision` again and restart the aggregator with "
                "the new server kit"
            )
        if claimed and claimed != cn:
            raise AuthError(
                f"the request claims to be site {claimed!r}, but its certificate is site {cn!r}; a site speaks only "
                f"for itself: set FL_SITE / init(site=...) to {cn!r}, or leave it unset to take the kit's name"
            )
        return cn

    @logs_refusals
    def operator(self, context: grpc.ServicerContext) -> str | None:
        """The common name of the caller's operator certificate (provision.py's admin kit), or None when the
        caller presents no such certificate. A revoked one is refused (AuthError), as a revoked site's is."""
        auth = context.auth_context() or {}
        cn = _first(auth.get("x509_common_name"))
        if cn is None or not is_operator_certificate(auth):
            return None
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        gone = self.revoked.lookup(pem) if self.revoked is not None and pem else None
        if gone is not None:
            raise AuthError(
                f"operator certificate {cn!r} (serial {gone.serial:x}) was revoked by the admin of project "
                f"{self.project!r}{f' on {gone.revoked_at}' if gone.revoked_at else ''}; provision again "
                "(`fl-plugins provision PROJECT.yaml -o kits`) for a new admin kit"
            )
        return cn


def is_operator_certificate(auth: dict[str, Any]) -> bool:
    """Whether a call's auth context (gRPC's, of a verified client certificate) is the operator's certificate:
    its subject holds the attribute OU=OPERATOR_OU."""
    subject = _first(auth.get("x509_subject"))
    return subject is not None and f"OU={OPERATOR_OU}" in subject_attributes(subject)


def subject_attributes(subject: str) -> list[str]:
    """The attributes of an RFC 2253 subject as gRPC gives it ("CN=admin@demo,OU=fl-plugins-operator"), each
    as TYPE=VALUE with its escapes kept: an escaped ',' or '+' inside a value does not split it, so no common
    name can forge another attribute."""
    attrs: list[str] = []
    cur, i = "", 0
    while i < len(subject):
        c = subject[i]
        if c == "\\":
            cur, i = cur + subject[i : i + 2], i + 2
            continue
        if c in ",+":
            attrs.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    return [*attrs, cur.strip()]


def operator_is_not_a_site(cn: str) -> str:
    return (
        f"{cn!r} is the operator's certificate (the admin kit of `fl-plugins provision`): it may read the job's "
        "status (`fl-plugins status ADDRESS --kit kits/admin`), never train or send as a site; run a site with "
        "its own kit (`fl-plugins client --kit kits/SITE`)"
    )


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the caller's verified client certificate, or None (no certificate, plaintext)."""
    return _first((context.auth_context() or {}).get("x509_common_name"))


def _first(values: list[bytes] | None) -> str | None:
    return values[0].decode("utf-8", "replace") if values else None


# -- plaintext: loopback only, unless told otherwise --------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback IP (127.0.0.0/8, ::1); brackets around an IPv6 address are allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local_target(address: str) -> bool:
    """Whether the gRPC target `address` reaches only this machine: HOST:PORT (or ipv4:/ipv6:/dns: targets) whose
    hosts are all loopback, or a unix socket. Anything it cannot read counts as remote."""
    scheme, sep, rest = address.partition(":")
    if sep and scheme in ("unix", "unix-abstract"):
        return True
    if sep and scheme in ("ipv4", "ipv6"):
        targets = rest.split(",")
    elif sep and scheme == "dns":
        targets = [rest[2:].partition("/")[2] if rest.startswith("//") else rest]  # dns://[authority]/host:port
    else:
        targets = [address]
    return all(is_loopback(_host_of(t)) for t in targets)


def _host_of(target: str) -> str:
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    if target.count(":") > 1:  # a bare IPv6 address, no port
        return target
    return target.rpartition(":")[0] if ":" in target else target


def check_plaintext_target(address: str, *, insecure: bool, opt_out: str) -> None:
    """Refuse plaintext to a host that is not this machine unless `insecure` (the explicit opt-out, named in the
    message as `opt_out`); with the opt-out, log a warning. Called before any channel exists."""
    if is_local_target(address):
        return
    if not insecure:
        raise ConfigError(
            f"aggregator address {address}: without a startup kit this site would connect in plaintext, and that is "
            "not a loopback address, so anyone on the network could read and alter the weights; connect with this "
            "site's kit (`fl-plugins client --kit kits/SITE`, FL_KIT or init(kit=...), written by `fl-plugins "
            f"provision`), or opt out explicitly with {opt_out}"
        )
    log.warning(
        "INSECURE: plaintext gRPC to non-loopback address %s (%s): anyone on the network can read and alter "
        "the weights; use a startup kit (mTLS) outside a trusted network",
        address,
        opt_out,
    )


@dataclass(frozen=True)
class ServerKit:
    """The aggregator's kit: its certificate and key, the CA that signs the sites, and the project's sites."""

    path: Path
    project: str
    address: str  # HOST:PORT sites connect to (the default listening address); port 0: picked when serving
    sites: tuple[str, ...]  # the names a site certificate may carry
    ca: bytes = field(repr=False)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    revoked: RevocationList | None = field(default=None, repr=False, compare=False)  # PATH/revoked.json

    def credentials(self) -> grpc.ServerCredentials:
        """TLS that requires a client certificate signed by the project's CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def auth(self) -> SiteAuth:
        return SiteAuth(self.project, frozenset(self.sites), self.revoked)


@dataclass(frozen=True)
class SiteKit:
    """A site's kit: its certificate (common name = the site's name) and key, and the CA that signs the
    aggregator's certificate."""

    path: Path
    project: str
    site: str
    server: str | None  # HOST:PORT of the aggregator; None when provisioned without a fixed port
    ca: bytes = field(repr=False)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS that checks the aggregator's certificate against the project's CA and presents the site's."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def load_server_kit(path: str | Path) -> ServerKit:
    """Read the aggregator's kit folder (kits/server); ConfigError saying what is wrong and how to fix it."""
    path = Path(path)
    info = read_kit_file(path, "server", "the aggregator needs the server kit (e.g. kits/server)")
    address = _str(path, info, "address")
    sites = info.get("sites")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s for s in sites):
        raise ConfigError(
            f"{path / KIT_FILE}: `sites` must be the project's list of site names (got {sites!r}); "
            "run `fl-plugins provision` again"
        )
    ca, cert = _read(path, CA_CERT), _read(path, SERVER_CERT)
    _check_validity(path / SERVER_CERT, cert)
    return ServerKit(
        path,
        _str(path, info, "project"),
        address,
        tuple(sites),
        ca,
        cert,
        _read(path, SERVER_KEY),
        RevocationList(path / REVOKED_FILE),
    )


def load_site_kit(path: str | os.PathLike) -> SiteKit:
    """Read a site's kit folder (kits/site-1); ConfigError saying what is wrong and how to fix it."""
    path = Path(path)
    info = read_kit_file(path, "site", "a site needs its own kit (e.g. kits/site-1)")
    server = info.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError(f"{path / KIT_FILE}: `server` must be HOST:PORT (got {server!r})")
    ca, cert = _read(path, CA_CERT), _read(path, CLIENT_CERT)
    _check_validity(path / CLIENT_CERT, cert)
    return SiteKit(
        path, _str(path, info, "project"), _str(path, info, "site"), server or None, ca, cert, _read(path, CLIENT_KEY)
    )


@dataclass(frozen=True)
class OperatorKit:
    """What `fl-plugins status` connects with: the operator's kit (kits/admin), or the aggregator's own kit,
    whose certificate the aggregator also takes for its operator's. Both see the whole job."""

    path: Path
    project: str
    name: str  # the certificate's common name
    server: str | None  # HOST:PORT of the aggregator; None when provisioned without a fixed port
    ca: bytes = field(repr=False)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def load_operator_kit(path: str | os.PathLike) -> OperatorKit:
    """Read the operator's kit (kits/admin) or the aggregator's (kits/server); ConfigError for a site's kit."""
    path = Path(path)
    need = (
        "`fl-plugins status --kit` takes the operator's kit (kits/admin, written by `fl-plugins provision`) or "
        "the aggregator's (kits/server): a site's certificate never gets the operator's view"
    )
    role = "server" if (path / KIT_FILE).is_file() and _role(path) == "server" else "admin"
    if role == "server":
        s = load_server_kit(path)
        return OperatorKit(path, s.project, f"{s.project} aggregator", s.address, s.ca, s.cert, s.key)
    info = read_kit_file(path, "admin", need)
    server = info.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError(f"{path / KIT_FILE}: `server` must be HOST:PORT (got {server!r})")
    ca, cert = _read(path, CA_CERT), _read(path, CLIENT_CERT)
    _check_validity(path / CLIENT_CERT, cert)
    project, name = _str(path, info, "project"), _str(path, info, "name")
    return OperatorKit(path, project, name, server or None, ca, cert, _read(path, CLIENT_KEY))


def _role(path: Path) -> Any:
    import yaml

    try:
        info = yaml.safe_load((path / KIT_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # read_kit_file names the problem
    return info.get("role") if isinstance(info, dict) else None


def read_kit_file(path: Path, role: str, need: str) -> dict[str, Any]:
    import yaml

    f = path / KIT_FILE
    if not path.is_dir():
        raise ConfigError(
            f"startup kit {path} does not exist or is not a folder (looked for {path.resolve()}); "
            f"{need}, written by `fl-plugins provision PROJECT.yaml -o kits/`"
        )
    try:
        info = yaml.safe_load(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is not a startup kit: it has no {KIT_FILE}; {need}, written by `fl-plugins provision`"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{f} cannot be read: {e}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{f}: a kit file must be a mapping (role, project, ...); run `fl-plugins provision` again")
    if info.get("role") != role:
        got = info.get("role")
        other = "the aggregator's kit" if got == "server" else f"the kit of site {info.get('site')!r}"
        other = "the operator's kit (for `fl-plugins status`)" if got == "admin" else other
        raise ConfigError(f"{path} is {other}, not {'an' if role == 'admin' else 'a'} {role} kit; {need}")
    return info


def _str(path: Path, info: dict[str, Any], key: str) -> str:
    v = info.get(key)
    if not isinstance(v, str) or not v:
        raise ConfigError(
            f"{path / KIT_FILE}: `{key}` must be a non-empty string (got {v!r}); run `fl-plugins provision` again"
        )
    return v


def _read(path: Path, name: str) -> bytes:
    f = path / name
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"startup kit {path} is missing {name}; copy the whole kit folder written by `fl-plugins provision`"
        ) from None
    except OSError as e:
        raise ConfigError(f"{f} cannot be read: {e}") from None
    if name.endswith(".key") and os.name == "posix" and stat.S_IMODE(f.stat().st_mode) & 0o077:
        log.warning("%s can be read by other users (mode %o): run `chmod 600 %s`", f, stat.S_IMODE(f.stat().st_mode), f)
    return data


def _check_validity(path: Path, pem: bytes) -> None:
    """Name an expired (or not yet valid) certificate now, rather than as a failed TLS handshake later."""
    try:
        from cryptography import x509
    except ImportError:  # optional on sites: the aggregator's handshake refuses an expired certificate anyway
        return
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM certificate ({e}); run `fl-plugins provision` again") from None
    now = datetime.now(timezone.utc)
    if now > cert.not_valid_after_utc:
        raise ConfigError(
            f"{path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; ask "
            "the project's admin for a new kit (`fl-plugins provision` again)"
        )
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{path}: the certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC; check this machine's clock"
        )
