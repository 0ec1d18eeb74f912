"""`--log-level`, the same on every command: a level name in any case. An unknown one is refused in one line,
``fl-plugins server: error: --log-level verbose: unknown level; choose one of debug, info, ...`` (exit 2, without
the command's usage above it), instead of a traceback from `logging.basicConfig`."""

from __future__ import annotations

import argparse
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level(text: str) -> str:
    """The level's name as logging spells it ("INFO"), whatever the case given; ValueError naming the levels."""
    if text.lower() not in LEVELS:
        raise ValueError(f"--log-level {text}: unknown level; choose one of {', '.join(LEVELS)} (any case)")
    return text.upper()


class _LogLevel(argparse.Action):
    """Stores `log_level(value)`; an unknown level exits 2 with that one line."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        try:
            setattr(ns, self.dest, log_level(str(value)))
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")


def add_log_level(parser: argparse.ArgumentParser, default: str, what: str = "") -> None:
    """Add `--log-level` to a command's parser; `what`: which messages it filters, when that needs saying."""
    parser.add_argument(
        "--log-level",
        action=_LogLevel,
        default=log_level(default),
        metavar="LEVEL",
        help=f"the console's log level{what}: {', '.join(LEVELS)} (default: {default.lower()})",
    )
