"""The startup kits' folders as `fl-plugins provision` writes them (provision.py lays them out and documents
their files; tls.py reads them): the aggregator's, a site's, and the operator's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins._version import __version__
from fl_plugins.security.ca import CertificateAuthority, make_private_dir, write_file
from fl_plugins.security.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, KIT_FILE, SERVER_CERT, SERVER_KEY

if TYPE_CHECKING:
    from fl_plugins.security.provision import Project


def _write_kit_file(path: Path, header: str, info: dict[str, Any]) -> None:
    import yaml

    info = {**info, "fl_plugins_version": __version__}
    write_file(path / KIT_FILE, (header + yaml.safe_dump(info, sort_keys=False)).encode())


def write_server_kit(
    ca: CertificateAuthority, directory: str | Path, project: Project, *, now: dt.datetime | None = None
) -> Path:
    """The aggregator's kit: its certificate (valid for the project's server host and alt_names), the CA that
    signs the sites, and the project's site list."""
    directory = Path(directory)
    names = tuple(dict.fromkeys((project.server.host, *project.server.alt_names)))
    cert, key = ca.issue(f"{project.name} aggregator"[:64], days=project.validity_days, server_names=names, now=now)
    make_private_dir(directory)
    write_file(directory / CA_CERT, ca.cert_pem)
    write_file(directory / SERVER_CERT, cert)
    write_file(directory / SERVER_KEY, key, secret=True)
    _write_kit_file(
        directory,
        f"# The aggregator's startup kit for project {project.name!r} (fl-plugins provision).\n"
        f"# Serve with: fl-plugins server --kit {directory} --run-dir RUN_DIR --rounds N\n",
        {"role": "server", "project": project.name, "address": project.server.address, "sites": list(project.sites)},
    )
    return directory


def write_site_kit(
    ca: CertificateAuthority,
    directory: str | Path,
    site: str,
    project: Project,
    *,
    now: dt.datetime | None = None,
    days: int | None = None,
) -> Path:
    """A site's kit: its certificate (common name = `site`), its key, the CA, and the aggregator's address.

    The CA signs any name here; only the aggregator's site list decides whether the name is admitted."""
    directory = Path(directory)
    _client_files(ca, directory, ca.issue(site, days=project.validity_days if days is None else days, now=now))
    server = project.server.address if project.server.port else None
    _write_kit_file(
        directory,
        f"# The startup kit of site {site!r}, project {project.name!r} (fl-plugins provision).\n"
        f"# Run the site with: fl-plugins client --kit {directory} -- python train.py\n",
        {"role": "site", "project": project.name, "site": site, "server": server},
    )
    return directory


def operator_name(project: Project) -> str:
    """The operator certificate's common name: admin@PROJECT, at most X.509's 64 characters."""
    return f"admin@{project.name}"[:64]


def write_admin_kit(
    ca: CertificateAuthority, directory: str | Path, project: Project, *, now: dt.datetime | None = None
) -> Path:
    """The operator's kit: a client certificate with the operator's role marker (this module's docstring), its
    key, the CA, and the aggregator's address. `fl-plugins status ADDRESS --kit` connects with it."""
    directory = Path(directory)
    name = operator_name(project)
    _client_files(ca, directory, ca.issue(name, days=project.validity_days, operator=True, now=now))
    server = project.server.address if project.server.port else None
    _write_kit_file(
        directory,
        f"# The operator's kit of project {project.name!r} (fl-plugins provision): it reads the job's status,\n"
        f"# never trains. See the whole job with: fl-plugins status {server or 'HOST:PORT'} --kit {directory}\n",
        {"role": "admin", "project": project.name, "name": name, "server": server},
    )
    return directory


def _client_files(ca: CertificateAuthority, directory: Path, issued: tuple[bytes, bytes]) -> None:
    """A client kit's files (a site's or the operator's): the CA, the certificate and its key (0600)."""
    cert, key = issued
    make_private_dir(directory)
    write_file(directory / CA_CERT, ca.cert_pem)
    write_file(directory / CLIENT_CERT, cert)
    write_file(directory / CLIENT_KEY, key, secret=True)
