"""A site learns fast what is wrong (issue 17), against real aggregators on 127.0.0.1 over real gRPC.

- A connection that waiting cannot mend (a TLS handshake that cannot succeed) fails at once, timed as well under
  the connect timeout; what waiting can mend (nothing listening yet, a proxy closing connections while its
  aggregator restarts) is waited out for the whole connect timeout.
- A site waiting for an aggregator says so on its log, and the waits come from init(), FL_CONNECT_TIMEOUT /
  FL_RETRY_TIMEOUT and `fl-plugins client --connect-timeout / --retry-timeout`, a bad value named with its source.
- An aggregator gone mid-job is reported once it has been silent for the retry timeout, as one line.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import fl_plugins.client as flare
from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.client import api, reach
from fl_plugins.client.reach import diagnose, reason_of
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import ConfigError, TransportError

pytest.importorskip("cryptography")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"name": "feedback", "server": "127.0.0.1:8443", "sites": ["site-1", "site-2"], "validity_days": 30}
INITIAL = {"w": np.arange(4, dtype=np.float32)}


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    from fl_plugins.security.provision import parse_project, provision

    root = tmp_path_factory.mktemp("kits")
    return provision(parse_project(PROJECT, root / "project.yaml"), root / "kits")


@pytest.fixture
def api_session():
    yield flare
    flare.shutdown()


def _server(run_dir: Path, kit: Path | None = None, address: str = "127.0.0.1:0") -> AggregatorServer:
    from safetensors.numpy import save_file  # not conftest's save_numpy: these tests need no torch

    init = run_dir.parent / f"{run_dir.name}.safetensors"
    save_file(INITIAL, str(init))
    cfg = AggregatorConfig(run_dir=run_dir, rounds=2, min_sites=1, initial_model=init, linger=0.2)
    return AggregatorServer(cfg, address, kit=kit).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(address: str, connect_timeout: float, **kw) -> tuple[BaseException | None, float]:
    """The error connect() ended with (None if it connected) and the seconds it took."""
    c = SiteClient(address, connect_timeout=connect_timeout, heartbeat=0, **kw)
    start = time.monotonic()
    try:
        c.connect()
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e, time.monotonic() - start
    finally:
        c.close()
    return None, time.monotonic() - start


# -- what gRPC reports, and what it means -----------------------------------------------------------------------

LAST = "failed to connect to all addresses; last error: "
VERIFY = (
    "UNKNOWN: ipv4:127.0.0.1:41473: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:"
    "SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
PLAIN = (
    "UNKNOWN: ipv4:127.0.0.1:43925: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:"
    "SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)
HOST = (
    "UNKNOWN: ipv4:127.0.0.1:33183: Custom verification check failed with error: UNAUTHENTICATED: Hostname "
    "Verification Check failed."
)
REFUSED = "UNKNOWN: ipv4:127.0.0.1:57249: Failed to connect to remote host: Connection refused"


@pytest.mark.parametrize(
    ("details", "reason", "fatal", "hint"),
    [
        (VERIFY, "TLS handshake failed: CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate", True,
         "did not verify against the kit's ca.crt"),
        (PLAIN, "TLS handshake failed: WRONG_VERSION_NUMBER: Invalid certificate verification context", True,
         "the aggregator does not speak TLS: it was started without --kit"),
        (HOST, "Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.",
         True, "the aggregator's certificate does not name the host '127.0.0.1'"),
        ("UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed: SSL_ERROR_SSL: TLSV1_ALERT_UNKNOWN_CA", None, True,
         "closed the connection during the TLS handshake: it refuses this site's certificate"),
        (REFUSED, "Failed to connect to remote host: Connection refused", False,
         "check that `fl-plugins server` runs there"),
        ("UNAVAILABLE: DNS resolution failed for nowhere.invalid:1", None, False, "FL_CONNECT_TIMEOUT"),
    ],
)  # fmt: skip
def test_failed_connections_are_read_conservatively(kits, details, reason, fatal, hint):
    from fl_plugins.security.tls import load_site_kit

    d = diagnose(LAST + details, load_site_kit(kits.sites["site-1"]), "127.0.0.1:8443")
    assert (d.fatal, hint in d.hint) == (fatal, True), d
    if reason is not None:
        assert d.reason == reason == reason_of(LAST + details)
    mid_call = diagnose(details, load_site_kit(kits.sites["site-1"]), "127.0.0.1:8443")
    assert not mid_call.fatal  # only a connection being made, not one that dropped mid-call, fails at once


# -- a TLS failure that waiting cannot mend fails at once ------------------------------------------------------


def _kits_at_fault(kits, tmp_path: Path) -> dict[str, dict]:
    """Sites whose connection to the project's mTLS aggregator cannot succeed, as SiteClient arguments."""
    from fl_plugins.security.ca import CertificateAuthority
    from fl_plugins.security.provision import parse_project, provision_local, write_site_kit
    from fl_plugins.security.tls import load_site_kit

    other = provision_local(tmp_path / "other", ["site-1"])  # another project: its own CA
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    project = parse_project(PROJECT, kits.root.parent / "project.yaml")
    expired = write_site_kit(CertificateAuthority.load(kits.ca), tmp_path / "exp", "site-1", project, now=past, days=1)
    mine = load_site_kit(kits.sites["site-1"])
    theirs = load_site_kit(other.sites["site-1"])
    return {
        "plaintext": dict(site="site-1"),
        "no client certificate": dict(kit=replace(mine, cert=None, key=None)),
        "another CA's certificate": dict(kit=replace(mine, cert=theirs.cert, key=theirs.key)),
        "expired": dict(kit=replace(mine, cert=(expired / "client.crt").read_bytes(),
                                    key=(expired / "client.key").read_bytes())),
        "another project's kit": dict(kit=other.sites["site-1"]),
    }  # fmt: skip


