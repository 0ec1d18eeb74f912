"""`fl-plugins provision PROJECT.yaml`: the CA and the startup kits (security/provision.py), or revocations."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fl_plugins.cli.levels import add_log_level


def add(sub: Any) -> None:
    v = sub.add_parser(
        "provision",
        help="make the project's CA and a startup kit for the aggregator and each site",
        description="Read the project file (name, server host/port, sites, validity_days) and write OUT/ca (the "
        "CA: keep it, do not ship it), OUT/server (the aggregator's kit), OUT/admin (the operator's, for `fl-plugins "
        "status`) and OUT/<site> for each site. An existing "
        "OUT/ca is reused, so kits handed out earlier stay valid.",
    )
    v.add_argument("project", type=Path, help="the project YAML")
    v.add_argument("-o", "--out", type=Path, default=Path("kits"), help="where the kits go (default %(default)s)")
    v.add_argument(
        "--revoke",
        action="append",
        metavar="SITE",
        help="instead of provisioning: revoke every certificate issued to SITE (repeatable; `admin`: the "
        "operator's kit); the aggregator "
        "refuses them from the next call (OUT/server/revoked.json); provision again to give SITE a new kit",
    )
    add_log_level(v, "info")


def command(args: argparse.Namespace) -> int:
    from fl_plugins.security.provision import load_project, provision, revoke

    project = load_project(args.project)
    if args.revoke:
        revoked = {site: revoke(project, args.out, site) for site in dict.fromkeys(args.revoke)}
        listed = args.out / "server" / "revoked.json"
        for site, added in revoked.items():
            serials = ", ".join(f"{r.serial:x}" for r in added)
            if added and site == "admin":
                print(f"the operator's kit: revoked {len(added)} certificate(s) ({serials})", flush=True)
            elif added:
                print(f"site {site!r}: revoked {len(added)} certificate(s) ({serials})", flush=True)
            else:
                print(f"site {site!r}: its certificates were already revoked", flush=True)
        print(
            f"the aggregator refuses them from its next call once its kit holds {listed} (copy the file there if "
            f"it runs from a copy of {args.out / 'server'}); to give a site a new kit: fl-plugins provision "
            f"{args.project} -o {args.out}, then ship {args.out / 'SITE'} to that site only",
            flush=True,
        )
        return 0
    kits = provision(project, args.out)
    rows = [
        (kits.ca, "the CA: keep it here, never ship it (provisioning again reuses it)"),
        (kits.server, f"the aggregator's: fl-plugins server --kit {kits.server} --run-dir RUN_DIR --rounds N"),
        *((p, f"site {s}'s: fl-plugins client --kit {p} -- python train.py") for s, p in kits.sites.items()),
    ]
    if kits.admin is not None:
        rows.append((kits.admin, f"the operator's (ship to no site): fl-plugins status ADDRESS --kit {kits.admin}"))
    width = max(len(str(p)) for p, _ in rows)
    print(f"project {project.name!r}: startup kits written to {kits.root}", flush=True)
    for path, what in rows:
        print(f"  {str(path):<{width}}  {what}", flush=True)
    return 0
