"""The aggregator's operator log (issue 17): refusals and presence.

* Refusals past the TLS handshake (SiteAuth, security/refusals.py): one WARNING each with the caller's address,
  its certificate's name and the reason, repeats counted, against a real mTLS aggregator in this process.
* Refusals inside gRPC's TLS handshake (security/handshake_log.py): a real `fl-plugins server --kit` process,
  dialled in plaintext, without a certificate, with another project's certificate and with an expired one; its
  stderr and RUN_DIR/aggregator.log hold one WARNING per reason (and the count of the repeats), no raw gRPC line,
  and everything else it printed. The bridge's parts: its pass-through, and output written just before the process
  dies.
* Presence (aggregator/presence.py): the aggregator driven with a fake clock, its log lines captured.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from fl_plugins.aggregator.core import Aggregator, AggregatorConfig, TaskKind
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import AuthError
from fl_plugins.security import handshake_log, stderr_filter
from fl_plugins.security.handshake_log import HandshakeLog, reason
from fl_plugins.security.refusals import RefusalLog
from fl_plugins.security.tls import load_site_kit

pytest.importorskip("cryptography")

from fl_plugins.security.provision import (  # noqa: E402 - needs cryptography
    CertificateAuthority,
    Kits,
    Project,
    ServerSpec,
    provision_local,
    write_site_kit,
)

ROOT = Path(__file__).resolve().parents[1]
REFUSALS = "fl_plugins.security.refusals"
PRESENCE = "fl_plugins.aggregator.presence"
# gRPC's line for a failed handshake, as grpcio 1.85 prints it (the error text is what handshake_log.reason reads)
GRPC_LINE = (
    "I1205 21:33:35.365701   11530 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: {}"
)
PLAINTEXT = (
    "error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context"
)
EXPIRED = "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired"
NO_CERT = "error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate"
OTHER_CA = (
    "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
)
FAILED_WAIT = 30.0  # seconds a refused client may take to see its connection fail (it fails at once; a bound only)


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Kits:
    return provision_local(tmp_path_factory.mktemp("kits"), ["site-1", "site-2"], name="ops")


def _kit_of(kits: Kits, into: Path, name: str, **kw) -> Path:
    """A site kit from the project's own CA (`name` need not be in the project; `now`/`days` for an old one)."""
    project = Project("ops", ServerSpec("127.0.0.1", 0, ("localhost",)), ("site-1", "site-2"), 30)
    return write_site_kit(CertificateAuthority.load(kits.ca), into, name, project, **kw)


# -- refusals: rate limit ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _warnings(caplog, logger: str = REFUSALS) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def test_a_repeated_refusal_is_counted_and_the_count_told_with_the_next_line(caplog):
    clock = Clock()
    refusals = RefusalLog(60.0, clock=clock)
    caplog.set_level(logging.WARNING, REFUSALS)
    assert refusals.refused(("10.0.0.7", "x"), "refused x")
    clock.t += refusals.every / 2
    assert not any([refusals.refused(("10.0.0.7", "x"), "refused x") for _ in range(4)])
    assert refusals.refused(("10.0.0.8", "x"), "refused x from another peer")  # another key: its own line
    assert _warnings(caplog) == ["refused x", "refused x from another peer"]
    clock.t += refusals.every / 2  # the interval is over: the next one is logged, with the count of the others
    assert refusals.refused(("10.0.0.7", "x"), "refused x")
    assert _warnings(caplog)[-1] == f"refused x [refused 4 more times in the last {refusals.every:.0f} s]"

    caplog.clear()
    refusals.refused(("10.0.0.7", "x"), "refused x")  # counted; told by a flush once its interval is over
    refusals.flush()
    assert _warnings(caplog) == []
    clock.t += refusals.every
    refusals.flush()
    assert _warnings(caplog) == [f"refused x [refused 1 more time in the last {refusals.every:.0f} s]"]


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (PLAINTEXT, "a caller spoke plaintext to this mTLS port (WRONG_VERSION_NUMBER); a site started without"),
        (NO_CERT, "a caller presented no client certificate (PEER_DID_NOT_RETURN_A_CERTIFICATE)"),
        (OTHER_CA, "a caller's certificate is not signed by this project's CA (CERTIFICATE_VERIFY_FAILED)"),
        (EXPIRED, "a caller's certificate has expired (CERTIFICATE_VERIFY_FAILED); ask the project's admin"),
        ("error:1:SSL routines:OPENSSL_internal:SOMETHING_NEW", "the handshake failed (error:1:SSL routines"),
    ],
)
def test_each_handshake_failure_is_named_with_its_fix(error, says):
    kind, message = reason(error)
    assert message.startswith("refused a TLS connection: ") and says in message


