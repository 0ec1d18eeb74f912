"""`fl-plugins client --kit KIT -- CMD`: a site's script run with its startup kit (or plaintext to loopback)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from fl_plugins.cli.levels import add_log_level
from fl_plugins.errors import ConfigError


def add(sub: Any) -> None:
    c = sub.add_parser(
        "client",
        help="run a site's training script with its startup kit",
        description="Run COMMAND (e.g. `python train.py --epochs 1`) as this site: FL_SERVER, FL_SITE and FL_KIT "
        "are set from the kit, so the script connects with mTLS; the exit code is the command's. Without --kit "
        "(--server and --site instead) the site speaks plaintext, to a loopback address only unless --insecure.",
    )
    c.add_argument("--kit", type=Path, help="this site's startup kit (kits/site-1)")
    c.add_argument("--server", help="HOST:PORT of the aggregator (default: the kit's)")
    c.add_argument("--site", help="without --kit: this site's name (with a kit, the kit's certificate names it)")
    c.add_argument(
        "--insecure",
        action="store_true",
        help="without --kit: allow plaintext to a non-loopback aggregator (sets FL_INSECURE=1)",
    )
    c.add_argument(
        "--connect-timeout",
        metavar="S",
        help="seconds the site waits for an aggregator that is not up yet (sets FL_CONNECT_TIMEOUT; default 60)",
    )
    c.add_argument(
        "--retry-timeout",
        metavar="S",
        help="seconds the aggregator may be silent mid-job before the site gives up (sets FL_RETRY_TIMEOUT; "
        "default 60, the aggregator's default --site-timeout)",
    )
    add_log_level(c, "warning", " for this command's own messages (the script's logging is its own)")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="what to run as this site")


def command(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from fl_plugins.security.tls import check_plaintext_target, load_site_kit

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ConfigError("no command to run: fl-plugins client --kit KIT -- python train.py [ARGS]")
    env = dict(os.environ)
    env.pop("FL_INSECURE", None)  # the flag decides, not what this shell happens to hold
    # gRPC's C core prints a failed TLS handshake as a raw INFO line before the site's own one-line reason
    # (client/reach.py); errors still print. A value the user set wins.
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    env.update(_timeouts(args))
    if args.kit is not None:
        if args.insecure:
            raise ConfigError(
                "--insecure and --kit do not go together: with a kit the site speaks mTLS only; drop --insecure"
            )
        kit = load_site_kit(args.kit)
        if args.site and args.site != kit.site:
            raise ConfigError(
                f"--site {args.site} differs from the site of the kit {kit.path} ({kit.site!r}); the aggregator "
                "knows a site by its certificate: drop --site, or use that site's kit"
            )
        server = args.server or kit.server
        if not server:
            raise ConfigError(f"the kit {kit.path} names no aggregator address: pass --server HOST:PORT")
        env.update(FL_SERVER=server, FL_SITE=kit.site, FL_KIT=str(kit.path.resolve()))
    else:
        if not args.server or not args.site:
            raise ConfigError(
                "fl-plugins client needs --kit kits/SITE (mTLS), or --server HOST:PORT and --site NAME "
                "(plaintext: a loopback address, or another with --insecure)"
            )
        check_plaintext_target(args.server, insecure=args.insecure, opt_out="--insecure")
        env.pop("FL_KIT", None)
        env.update(FL_SERVER=args.server, FL_SITE=args.site, **({"FL_INSECURE": "1"} if args.insecure else {}))
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as e:
        print(f"fl-plugins client: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127
    # Ctrl-C reaches the command too (same process group): wait for it; pass SIGTERM on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it


def _timeouts(args: argparse.Namespace) -> dict[str, str]:
    """The environment the timeout flags set for the command, checked here: a bad value stops before it runs."""
    from fl_plugins.client.retry import check_timeout

    flags = [
        ("--connect-timeout", args.connect_timeout, "FL_CONNECT_TIMEOUT"),
        ("--retry-timeout", args.retry_timeout, "FL_RETRY_TIMEOUT"),
    ]
    return {var: str(check_timeout(raw, flag)) for flag, raw, var in flags if raw is not None}