@pytest.mark.integration
def test_a_tls_failure_that_waiting_cannot_mend_fails_well_under_the_connect_timeout(kits, tmp_path):
    connect_timeout = 30.0
    tls, plain = _server(tmp_path / "tls", kits.server), _server(tmp_path / "plain")
    cases = {name: (tls.address, kw) for name, kw in _kits_at_fault(kits, tmp_path).items()}
    cases["a kit at a plaintext aggregator"] = (plain.address, dict(kit=kits.sites["site-1"]))
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            runs = [pool.submit(_connect, address, connect_timeout, **kw) for address, kw in cases.values()]
            got = dict(zip(cases, (r.result() for r in runs), strict=True))
    finally:
        tls.stop(0)
        plain.stop(0)
    for name, (err, took) in got.items():
        assert isinstance(err, TransportError), (name, err)
        assert took < connect_timeout / 3, (name, took)
        assert str(err).startswith(f"connect: cannot connect to the aggregator at {cases[name][0]} ("), name
    msg = {name: str(err) for name, (err, _) in got.items()}
    assert "answers a TLS handshake: if it serves with mTLS (`fl-plugins server --kit`), this site needs its " \
           "startup kit: FL_KIT, init(kit=...) or `fl-plugins client --kit`" in msg["plaintext"]  # fmt: skip
    refuses = "closed the connection during the TLS handshake: it refuses this site's certificate: "
    assert refuses + "the kit has no client certificate (client.crt)" in msg["no client certificate"]
    assert refuses + "it is not signed by the kit's CA (ca.crt)" in msg["another CA's certificate"]
    assert refuses + "it expired on " in msg["expired"]
    assert "CERTIFICATE_VERIFY_FAILED" in msg["another project's kit"]
    assert "did not verify against the kit's ca.crt" in msg["another project's kit"]
    assert "WRONG_VERSION_NUMBER" in msg["a kit at a plaintext aggregator"]
    assert "the aggregator does not speak TLS" in msg["a kit at a plaintext aggregator"]