# -- refusals past the handshake: SiteAuth -------------------------------------------------------------------------


@pytest.mark.integration
def test_refused_calls_are_logged_with_the_callers_address_certificate_and_reason(kits, tmp_path, caplog):
    intruder = _kit_of(kits, tmp_path / "intruder", "intruder")
    cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=1, linger=0.0)
    srv = AggregatorServer(cfg, "127.0.0.1:0", kit=kits.server).start()
    caplog.set_level(logging.WARNING, REFUSALS)
    try:
        for _ in range(3):  # a site that retries: one line, the repeats counted
            c = SiteClient(srv.address, kit=intruder, heartbeat=0)
            with pytest.raises(AuthError, match="site 'intruder' is not in project 'ops'"):
                c.connect()
            c.close()
        impostor = SiteClient(srv.address, kit=load_site_kit(kits.sites["site-1"]), heartbeat=0)
        impostor.site = "site-2"  # a modified client that claims another site's name
        with pytest.raises(AuthError, match="claims to be site 'site-2'"):
            impostor.connect()
        impostor.close()
    finally:
        srv.stop(0)
    lines = _warnings(caplog)
    assert len(lines) == 2, lines
    peer = r"refused a call from 127\.0\.0\.1:\d+ "
    assert re.match(
        peer + r"\(certificate 'intruder'\): site 'intruder' is not in project 'ops' \(its sites: site-1, "
        r"site-2\); to add it, .*`fl-plugins provision` again",
        lines[0],
    ), lines[0]
    assert re.match(
        peer + r"\(certificate 'site-1'\): the request claims to be site 'site-2', but its certificate "
        r"is site 'site-1'",
        lines[1],
    ), lines[1]


# -- refusals inside the handshake: the stderr bridge --------------------------------------------------------------


def test_the_bridge_passes_other_output_unchanged_and_turns_handshake_lines_into_warnings(tmp_path, caplog):
    caplog.set_level(logging.WARNING, REFUSALS)
    out = tmp_path / "stderr"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    other = [b"INFO plain text\n", "naïve ünïcode\n".encode(), b"\x00\xff binary \x1b[31m\n", b"x" * 70_000 + b"\n"]
    try:
        bridge = HandshakeLog(fd=fd).start()
        for i in range(3):
            os.write(fd, other[i % len(other)])
            os.write(fd, (GRPC_LINE.format(PLAINTEXT) + "\n").encode())
        os.write(fd, other[3] + GRPC_LINE.format(NO_CERT).encode() + b"\n" + b"a partial line")
        bridge.stop()
        bridge.stop()  # idempotent
        os.write(fd, b"after the stop\n")  # fd leads where it led before
    finally:
        os.close(fd)
    expected = other[0] + other[1] + other[2] + other[3] + b"a partial lineafter the stop\n"
    assert out.read_bytes() == expected
    plain, no_cert = reason(PLAINTEXT)[1], reason(NO_CERT)[1]
    lines = _warnings(caplog)
    assert lines[:2] == [plain, no_cert] and len(lines) == 3, lines
    assert re.fullmatch(re.escape(plain) + r" \[refused 2 more times in the last \d+ s\]", lines[2]), lines[2]


def test_the_bridge_hands_on_a_partial_line_without_waiting_for_its_end(tmp_path):
    out = tmp_path / "stderr"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    bridge = HandshakeLog(fd=fd).start()
    try:
        os.write(fd, b"Downloading 42%")  # a progress line that is not ended yet
        seen = threading.Event()

        def look() -> None:
            while not seen.is_set() and out.read_bytes() != b"Downloading 42%":
                seen.wait(stderr_filter.PARTIAL_WAIT)
            seen.set()

        t = threading.Thread(target=look)
        t.start()
        t.join(100 * stderr_filter.PARTIAL_WAIT)
        assert out.read_bytes() == b"Downloading 42%", "a partial line must not wait for its end"
    finally:
        seen.set()
        bridge.stop()
        os.close(fd)


def test_what_the_aggregator_writes_just_before_it_dies_is_not_lost():
    code = (
        "import os\n"
        "from fl_plugins.security.handshake_log import install\n"
        "assert install() is not None\n"
        "os.write(2, b'last words before the crash\\n')\n"
        "os._exit(3)\n"  # no cleanup at all: the filter process still copies what the pipe holds
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60)
    assert p.returncode == 3
    assert p.stderr.endswith(b"last words before the crash\n"), p.stderr


