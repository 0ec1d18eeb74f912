"""`fl-plugins`: the command line. `fl-plugins server ...` runs the aggregator service; `fl-plugins run RECIPE`
runs a whole federation on this machine (runner.py); `fl-plugins provision PROJECT.yaml` writes the CA and the
startup kits (security/provision.py); `fl-plugins client --kit KIT -- CMD` runs a site's script with its kit;
`fl-plugins report RUN_DIR` prints a run's table and writes its plots (report.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from fl_plugins._version import __version__
from fl_plugins.errors import ConfigError, FLError


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
    s.add_argument("--address", help="HOST:PORT to listen on (default: the kit's address, else 127.0.0.1:8443)")
    s.add_argument("--kit", type=Path, help="the aggregator's startup kit (kits/server from `fl-plugins provision`): "
                                            "serve mTLS only, and know each site by its certificate")  # fmt: skip
    s.add_argument("recipe", nargs="?", type=Path,
                   help="a recipe YAML: its rounds, min_sites, initial_model, round_deadline, name (as the job id) "
                        "and tracking, for what the flags leave out; the sites run its script or task "
                        "(`fl-plugins client --kit K -- python -m fl_plugins.hf.task --recipe RECIPE`)")  # fmt: skip
    s.add_argument("--run-dir", type=Path, help="checkpoints, metrics and logs go here (default with a recipe: "
                                                "runs/NAME); an existing run dir resumes its job, and a start "
                                                "with another job id, recipe or initial model is refused")  # fmt: skip
    s.add_argument("--rounds", type=int, help="number of rounds (required without a recipe)")
    s.add_argument("--min-sites", type=int, help="sites needed to start a round (default 1, or the recipe's)")
    s.add_argument("--initial-model", type=Path, help="a .safetensors file or a Hugging Face model folder")
    s.add_argument("--round-deadline", type=_positive_float, help="seconds; close a round with the updates it has")
    s.add_argument("--min-updates", type=int, help="updates a round needs at its deadline (default 1)")
    s.add_argument("--max-attempts", type=int, help="attempts a round may take to collect its updates: a new "
                                                    "attempt when the deadline passes with too few, or every site "
                                                    "left sits out (default 3)")  # fmt: skip
    s.add_argument("--on-attempts-exhausted", choices=("fail", "close"),
                   help="after --max-attempts: fail the job (default) or close the round with the updates it has")
    s.add_argument("--idle-timeout", type=_positive_float,
                   help="cancel a transfer that moves no bytes for this many seconds (default 60)")
    s.add_argument("--site-timeout", type=_positive_float,
                   help="a site silent this long has left the round (default 60)")
    s.add_argument("--chunk-bytes", type=int, default=None, help="bytes per chunk message (default 4 MiB)")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="average updates that hold NaN or Inf (default: refuse such an update)")  # fmt: skip
    s.add_argument("--job-id", default="", help="a name for this job (default: the recipe's name, else random); kept "
                                                "in RUN_DIR/run.json, so a restart serves the same job")  # fmt: skip
    s.add_argument("--insecure", action="store_true", help="without --kit: allow plaintext on a non-loopback address")
    s.add_argument("--tracking", metavar="NAMES",
                   help="stream the run's records to trackers in RUN_DIR: mlflow,tensorboard,wandb")  # fmt: skip
    s.add_argument("--log-level", default="INFO")
    r = sub.add_parser("run", help="run a whole federation on this machine from a recipe",
                       description="Start the aggregator and one process per site on 127.0.0.1, as the recipe "
                                   "says; show progress; stop everything at the end, on Ctrl-C or when a site "
                                   "crashes.")  # fmt: skip
    r.add_argument("recipe", type=Path, help="the recipe YAML (see recipes/quickstart.yaml)")
    r.add_argument("--run-dir", type=Path, help="logs, metrics and checkpoints go here; an existing run dir of the "
                                                "same recipe resumes, one of another is refused (default: "
                                                "runs/NAME-TIMESTAMP)")  # fmt: skip
    r.add_argument("--log-level", default="WARNING", help="console log level (the run dir's logs are INFO)")
    r.add_argument("--tls", action="store_true", help="mTLS between the sites and the aggregator: provision a CA "
                                                      "and startup kits into RUN_DIR/kits first")  # fmt: skip
    v = sub.add_parser("provision", help="make the project's CA and a startup kit for the aggregator and each site",
                       description="Read the project file (name, server host/port, sites, validity_days) and write "
                                   "OUT/ca (the CA: keep it, do not ship it), OUT/server (the aggregator's kit) and "
                                   "OUT/<site> for each site. An existing OUT/ca is reused, so kits handed out "
                                   "earlier stay valid.")  # fmt: skip
    v.add_argument("project", type=Path, help="the project YAML")
    v.add_argument("-o", "--out", type=Path, default=Path("kits"), help="where the kits go (default %(default)s)")
    v.add_argument("--revoke", action="append", metavar="SITE",
                   help="instead of provisioning: revoke every certificate issued to SITE (repeatable); the "
                        "aggregator refuses them from the next call (OUT/server/revoked.json); provision again to "
                        "give SITE a new kit")  # fmt: skip
    v.add_argument("--log-level", default="INFO")
    c = sub.add_parser("client", help="run a site's training script with its startup kit",
                       description="Run COMMAND (e.g. `python train.py --epochs 1`) as this site: FL_SERVER, "
                                   "FL_SITE and FL_KIT are set from the kit, so the script connects with mTLS; the "
                                   "exit code is the command's. Without --kit (--server and --site instead) the "
                                   "site speaks plaintext, to a loopback address only unless --insecure.")  # fmt: skip
    c.add_argument("--kit", type=Path, help="this site's startup kit (kits/site-1)")
    c.add_argument("--server", help="HOST:PORT of the aggregator (default: the kit's)")
    c.add_argument("--site", help="without --kit: this site's name (with a kit, the kit's certificate names it)")
    c.add_argument("--insecure", action="store_true",
                   help="without --kit: allow plaintext to a non-loopback aggregator (sets FL_INSECURE=1)")  # fmt: skip
    c.add_argument("--log-level", default="WARNING")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="what to run as this site")
    e = sub.add_parser("report", help="print a run's per-round table and write its plots",
                       description="Read RUN_DIR (metrics.jsonl, logs.jsonl, summary.json, baselines.json), print the "
                                   "per-round table and write PNG plots into RUN_DIR/report.")  # fmt: skip
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory of `fl-plugins run` or `server`")
    e.add_argument("--no-plots", action="store_true", help="only print the table")
    e.add_argument("--partial", action="store_true", help="report an unfinished run as far as it got")
    e.add_argument("--log-level", default="WARNING")
    return p


def _from_recipe(args: argparse.Namespace) -> None:
    """`server RECIPE`: the recipe's federation settings fill in what the flags leave out."""
    if args.recipe is None:
        missing = [f for f, v in (("--rounds", args.rounds), ("--run-dir", args.run_dir)) if v is None]
        if missing:
            raise ConfigError(f"fl-plugins server needs {' and '.join(missing)}, or a recipe that gives them "
                              "(fl-plugins server RECIPE.yaml)")  # fmt: skip
        from fl_plugins.recipe import FederationSpec

        fed = FederationSpec(args.rounds, 1)  # the defaults
    else:
        from fl_plugins.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        fed = recipe.federation
        args.recipe_identity = recipe.identity()  # in run.json; its name is the job id unless --job-id says
        args.run_dir = args.run_dir or Path("runs") / recipe.name
        if not args.tracking and recipe.tracking:
            args.tracking_specs = recipe.tracking  # with their options
    # the flags win; what they leave out comes from the recipe (its aggregation: and transfer: too)
    args.min_updates = fed.min_updates if args.min_updates is None else args.min_updates
    args.max_attempts = fed.max_attempts if args.max_attempts is None else args.max_attempts
    args.on_attempts_exhausted = args.on_attempts_exhausted or fed.on_attempts_exhausted
    args.site_timeout = args.site_timeout or fed.site_timeout
    args.idle_timeout = args.idle_timeout or fed.idle_timeout
    args.chunk_bytes = args.chunk_bytes or fed.chunk_bytes
    args.allow_nonfinite = args.allow_nonfinite or not fed.reject_nonfinite
    args.rounds = fed.rounds if args.rounds is None else args.rounds
    args.min_sites = fed.min_sites if args.min_sites is None else args.min_sites
    args.initial_model = args.initial_model or fed.initial_model
    args.round_deadline = args.round_deadline or fed.round_deadline


