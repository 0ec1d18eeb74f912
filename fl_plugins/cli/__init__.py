"""`fl-plugins`: the command line. `fl-plugins server ...` runs the aggregator service; `fl-plugins run RECIPE`
runs a whole federation on this machine (runner.py); `fl-plugins provision PROJECT.yaml` writes the CA and the
startup kits (security/provision.py); `fl-plugins client --kit KIT -- CMD` runs a site's script with its kit;
`fl-plugins status ADDRESS --kit kits/admin` shows a running aggregator's job, sites and uploads (status.py);
`fl-plugins report RUN_DIR` prints a run's table and writes its plots (report.py); `fl-plugins export RUN_DIR -o
DIR` writes its global model as a Hugging Face folder with a model card (export.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from fl_plugins._version import __version__
from fl_plugins.cli import client, export, provision, run, server, status
from fl_plugins.cli.server import server_config
from fl_plugins.errors import FLError

__all__ = ["main", "server_config"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-plugins", description="Federated fine-tuning: the aggregator and tools.")
    p.add_argument("--version", action="version", version=f"fl-plugins {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (server.add, run.add_run, provision.add, client.add, status.add, run.add_report, export.add):
        add(sub)
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "server": server.command,
    "run": run.run_command,
    "provision": provision.command,
    "client": client.command,
    "status": status.command,
    "report": run.report_command,
    "export": export.command,
}


def main(argv: list[str] | None = None) -> int:
    from fl_plugins._sys import limit_malloc_arenas

    limit_malloc_arenas()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except FLError as e:
        print(f"fl-plugins {args.command}: error: {e}", file=sys.stderr)
        return 2