def _fail_to_connect(address: str, creds: grpc.ChannelCredentials | None) -> None:
    """One connection the aggregator's TLS handshake refuses: dial, wait for the failure, hang up."""
    own = [("grpc.use_local_subchannel_pool", 1)]  # its own connection, not one shared with the other channels
    channel = grpc.secure_channel(address, creds, own) if creds is not None else grpc.insecure_channel(address, own)
    failed = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            failed.set()

    channel.subscribe(on_state, try_to_connect=True)
    try:
        assert failed.wait(FAILED_WAIT), "the aggregator should have refused this connection"
    finally:
        channel.unsubscribe(on_state)
        channel.close()


@pytest.mark.integration
def test_fl_plugins_server_logs_each_tls_refusal_once_with_its_reason(kits, tmp_path):
    run = tmp_path / "run"
    mine = load_site_kit(kits.sites["site-1"])
    other = load_site_kit(provision_local(tmp_path / "other", ["site-1"]).sites["site-1"])
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    expired = _kit_of(kits, tmp_path / "expired", "site-1", now=past, days=1)  # (load_site_kit would refuse it)
    cases = {
        PLAINTEXT: None,
        NO_CERT: grpc.ssl_channel_credentials(root_certificates=mine.ca),
        OTHER_CA: grpc.ssl_channel_credentials(mine.ca, other.key, other.cert),
        EXPIRED: grpc.ssl_channel_credentials(
            mine.ca, *(Path(expired, f).read_bytes() for f in ("client.key", "client.crt"))
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "fl_plugins.cli",
        "server",
        "--kit",
        str(kits.server),
        "--address",
        "127.0.0.1:0",
        "--rounds",
        "1",
        "--run-dir",
        str(run),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}  # gRPC's defaults
    agg = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in agg.stdout or ():
            if address := re.search(r"listening on (\S+)", line):
                break
        assert address, "the aggregator did not start"
        dials = [*cases.values(), *cases.values()]  # each refused twice: the second one is counted, not logged
        with ThreadPoolExecutor(len(dials)) as pool:
            list(pool.map(lambda creds: _fail_to_connect(address[1], creds), dials))
    finally:
        agg.send_signal(signal.SIGTERM)
        _, err = agg.communicate(timeout=60)
    assert "ssl_transport_security" not in err, err  # no raw gRPC line
    assert "INFO fl_plugins.aggregator.service: aggregator listening on" in err  # the rest passes unchanged
    log_file = (run / "aggregator.log").read_text()
    for error in cases:
        message = reason(error)[1]
        lines = [x for x in err.splitlines() if message in x]
        assert len([x for x in lines if "[refused" not in x]) == 1, (error, lines)  # once, at the first refusal
        assert any(re.search(r"\[refused \d+ more times? in the last \d+ s\]$", x) for x in lines), lines  # the rest
        assert f"WARNING fl_plugins.security.refusals: {message}" in log_file


# -- presence ------------------------------------------------------------------------------------------------------


def _aggregator(tmp_path: Path, clock: Clock, **kw) -> Aggregator:
    from safetensors.numpy import save_file  # (no torch: these tests stay quick)

    init = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, str(init))
    kw = {"site_timeout": 60.0, "presence_every": 30.0, **kw}
    return Aggregator(
        AggregatorConfig(run_dir=tmp_path / "run", rounds=2, initial_model=init, linger=0.0, **kw), clock=clock
    )


def _lines(caplog) -> list[tuple[str, str]]:
    out = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == PRESENCE]
    caplog.clear()
    return out


def test_a_waiting_round_says_who_is_connected_silent_dropped_and_back(tmp_path, caplog):
    clock = Clock()
    agg = _aggregator(tmp_path, clock, min_sites=4)
    timeout, every, t0 = agg.config.site_timeout, agg.config.presence_every, clock.t
    caplog.set_level(logging.INFO, PRESENCE)
    try:
        for site in ("site-1", "site-2", "site-3"):
            agg.hello(site, False)
        agg.step()  # the wait begins: its first line comes `every` seconds later
        clock.t += every - 1
        agg.step()
        assert _lines(caplog) == []
        clock.t += 1
        agg.heartbeat("site-1")
        agg.heartbeat("site-2")
        agg.step()
        assert _lines(caplog) == [
            (
                "INFO",
                f"round 0 waiting for 1 more site (3 of 4 connected); connected: site-1, "
                f"site-2; silent: site-3 for {every:.0f} s",
            )
        ]

        clock.t = t0 + timeout  # site-3's silence reaches --site-timeout: it is dropped, once
        agg.heartbeat("site-1")
        agg.heartbeat("site-2")
        agg.step()
        agg.step()
        assert _lines(caplog) == [
            (
                "WARNING",
                f"site 'site-3' dropped: silent for {timeout:.0f} s (--site-timeout {timeout:.0f} s); the "
                "job no longer waits for it",
            ),
            (
                "INFO",
                f"round 0 waiting for 2 more sites (2 of 4 connected); connected: site-1, site-2; silent: "
                f"site-3 for {timeout:.0f} s (dropped)",
            ),
        ]

        clock.t += 15
        agg.hello("site-3", False)  # its process starts again
        agg.step()
        agg.hello("site-1", False)  # a live site says Hello again: a new process or connection
        assert _lines(caplog) == [
            ("INFO", f"site 'site-3' reconnected after {timeout + 15:.0f} s (it had been dropped)"),
            ("INFO", "site 'site-1' reconnected after 15 s (a new process or connection)"),
        ]

        heard = agg.sites["site-2"].last_seen  # site-2 drops, then its heartbeats come back (a network that healed)
        clock.t += timeout - 1
        agg.hello("site-1", False)
        agg.heartbeat("site-3")
        agg.step()
        clock.t += 5
        agg.heartbeat("site-2")
        agg.step()
        assert [m for _, m in _lines(caplog) if "'site-2'" in m] == [
            f"site 'site-2' dropped: silent for {clock.t - 5 - heard:.0f} s (--site-timeout {timeout:.0f} s); the "
            "job no longer waits for it",
            f"site 'site-2' reconnected after {clock.t - heard:.0f} s (it had been dropped)",
        ]
    finally:
        agg.stop()


