"""What the YAML files a user writes (recipes, project files, a recipe's `task:`) share: reading them, and the
checks whose errors name the file, the key path, what must hold and what was got, with a did-you-mean."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError


def load_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML at `path` (`what` names the kind of file in errors: "recipe", "project file")."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist (looked for {path.resolve()})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


class Checker:
    """Checks of one file's values; `prefix` is prepended to every key path (e.g. "task.")."""

    def __init__(self, source: Path, prefix: str = "") -> None:
        self.source = source
        self.prefix = prefix

    def fail(self, key: str, must: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.source}: `{self.prefix}{key}` {must} (got {got!r})")

    def unknown(self, key: Any, known: Iterable[str], where: str = "") -> ConfigError:
        known = list(known)
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        at = f"{self.prefix}{where}"
        hint = f"; did you mean `{at}{close[0]}`?" if close else f"; known keys: {', '.join(known)}"
        return ConfigError(f"{self.source}: unknown key `{at}{key}`{hint}")

    def keys(self, d: dict, known: Iterable[str], where: str = "") -> None:
        known = list(known)
        for k in d:
            if k not in known:
                raise self.unknown(k, known, where)

    def integer(self, key: str, v: Any, lo: int, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise self.fail(key, f"must be an integer {f'>= {lo}' if hi is None else f'in {lo}..{hi}'}", v)
        return v

    def number(self, key: str, v: Any, lo: float, hi: float | None = None, *, open_lo: bool = False) -> float:
        bad = isinstance(v, bool) or not isinstance(v, (int, float))
        if not bad:
            bad = (v <= lo if open_lo else v < lo) or (hi is not None and v > hi)
        if bad:
            rng = f"> {lo}" if open_lo else f">= {lo}"
            raise self.fail(key, f"must be a number {rng}" + (f" and <= {hi}" if hi is not None else ""), v)
        return float(v)

    def choice(self, key: str, v: Any, options: tuple[str, ...]) -> str:
        if v not in options:
            close = difflib.get_close_matches(str(v), options, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.fail(key, f"must be one of {', '.join(options)}{hint}", v)
        return v
