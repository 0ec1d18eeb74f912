"""`fl-plugins`: the command line. `fl-plugins server ...` runs the aggregator service; `fl-plugins run RECIPE`
runs a whole federation on this machine (runner.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from fl_plugins._version import __version__
from fl_plugins.errors import FLError


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {s})")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-plugins", description="Federated fine-tuning: the aggregator and tools.")
    p.add_argument("--version", action="version", version=f"fl-plugins {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("server", help="run the aggregator service",
                       description="Run the aggregator: rounds of FedAvg over streamed safetensors updates.")
    s.add_argument("--address", default="127.0.0.1:8443", help="HOST:PORT to listen on (default %(default)s)")
    s.add_argument("--run-dir", required=True, type=Path, help="checkpoints, metrics and logs go here")
    s.add_argument("--rounds", required=True, type=int, help="number of rounds")
    s.add_argument("--min-sites", type=int, default=1, help="sites needed to start a round (default 1)")
    s.add_argument("--initial-model", type=Path, help="a .safetensors file or a Hugging Face model folder")
    s.add_argument("--round-deadline", type=_positive_float, help="seconds; close a round with the updates it has")
    s.add_argument("--min-updates", type=int, default=1, help="updates a round needs at its deadline (default 1)")
    s.add_argument("--idle-timeout", type=_positive_float, default=60.0,
                   help="cancel a transfer that moves no bytes for this many seconds (default 60)")
    s.add_argument("--site-timeout", type=_positive_float, default=60.0,
                   help="a site silent this long has left the round (default 60)")
    s.add_argument("--chunk-bytes", type=int, default=None, help="bytes per chunk message (default 4 MiB)")
    s.add_argument("--job-id", default="", help="a name for this job (default: random)")
    s.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    s.add_argument("--log-level", default="INFO")
    r = sub.add_parser("run", help="run a whole federation on this machine from a recipe",
                       description="Start the aggregator and one process per site on 127.0.0.1, as the recipe "
                                   "says; show progress; stop everything at the end, on Ctrl-C or when a site "
                                   "crashes.")  # fmt: skip
    r.add_argument("recipe", type=Path, help="the recipe YAML (see recipes/quickstart.yaml)")
    r.add_argument("--run-dir", type=Path, help="logs, metrics and checkpoints go here; an existing run dir resumes "
                                                "(default: runs/NAME-TIMESTAMP)")  # fmt: skip
    r.add_argument("--log-level", default="WARNING", help="console log level (the run dir's logs are INFO)")
    return p


def _server(args: argparse.Namespace) -> int:
    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES

    config = AggregatorConfig(run_dir=args.run_dir, rounds=args.rounds, min_sites=args.min_sites,
                              initial_model=args.initial_model, round_deadline=args.round_deadline,
                              min_updates=args.min_updates, idle_timeout=args.idle_timeout,
                              site_timeout=args.site_timeout, chunk_bytes=args.chunk_bytes or DEFAULT_CHUNK_BYTES,
                              job_id=args.job_id)  # fmt: skip
    args.run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.run_dir / "aggregator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    server = AggregatorServer(config, args.address, insecure=args.insecure).start()
    print(f"fl-plugins aggregator listening on {server.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    code = server.wait(stop_event=stop)
    server.stop()
    if stop.is_set() and not server.aggregator.done:
        print("aggregator stopped before the last round; run the same command again to resume", file=sys.stderr)
        return 130
    return code


def _run(args: argparse.Namespace) -> int:
    from fl_plugins.recipe import load_recipe
    from fl_plugins.runner import default_run_dir, run

    recipe = load_recipe(args.recipe)

    def _term(*_):
        raise KeyboardInterrupt

    # SIGTERM (and SIGINT, even where a shell started us with it ignored) stop the sites and the aggregator
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    return run(recipe, args.run_dir or default_run_dir(recipe))


def main(argv: list[str] | None = None) -> int:
    from fl_plugins._sys import limit_malloc_arenas

    limit_malloc_arenas()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        if args.command == "server":
            return _server(args)
        if args.command == "run":
            return _run(args)
    except FLError as e:
        print(f"fl-plugins {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