def test_a_started_round_names_the_sites_it_waits_for(tmp_path, caplog):
    clock = Clock()
    agg = _aggregator(tmp_path, clock, min_sites=2)
    every = agg.config.presence_every
    caplog.set_level(logging.INFO, PRESENCE)
    try:
        for site in ("site-1", "site-2"):
            agg.hello(site, False)
        assert agg.get_task("site-1", 0.0).kind is TaskKind.TRAIN
        agg.step()
        clock.t += every
        agg.heartbeat("site-1")
        agg.heartbeat("site-2")
        agg.step()
        assert _lines(caplog) == [
            ("INFO", "round 0 attempt 0 waiting for updates from site-1 (0 of 2 counted); connected: site-1, site-2")
        ]
        clock.t += every
        assert agg.get_task("site-2", 0.0).kind is TaskKind.TRAIN
        agg.heartbeat("site-1")
        agg.step()
        assert _lines(caplog) == [
            (
                "INFO",
                "round 0 attempt 0 waiting for updates from site-1, site-2 (0 of 2 counted); connected: site-1, site-2",
            )
        ]
    finally:
        agg.stop()


def test_presence_every_0_keeps_the_waiting_line_quiet(tmp_path, caplog):
    clock = Clock()
    agg = _aggregator(tmp_path, clock, min_sites=2, presence_every=0.0)
    caplog.set_level(logging.INFO, PRESENCE)
    try:
        agg.hello("site-1", False)
        for _ in range(3):
            agg.step()
            clock.t += agg.config.site_timeout / 2
        agg.heartbeat("site-1")
        agg.step()
        assert [m for _, m in _lines(caplog) if "waiting" in m] == []
    finally:
        agg.stop()


def test_the_bridge_is_not_installed_on_import():
    code = (
        "import os\n"
        "before = os.fstat(2)\n"
        "import fl_plugins.cli, fl_plugins.security.handshake_log\n"
        "print((before.st_dev, before.st_ino) == (os.fstat(2).st_dev, os.fstat(2).st_ino))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.stdout.strip() == "True", "importing must not take over stderr: only `fl-plugins server --kit` does"
    assert handshake_log.FILTER.is_file()


def test_a_heartbeat_is_answered_while_a_long_write_holds_the_lock_and_counted_at_the_next_step(tmp_path):
    """A long write under the coordinator's lock (an fsync of a big offered model) must not make the sites' heartbeats
    time out: the site would count the aggregator as silent and give up. The window is widened by holding the lock
    in another thread for as long as the test likes."""
    from fl_plugins.aggregator import core

    clock = Clock()
    agg = _aggregator(tmp_path, clock)
    try:
        agg.hello("site-1", False)
        before = agg.rounds.sites["site-1"].last_seen
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with agg.lock:
                held.set()
                release.wait()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        held.wait()
        clock.t += 30
        done = threading.Event()
        threading.Thread(target=lambda: (agg.heartbeat("site-1"), done.set()), daemon=True).start()
        assert done.wait(10 * core.HEARD_WAIT), "the heartbeat waited for the lock"  # (the lock is still held)
        assert agg.heard == {"site-1": clock.t} and agg.rounds.sites["site-1"].last_seen == before
        release.set()
        holder.join()
        agg.step()  # the next step tells what was heard
        assert agg.rounds.sites["site-1"].last_seen == clock.t and agg.heard == {}
    finally:
        agg.stop()
