"""Issue 11's shape rules hold for the package: modules under 450 lines, functions of at most 60, no formatter
skips, no reaching into another package's private names (tools/shape.py), `ruff format` clean, and mypy clean
(pyproject.toml's [tool.mypy]: the ML stacks' own sources are not followed, so a cold run takes seconds)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import shape  # noqa: E402


def test_the_package_keeps_its_shape():
    found = [b for p in shape.files([]) for b in shape.breaches(p)]
    assert not found, "\n".join(found)


def test_the_shape_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    bad.write_text(
        f"from fl_plugins.client import api\n\ndef f():\n{body}\n    api._runtime()\n" + "y = 1  # fmt: skip\n"
    )
    found = list(shape.breaches(bad))
    assert any("function: f is" in b for b in found), found
    assert any("private: uses api._runtime" in b for b in found), found
    assert any("format:" in b for b in found), found


def test_ruff_format_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "format", "--check", "fl_plugins"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    out = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
