"""The project's root CA: creating, saving and loading it, the certificates it issues (EC P-256 keys), and its
record of what it signed (ca/issued.jsonl, which `provision --revoke` reads). provision.py lays the kits out
around it. Needs `cryptography` (pip install 'fl-plugins[server]'), imported when used.

    ca = CertificateAuthority.create("my-project")          # or CertificateAuthority.load("kits/ca")
    ca.save("kits/ca")                                      # ca.crt, ca.key (0600); from here on it records
    cert_pem, key_pem = ca.issue("site-1", days=365)        # what it issues in kits/ca/issued.jsonl
    ca.issue("admin@my-project", days=365, operator=True)    # the operator's: OU=fl-plugins-operator (tls.py)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError, require
from fl_plugins.security.tls import CA_CERT, OPERATOR_OU

CA_KEY = "ca.key"
ISSUED_FILE = "issued.jsonl"  # in the CA's folder: one JSON line per certificate it signed
CA_MIN_DAYS = 3650  # the CA outlives many rounds of re-provisioning; kits are re-issued, the CA is kept
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start a little in the past: clocks of sites differ


PEER_DOMAIN = "site.fl-plugins.invalid"  # .invalid (RFC 2606) is no host's: a site's name can never be the aggregator's


def peer_host(site: str) -> str:
    """The host name a site's certificate is valid for as a server (its inbound port in a swarm): the site's name
    under PEER_DOMAIN; a peer dials it with this name as the TLS target name (swarm/peer.py)."""
    return f"{site}.{PEER_DOMAIN}"


def not_a_site(cert: Any) -> str | None:
    """Why `cert` (a cryptography x509 certificate this CA signed) is not a site's, or None: the operator's carries
    OPERATOR_OU, the aggregator's is valid for host names. A swarm site seals only for sites (seal.py)."""
    from cryptography import x509

    if cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME):
        return "the operator's certificate (it carries an OU), not a site's"
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    hosts = [str(n.value) for n in alt if not str(n.value).endswith("." + PEER_DOMAIN)]
    return f"a server's certificate (valid for {', '.join(hosts)}), not a site's" if hosts else None


