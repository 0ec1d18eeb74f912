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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fl_plugins._version import __version__
from fl_plugins.config import SETTINGS, AggregatorConfig, Boolean, Setting, merge, trains
from fl_plugins.errors import ConfigError, FLError

if TYPE_CHECKING:
    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.recipe import Recipe
    from fl_plugins.tracking import TrackerSpec, Tracking


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-plugins", description="Federated fine-tuning: the aggregator and tools.")
    p.add_argument("--version", action="version", version=f"fl-plugins {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_server, _add_run, _add_provision, _add_client, _add_report):
        add(sub)
    return p


def _add_server(sub: Any) -> None:
    s = sub.add_parser(
        "server",
        help="run the aggregator service",
        description="Run the aggregator: rounds of FedAvg over streamed safetensors updates. A flag wins over the "
        "recipe's key for the same setting; a setting neither gives takes its default.",
    )
    s.add_argument("--address", help="HOST:PORT to listen on (default: the kit's address, else 127.0.0.1:8443)")
    s.add_argument(
        "--kit",
        type=Path,
        help="the aggregator's startup kit (kits/server from `fl-plugins provision`): serve mTLS only, and know "
        "each site by its certificate",
    )
    s.add_argument(
        "recipe",
        nargs="?",
        type=Path,
        help="a recipe YAML: its aggregator settings (rounds, min_sites, initial_model, round_deadline, "
        "aggregation, transfer), name (as the job id) and tracking, for what the flags leave out; the sites run its "
        "script or task (`fl-plugins client --kit K -- python -m fl_plugins.tasks --recipe RECIPE`)",
    )
    for setting in SETTINGS.values():  # one flag per aggregator setting that has one (fl_plugins/config.py)
        if setting.flag is not None:
            s.add_argument(
                setting.flag, dest=setting.name, default=None, help=_flag_help(setting), **_flag_kind(setting)
            )
    s.add_argument("--insecure", action="store_true", help="without --kit: allow plaintext on a non-loopback address")
    s.add_argument(
        "--tracking",
        metavar="NAMES",
        help="stream the run's records to trackers in RUN_DIR: mlflow,tensorboard,wandb",
    )
    s.add_argument("--log-level", default="INFO")


def _flag_kind(setting: Setting) -> dict[str, Any]:
    """argparse's arguments for the flag of `setting`: a switch for a bool (it turns the default over), else the
    value's type, and the choices of a choice. A flag left out is None: the recipe's value or the default."""
    if isinstance(setting.check, Boolean):
        return {"action": "store_const", "const": not setting.default}
    return {"type": setting.check.parse, "choices": getattr(setting.check, "options", None)}


def _flag_help(setting: Setting) -> str:
    """What the flag does, its default, and the recipe key that sets the same setting."""
    if setting.required:
        default = setting.shown or "required without a recipe"
    elif setting.shown:
        default = f"default: {setting.shown}"
    elif setting.unit is not None:
        default = f"default: {setting.default} = {setting.default / setting.unit[1]:g} {setting.unit[0]}"
    else:
        default = (
            f"default: {setting.default:g}" if isinstance(setting.default, float) else f"default: {setting.default}"
        )
    unit = f", in {setting.unit[0]}" if setting.unit is not None else ""
    recipe = f"; recipe: {setting.key}{unit}" if setting.key is not None else ""
    return f"{setting.flag_help or setting.doc} ({default}{recipe})"


def _add_run(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a whole federation on this machine from a recipe",
        description="Start the aggregator and one process per site on 127.0.0.1, as the recipe says; show "
        "progress; stop everything at the end, on Ctrl-C or when a site crashes.",
    )
    r.add_argument("recipe", type=Path, help="the recipe YAML (see recipes/quickstart.yaml)")
    r.add_argument(
        "--run-dir",
        type=Path,
        help="logs, metrics and checkpoints go here; an existing run dir of the same recipe resumes, one of "
        "another is refused (default: runs/NAME-TIMESTAMP)",
    )
    r.add_argument("--log-level", default="WARNING", help="console log level (the run dir's logs are INFO)")
    r.add_argument(
        "--tls",
        action="store_true",
        help="mTLS between the sites and the aggregator: provision a CA and startup kits into RUN_DIR/kits first",
    )


def _add_provision(sub: Any) -> None:
    v = sub.add_parser(
        "provision",
        help="make the project's CA and a startup kit for the aggregator and each site",
        description="Read the project file (name, server host/port, sites, validity_days) and write OUT/ca (the "
        "CA: keep it, do not ship it), OUT/server (the aggregator's kit) and OUT/<site> for each site. An existing "
        "OUT/ca is reused, so kits handed out earlier stay valid.",
    )
    v.add_argument("project", type=Path, help="the project YAML")
    v.add_argument("-o", "--out", type=Path, default=Path("kits"), help="where the kits go (default %(default)s)")
    v.add_argument(
        "--revoke",
        action="append",
        metavar="SITE",
        help="instead of provisioning: revoke every certificate issued to SITE (repeatable); the aggregator "
        "refuses them from the next call (OUT/server/revoked.json); provision again to give SITE a new kit",
    )
    v.add_argument("--log-level", default="INFO")


def _add_client(sub: Any) -> None:
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
    c.add_argument("--log-level", default="WARNING")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="what to run as this site")