class ClosingProxy:
    """A TCP listener that accepts and closes every connection at once, as a proxy does while the aggregator behind
    it restarts: the site sees "Socket closed", which must not count as a refusal."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.integration
def test_what_waiting_can_mend_is_waited_out_for_the_whole_connect_timeout(kits):
    connect_timeout = 1.5
    proxy = ClosingProxy()
    cases = {
        "nothing listens (plaintext)": (f"127.0.0.1:{_free_port()}", dict(site="site-1")),
        "nothing listens (mTLS)": (f"127.0.0.1:{_free_port()}", dict(kit=kits.sites["site-1"])),
        "a proxy closes (plaintext)": (proxy.address, dict(site="site-1")),
        "a proxy closes (mTLS)": (proxy.address, dict(kit=kits.sites["site-1"])),
    }
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            runs = [pool.submit(_connect, address, connect_timeout, **kw) for address, kw in cases.values()]
            got = dict(zip(cases, (r.result() for r in runs), strict=True))
    finally:
        proxy.close()
    for name, (err, took) in got.items():
        assert isinstance(err, TransportError), (name, err)
        assert took >= connect_timeout, (name, took)
        expected = f"connect: the aggregator at {cases[name][0]} did not answer within {connect_timeout:g} s ("
        assert str(err).startswith(expected), name
    assert proxy.accepted > 2  # it was tried again and again
    assert "Connection refused" in str(got["nothing listens (mTLS)"][0])
    assert "FL_CONNECT_TIMEOUT, init(connect_timeout=...)" in str(got["nothing listens (plaintext)"][0])
    assert "if it serves with mTLS (`fl-plugins server --kit`)" in str(got["a proxy closes (plaintext)"][0])


# -- a site waiting for its aggregator says so, for as long as it is told -------------------------------------


@pytest.mark.integration
def test_a_site_waiting_for_its_aggregator_says_so_and_connects_once_it_is_up(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(reach, "NOTICE", 0.3)  # a line every 0.3 s instead of 5 s
    address = f"127.0.0.1:{_free_port()}"
    said = threading.Event()

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for the aggregator" in record.getMessage():
                said.set()

    servers: list[AggregatorServer] = []

    def start_once_the_site_said_it_waits() -> None:
        said.wait(30)
        servers.append(_server(tmp_path / "run", address=address))

    handler = Said()
    logging.getLogger("fl_plugins.client").addHandler(handler)
    starter = threading.Thread(target=start_once_the_site_said_it_waits)
    starter.start()
    c = SiteClient(address, "late", connect_timeout=30, heartbeat=0)
    try:
        with caplog.at_level("WARNING", logger="fl_plugins.client"):
            c.connect()
        assert c.job_id
    finally:
        c.close()
        starter.join()
        logging.getLogger("fl_plugins.client").removeHandler(handler)
        for s in servers:
            s.stop(0)
    lines = [r.getMessage() for r in caplog.records if "waiting for the aggregator" in r.getMessage()]
    assert lines[0].startswith(f"site 'late': waiting for the aggregator at {address}, ")
    assert lines[0].endswith(" s left (UNAVAILABLE: Failed to connect to remote host: Connection refused)")
    assert all(r.levelname == "WARNING" for r in caplog.records if "waiting for" in r.getMessage())


@pytest.mark.parametrize(
    ("env", "kw", "expected"),
    [
        ({"FL_CONNECT_TIMEOUT": "soon"}, {}, "$FL_CONNECT_TIMEOUT must be a number of seconds > 0, e.g. 120 "
                                             "(got 'soon')"),
        ({"FL_RETRY_TIMEOUT": "0"}, {}, "$FL_RETRY_TIMEOUT must be a number of seconds > 0, e.g. 120 (got '0')"),
        ({"FL_CONNECT_TIMEOUT": "nan"}, {}, "(got 'nan')"),
        ({"FL_CONNECT_TIMEOUT": "5"}, {"connect_timeout": -1}, "init(connect_timeout=...) must be a number of "
                                                              "seconds > 0, e.g. 120 (got -1)"),
        ({}, {"retry_timeout": "a while"}, "init(retry_timeout=...) must be a number of seconds > 0"),
    ],
)  # fmt: skip
def test_a_bad_timeout_is_one_error_naming_where_it_came_from(api_session, monkeypatch, env, kw, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        api_session.init(f"127.0.0.1:{_free_port()}", "site-1", **kw)
    assert expected in str(e.value)
    with pytest.raises(ConfigError, match=r"connect_timeout must be a number of seconds > 0, e\.g\. 120 \(got inf\)"):
        SiteClient("127.0.0.1:1", "site-1", connect_timeout=float("inf"))


def test_the_connect_timeout_comes_from_the_environment(api_session, monkeypatch):
    monkeypatch.setenv("FL_CONNECT_TIMEOUT", "1.5")
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(TransportError, match=f"connect: the aggregator at {address} did not answer within 1.5 s "):
        api_session.init(address, "site-1")  # not the default 60 s


def test_fl_plugins_client_passes_the_timeouts_to_the_script_and_refuses_a_bad_one(tmp_path, capfd):
    from fl_plugins.cli import main

    show = "import os; print('ENV', os.environ['FL_CONNECT_TIMEOUT'], os.environ['FL_RETRY_TIMEOUT'])"
    base = ["client", "--server", "127.0.0.1:1", "--site", "site-1"]
    assert main([*base, "--connect-timeout", "90", "--retry-timeout", "120", "--", sys.executable, "-c", show]) == 0
    assert "ENV 90.0 120.0" in capfd.readouterr().out
    marker = tmp_path / "ran"
    assert main([*base, "--connect-timeout", "-3", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]) == 2
    assert "fl-plugins client: error: --connect-timeout must be a number of seconds > 0, e.g. 120 (got '-3')" in (
        capfd.readouterr().err
    )
    assert not marker.exists()


# -- an aggregator gone mid-job --------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_aggregator_gone_mid_job_is_reported_once_silent_for_the_retry_timeout(tmp_path, caplog, monkeypatch):
    """The site trains while the aggregator goes; the heartbeats notice, and the site's next call gives up at once
    as the aggregator has been silent for the whole retry timeout already (after NOTICE seconds of its own)."""
    monkeypatch.setattr(reach, "NOTICE", 0.3)
    srv = _server(tmp_path / "run")
    c = SiteClient(srv.address, "site-1", retry_timeout=2.0, heartbeat=0.1)
    try:
        c.connect()
        task = c.next_task()
        _, params = c.download(task, "numpy")
        with caplog.at_level("WARNING", logger="fl_plugins.client"):
            srv.stop(0)
            bound = time.monotonic() + 10 * c.retry_timeout
            while c.last_heard is None or time.monotonic() - c.last_heard < c.retry_timeout:
                assert time.monotonic() < bound, "the heartbeats went on hearing a stopped aggregator"
                time.sleep(0.05)  # training, meanwhile
            start = time.monotonic()
            with pytest.raises(TransportError) as e:
                c.upload(task.round, task.attempt, {k: v + 1 for k, v in params.items()}, {"params_type": "FULL"})
            took = time.monotonic() - start
    finally:
        c.close()
        srv.stop(0)
    assert took < c.retry_timeout  # the silence had lasted the whole retry timeout before the call
    msg = str(e.value)
    assert msg.startswith(f"begin upload: the aggregator at {srv.address} has not answered for "), msg
    silent = float(msg.split("has not answered for ")[1].split(" s")[0])
    assert silent >= c.retry_timeout
    assert "if it restarted with the same run directory, run this site again" in msg
    assert "a site gives up after 2 s of silence: FL_RETRY_TIMEOUT, init(retry_timeout=...)" in msg
    heartbeat = [r.getMessage() for r in caplog.records if "this site gives up after" in r.getMessage()]
    assert len(heartbeat) == 1 and heartbeat[0].startswith(f"site 'site-1': the aggregator at {srv.address} has not")


SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import fl_plugins.client as flare
    flare.init(params_format="numpy")
    m = flare.receive()
    print("RECEIVED", flush=True)
    while not os.path.exists(sys.argv[1]):  # the test stops the aggregator meanwhile
        time.sleep(0.02)
    flare.send(flare.FLModel(params={k: v + 1 for k, v in m.params.items()}))
    """
)