def _usage(x509: Any, b: Any, common_name: str, server_names: tuple[str, ...], operator: bool) -> Any:
    """What a certificate may be used for: the aggregator's serves its host names (and is a client: the operator
    presents it to see the full Status); the operator's is a client; a site's is a client and also the server of its
    inbound port in a swarm (direct transfers), under a name no host has (`peer_host`)."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    client, server = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
    if server_names:
        alt = [_general_name(n) for n in server_names]
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return b.add_extension(x509.ExtendedKeyUsage([server, client]), critical=False)
    if operator:
        return b.add_extension(x509.ExtendedKeyUsage([client]), critical=False)
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", common_name):  # (else: relayed transfers only)
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(peer_host(common_name))]), critical=False)
    return b.add_extension(x509.ExtendedKeyUsage([client, server]), critical=False)


def now_utc(now: dt.datetime | None = None) -> dt.datetime:
    """`now` (default: the current time) in UTC."""
    return (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)


@dataclass
class CertificateAuthority:
    """The project's root CA: it signs the aggregator's and every site's certificate."""

    cert: Any  # cryptography.x509.Certificate
    key: Any  # its EC private key
    directory: Path | None = None  # where it is saved (load/save set it): what it signs is recorded in ISSUED_FILE

    @classmethod
    def create(cls, name: str, *, days: int = CA_MIN_DAYS, now: dt.datetime | None = None) -> CertificateAuthority:
        x509, hashes, ec = load_crypto()
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fl-plugins"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA"[:64]),
            ]
        )
        start = now_utc(now) - CLOCK_SKEW
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(x509, ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        """The CA saved in `directory` (ca.crt, ca.key)."""
        x509, _, _ = load_crypto()
        from cryptography.hazmat.primitives import serialization

        directory = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(
                f"the CA in {directory} cannot be read ({e}); restore {CA_CERT} and {CA_KEY}, or move "
                f"{directory} aside to make a new CA (every site then needs its new kit)"
            ) from None
        if cert.public_key() != key.public_key():
            raise ConfigError(f"{directory}: {CA_KEY} is not the key of {CA_CERT}; restore the pair written together")
        return cls(cert, key, directory)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        make_private_dir(directory)
        write_file(directory / CA_CERT, self.cert_pem)
        write_file(directory / CA_KEY, _key_pem(self.key), secret=True)
        self.directory = directory

    @property
    def cert_pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.cert.public_bytes(Encoding.PEM)

    @property
    def expires(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def issue(
        self,
        common_name: str,
        *,
        days: int,
        server_names: tuple[str, ...] = (),
        operator: bool = False,
        now: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A new key and a certificate for it signed by this CA: (certificate PEM, key PEM).

        With `server_names`, a server certificate valid for those host names / IPs; with `operator`, the
        operator's client certificate (its subject carries the role marker OU=OPERATOR_OU, which the aggregator
        checks: provision.py's docstring); else a site's client certificate whose common name is the site's name
        (the aggregator reads the site from it). `now` sets the start of the validity (tests issue certificates
        that have already expired)."""
        x509, hashes, ec = load_crypto()
        from cryptography.x509.oid import NameOID

        start = now_utc(now) - CLOCK_SKEW
        end = start + dt.timedelta(days=days)
        if end > self.expires:
            raise ConfigError(
                f"the CA expires on {self.expires:%Y-%m-%d}, before a certificate valid for {days} days "
                "would: lower `validity_days`, or move the kits' `ca` folder aside to make a new CA "
                "(every site then needs its new kit)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if operator:
            subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OPERATOR_OU))
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(x509, ca=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        b = _usage(x509, b, common_name, server_names, operator)
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = b.sign(self.key, hashes.SHA256())
        if self.directory is not None:
            kind = "server" if server_names else "operator" if operator else "site"
            _record_issued(self.directory, cert, common_name, kind)
        return cert.public_bytes(Encoding.PEM), _key_pem(key)


def _record_issued(ca_dir: Path, cert: Any, common_name: str, kind: str) -> None:
    """Append a certificate the CA signed to its record (ca_dir/ISSUED_FILE), which `revoke` reads."""
    line = json.dumps(
        {
            "serial": f"{cert.serial_number:x}",
            "common_name": common_name,
            "kind": kind,
            "not_before": iso_utc(cert.not_valid_before_utc),
            "not_after": iso_utc(cert.not_valid_after_utc),
        }
    )
    fd = os.open(ca_dir / ISSUED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def issued_to(ca_dir: Path, site: str | None, kind: str = "site") -> dict[int, str]:
    """Serial -> expiry of every certificate of `kind` ("site", "operator", "server") with common name `site`
    (None: any name) in the CA's record."""
    path = ca_dir / ISSUED_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    out: dict[int, str] = {}
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else {}
            if rec and rec.get("kind") == kind and site in (None, rec.get("common_name")):
                out[int(rec["serial"], 16)] = str(rec.get("not_after", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"{path}:{i} is not a record of an issued certificate ({e}); restore the file (it "
                "lists what the CA signed) or remove the broken line"
            ) from None
    return out


def iso_utc(t: dt.datetime) -> str:
    """`t` in UTC as 2025-01-31T12:00:00Z (the records' and revoked.json's form)."""
    return f"{t.astimezone(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def load_crypto() -> tuple[Any, Any, Any]:
    """(x509, hashes, ec) from `cryptography`, or MissingDependencyError with the command that installs it."""
    require("cryptography", "server")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return x509, hashes, ec


def _general_name(host: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_private_dir(directory: Path) -> None:
    """Make `directory` (and its parents) and give it mode 0700."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.name == "posix":
        os.chmod(directory, 0o700)


def write_file(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write `data`; a key gets mode 0600 from the moment it exists (also when the file was there before)."""
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        if os.name == "posix":
            os.fchmod(f.fileno(), mode)
        f.write(data)


def _key_usage(x509: Any, *, ca: bool) -> Any:
    """A CA signs certificates (and CRLs); a leaf certificate only signs (its TLS handshakes)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