def _add_report(sub: Any) -> None:
    e = sub.add_parser(
        "report",
        help="print a run's per-round table and write its plots",
        description="Read RUN_DIR (metrics.jsonl, logs.jsonl, summary.json, baselines.json), print the per-round "
        "table and write PNG plots into RUN_DIR/report.",
    )
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory of `fl-plugins run` or `server`")
    e.add_argument("--no-plots", action="store_true", help="only print the table")
    e.add_argument("--partial", action="store_true", help="report an unfinished run as far as it got")
    e.add_argument("--log-level", default="WARNING")


def server_config(flags: Mapping[str, Any], recipe: Recipe | None) -> AggregatorConfig:
    """The AggregatorConfig of `fl-plugins server [RECIPE]`: each setting from its flag when given (`flags`, by
    field name: {"min_updates": 2}), else from the recipe, else its default (fl_plugins/config.py). With a
    recipe, RUN_DIR defaults to runs/NAME and the recipe (its identity) is kept in run.json."""
    if recipe is None:
        needed = ("rounds", "run_dir") if trains(flags.get("workflow", "fedavg")) else ("run_dir",)
        flags = flags if "rounds" in flags or "rounds" in needed else {**flags, "rounds": 1}
        missing = [SETTINGS[name].flag for name in needed if name not in flags]
        if missing:
            raise ConfigError(
                f"fl-plugins server needs {' and '.join(map(str, missing))}, or a recipe that gives them "
                "(fl-plugins server RECIPE.yaml)"
            )
        return merge(flags)
    given = {"run_dir": Path("runs") / recipe.name, **recipe.federation.values}
    return merge(flags, given, recipe=recipe.identity())


def _given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The aggregator settings given on the command line, by field name (a flag left out is None)."""
    return {name: getattr(args, name) for name, s in SETTINGS.items() if s.flag and getattr(args, name) is not None}


def _server(args: argparse.Namespace) -> int:
    from fl_plugins.aggregator.store import RunStore

    recipe = None
    if args.recipe is not None:
        from fl_plugins.recipe import load_recipe

        recipe = load_recipe(args.recipe)
    config = server_config(_given_flags(args), recipe)
    specs = _tracking_specs(args.tracking, recipe)  # checked before anything is made: a bad name or library stops
    # a run directory of another job is refused before anything is made or bound (the aggregator checks again)
    RunStore(config.run_dir).open_run(
        job_id=config.job_id, recipe=config.recipe, initial_model=config.initial_model, check_only=True
    )
    name = config.job_id or (recipe.name if recipe else "") or config.run_dir.resolve().name
    server, tracking = _start(config, args, specs, name)
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


def _start(
    config: AggregatorConfig, args: argparse.Namespace, specs: tuple[TrackerSpec, ...] | None, name: str
) -> tuple[AggregatorServer, Tracking | None]:
    """The started AggregatorServer, and the Tracking (named `name`) when `specs`; a start that fails (busy
    port, bad kit or model) leaves nothing in the run directory."""
    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.aggregator.store import private_dir, private_file, undo_failed_start

    address = args.address or (None if args.kit else "127.0.0.1:8443")
    tracking = None
    with undo_failed_start(config.run_dir):
        private_dir(config.run_dir)
        private_file(config.run_dir / "aggregator.log").close()  # 0600 before the handler appends to it
        handler = logging.FileHandler(config.run_dir / "aggregator.log")
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

                params = {"rounds": config.rounds, "min_sites": config.min_sites}
                tracking = Tracking(config.run_dir, specs, name=name, params=params).start()
            server.start()
        except BaseException:
            server.stop(0)
            if tracking is not None:
                tracking.close(1)
            logging.getLogger().removeHandler(handler)
            handler.close()
            raise
    mtls = " (mTLS)" if server.kit else ""
    print(f"fl-plugins aggregator listening on {server.address}{mtls} (job {server.aggregator.job_id})", flush=True)
    return server, tracking


def _tracking_specs(flag: str | None, recipe: Recipe | None) -> tuple[TrackerSpec, ...] | None:
    """`server --tracking mlflow,tensorboard`, else the recipe's `tracking:` (with their options): the trackers'
    specs, checked and installed, or None."""
    specs = recipe.tracking if recipe is not None else ()
    if flag:
        from fl_plugins.tracking import parse_tracking

        specs = parse_tracking(flag, key="--tracking")
    if not specs:
        return None
    from fl_plugins.tracking import check_installed

    check_installed(specs)
    return specs


def _run(args: argparse.Namespace) -> int:
    from fl_plugins.recipe import load_recipe
    from fl_plugins.runner import default_run_dir, run

    recipe = load_recipe(args.recipe)

    def _term(*_: object) -> NoReturn:
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
            if added:
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
    width = max(len(str(p)) for p, _ in rows)
    print(f"project {project.name!r}: startup kits written to {kits.root}", flush=True)
    for path, what in rows:
        print(f"  {str(path):<{width}}  {what}", flush=True)
    return 0


def _client(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from fl_plugins.security.tls import check_plaintext_target, load_site_kit

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ConfigError("no command to run: fl-plugins client --kit KIT -- python train.py [ARGS]")
    env = dict(os.environ)
    env.pop("FL_INSECURE", None)  # the flag decides, not what this shell happens to hold
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


def main(argv: list[str] | None = None) -> int:
    from fl_plugins._sys import limit_malloc_arenas

    limit_malloc_arenas()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
