"""`fl-plugins run RECIPE` (a whole federation on this machine: runner.py) and `fl-plugins report RUN_DIR`."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path
from typing import Any, NoReturn

from fl_plugins.cli.levels import add_log_level


def add_run(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a whole federation on this machine from a recipe",
        description="Start the aggregator and one process per site on 127.0.0.1 (or each site on a Ray cluster), "
        "as the recipe says; show progress; stop everything at the end, on Ctrl-C or when a site crashes.",
    )
    r.add_argument("recipe", type=Path, help="the recipe YAML (see recipes/quickstart.yaml)")
    r.add_argument(
        "--run-dir",
        type=lambda text: text if "://" in text else Path(text),
        help="logs, metrics and checkpoints go here; an existing run dir of the same recipe resumes, one of "
        "another is refused (default: runs/NAME-TIMESTAMP); a URL (s3://bucket/job) keeps the run in an object "
        "store, with a working copy on this machine",
    )
    add_log_level(r, "warning", " (RUN_DIR/aggregator.log is at info whatever it says)")
    r.add_argument(
        "--tls",
        action="store_true",
        help="mTLS between the sites and the aggregator: provision a CA and startup kits into RUN_DIR/kits first",
    )
    r.add_argument(
        "--backend",
        choices=("process", "ray"),
        help="where the sites run (default: the recipe's `backend`, else one process per site on this machine)",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="run the sites on this Ray cluster (implies --backend ray; default: start Ray on 127.0.0.1)",
    )


def run_command(args: argparse.Namespace) -> int:
    from fl_plugins.aggregator.remote import is_url, working_copy
    from fl_plugins.recipe import load_recipe
    from fl_plugins.runner import Terminated, default_run_dir, run

    url = args.run_dir if is_url(args.run_dir) else None  # an object store: its working copy here (remote.py)
    recipe = load_recipe(args.recipe)
    recipe = dataclasses.replace(recipe, backend=recipe.backend.with_cli(args.backend, args.ray_address))

    def _int(*_: object) -> NoReturn:
        raise KeyboardInterrupt

    def _term(*_: object) -> NoReturn:
        raise Terminated

    # SIGTERM (exit 143) and SIGINT (exit 130, even where a shell started us with it ignored) stop the sites and
    # the aggregator
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _int)
    run_dir = working_copy(url) if url else args.run_dir or default_run_dir(recipe)
    return run(recipe, run_dir, tls=args.tls, store_url=url)


def add_report(sub: Any) -> None:
    e = sub.add_parser(
        "report",
        help="print a run's per-round table and write its plots",
        description="Read RUN_DIR (metrics.jsonl, logs.jsonl, summary.json, baselines.json), print the per-round "
        "table and write PNG plots into RUN_DIR/report.",
    )
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory of `fl-plugins run` or `server`")
    e.add_argument("--no-plots", action="store_true", help="only print the table")
    e.add_argument("--partial", action="store_true", help="report an unfinished run as far as it got")
    add_log_level(e, "warning")


def report_command(args: argparse.Namespace) -> int:
    from fl_plugins.report import report

    report(args.run_dir, plots=not args.no_plots, partial=args.partial)
    return 0
