"""README.md's "Running a real federation", run as written: provision -> server -> sites -> status -> report ->
final model, each command of its bash block in order, in a fresh folder, on 127.0.0.1 with a free port.

The block is read from the README (not copied here), so a command edited there is the command tested. A line that
ends in `&` starts in the background, as a shell would; the aggregator's line is waited for until it says it
listens (as a person waits for it before starting the sites); `wait` waits for every background command and
checks each exited 0. Each foreground command must exit 0."""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Running a real federation"


def _blocks(kind: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{kind}\n(.*?)```", section, re.S)


def _commands() -> list[str]:
    (block,) = _blocks("bash")
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "fl-plugins":
        return [sys.executable, "-m", "fl_plugins.cli", *argv[1:]]
    return [sys.executable if a == "python" else a for a in argv]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    for name in ("FL_SERVER", "FL_SITE", "FL_KIT", "FL_INSECURE"):
        env.pop(name, None)
    return env


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen) -> None:
    """Until `log` holds `text`, or fail when the process ended without printing it (no fixed sleep decides)."""
    while text not in log.read_text():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before printing {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    port = _free_port()
    (project,) = _blocks("yaml")
    (tmp_path / "project.yaml").write_text(project.replace("port: 8443", f"port: {port}"))
    for name in ("recipes", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env, background, outputs = _env(), [], {}
    commands = _commands()
    assert [c.split()[1] for c in commands if c.startswith("fl-plugins")] == [
        "provision", "server", "client", "status", "client", "client", "report"
    ]  # fmt: skip
    for i, command in enumerate(commands):
        if command == "wait":
            for proc, what, log in background:
                proc.wait(timeout=300)
                outputs[what] = log.read_text()
                assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{outputs[what][-3000:]}"
            background = []
            continue
        if command.startswith("ls "):
            outputs[command] = sorted(p.name for p in (tmp_path / command.split()[1]).iterdir())
            continue
        argv = _argv(command.rstrip("&").strip().replace("127.0.0.1:8443", f"127.0.0.1:{port}"))
        if command.endswith("&"):
            log = tmp_path / f"background-{i}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
            background.append((proc, command, log))
            if " server " in command:  # the operator waits for its line before starting the sites
                _wait_for_line(log, "listening on", proc)
            continue
        done = subprocess.run(argv, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        outputs[command] = done.stdout
    assert not background, "the README's block must end its background commands with `wait`"

    status = next(out for c, out in outputs.items() if c.startswith("fl-plugins status"))
    assert "quickstart" in status and "round" in status, status  # the job (the recipe's name), as the operator sees it
    report = next(out for c, out in outputs.items() if c.startswith("fl-plugins report"))
    assert "final" in report, report  # the final model's evaluation is the table's last row
    final = next(out for c, out in outputs.items() if c.startswith("ls "))
    assert "manifest.json" in final and any(name.endswith(".safetensors") for name in final), final
    shard = next(p for p in (tmp_path / "runs" / "job1" / "final").iterdir() if p.suffix == ".safetensors")
    with safe_open(str(shard), "np") as f:
        assert len(list(f.keys())) > 0
