"""`fl-plugins provision PROJECT.yaml -o kits/`: a project's root CA and one startup kit per participant.

    name: my-project                          # optional; default: the file's stem
    server:                                   # where sites reach the aggregator
      host: aggregator.example.org            # a host name or IP; the aggregator's certificate is valid for it
      port: 8443
      alt_names: [10.0.0.5]                   # optional: more host names / IPs the certificate is valid for
    # or: server: {address: "aggregator.example.org:8443"}
    sites: [site-1, site-2, site-3]           # site names (or a count: site-1..site-N)
    validity_days: 365                        # how long the aggregator's and sites' certificates are valid

writes

    kits/ca/       ca.crt ca.key issued.jsonl             the CA: keep it here, never ship it (it signs new kits);
                                                          issued.jsonl: every certificate it signed (serial, name)
    kits/server/   ca.crt server.crt server.key kit.yaml  the aggregator's kit (kit.yaml lists the project's sites)
                   [revoked.json]                         certificates the aggregator refuses (--revoke)
    kits/site-1/   ca.crt client.crt client.key kit.yaml  one per site: the certificate's common name is the site
    kits/admin/    ca.crt client.crt client.key kit.yaml  the operator's kit: `fl-plugins status ADDRESS --kit
                                                          kits/admin` shows the whole job (every site, transfers)

The operator's certificate is told from a site's by a role marker in its signed subject, the organizational unit
OU=fl-plugins-operator (tls.py OPERATOR_OU), which only this CA can put there and which no site certificate
carries; its common name is admin@PROJECT (truncated to X.509's 64 characters), a name no site can have ('@' is
not allowed in site names), for people and logs. The aggregator reads the marker from gRPC's view of the verified
certificate (its subject), so it needs no certificate parsing per call: a caller with it gets the operator's
Status view, and every call that speaks for a site (Hello, tasks, uploads) refuses it by name, so an admin kit can
never train or send. An OU rather than an extended key usage because gRPC exposes the subject of a peer
certificate but not its extensions. `admin` is reserved as a site name (the kit's folder).

Keys are EC P-256, written with mode 0600 (the CA and the certificates it issues: ca.py). Provisioning again
into the same folder reuses the CA in kits/ca, so kits already handed out stay valid: to add a site, list it and
provision again, then restart the aggregator with the new server kit (its site list is what admits a name). A
site removed from the list is refused even though its certificate is still valid. Every project-file error names
the file, the key path, what must hold and what was got.

`fl-plugins provision PROJECT.yaml -o kits --revoke SITE` (`revoke`) cuts off a leaked site key without a new
CA: it adds every certificate the CA issued to SITE to kits/server/revoked.json (revocation.py), which the
aggregator checks at every call and re-reads when it changes. Every provisioning run issues each site a new
certificate while the earlier ones stay valid, so the leaked key may belong to any of them: the CA's record of
what it signed (issued.jsonl, as `openssl ca` keeps index.txt) is what names them all; for kits made before that
record existed, the certificate in kits/SITE is revoked. Provisioning again afterwards issues SITE a new
certificate, which is admitted. `--revoke admin` revokes every operator certificate the CA issued, the same way.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fl_plugins._config import Checker, load_yaml
from fl_plugins.errors import ConfigError
from fl_plugins.security.ca import (
    CA_KEY,
    CA_MIN_DAYS,
    CLOCK_SKEW,
    ISSUED_FILE,
    CertificateAuthority,
    iso_utc,
    issued_to,
    load_crypto,
    make_private_dir,
    now_utc,
)
from fl_plugins.security.kits import operator_name, write_admin_kit, write_server_kit, write_site_kit
from fl_plugins.security.revocation import REVOKED_FILE, Revoked, read_revocations, write_revocations
from fl_plugins.security.tls import (
    CA_CERT,
    CLIENT_CERT,
    OPERATOR_OU,
    read_kit_file,
)

__all__ = [  # CertificateAuthority and the CA's constants live in ca.py, and are importable from here too
    "CA_DIR",
    "CA_KEY",
    "CA_MIN_DAYS",
    "CLOCK_SKEW",
    "ISSUED_FILE",
    "SERVER_DIR",
    "CertificateAuthority",
    "Kits",
    "Project",
    "ServerSpec",
    "load_project",
    "parse_project",
    "provision",
    "provision_local",
    "revoke",
    "operator_name",
    "write_admin_kit",
    "write_server_kit",
    "write_site_kit",
]

log = logging.getLogger(__name__)

CA_DIR, SERVER_DIR, ADMIN_DIR = "ca", "server", "admin"  # reserved: site kits live beside them, named after sites
RESERVED = (CA_DIR, SERVER_DIR, ADMIN_DIR)
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a folder name and an X.509 common name (<= 64)
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class ServerSpec:
    """Where sites reach the aggregator; its certificate is valid for `host` and `alt_names`."""

    host: str  # a host name or IP address sites connect to
    port: int  # 1..65535 in a project file; 0 (provision_local): sites take the address from FL_SERVER
    alt_names: tuple[str, ...] = ()  # more host names / IPs the aggregator's certificate is valid for

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Project:
    """A validated project file. Build it with `load_project(path)` or directly."""

    name: str  # the project's name (the CA's common name is "NAME CA")
    server: ServerSpec
    sites: tuple[str, ...]  # site names: each becomes a kit folder and a certificate's common name
    validity_days: int = 365  # validity of the aggregator's and the sites' certificates

    def __post_init__(self) -> None:
        for i, s in enumerate(self.sites):
            if not isinstance(s, str) or not _SITE_NAME.match(s) or s in RESERVED:
                raise ConfigError(f"project {self.name!r}: `sites[{i}]` {_SITE_RULE} (got {s!r})")
        if len(set(self.sites)) != len(self.sites) or not self.sites:
            raise ConfigError(
                f"project {self.name!r}: `sites` must list distinct names, at least one (got {list(self.sites)})"
            )


_SITE_RULE = (
    "must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, and not 'ca' or "
    "'server' or 'admin' (it names the site's kit folder and its certificate)"
)


@dataclass(frozen=True)
class Kits:
    """What `provision` wrote."""

    root: Path
    ca: Path  # the CA's folder (ca.crt, ca.key): keep it, do not ship it
    server: Path  # the aggregator's kit
    sites: dict[str, Path] = field(default_factory=dict)  # site name -> its kit
    admin: Path | None = None  # the operator's kit (`fl-plugins status --kit`)


# -- the project file ---------------------------------------------------------------------------------------------

_KEYS = ("name", "server", "sites", "validity_days")
_SERVER_KEYS = ("host", "port", "address", "alt_names")


class _Checker(Checker):
    def host(self, key: str, v: Any) -> str:
        if not isinstance(v, str) or not _host_ok(v):
            raise self.fail(key, "must be a host name or an IP address, e.g. aggregator.example.org or 10.0.0.5", v)
        if v.strip("[]") in ("0.0.0.0", "::"):
            raise self.fail(
                key,
                "must be the address sites connect to, not a wildcard (to listen on every "
                "interface, start the aggregator with --address 0.0.0.0:PORT)",
                v,
            )
        return v.strip("[]")


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        labels = host.rstrip(".").split(".")
        return 0 < len(host) <= 253 and all(_HOST_LABEL.match(x) for x in labels) and not labels[-1].isdigit()


def parse_project(data: Any, source: str | Path) -> Project:
    """Validate the parsed YAML `data` of the project file at `source`."""
    source = Path(source)
    c = _Checker(source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a project file must be a mapping of keys (name, server, sites, "
            f"validity_days); got {type(data).__name__}"
        )
    for k in data:
        if k not in _KEYS:
            raise c.unknown(k, _KEYS)
    for k, example in (("server", "`server: {host: 127.0.0.1, port: 8443}`"), ("sites", "`sites: [site-1, site-2]`")):
        if data.get(k) is None:
            raise ConfigError(f"{source}: `{k}` is required (e.g. {example})")
    name = data.get("name", source.stem)
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 60:
        raise c.fail("name", "must be a non-empty string of at most 60 characters", name)

    server = _server(c, data["server"], source)
    sites = _sites(c, data["sites"])
    days = c.integer("validity_days", data.get("validity_days", 365), 1, 36500)
    return Project(name.strip(), server, sites, days)


def _server(c: _Checker, srv: Any, source: Path) -> ServerSpec:
    """`server:`: a mapping of host, port (or address) and alt_names, or a bare HOST:PORT string."""
    if isinstance(srv, str):
        srv = {"address": srv}
    if not isinstance(srv, dict):
        raise c.fail("server", "must be a mapping, e.g. {host: 127.0.0.1, port: 8443}", srv)
    for k in srv:
        if k not in _SERVER_KEYS:
            raise c.unknown(k, _SERVER_KEYS, "server.")
    if "address" in srv:
        if "host" in srv or "port" in srv:
            raise ConfigError(f"{source}: `server` takes either `address` or `host` and `port`, not both")
        addr = srv["address"]
        host, sep, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
        if not sep or not port.isdigit():
            raise c.fail("server.address", "must be HOST:PORT, e.g. 127.0.0.1:8443", addr)
        host = c.host("server.address", host)
        port_n = c.integer("server.address", int(port), 1, 65535)
    else:
        for k in ("host", "port"):
            if srv.get(k) is None:
                raise ConfigError(f"{source}: `server.{k}` is required (or give `server.address: HOST:PORT`)")
        host = c.host("server.host", srv["host"])
        port_n = c.integer("server.port", srv["port"], 1, 65535)
    alt = srv.get("alt_names") or []
    if not isinstance(alt, list):
        raise c.fail("server.alt_names", "must be a list of host names or IPs", alt)
    alt_names = tuple(c.host(f"server.alt_names[{i}]", a) for i, a in enumerate(alt))
    return ServerSpec(host, port_n, alt_names)


def _sites(c: _Checker, sites_v: Any) -> tuple[str, ...]:
    """`sites:`: a list of distinct site names, or a count (site-1..site-N)."""
    if isinstance(sites_v, int) and not isinstance(sites_v, bool):
        sites = tuple(f"site-{i}" for i in range(1, c.integer("sites", sites_v, 1, 10_000) + 1))
    elif isinstance(sites_v, list) and sites_v:
        for i, s in enumerate(sites_v):
            if not isinstance(s, str) or not _SITE_NAME.match(s) or s in RESERVED:
                raise c.fail(f"sites[{i}]", _SITE_RULE, s)
        dup = sorted({s for s in sites_v if sites_v.count(s) > 1})
        if dup:
            raise c.fail("sites", f"must not repeat a name ({', '.join(dup)} appears twice)", sites_v)
        sites = tuple(sites_v)
    else:
        raise c.fail("sites", "must be a non-empty list of site names, or a count >= 1", sites_v)
    return sites


def load_project(path: str | Path) -> Project:
    """Read and validate the project YAML at `path`; raise ConfigError naming the key path and the fix."""
    return parse_project(load_yaml(path, "project file"), Path(path))


# -- kits (the writers: kits.py) -------------------------------------------------------------------------------


def provision(project: Project, out_dir: str | Path, *, now: dt.datetime | None = None) -> Kits:
    """Write the CA (or reuse the one in OUT/ca), the aggregator's kit, the operator's kit (OUT/admin) and one kit
    per site under `out_dir`."""
    out = Path(out_dir)
    make_private_dir(out)
    ca_dir = out / CA_DIR
    if (ca_dir / CA_CERT).exists() or (ca_dir / CA_KEY).exists():
        ca = CertificateAuthority.load(ca_dir)
        if now_utc(now) >= ca.expires:
            raise ConfigError(
                f"the CA in {ca_dir} expired on {ca.expires:%Y-%m-%d}; move {ca_dir} aside to make a "
                "new CA (every site then needs its new kit)"
            )
        log.info("reusing the CA in %s: kits already handed out stay valid", ca_dir)
    else:
        ca = CertificateAuthority.create(project.name, days=max(CA_MIN_DAYS, project.validity_days + 1), now=now)
        ca.save(ca_dir)
        log.info("created the project's CA in %s (keep it; do not ship it)", ca_dir)
    kits = Kits(out, ca_dir, write_server_kit(ca, out / SERVER_DIR, project, now=now))
    for site in project.sites:
        kits.sites[site] = write_site_kit(ca, out / site, site, project, now=now)
    kits = replace(kits, admin=write_admin_kit(ca, out / ADMIN_DIR, project, now=now))
    stale = sorted(
        p.name
        for p in out.iterdir()
        if p.is_dir() and p.name not in (*RESERVED, *project.sites) and (p / CLIENT_CERT).exists()
    )
    if stale:
        log.warning(
            "%s holds kits of sites no longer in the project (%s): the aggregator refuses them; delete those folders",
            out,
            ", ".join(stale),
        )
    return kits


def revoke(project: Project, out_dir: str | Path, site: str, *, now: dt.datetime | None = None) -> list[Revoked]:
    """Revoke every certificate of `site` that the CA in OUT/ca issued (its record, issued.jsonl) and the one in
    OUT/SITE/client.crt: add them to the aggregator's list OUT/server/revoked.json, which it checks at every call.
    `site` "admin": every operator certificate (the admin kit). Returns the certificates newly revoked (none when
    all of them already were). Nothing else is written: `provision` afterwards issues the site a new
    certificate, and that one is admitted."""
    admin = site == ADMIN_DIR
    if not admin and (not isinstance(site, str) or not _SITE_NAME.match(site) or site in RESERVED):
        raise ConfigError(f"--revoke: a site name {_SITE_RULE}, or 'admin' for the operator's kit (got {site!r})")
    out = Path(out_dir)
    server_dir, ca_dir = out / SERVER_DIR, out / CA_DIR
    need = "--revoke writes the aggregator's list of revoked certificates into its kit: pass -o the kits' folder"
    info = read_kit_file(server_dir, "server", need)
    if info.get("project") != project.name:
        raise ConfigError(
            f"{server_dir} is the aggregator's kit of project {info.get('project')!r}, not of "
            f"{project.name!r}: pass -o the folder this project file was provisioned into"
        )
    serials = issued_to(ca_dir, None, "operator") if admin else issued_to(ca_dir, site)
    kit_cert = out / site / CLIENT_CERT
    if kit_cert.is_file():
        serial, not_after = _kit_serial(kit_cert, site, admin)
        serials.setdefault(serial, not_after)
    if not serials:
        known = sorted(p.name for p in out.iterdir() if (p / CLIENT_CERT).is_file() and p.name != ADMIN_DIR)
        raise ConfigError(
            f"--revoke {site}: no certificate of {'the operator' if admin else f'site {site!r}'} is known here: "
            f"{ca_dir / ISSUED_FILE} lists none and {kit_cert} does not exist (sites with a kit in {out}: "
            f"{', '.join(known) or 'none'}); check the name and -o"
        )
    path = server_dir / REVOKED_FILE
    entries = read_revocations(path)
    when = iso_utc(now_utc(now))
    added = [Revoked(s, site, when, na) for s, na in sorted(serials.items()) if s not in entries]
    if added:
        write_revocations(path, [*entries.values(), *added])
        log.warning("revoked %d certificate(s) of %r in %s", len(added), site, path)
    return added


def _kit_serial(kit_cert: Path, site: str, admin: bool) -> tuple[int, str]:
    """The serial and expiry of the certificate in a kit that `revoke` names: a site's (its common name is the
    site) or the operator's (it carries the operator's role marker)."""
    x509, _, _ = load_crypto()
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(kit_cert.read_bytes())
    except ValueError as e:
        raise ConfigError(
            f"{kit_cert} is not a PEM certificate ({e}); revoke needs the serial number it "
            "holds: restore the file, or remove it to revoke what the CA's record lists"
        ) from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if (OPERATOR_OU in units) != admin or (not admin and names != [site]):
        raise ConfigError(
            f"{kit_cert} is a certificate of {names[0] if names else 'no site'!r}, not "
            f"{'the operator' if admin else f'of site {site!r}'}: restore the folder written by `fl-plugins provision`"
        )
    return cert.serial_number, iso_utc(cert.not_valid_after_utc)


def provision_local(
    out_dir: str | Path,
    sites: list[str] | tuple[str, ...],
    *,
    name: str = "local",
    port: int = 0,
    validity_days: int = 30,
) -> Kits:
    """Kits for a federation on this machine: the aggregator on 127.0.0.1 (and localhost). With port 0 the
    sites' kits name no port: the launcher gives them the address through FL_SERVER."""
    return provision(Project(name, ServerSpec("127.0.0.1", port, ("localhost",)), tuple(sites), validity_days), out_dir)