def _server(args: argparse.Namespace) -> int:
    from fl_plugins.aggregator.core import AggregatorConfig
    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.aggregator.store import RunStore, private_dir, private_file, undo_failed_start
    from fl_plugins.wire.layout import DEFAULT_CHUNK_BYTES

    _from_recipe(args)

    config = AggregatorConfig(run_dir=args.run_dir, rounds=args.rounds, min_sites=args.min_sites,
                              initial_model=args.initial_model, round_deadline=args.round_deadline,
                              min_updates=args.min_updates, idle_timeout=args.idle_timeout,
                              site_timeout=args.site_timeout, chunk_bytes=args.chunk_bytes or DEFAULT_CHUNK_BYTES,
                              job_id=args.job_id, reject_nonfinite=not args.allow_nonfinite,
                              max_attempts=args.max_attempts, on_attempts_exhausted=args.on_attempts_exhausted,
                              recipe=getattr(args, "recipe_identity", None))  # fmt: skip
    specs = _tracking_specs(args)  # checked before anything is made: a bad name or a missing library stops here
    # a run directory of another job is refused before anything is made or bound (the aggregator checks again)
    RunStore(config.run_dir).open_run(job_id=config.job_id, recipe=config.recipe,
                                      initial_model=config.initial_model, check_only=True)  # fmt: skip
    address = args.address or (None if args.kit else "127.0.0.1:8443")
    tracking = None
    with undo_failed_start(args.run_dir):  # a start that fails (busy port, bad kit or model) leaves nothing
        private_dir(args.run_dir)
        private_file(args.run_dir / "aggregator.log").close()  # 0600 before the handler appends to it
        handler = logging.FileHandler(args.run_dir / "aggregator.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            server = AggregatorServer(config, address, insecure=args.insecure, kit=args.kit)
        except BaseException:
            logging.getLogger().removeHandler(handler)
            handler.close()
            raise
        try:
            if specs:
                from fl_plugins.tracking import Tracking

                recipe_name = (getattr(args, "recipe_identity", None) or {}).get("job", {}).get("name")
                tracking = Tracking(args.run_dir, specs, name=args.job_id or recipe_name or args.run_dir.resolve().name,
                                    params={"rounds": args.rounds, "min_sites": args.min_sites}).start()  # fmt: skip
            server.start()
        except BaseException:
            server.stop(0)
            if tracking is not None:
                tracking.close(1)
            logging.getLogger().removeHandler(handler)
            handler.close()
            raise
    print(f"fl-plugins aggregator listening on {server.address}{' (mTLS)' if server.kit else ''} (job "
          f"{server.aggregator.job_id})", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        code = server.wait(stop_event=stop)
    finally:
        server.stop()
        if tracking is not None:
            tracking.close(130 if stop.is_set() and not server.aggregator.done else 0)
    if stop.is_set() and not server.aggregator.done:
        print("aggregator stopped before the last round; run the same command again to resume", file=sys.stderr)
        return 130
    return code


def _tracking_specs(args: argparse.Namespace):
    """`server --tracking mlflow,tensorboard` (or the recipe's `tracking:`): the trackers' specs, checked and
    installed, or None."""
    specs = getattr(args, "tracking_specs", None)
    if not args.tracking and not specs:
        return None
    from fl_plugins.tracking import check_installed, parse_tracking

    specs = specs or parse_tracking(args.tracking, key="--tracking")
    check_installed(specs)
    return specs


def _run(args: argparse.Namespace) -> int:
    from fl_plugins.recipe import load_recipe
    from fl_plugins.runner import default_run_dir, run

    recipe = load_recipe(args.recipe)

    def _term(*_):
        raise KeyboardInterrupt

    # SIGTERM (and SIGINT, even where a shell started us with it ignored) stop the sites and the aggregator
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    return run(recipe, args.run_dir or default_run_dir(recipe), tls=args.tls)


def _report(args: argparse.Namespace) -> int:
    from fl_plugins.report import report

    report(args.run_dir, plots=not args.no_plots, partial=args.partial)
    return 0


def _provision(args: argparse.Namespace) -> int:
    from fl_plugins.security.provision import load_project, provision, revoke

    project = load_project(args.project)
    if args.revoke:
        revoked = {site: revoke(project, args.out, site) for site in dict.fromkeys(args.revoke)}
        listed = args.out / "server" / "revoked.json"
        for site, added in revoked.items():
            serials = ", ".join(f"{r.serial:x}" for r in added)
            print(f"site {site!r}: revoked {len(added)} certificate(s) ({serials})" if added else
                  f"site {site!r}: its certificates were already revoked", flush=True)  # fmt: skip
        print(f"the aggregator refuses them from its next call once its kit holds {listed} (copy the file there if "
              f"it runs from a copy of {args.out / 'server'}); to give a site a new kit: fl-plugins provision "
              f"{args.project} -o {args.out}, then ship {args.out / 'SITE'} to that site only", flush=True)  # fmt: skip
        return 0
    kits = provision(project, args.out)
    rows = [(kits.ca, "the CA: keep it here, never ship it (provisioning again reuses it)"),
            (kits.server, f"the aggregator's: fl-plugins server --kit {kits.server} --run-dir RUN_DIR --rounds N"),
            *((p, f"site {s}'s: fl-plugins client --kit {p} -- python train.py") for s, p in kits.sites.items())]
    width = max(len(str(p)) for p, _ in rows)
    print(f"project {project.name!r}: startup kits written to {kits.root}", flush=True)
    for path, what in rows:
        print(f"  {str(path):<{width}}  {what}", flush=True)
    return 0


def _client(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from fl_plugins.errors import ConfigError
    from fl_plugins.security.tls import check_plaintext_target, load_site_kit

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ConfigError("no command to run: fl-plugins client --kit KIT -- python train.py [ARGS]")
    env = dict(os.environ)
    env.pop("FL_INSECURE", None)  # the flag decides, not what this shell happens to hold
    if args.kit is not None:
        if args.insecure:
            raise ConfigError("--insecure and --kit do not go together: with a kit the site speaks mTLS only; "
                              "drop --insecure")  # fmt: skip
        kit = load_site_kit(args.kit)
        if args.site and args.site != kit.site:
            raise ConfigError(f"--site {args.site} differs from the site of the kit {kit.path} ({kit.site!r}); the "
                              "aggregator knows a site by its certificate: drop --site, or use that site's "
                              "kit")  # fmt: skip
        server = args.server or kit.server
        if not server:
            raise ConfigError(f"the kit {kit.path} names no aggregator address: pass --server HOST:PORT")
        env.update(FL_SERVER=server, FL_SITE=kit.site, FL_KIT=str(kit.path.resolve()))
    else:
        if not args.server or not args.site:
            raise ConfigError("fl-plugins client needs --kit kits/SITE (mTLS), or --server HOST:PORT and --site NAME "
                              "(plaintext: a loopback address, or another with --insecure)")  # fmt: skip
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
        if args.command == "provision":
            return _provision(args)
        if args.command == "client":
            return _client(args)
        if args.command == "report":
            return _report(args)
    except FLError as e:
        print(f"fl-plugins {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
