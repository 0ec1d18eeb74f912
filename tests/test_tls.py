"""Provisioning and mTLS over real gRPC on 127.0.0.1: kits, a federated job over mTLS, and every way a caller
is refused (no certificate, another CA, expired, a site not in the project, a site claiming another's name)
while the aggregator goes on serving the sites that belong.

Model values are multiples of 1/16 and FedAvg weights sum to a power of two, so results are exact in float32
whatever the order of the folds: the mTLS job is compared bit for bit with the same job in plaintext.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import SiteThread, join_sites, load_round, save_numpy

import fl_plugins.client as flare
from fl_plugins.aggregator.core import AggregatorConfig
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import AuthError, ConfigError, TransportError
from fl_plugins.security.provision import (
    CertificateAuthority,
    Kits,
    Project,
    load_project,
    parse_project,
    provision,
    provision_local,
    write_site_kit,
)
from fl_plugins.security.tls import load_server_kit, load_site_kit
from fl_plugins.wire import rpc
from fl_plugins.wire.proto import fl_pb2 as pb

pytest.importorskip("cryptography")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_YAML = """\
name: test-project
server: {host: 127.0.0.1, port: 8443, alt_names: [localhost]}
sites: [site-1, site-2]
validity_days: 30
"""
INITIAL = {"w": np.arange(8, dtype=np.float32) / 16, "b": np.full((2, 3), 0.5, np.float32)}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Kits:
    root = tmp_path_factory.mktemp("kits")
    (root / "project.yaml").write_text(PROJECT_YAML)
    return provision(load_project(root / "project.yaml"), root / "kits")


@pytest.fixture(scope="module")
def project(kits) -> Project:
    return load_project(kits.root.parent / "project.yaml")


@pytest.fixture
def api():
    yield flare
    flare.shutdown()


def _server(tmp_path: Path, kit: Path | None, rounds: int = 2, min_sites: int = 2) -> AggregatorServer:
    init = save_numpy(tmp_path / "initial.safetensors", INITIAL)
    cfg = AggregatorConfig(run_dir=tmp_path / ("run-tls" if kit else "run-plain"), rounds=rounds, min_sites=min_sites,
                           initial_model=init, linger=0.5)  # fmt: skip
    return AggregatorServer(cfg, "127.0.0.1:0", kit=kit).start()


def _step(site: int):
    """Each site moves the model its own way; weights 1 and 3 sum to 4, so FedAvg stays exact."""

    def step(r: int, params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, float]:
        return {k: v + (site + r) / 4 for k, v in params.items()}, "FULL", 1.0 if site == 1 else 3.0

    return step


def _updates(run_dir: Path) -> list[tuple[int, str]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r["round"], r["site"]) for r in recs if r["event"] == "update")


# -- provisioning ---------------------------------------------------------------------------------------------


def test_provision_writes_the_ca_and_one_kit_each_with_private_keys(kits):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    assert sorted(p.name for p in kits.root.iterdir()) == ["admin", "ca", "server", "site-1", "site-2"]
    files = {p.relative_to(kits.root).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in kits.root.rglob("*") if p.is_file()}  # fmt: skip
    assert sorted(files) == ["admin/ca.crt", "admin/client.crt", "admin/client.key", "admin/kit.yaml", "ca/ca.crt",
                             "ca/ca.key", "ca/issued.jsonl", "server/ca.crt", "server/kit.yaml",
                             "server/server.crt", "server/server.key", "site-1/ca.crt", "site-1/client.crt",
                             "site-1/client.key", "site-1/kit.yaml", "site-2/ca.crt", "site-2/client.crt",
                             "site-2/client.key", "site-2/kit.yaml"]  # fmt: skip
    keys = ["admin/client.key", "ca/ca.key", "server/server.key", "site-1/client.key", "site-2/client.key"]
    assert {f: m for f, m in files.items() if f.endswith(".key")} == dict.fromkeys(keys, 0o600)
    assert all(m & 0o077 == 0o044 for f, m in files.items() if not f.endswith(".key"))  # certificates: readable

    server = load_server_kit(kits.server)
    assert (server.project, server.address, server.sites) == ("test-project", "127.0.0.1:8443", ("site-1", "site-2"))
    cert = x509.load_pem_x509_certificate(server.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    site = load_site_kit(kits.sites["site-1"])
    assert (site.project, site.site, site.server) == ("test-project", "site-1", "127.0.0.1:8443")
    client = x509.load_pem_x509_certificate(site.cert)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-1"
    assert client.issuer == x509.load_pem_x509_certificate(site.ca).subject
    assert (client.not_valid_after_utc - client.not_valid_before_utc).days == 30
    issued = {r["serial"]: (r["kind"], r["common_name"])
              for r in map(json.loads, (kits.ca / "issued.jsonl").read_text().splitlines())}  # fmt: skip
    assert issued[f"{client.serial_number:x}"] == ("site", "site-1")  # the CA's record of what it signed
    assert issued[f"{cert.serial_number:x}"] == ("server", "test-project aggregator")


def test_provisioning_again_keeps_the_ca_and_tightens_key_permissions(tmp_path, caplog):
    project = parse_project({"server": "127.0.0.1:8443", "sites": ["a", "b"]}, tmp_path / "p.yaml")
    first = provision(project, tmp_path / "kits")
    ca = (first.ca / "ca.crt").read_bytes()
    old_site_cert = (first.sites["b"] / "client.crt").read_bytes()
    os.chmod(first.sites["a"] / "client.key", 0o644)
    with caplog.at_level("WARNING"):
        second = provision(replace(project, sites=("a",)), tmp_path / "kits")
    assert (second.ca / "ca.crt").read_bytes() == ca  # kits handed out earlier stay valid
    assert stat.S_IMODE((second.sites["a"] / "client.key").stat().st_mode) == 0o600
    assert "no longer in the project (b)" in caplog.text
    assert load_server_kit(second.server).sites == ("a",)  # b's old certificate is still signed, but not admitted
    assert (tmp_path / "kits" / "b" / "client.crt").read_bytes() == old_site_cert


def test_provision_local_makes_a_loopback_project_without_a_fixed_port(tmp_path):
    kits = provision_local(tmp_path / "kits", ["site-1", "site-2", "site-3"])
    assert load_server_kit(kits.server).address == "127.0.0.1:0"
    assert load_site_kit(kits.sites["site-3"]).server is None  # the launcher passes FL_SERVER


@pytest.mark.parametrize(("text", "expected"), [
    ("server: 127.0.0.1:8443\nsite: [a]\n", "unknown key `site`; did you mean `sites`?"),
    ("server: {host: 127.0.0.1, prot: 8443}\nsites: [a]\n", "unknown key `server.prot`; did you mean `server.port`?"),
    ("server: 127.0.0.1:8443\nsites: [a]\nvalidity_days: a year\n",
     "`validity_days` must be an integer in 1..36500 (got 'a year')"),
    ("server: {host: 127.0.0.1, port: '8443'}\nsites: [a]\n",
     "`server.port` must be an integer in 1..65535 (got '8443')"),
    ("server: {host: 127.0.0.1, port: 8443}\nsites: site-1\n", "`sites` must be a non-empty list of site names"),
    ("server: 127.0.0.1:8443\nsites: [a, 'b c']\n", "`sites[1]` must be 1-64 letters, digits"),
    ("server: 127.0.0.1:8443\nsites: [a, server]\n", "not 'ca' or 'server'"),
    ("server: 127.0.0.1:8443\nsites: [a, a]\n", "must not repeat a name (a appears twice)"),
    ("server: {host: 0.0.0.0, port: 8443}\nsites: [a]\n", "not a wildcard"),
    ("server: {host: 'my host', port: 8443}\nsites: [a]\n", "`server.host` must be a host name or an IP address"),
    ("server: {host: 127.0.0.1}\nsites: [a]\n", "`server.port` is required"),
    ("server: {address: 127.0.0.1:1, port: 2}\nsites: [a]\n", "either `address` or `host` and `port`"),
    ("sites: [a]\n", "`server` is required"),
    ("- a\n", "a project file must be a mapping"),
])  # fmt: skip
def test_project_file_errors_name_the_file_and_key(tmp_path, text, expected):
    p = tmp_path / "project.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_project(p)
    assert str(e.value).startswith(f"{p}: ")
    assert expected in str(e.value)


def test_project_file_forms(tmp_path):
    p = parse_project({"server": {"address": "agg.example.org:9000", "alt_names": ["10.0.0.5"]}, "sites": 3}, "x.yaml")
    assert (p.name, p.server.address, p.server.alt_names) == ("x", "agg.example.org:9000", ("10.0.0.5",))
    assert p.sites == ("site-1", "site-2", "site-3") and p.validity_days == 365


# -- a job over mTLS ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_job_over_mtls_equals_the_plain_job(kits, tmp_path, api, monkeypatch):
    plain = _server(tmp_path, None)
    try:
        join_sites(SiteThread(plain.address, "site-1", _step(1)), SiteThread(plain.address, "site-2", _step(2)))
        assert plain.wait() == 0
    finally:
        plain.stop(0)

    srv = _server(tmp_path, kits.server)
    try:
        # site-1 with SiteClient(kit=...); site-2 through the client API with FL_KIT, as `fl-plugins client` runs it
        site1 = SiteThread(srv.address, "site-1", _step(1), kit=kits.sites["site-1"])
        site1.start()
        monkeypatch.setenv("FL_KIT", str(kits.sites["site-2"]))
        monkeypatch.delenv("FL_SITE", raising=False)
        api.init(srv.address, params_format="numpy")
        assert api.get_site_name() == "site-2"
        while api.is_running():
            m = api.receive()
            params, _, weight = _step(2)(m.current_round, m.params)
            api.send(api.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": weight}))
        site1.join(60)
        assert site1.error is None, site1.error
        assert srv.wait() == 0
    finally:
        srv.stop(0)
    for r in (1, 2):
        got, want = load_round(tmp_path / "run-tls", r), load_round(tmp_path / "run-plain", r)
        for k in INITIAL:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"round {r} {k}")
    assert _updates(tmp_path / "run-tls") == [(0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2")]


# -- refusals -------------------------------------------------------------------------------------------------


def _hybrid_kit(kits: Kits, cert_from: Path, into: Path) -> Path:
    """`cert_from`'s certificate and key with this project's CA (so the site trusts the real aggregator)."""
    into.mkdir()
    for name in ("client.crt", "client.key", "kit.yaml"):
        (into / name).write_bytes((cert_from / name).read_bytes())
    (into / "client.key").chmod(0o600)
    (into / "ca.crt").write_bytes((kits.ca / "ca.crt").read_bytes())
    return into


def _connect(address: str, **kw) -> BaseException | None:
    c = SiteClient(address, connect_timeout=1.5, heartbeat=0, **kw)
    try:
        c.connect()
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e
    finally:
        c.close()
    return None


@pytest.mark.integration
def test_callers_without_a_valid_certificate_of_the_project_are_refused(kits, project, tmp_path):
    other = provision_local(tmp_path / "other", ["site-1"])  # another project's CA, same site name
    ca = CertificateAuthority.load(kits.ca)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    expired = write_site_kit(ca, tmp_path / "expired", "site-1", project, now=past, days=1)
    intruder = write_site_kit(ca, tmp_path / "intruder", "intruder", project)  # the right CA, not in the project
    mine = load_site_kit(kits.sites["site-1"])
    old = replace(mine, cert=(expired / "client.crt").read_bytes(), key=(expired / "client.key").read_bytes())
    srv = _server(tmp_path, kits.server)
    try:
        with pytest.raises(ConfigError, match=r"client.crt: the certificate expired on .* ask the project's admin"):
            load_site_kit(expired)  # the site is told before it dials
        cases = {  # what the aggregator's TLS handshake refuses: the site can only see the connection closed
            "plaintext": dict(site="site-1"),
            "no client certificate": dict(kit=replace(mine, cert=None, key=None)),
            "another CA": dict(kit=_hybrid_kit(kits, other.sites["site-1"], tmp_path / "hybrid")),
            "expired": dict(kit=old),
            "another project's kit": dict(kit=other.sites["site-1"]),
            "intruder": dict(kit=intruder),
        }
        with ThreadPoolExecutor(len(cases)) as pool:
            got = dict(zip(cases, pool.map(lambda kw: _connect(srv.address, **kw), cases.values()), strict=True))
        assert all(isinstance(got[k], TransportError) for k in list(cases)[:5]), got
        msg = {k: str(e) for k, e in got.items()}
        assert "if it serves with mTLS (`fl-plugins server --kit`), this site needs its startup kit" in msg["plaintext"]
        for k in ("no client certificate", "another CA", "expired"):
            assert "closed the connection during the TLS handshake: it refuses this site's certificate" in msg[k], k
        assert "did not verify against the kit's ca.crt" in msg["another project's kit"]
        assert isinstance(got["intruder"], AuthError)  # past the handshake: the aggregator says why
        assert "site 'intruder' is not in project 'test-project' (its sites: site-1, site-2)" in msg["intruder"]
        assert "fl-plugins provision` again" in msg["intruder"]

        impostor = SiteClient(srv.address, kit=mine, heartbeat=0)  # a modified client that claims site-2's name
        impostor.site = "site-2"
        with pytest.raises(AuthError, match="claims to be site 'site-2', but its certificate is site 'site-1'"):
            impostor.connect()
        impostor.close()

        # the aggregator goes on serving the project's sites: both rounds complete with their updates only
        join_sites(SiteThread(srv.address, "site-1", _step(1), kit=kits.sites["site-1"]),
                   SiteThread(srv.address, "site-2", _step(2), kit=kits.sites["site-2"]), timeout=60)  # fmt: skip
        assert srv.wait() == 0
        assert srv.aggregator.status()["sites"] == ["site-1", "site-2"]
    finally:
        srv.stop(0)
    assert _updates(tmp_path / "run-tls") == [(0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2")]


@pytest.mark.integration
def test_a_site_cannot_send_into_another_sites_upload(kits, tmp_path):
    srv = _server(tmp_path, kits.server, rounds=1, min_sites=1)
    site1, site2 = load_site_kit(kits.sites["site-1"]), load_site_kit(kits.sites["site-2"])
    ch1 = rpc.secure_channel(srv.address, site1.credentials())
    ch2 = rpc.secure_channel(srv.address, site2.credentials())
    try:
        s1, s2 = rpc.Stub(ch1), rpc.Stub(ch2)
        s2.Hello(pb.HelloRequest(site="site-2"), timeout=10)
        task = s2.GetTask(pb.TaskRequest(site="site-2", wait_seconds=5), timeout=10)
        assert task.kind == pb.Task.TRAIN
        manifest = json.loads(task.manifest_json)
        manifest["envelope"] = {"params_type": "FULL"}
        up = s2.BeginUpload(pb.UploadBegin(site="site-2", round=0, attempt=0, manifest_json=json.dumps(manifest),
                                           nonce="n"), timeout=10)  # fmt: skip
        with pytest.raises(Exception) as e:
            s1.CommitUpload(pb.UploadCommit(upload_id=up.upload_id, shard_digests=["x"]), timeout=10)
        err = rpc.error_from_rpc(e.value, "commit")
        assert isinstance(err, AuthError)
        assert "belongs to site 'site-2', but the caller's certificate is site 'site-1'" in str(err)
        with pytest.raises(Exception) as e:
            s1.Upload(iter([b""]), metadata=(("fl-upload-id", up.upload_id), ("fl-shard", "0")), timeout=10)
        assert isinstance(rpc.error_from_rpc(e.value, "upload"), AuthError)
    finally:
        ch1.close()
        ch2.close()
        srv.stop(0)


def test_a_site_name_that_differs_from_the_kit_is_an_error(kits, api, monkeypatch):
    with pytest.raises(ConfigError, match=r"init\(site='site-2'\) differs from the site of the kit .* \('site-1'\)"):
        api.init("127.0.0.1:1", site="site-2", kit=kits.sites["site-1"])
    monkeypatch.setenv("FL_SITE", "site-2")
    with pytest.raises(ConfigError, match=r"\$FL_SITE=site-2 differs from the site of the kit"):
        api.init("127.0.0.1:1", kit=kits.sites["site-1"])
    with pytest.raises(ConfigError, match="differs from the kit's site 'site-1'"):
        SiteClient("127.0.0.1:1", "site-2", kit=kits.sites["site-1"])


def test_kits_are_checked_for_their_role(kits, tmp_path):
    with pytest.raises(ConfigError, match="is the kit of site 'site-1', not a server kit"):
        AggregatorServer(AggregatorConfig(run_dir=tmp_path, rounds=1), kit=kits.sites["site-1"])
    with pytest.raises(ConfigError, match="--insecure and --kit do not go together"):
        AggregatorServer(AggregatorConfig(run_dir=tmp_path, rounds=1), kit=kits.server, insecure=True)
    with pytest.raises(ConfigError, match="is the aggregator's kit, not a site kit"):
        load_site_kit(kits.server)
    with pytest.raises(ConfigError, match="has no kit.yaml"):
        load_site_kit(tmp_path)


# -- fl-plugins client ----------------------------------------------------------------------------------------

SITE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import fl_plugins.client as flare
    flare.init(params_format="numpy")
    m = flare.receive()
    flare.send(flare.FLModel(params={k: v + 1 for k, v in m.params.items()}))
    print("SITE", flare.get_site_name(), "KIT", os.environ["FL_KIT"], flush=True)
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.mark.integration
def test_fl_plugins_client_runs_the_script_with_the_kit_and_forwards_its_exit_code(kits, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SITE_SCRIPT)
    srv = _server(tmp_path, kits.server, rounds=1, min_sites=1)
    try:
        out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "client", "--kit", str(kits.sites["site-2"]),
                              "--server", srv.address, "--", sys.executable, str(script), "3"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert out.returncode == 3, out.stdout + out.stderr
        assert f"SITE site-2 KIT {kits.sites['site-2'].resolve()}" in out.stdout
        assert srv.wait() == 0
    finally:
        srv.stop(0)
    assert _updates(tmp_path / "run-tls") == [(0, "site-2")]


def test_fl_plugins_provision_command(tmp_path):
    (tmp_path / "project.yaml").write_text(PROJECT_YAML)
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "provision", "project.yaml", "-o", "kits"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "kits/server  the aggregator's: fl-plugins server --kit kits/server" in out.stdout
    assert load_site_kit(tmp_path / "kits" / "site-2").site == "site-2"
    (tmp_path / "bad.yaml").write_text("server: 127.0.0.1:8443\nsites: [a]\nvalidity: 3\n")
    bad = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "provision", "bad.yaml"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "unknown key `validity`; did you mean `validity_days`?" in bad.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.slow
def test_a_deployment_server_with_a_recipe_and_three_clients_over_mtls(tmp_path):
    """DESIGN.md's deployment: `fl-plugins server --kit kits/server RECIPE` takes rounds, sites, the initial model
    and the job name from the recipe; each site is `fl-plugins client --kit kits/<site> -- python SCRIPT`."""
    import subprocess
    import sys

    names = ["site-1", "site-2", "site-3"]
    kits = provision_local(tmp_path / "kits", names)
    address = f"127.0.0.1:{_free_port()}"
    cli = [sys.executable, "-m", "fl_plugins.cli"]
    server = subprocess.Popen([*cli, "server", str(ROOT / "recipes" / "quickstart.yaml"), "--kit", str(kits.server),
                               "--address", address, "--run-dir", str(tmp_path / "run")], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        sites = [subprocess.Popen([*cli, "client", "--kit", str(kits.sites[n]), "--server", address, "--",
                                   sys.executable, str(ROOT / "examples" / "client_api_train.py")], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
                 for n in names]
        for p in sites:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[-3000:]
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out[-3000:]
    finally:
        for p in [server, *locals().get("sites", [])]:
            if p.poll() is None:
                p.kill()
    assert _updates(tmp_path / "run") == sorted((r, n) for r in range(3) for n in names)  # the recipe's 3 rounds
    log = (tmp_path / "run" / "aggregator.log").read_text()
    assert "job quickstart" in log and "(mTLS" in out


def test_server_without_a_recipe_needs_rounds_and_a_run_dir(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "server", "--rounds", "2"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "needs --run-dir, or a recipe that gives them" in out.stderr


# -- revocation: a leaked site key cut off without a new CA -----------------------------------------------------


def _serial(kit: Path) -> str:
    from cryptography import x509

    return f"{x509.load_pem_x509_certificate((kit / 'client.crt').read_bytes()).serial_number:x}"


@pytest.mark.integration
def test_a_revoked_site_is_refused_at_its_next_call_and_its_new_kit_works(tmp_path, capsys, caplog):
    from fl_plugins.cli import main

    (tmp_path / "project.yaml").write_text(PROJECT_YAML)
    project = load_project(tmp_path / "project.yaml")
    kits = provision(project, tmp_path / "kits")
    leaked = shutil.copytree(kits.sites["site-1"], tmp_path / "leaked")  # the kit handed out, whose key got out
    provision(project, kits.root)  # provisioned again (say, to add a site): kits/site-1 holds a newer certificate
    newer = shutil.copytree(kits.sites["site-1"], tmp_path / "newer")
    assert _serial(leaked) != _serial(newer)
    srv = _server(tmp_path, kits.server)
    try:
        online = SiteClient(srv.address, kit=leaked, heartbeat=0)
        online.connect()  # a site connected before the revocation
        argv = ["provision", str(tmp_path / "project.yaml"), "-o", str(kits.root), "--revoke", "site-1"]
        assert main(argv) == 0
        assert "site 'site-1': revoked 2 certificate(s)" in capsys.readouterr().out
        listed = json.loads((kits.server / "revoked.json").read_text())["revoked"]
        assert sorted((r["site"], r["serial"]) for r in listed) == sorted(
            [("site-1", _serial(leaked)), ("site-1", _serial(newer))])  # every certificate the CA issued to it
        assert main(argv) == 0 and "its certificates were already revoked" in capsys.readouterr().out

        # the running aggregator re-reads the list: the open connection is refused at its next call, a new one too
        with pytest.raises(AuthError) as e:
            online.next_task(poll=1)
        online.close()
        assert (f"site 'site-1': its certificate (serial {_serial(leaked)}) was revoked by the admin of project "
                "'test-project' on ") in str(e.value)  # fmt: skip
        assert "ask the admin for a new kit (`fl-plugins provision PROJECT.yaml -o kits` issues site-1 a new" in str(
            e.value)
        got = {k: _connect(srv.address, kit=kit) for k, kit in [("leaked", leaked), ("newer", newer),
                                                                 ("site-2", kits.sites["site-2"])]}  # fmt: skip
        assert isinstance(got["leaked"], AuthError) and isinstance(got["newer"], AuthError), got
        assert got["site-2"] is None  # the other sites go on

        # a list broken while the aggregator serves: it says so and keeps refusing what it had read
        good = (kits.server / "revoked.json").read_text()
        (kits.server / "revoked.json").write_text("{not json")
        with caplog.at_level("ERROR"):
            assert isinstance(_connect(srv.address, kit=leaked), AuthError)
        assert "revoked.json cannot be read" in caplog.text and "keeps refusing the 2 certificate(s)" in caplog.text
        (kits.server / "revoked.json").write_text(good)

        # provisioning again issues site-1 a new certificate, which the same running aggregator admits
        kits = provision(project, kits.root)
        assert _connect(srv.address, kit=kits.sites["site-1"]) is None
        assert isinstance(_connect(srv.address, kit=leaked), AuthError)
    finally:
        srv.stop(0)

    (tmp_path / "restart").mkdir()
    srv = _server(tmp_path / "restart", kits.server)  # an aggregator started with the kit refuses from the start
    try:
        assert isinstance(_connect(srv.address, kit=newer), AuthError)
        join_sites(SiteThread(srv.address, "site-1", _step(1), kit=kits.sites["site-1"]),
                   SiteThread(srv.address, "site-2", _step(2), kit=kits.sites["site-2"]), timeout=60)  # fmt: skip
        assert srv.wait() == 0
    finally:
        srv.stop(0)


def test_revoke_errors_name_the_site_the_folder_and_the_fix(kits, project, tmp_path):
    from fl_plugins.security.provision import revoke

    with pytest.raises(ConfigError, match=r"--revoke site-9: no certificate of site 'site-9' is known here: .*"
                                          r"issued.jsonl lists none .* \(sites with a kit in .*: site-1, site-2\)"):
        revoke(project, kits.root, "site-9")
    with pytest.raises(ConfigError, match=r"--revoke: a site name must be 1-64 letters.* \(got '\.\./x'\)"):
        revoke(project, kits.root, "../x")
    with pytest.raises(ConfigError, match=r"is the aggregator's kit of project 'test-project', not of 'other'"):
        revoke(replace(project, name="other"), kits.root, "site-1")
    with pytest.raises(ConfigError, match=r"startup kit .*nowhere.* does not exist.*--revoke writes the aggregator"):
        revoke(project, tmp_path / "nowhere", "site-1")
    bad = shutil.copytree(kits.server, tmp_path / "server")
    (bad / "revoked.json").write_text('{"revoked": [{"serial": "xyz", "site": "site-1"}]}')
    with pytest.raises(ConfigError, match=r"revoked.json: `revoked\[0\]` must be \{serial: HEX, site: NAME"):
        load_server_kit(bad)  # an aggregator does not start with a list it cannot read


# -- a site without a kit speaks plaintext to loopback only ------------------------------------------------------

REMOTE = "10.255.255.1:1"  # not this machine: every use below is refused, or built without a call, before dialling


@pytest.fixture
def channels(monkeypatch):
    """The targets of every gRPC channel made during the test (grpc's own functions, recorded). A channel to one of
    the remote hosts below fails the test before it exists, unless the test allows it: nothing is dialled."""
    import grpc

    remote = ("10.255.255.1", "2001:db8::1", "example.invalid")
    made: list[str] = []
    allowed: set[str] = set()

    def recorded(real):
        def make(target, *a, **kw):
            made.append(target)
            assert target in allowed or not any(r in target for r in remote), f"a channel to {target} was made"
            return real(target, *a, **kw)

        return make

    for name in ("insecure_channel", "secure_channel"):
        monkeypatch.setattr(grpc, name, recorded(getattr(grpc, name)))
    return made, allowed


@pytest.mark.parametrize("address", [REMOTE, "dns:///10.255.255.1:1", "ipv4:127.0.0.1:1,10.255.255.1:1",
                                     "[2001:db8::1]:1", "aggregator.example.invalid:1"])  # fmt: skip
def test_a_site_without_a_kit_refuses_plaintext_to_another_machine(address, channels, api, monkeypatch):
    made, _ = channels
    with pytest.raises(ConfigError) as e:
        SiteClient(address, "site-1")
    msg = str(e.value)
    assert msg.startswith(f"aggregator address {address}: without a startup kit this site would connect in "
                          "plaintext, and that is not a loopback address")  # fmt: skip
    assert "connect with this site's kit (`fl-plugins client --kit kits/SITE`, FL_KIT or init(kit=...)" in msg
    assert "opt out explicitly with insecure=True (init(insecure=True), FL_INSECURE=1" in msg
    monkeypatch.delenv("FL_INSECURE", raising=False)
    with pytest.raises(ConfigError, match="without a startup kit this site would connect in plaintext"):
        api.init(address, "site-1", connect_timeout=0.5)
    monkeypatch.setenv("FL_SERVER", address)  # the launcher's environment
    monkeypatch.setenv("FL_SITE", "site-1")
    with pytest.raises(ConfigError, match="opt out explicitly with insecure=True"):
        api.init(connect_timeout=0.5)
    assert made == []  # refused before any channel, so before any connection


def test_the_explicit_opt_out_warns_and_loopback_needs_none(kits, channels, api, monkeypatch, caplog):
    made, allowed = channels
    allowed.add(REMOTE)
    with caplog.at_level("WARNING"):
        SiteClient(REMOTE, "site-1", insecure=True, heartbeat=0).close()  # built, never called: nothing is dialled
    assert f"INSECURE: plaintext gRPC to non-loopback address {REMOTE}" in caplog.text
    assert made == [REMOTE]
    caplog.clear()
    for local in ("127.0.0.1:1", "localhost:1", "[::1]:1", "ipv4:127.0.0.2:1", "dns:///localhost:1", "unix:/tmp/x"):
        SiteClient(local, "site-1", heartbeat=0).close()
    assert "INSECURE" not in caplog.text
    with pytest.raises(ConfigError, match="insecure=True and a kit do not go together: with a kit the site speaks "
                                          "mTLS only"):  # fmt: skip
        SiteClient("127.0.0.1:1", kit=kits.sites["site-1"], insecure=True)
    monkeypatch.setenv("FL_INSECURE", "1")  # the launcher's opt-out reaches the site's client
    with pytest.raises(ConfigError, match="insecure=True and a kit do not go together"):
        api.init("127.0.0.1:1", kit=kits.sites["site-1"], connect_timeout=0.5)
    monkeypatch.setenv("FL_INSECURE", "maybe")
    with pytest.raises(ConfigError, match=r"\$FL_INSECURE must be 1 .* or 0 \(got 'maybe'\)"):
        api.init("127.0.0.1:1", "site-1", connect_timeout=0.5)


def test_fl_plugins_client_without_a_kit_refuses_a_remote_aggregator_unless_insecure(kits, tmp_path, capsys):
    from fl_plugins.cli import main

    marker = tmp_path / "ran"
    cmd = ["--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    assert main(["client", "--server", REMOTE, "--site", "site-1", *cmd]) == 2
    err = capsys.readouterr().err
    assert f"fl-plugins client: error: aggregator address {REMOTE}: without a startup kit" in err
    assert "opt out explicitly with --insecure" in err
    assert main(["client", "--kit", str(kits.sites["site-1"]), "--insecure", *cmd]) == 2
    assert "--insecure and --kit do not go together" in capsys.readouterr().err
    assert main(["client", "--server", REMOTE, *cmd]) == 2
    assert "needs --kit kits/SITE (mTLS), or --server HOST:PORT and --site NAME" in capsys.readouterr().err
    assert not marker.exists()  # the script never ran

    show = "import os; print('ENV', os.environ['FL_SERVER'], os.environ['FL_SITE'], os.environ['FL_INSECURE'], " \
           "'FL_KIT' in os.environ)"  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "client", "--server", REMOTE, "--site", "site-1",
                          "--insecure", "--", sys.executable, "-c", show], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**os.environ, "FL_KIT": str(kits.sites["site-2"])})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"ENV {REMOTE} site-1 1 False" in out.stdout  # the opt-out travels to the script as FL_INSECURE=1
    assert f"INSECURE: plaintext gRPC to non-loopback address {REMOTE} (--insecure)" in out.stderr
