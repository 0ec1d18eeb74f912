"""`fl-plugins status` and the operator's certificate, against a real aggregator on 127.0.0.1 (port 0).

The admin kit written by `fl-plugins provision` sees the whole job over mTLS (every site with its state and last
contact, an upload held open mid-stream with its progress); a site's certificate sees only its own entries and
never acts as the operator, and the operator's certificate never acts as a site. Without a kit the command speaks
plaintext to a loopback aggregator. Failures are one line: refused (exit 2) or unreachable (exit 1, at once).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import save_numpy
from test_hostile import CHUNK, INITIAL, RawSite
from test_promises import Stalled, wait_for

from fl_plugins._text import human_bytes
from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.cli import main
from fl_plugins.errors import ConfigError
from fl_plugins.security.provision import Kits, load_project, parse_project, provision
from fl_plugins.security.tls import OPERATOR_OU, load_operator_kit, load_site_kit, subject_attributes
from fl_plugins.wire import rpc
from fl_plugins.wire.proto import fl_pb2 as pb

pytest.importorskip("cryptography")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT_YAML = """\
name: ops-project
server: {host: 127.0.0.1, port: 8443, alt_names: [localhost]}
sites: [site-1, site-2, site-3]
validity_days: 30
"""


def _provision(root: Path) -> Kits:
    (root / "project.yaml").write_text(PROJECT_YAML)
    return provision(load_project(root / "project.yaml"), root / "kits")


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Kits:
    return _provision(tmp_path_factory.mktemp("ops"))


def _server(tmp_path: Path, kit: Path | None, **cfg) -> AggregatorServer:
    init = save_numpy(tmp_path / "initial.safetensors", INITIAL)
    config = AggregatorConfig(
        run_dir=tmp_path / "run", rounds=1, min_sites=2, initial_model=init, linger=0.5, chunk_bytes=CHUNK, **cfg
    )
    return AggregatorServer(config, "127.0.0.1:0", kit=kit).start()


class KitSite(RawSite):
    """A RawSite over mTLS with a kit's certificate."""

    def __init__(self, address: str, kit: Path, *, operator: bool = False) -> None:
        k = load_operator_kit(kit) if operator else load_site_kit(kit)
        self.name, self.can_offer = k.name if operator else k.site, False  # type: ignore[union-attr]
        self.channel = rpc.secure_channel(address, k.credentials())
        self.stub = rpc.Stub(self.channel)
        if not operator:
            self.stub.Hello(pb.HelloRequest(site=self.name), timeout=10)

    def status(self) -> dict:
        return json.loads(self.stub.Status(pb.StatusRequest(), timeout=10).status_json)