@pytest.mark.integration
def test_a_script_whose_aggregator_went_ends_with_one_line_and_a_nonzero_exit(tmp_path):
    script, go = tmp_path / "train.py", tmp_path / "go"
    script.write_text(SCRIPT)
    srv = _server(tmp_path / "run")
    env = {**os.environ, "FL_SERVER": srv.address, "FL_SITE": "site-1", "FL_RETRY_TIMEOUT": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(go)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "RECEIVED"
        srv.stop(0)
        go.touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop(0)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fl-plugins: begin upload: the aggregator at {srv.address} has not answered for "), err
    assert "run this site again" in last and "a site gives up after 1 s of silence: FL_RETRY_TIMEOUT" in last


def test_only_our_connection_errors_lose_their_traceback(capsys):
    seen: list[type[BaseException]] = []
    hook = api.OneLineErrors(lambda kind, value, tb: seen.append(kind))
    hook(TransportError, TransportError("connect: the aggregator at h:1 did not answer\nin 60 s"), None)
    assert capsys.readouterr().err == "fl-plugins: connect: the aggregator at h:1 did not answer in 60 s\n"
    hook(ValueError, ValueError("a bug in the script"), None)
    hook(ConfigError, ConfigError("send() without a received task"), None)
    assert seen == [ValueError, ConfigError] and capsys.readouterr().err == ""  # the previous hook's traceback
    previous = sys.excepthook
    try:
        api.install_one_line_errors()
        api.install_one_line_errors()
        assert isinstance(sys.excepthook, api.OneLineErrors) and not isinstance(
            sys.excepthook.previous, api.OneLineErrors
        )
    finally:
        sys.excepthook = previous
