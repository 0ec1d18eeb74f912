"""The package's public surface: cheap to import, a pinned __all__, generated code in sync with its .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fl_plugins
import fl_plugins.client

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["fl_plugins", "fl_plugins.errors", "fl_plugins.client"])
def test_import_is_cheap(module):
    heavy = ("torch", "lightning", "transformers", "grpc")
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import {module} loaded {out}"


def test_aggregator_never_imports_torch():
    code = ("import sys, fl_plugins.aggregator.service, fl_plugins.cli, fl_plugins.wire.stream;"
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_exported_members():
    assert fl_plugins.__all__ == sorted(fl_plugins.__all__)
    assert fl_plugins.__all__ == ["AuthError", "ConfigError", "FLError", "IntegrityError", "MissingDependencyError",
                                  "ModelMismatchError", "PolicyError", "ProtocolError", "RoundError", "TransportError",
                                  "__version__"]  # fmt: skip
    flare_names = {"init", "receive", "send", "is_running", "get_site_name", "get_job_id", "get_task_name",
                   "system_info", "is_train", "is_evaluate", "is_submit_model", "log", "shutdown", "FLModel",
                   "ParamsType"}  # fmt: skip
    assert flare_names <= set(fl_plugins.client.__all__)
    assert fl_plugins.client.__all__ == sorted(fl_plugins.client.__all__)


def test_errors_subclass_the_stdlib_type_they_resemble():
    assert issubclass(fl_plugins.ConfigError, ValueError)
    assert issubclass(fl_plugins.TransportError, ConnectionError)
    assert issubclass(fl_plugins.IntegrityError, fl_plugins.ProtocolError)


def test_generated_protobuf_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    proto_dir = ROOT / "fl_plugins" / "wire" / "proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", str(proto_dir / "fl.proto")], check=True)  # fmt: skip
    for name in ("fl_pb2.py", "fl_pb2.pyi"):
        assert (tmp_path / name).read_text() == (proto_dir / name).read_text(), f"{name} drifted: run `make proto`"


def test_cli_help_and_bad_flags():
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "server", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--initial-model" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "server", "--run-dir", "x", "--rounds", "0"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "`rounds` (--rounds) must be an integer >= 1 (got 0)" in bad.stderr


def test_the_trainer_faces_are_the_client_api_plus_patch():
    """`import fl_plugins.lightning as flare` / `fl_plugins.hf`: every client-API name, with receive, is_running
    and shutdown routed through the round driver."""
    pytest.importorskip("transformers")
    import fl_plugins.hf
    import fl_plugins.lightning
    from fl_plugins.integrations import face

    for mod, extra in ((fl_plugins.lightning, {"patch"}), (fl_plugins.hf, {"patch", "FLTrainerCallback",
                                                                            "exchanged_state"})):  # fmt: skip
        assert set(mod.__all__) == set(fl_plugins.client.__all__) | extra
        assert all(getattr(mod, n) is getattr(face, n) for n in ("receive", "is_running", "shutdown"))