def status(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["status", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- the operator's kit ---------------------------------------------------------------------------------------


def test_provision_writes_an_operator_kit_marked_in_its_signed_subject(kits, tmp_path, capsys):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate((kits.admin / "client.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin@ops-project"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == OPERATOR_OU
    site = x509.load_pem_x509_certificate((kits.sites["site-1"] / "client.crt").read_bytes())
    assert not site.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)  # sites carry no marker
    assert (kits.admin / "client.key").stat().st_mode & 0o077 == 0
    issued = [json.loads(x) for x in (kits.ca / "issued.jsonl").read_text().splitlines()]
    assert [r["common_name"] for r in issued if r["kind"] == "operator"] == ["admin@ops-project"]
    kit = load_operator_kit(kits.admin)
    assert (kit.name, kit.project, kit.server) == ("admin@ops-project", "ops-project", "127.0.0.1:8443")
    with pytest.raises(ConfigError, match=r"is the operator's kit \(for `fl-plugins status`\), not a site kit"):
        load_site_kit(kits.admin)
    with pytest.raises(ConfigError, match=r"`sites\[1\]` must be .* not 'ca' or 'server' or 'admin'"):
        parse_project({"server": "127.0.0.1:1", "sites": ["a", "admin"]}, "p.yaml")
    # an escaped separator in a common name cannot forge the marker
    assert f"OU={OPERATOR_OU}" not in subject_attributes(f"CN=x\\,OU={OPERATOR_OU}")
    assert f"OU={OPERATOR_OU}" in subject_attributes(f"CN=admin@p\\, x,OU={OPERATOR_OU}")

    (tmp_path / "project.yaml").write_text(PROJECT_YAML)
    assert main(["provision", str(tmp_path / "project.yaml"), "-o", str(tmp_path / "kits")]) == 0
    out = capsys.readouterr().out
    assert f"the operator's (ship to no site): fl-plugins status ADDRESS --kit {tmp_path / 'kits' / 'admin'}" in out


def test_the_operator_sees_every_site_and_an_upload_in_flight_a_site_only_itself(kits, tmp_path, capsys):
    srv = _server(tmp_path, kits.server)
    s1, s2 = KitSite(srv.address, kits.sites["site-1"]), KitSite(srv.address, kits.sites["site-2"])
    held = None
    try:
        s1.train_task()
        held = Stalled(s2, s2.train_task(), chunks=1)  # one chunk of three verified, the stream held open
        wait_for(lambda: any(u["offsets"] == [CHUNK] for u in srv.aggregator.status()["uploads"].values()), "chunk")
        planned = held.manifest.total_bytes

        rc, out, err = status(capsys, srv.address, "--kit", str(kits.admin))
        assert rc == 0, err
        assert (
            f"aggregator {srv.address}  job {srv.aggregator.job_id}  training, round 0 (the 1st of 1), attempt 0" in out
        )
        assert re.search(r"^  site-1  training +last contact \d+ s ago$", out, re.M), out
        assert re.search(r"^  site-2  uploading +last contact \d+ s ago$", out, re.M), out
        pct = f"{100 * CHUNK / planned:.0f}%"
        assert f"  site-2  round 0 update: {human_bytes(CHUNK)} of {human_bytes(planned)} ({pct})" in out
        assert "updates: 0 accepted, 0 refused, 0 lost" in out

        rc, out, _ = status(capsys, "--kit", str(kits.server), srv.address, "--json")  # the server kit's rule
        st = json.loads(out)
        assert rc == 0 and st["sites"] == ["site-1", "site-2"]
        assert {n: s["state"] for n, s in st["site_states"].items()} == {"site-1": "training", "site-2": "uploading"}
        (u,) = st["uploads"].values()
        assert (u["site"], u["bytes_verified"], u["bytes_planned"]) == ("site-2", CHUNK, planned)
        assert 0 <= st["site_states"]["site-1"]["last_contact_s"] < st["site_timeout"]

        # a site's certificate: its own entries only, whatever it names; never the operator's view
        mine = s1.status()
        assert (mine["site"], mine["sites"], mine["uploads"]) == ("site-1", ["site-1"], {})
        assert "bytes_received" not in mine and "site_states" not in mine
        with pytest.raises(grpc.RpcError) as e:  # naming another site does not show it
            s1.stub.Status(pb.StatusRequest(), metadata=(("fl-site", "site-2"),), timeout=10)
        assert "claims to be site 'site-2', but its certificate is site 'site-1'" in e.value.details()
        assert list(s2.status()["uploads"]) == list(st["uploads"])
        rc, out, err = status(capsys, srv.address, "--kit", str(kits.sites["site-1"]))
        assert rc == 2 and not out
        assert "is the kit of site 'site-1', not an admin kit" in err and "never gets the operator's view" in err

        # the operator's certificate never speaks for a site
        admin = KitSite(srv.address, kits.admin, operator=True)
        calls = {
            "Hello": pb.HelloRequest(site=""),
            "GetTask": pb.TaskRequest(wait_seconds=0),
            "BeginUpload": pb.UploadBegin(round=0, manifest_json=held.manifest.to_json()),
        }
        for call, req in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                getattr(admin.stub, call)(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, call
            assert "'admin@ops-project' is the operator's certificate" in e.value.details(), call
            assert "never train or send as a site" in e.value.details()
        assert admin.status()["sites"] == ["site-1", "site-2"]
        admin.close()
    finally:
        if held is not None:
            held.release()
        s1.close()
        s2.close()
        srv.stop(0)


def test_without_a_kit_plaintext_to_loopback_and_one_line_failures(kits, tmp_path, capsys):
    srv = _server(tmp_path, None)
    site = RawSite(srv.address, "site-a")
    try:
        rc, out, err = status(capsys, srv.address)
        assert rc == 0, err
        assert re.search(r"^  site-a  connected +last contact \d+ s ago$", out, re.M), out
        assert "uploads in flight: none" in out

        rc, out, err = status(capsys, srv.address, "--kit", str(kits.admin))  # TLS against plaintext
        assert rc == 2 and "does not speak TLS (started without --kit?): call it without --kit" in err
        rc, out, err = status(capsys, "10.1.2.3:8443")
        assert rc == 2 and "10.1.2.3:8443 is not a loopback address" in err and "pass --kit kits/admin" in err
    finally:
        site.close()
        srv.stop(0)


def test_an_aggregator_that_is_not_there_fails_at_once_and_a_refused_call_in_one_line(kits, tmp_path, capsys):
    other = _provision(tmp_path)  # another project: another CA
    srv = _server(tmp_path, kits.server)
    timeout = 30.0
    try:
        with socket.socket() as held:  # bound, not listening: connections are refused
            held.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{held.getsockname()[1]}"
            t = time.monotonic()
            rc, out, err = status(capsys, dead, "--kit", str(kits.admin), "--timeout", str(timeout))
            took = time.monotonic() - t
        assert rc == 1 and not out and err.count("\n") == 1
        assert f"the aggregator at {dead} is not reachable" in err and "check that `fl-plugins server` runs" in err
        assert took < timeout  # refused at once, not waited out

        rc, out, err = status(capsys, srv.address)  # plaintext against mTLS
        assert rc == 2 and err.count("\n") == 1
        assert "closed the connection: it serves mTLS and refused this caller; pass --kit kits/admin" in err

        # a process of its own (as a user runs it): the one line only, without gRPC's own log lines
        cmd = [sys.executable, "-m", "fl_plugins.cli", "status", srv.address, "--kit", str(other.admin)]
        got = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and not got.stdout
        assert got.stderr.count("\n") == 1 and "the TLS handshake with the aggregator" in got.stderr, got.stderr
        assert "a kit of another project" in got.stderr
    finally:
        srv.stop(0)


def test_a_revoked_operator_kit_is_refused_and_a_new_one_works(tmp_path, capsys):
    kits = _provision(tmp_path)
    srv = _server(tmp_path, kits.server)
    try:
        assert status(capsys, srv.address, "--kit", str(kits.admin))[0] == 0
        argv = ["provision", str(tmp_path / "project.yaml"), "-o", str(kits.root), "--revoke", "admin"]
        assert main(argv) == 0
        assert "the operator's kit: revoked 1 certificate(s)" in capsys.readouterr().out
        rc, out, err = status(capsys, srv.address, "--kit", str(kits.admin))
        assert rc == 2 and not out
        assert "refused the call: operator certificate 'admin@ops-project'" in err and "was revoked" in err
        provision(load_project(tmp_path / "project.yaml"), kits.root)  # a new admin kit
        assert status(capsys, srv.address, "--kit", str(kits.admin))[0] == 0
    finally:
        srv.stop(0)
