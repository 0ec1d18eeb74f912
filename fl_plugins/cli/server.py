"""`fl-plugins server [RECIPE]`: the aggregator service, its flags derived from fl_plugins/config.py."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins.cli.levels import add_log_level
from fl_plugins.config import SETTINGS, AggregatorConfig, Boolean, Setting, merge, trains
from fl_plugins.errors import ConfigError

if TYPE_CHECKING:
    from fl_plugins.aggregator.service import AggregatorServer
    from fl_plugins.recipe import Recipe
    from fl_plugins.tracking import TrackerSpec, Tracking


def add(sub: Any) -> None:
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
    add_log_level(s, "info", " (RUN_DIR/aggregator.log gets the same)")


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


def server_config(flags: Mapping[str, Any], recipe: Recipe | None) -> AggregatorConfig:
    """The AggregatorConfig of `fl-plugins server [RECIPE]`: each setting from its flag when given (`flags`, by
    field name: {"min_updates": 2}), else from the recipe, else its default (fl_plugins/config.py). With a
    recipe, RUN_DIR defaults to runs/NAME and the recipe (its identity) is kept in run.json."""
    from fl_plugins.aggregator import remote

    flags, fixed = remote.bind(flags)  # `--run-dir URL`: the run lives in an object store
    if recipe is None:
        needed = ("rounds", "run_dir") if trains(flags.get("workflow", "fedavg")) else ("run_dir",)
        flags = flags if "rounds" in flags or "rounds" in needed else {**flags, "rounds": 1}
        missing = [SETTINGS[name].flag for name in needed if name not in flags]
        if missing:
            raise ConfigError(
                f"fl-plugins server needs {' and '.join(map(str, missing))}, or a recipe that gives them "
                "(fl-plugins server RECIPE.yaml)"
            )
        return merge(flags, **fixed)
    given = {"run_dir": Path("runs") / recipe.name, **recipe.federation.values}
    return merge(flags, given, recipe=recipe.identity(), **fixed)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The aggregator settings given on the command line, by field name (a flag left out is None)."""
    return {name: getattr(args, name) for name, s in SETTINGS.items() if s.flag and getattr(args, name) is not None}


def command(args: argparse.Namespace) -> int:
    from fl_plugins.security.handshake_log import installed

    with installed(args.kit is not None):  # with mTLS, gRPC's failed TLS handshakes become WARNINGs that say why
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from fl_plugins.aggregator import ending
    from fl_plugins.aggregator.store import RunStore

    recipe = None
    if args.recipe is not None:
        from fl_plugins.recipe import load_recipe

        recipe = load_recipe(args.recipe)
    config = server_config(given_flags(args), recipe)
    specs = _tracking_specs(args.tracking, recipe)  # checked before anything is made: a bad name or library stops
    remote = None
    if config.store_url:  # the run lives in an object store: its working copy first (a finished run says so)
        from fl_plugins.aggregator.remote import RemoteRun

        remote = RemoteRun(config.store_url, config.run_dir)
        remote.fetch(catch_up=False)
    # a run directory of another job is refused before anything is made or bound (the aggregator checks again)
    RunStore(config.run_dir).open_run(
        job_id=config.job_id, recipe=config.recipe, initial_model=config.initial_model, check_only=True
    )
    done = ending.finished(config)  # a finished run is not run again
    if done is not None:
        print(ending.already_finished(config, done, "--rounds (or the recipe's `rounds`)"), flush=True)
        failed = remote.complete() if remote is not None else None  # the store gets what it lacks of the run
        if failed is not None:
            print(f"the run directory's object store: {failed}", file=sys.stderr)
        return 0 if failed is None else 1
    name = config.job_id or (recipe.name if recipe else "") or config.run_dir.resolve().name
    stop, signals = threading.Event(), []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before "listening" is printed: a signal right after it counts
        signal.signal(sig, on_signal)
    server, tracking = _start(config, args, specs, name)
    try:
        code = server.wait(stop_event=stop)
    finally:
        server.stop()
        agg = server.aggregator
        if agg.remote is not None and agg.remote.error is not None and code == 0:
            print(f"the run directory's object store: {agg.remote.error}", file=sys.stderr)
            code = 1  # (the job is done here, but the store lacks part of it: the same command uploads it)
        if stop.is_set() and not agg.done:  # 130 for Ctrl-C (SIGINT), 143 for SIGTERM, as a shell reports them
            code = 143 if signal.SIGTERM in signals else 130
        if code != 0 and not agg.done:  # the job's outcome, for `fl-plugins report` (a resume writes it again)
            ending.write_summary(agg, code)
        if tracking is not None:
            tracking.close(code)
    return _ended(server, code)


def _ended(server: AggregatorServer, code: int) -> int:
    """What the operator reads when the server stops: how to resume, or where the final model and report are."""
    run_dir = server.aggregator.config.run_dir
    if code in (130, 143):
        print("aggregator stopped before the job was finished; run the same command again to resume", file=sys.stderr)
    elif code == 0:
        from fl_plugins.aggregator.ending import read_summary

        done = read_summary(run_dir)
        final = f"; the final model is in {done.final_model}" if done is not None and done.final_model else ""
        print(f"job {server.aggregator.job_id} finished{final}; `fl-plugins report {run_dir}` shows it", flush=True)
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
