"""The shape rules of issue 11, checked on fl_plugins/: modules under MAX_LINES lines, functions under MAX_FUNC
lines, no `# fmt: skip`, and no module reaching into another's private names (`from m import _x`, `m._x`).

`python tools/shape.py [PATH...]` prints each breach as `path:line: rule: detail` and exits 1 if there is one;
tests/test_shape.py runs it over the package."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 450
MAX_FUNC = 60
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fl_plugins"
GENERATED = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def breaches(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if len(lines) >= MAX_LINES:
        yield f"{rel}:1: module: {len(lines)} lines (under {MAX_LINES})"
    for i, line in enumerate(lines, 1):
        if "fmt: skip" in line or "fmt: off" in line:
            yield f"{rel}:{i}: format: a formatter skip"
    tree = ast.parse(text, str(path))
    imported: set[str] = set()  # names bound to fl_plugins modules
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNC:
                yield f"{rel}:{node.lineno}: function: {node.name} is {n} lines (at most {MAX_FUNC})"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fl_plugins"):
            for a in node.names:
                if _private(a.name) and not _sibling(path, f"{node.module}.{a.name}"):
                    yield f"{rel}:{node.lineno}: private: imports {a.name} from {node.module}"
                imported.add(a.asname or a.name)
            if _private(node.module.rsplit(".", 1)[-1]) and not _sibling(path, node.module):
                yield f"{rel}:{node.lineno}: private: imports from the private module {node.module}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fl_plugins"):
                    imported.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            if node.value.id in imported:
                yield f"{rel}:{node.lineno}: private: uses {node.value.id}.{node.attr}"


def _sibling(path: Path, dotted: str) -> bool:
    """A private module or name may be used inside its own package (the importer sits in that package's folder)."""
    parts = dotted.split(".")
    owner = next((i for i, p in enumerate(parts) if _private(p)), len(parts))
    package = ROOT.joinpath(*parts[:owner])
    return path.resolve().is_relative_to(package) and package != ROOT


def files(args: list[str]) -> list[Path]:
    roots = [Path(a) for a in args] or [PACKAGE]
    out = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*.py")))]
    return [p.resolve() for p in out if not p.name.endswith(GENERATED)]


def main(argv: list[str]) -> int:
    found = [b for p in files(argv) for b in breaches(p)]
    print("\n".join(found) or "shape: no breach")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
