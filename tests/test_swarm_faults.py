"""Swarm faults and refusals over the wire (issue 13): tests/test_swarm.py's real mTLS aggregator and three sites
(their FLARE-style loops unchanged), with one thing made to go wrong in each job.

Every race is widened, never slept on: a sealed update is altered inside the aggregator's count of it
(`after_count`, under the aggregator's lock, so the round cannot close, nor its aggregator site fetch the update,
before the change is made); a site dies at a chosen point (of its fold, or before its send, once the others are
counted); a resend waits for the round to close; the offering site asks alone before the others start; a site
counts as silent at a close by its last call moved back. The expected global models are the service's FedAvg
fold, in the sites' name order, of the updates each round kept (`folds`), compared bit for bit."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509

import tests.test_swarm as swarm_test
from fl_plugins.aggregator.optimizers import FedAvg
from fl_plugins.aggregator.relay import RelayTransfer
from fl_plugins.aggregator.swarm import SwarmAggregator
from fl_plugins.client.relay import relay_transport
from fl_plugins.errors import FLError
from fl_plugins.record_files import read_records
from fl_plugins.records import AttemptRecord, RoundRecord, SwarmRecord
from fl_plugins.security.provision import Kits, provision_local
from fl_plugins.security.seal import Certificates, Identity, Sealer, SealError
from fl_plugins.security.tls import load_site_kit
from fl_plugins.swarm import site as site_module
from fl_plugins.swarm.site import SwarmSite
from fl_plugins.wire.layout import TensorInfo, dtype_of_numpy
from fl_plugins.wire.proto import fl_pb2 as pb
from tests.test_swarm import ROUNDS, SITES, WEIGHTS, SwarmSiteThread, initial, load_files, server, step

pytestmark = pytest.mark.integration

ALL = tuple(SITES)
JOIN = 30.0  # seconds a job may take here before the test calls it hung (each runs in a few)
SILENT = 3.0  # --site-timeout where a site dies: the live ones call every second or more often (long polls)


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Kits:
    return provision_local(tmp_path_factory.mktemp("swarm-faults") / "kits", list(SITES))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Kits:
    """Another project's kits, with the same site names: their certificates are signed by another CA."""
    return provision_local(tmp_path_factory.mktemp("other-project") / "kits", list(SITES), name="other")


# -- expected models ------------------------------------------------------------------------------------------------
def folds(kept: list[tuple[str, ...]]) -> list[dict[str, np.ndarray]]:
    """models[r]: round r's global model, where round r's fold kept the updates of the sites `kept[r]` (each
    site trains with test_swarm.py's `step`): the service's FedAvg fold in the sites' name order."""
    models = [initial()]
    infos = [TensorInfo(n, dtype_of_numpy(v.dtype), tuple(v.shape), 0, v.nbytes) for n, v in models[0].items()]
    for r, sites in enumerate(kept):
        fold = FedAvg(infos)
        for site in sorted(sites):
            update = step(site, r, models[-1])
            for t in infos:
                data = memoryview(np.ascontiguousarray(update[t.name]).reshape(-1).view(np.uint8))
                fold.fold(t, 0, data, WEIGHTS[site])
            fold.add_weight(WEIGHTS[site], "FULL")
        models.append({t.name: np.concatenate(list(fold.finalize(t, None))).reshape(t.shape) for t in infos})
    return models


def check_models(tmp_path: Path, sites: dict[str, SwarmSiteThread], want: list[dict], final_at: str) -> None:
    """Every site trained on `want[r]` in each round it trained in, and `final_at`'s output folder holds the final
    model (the last round's aggregator site writes it)."""
    for t in sites.values():
        for r, params in t.received.items():
            for name, value in want[r].items():
                np.testing.assert_array_equal(params[name], value, err_msg=f"{t.site} round {r} {name}")
    [job] = (tmp_path / "fl-output").iterdir()  # ./fl-output/JOB/SITE
    out, last = job / final_at, f"round-{ROUNDS:05d}"
    copies = [d for d in (out / "final", out / "fold" / last, out / "global" / last) if d.is_dir()]
    assert copies, f"{final_at} holds no final model"
    for folder in copies:  # every copy it holds: final/ (kept at the end), the fold's output, a received model's
        final = load_files(folder)
        assert final.keys() == want[ROUNDS].keys(), folder
        for name, value in want[ROUNDS].items():
            np.testing.assert_array_equal(final[name], value, err_msg=f"the final model in {folder}: {name}")


def swarm_records(tmp_path: Path) -> list[SwarmRecord]:
    return [rec for rec in read_records(tmp_path / "run" / "metrics.jsonl") if isinstance(rec, SwarmRecord)]


def round_records(tmp_path: Path) -> list[RoundRecord]:
    return [rec for rec in read_records(tmp_path / "run" / "metrics.jsonl") if isinstance(rec, RoundRecord)]


# -- sites ----------------------------------------------------------------------------------------------------------
class Site(SwarmSiteThread):
    """test_swarm.py's site, whose process ends when its script raises: its connection closes then too."""

    def run(self) -> None:
        super().run()
        s = self.session
        if self.error is not None and s is not None and s.client is not None:
            s.client.close()


def start(address: str, kits: Kits, names: Iterable[str], offer: str = "") -> dict[str, Site]:
    sites = {n: Site(address, kits, n, offer=n == offer) for n in names}
    for t in sites.values():
        t.start()
    return sites


def join(sites: dict[str, Site], timeout: float = JOIN) -> dict[str, Site]:
    for t in sites.values():
        t.join(timeout)
        assert not t.is_alive(), f"{t.site} did not finish within {timeout} s: the job hung"
    return sites


def run_sites(address: str, kits: Kits, offer: str = "") -> dict[str, Site]:
    return join(start(address, kits, SITES, offer))


def no_errors(sites: dict[str, Site]) -> None:
    for t in sites.values():
        if t.error is not None:
            raise t.error


def count_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times each site trains (test_swarm.py's sites call its module's `step`)."""
    steps = dict.fromkeys(SITES, 0)

    def counted(site: str, r: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        steps[site] += 1
        return step(site, r, params)

    monkeypatch.setattr(swarm_test, "step", counted)
    return steps


# -- the relay's spool ----------------------------------------------------------------------------------------------
def after_count(monkeypatch: pytest.MonkeyPatch, agg: SwarmAggregator, act: Callable[[RelayTransfer], None]) -> None:
    """Run `act(t)` on every sealed update the relay commits, right after the aggregator counts it and under its
    lock: the round cannot close, nor its aggregator site fetch the update, before `act` is done."""
    count = agg.update_committed

    def counted(t: RelayTransfer, envelope: dict[str, Any]) -> str:
        with agg.lock:
            message = count(t, envelope)
            act(t)
            return message

    monkeypatch.setattr(agg, "update_committed", counted)  # (each update's transfer is issued with it)


def record_span(t: RelayTransfer, i: int) -> tuple[int, int]:
    """(offset, length) of record `i` in a committed transfer's spool file (relay.py: u32 LE length, record)."""
    with open(t.path, "rb") as f:
        f.seek(t.offsets[i])
        return t.offsets[i] + 4, int.from_bytes(f.read(4), "little")


def write_at(t: RelayTransfer, offset: int, data: bytes) -> None:
    with t.lock, open(t.path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_ciphertext_byte(t: RelayTransfer, i: int) -> None:
    """Flip a byte of record `i`'s ciphertext (the record ends with it and its 16-byte GCM tag)."""
    offset, n = record_span(t, i)
    with open(t.path, "rb") as f:
        f.seek(offset + n - 20)
        byte = f.read(1)[0]
    write_at(t, offset + n - 20, bytes([byte ^ 0x5A]))


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "sealed update is left out" in r.getMessage()]


# -- 1. a tampered record --------------------------------------------------------------------------------------------
def test_a_tampered_update_is_refused_and_the_round_folds_the_other_sites(tmp_path, kits, monkeypatch, caplog):
    """Round 1 (site-2 folds it): one byte of site-3's sealed update is flipped in the relay's spool file right
    after the update is counted. site-2 refuses it (AES-GCM fails; the SealError names site-3, its transfer and
    the record), leaves it out, and round 2 trains on the fold of site-1's and site-2's updates; the job ends, and
    the records say which updates the round's model holds."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="fl_plugins.swarm.site")
    with server(tmp_path, kits) as srv:
        tampered: list[str] = []

        def tamper(t: RelayTransfer) -> None:
            if t.sender == "site-3" and t.round == 1:
                flip_ciphertext_byte(t, 1)
                tampered.append(t.transfer_id)

        after_count(monkeypatch, srv.aggregator, tamper)
        sites = run_sites(srv.address, kits)
    no_errors(sites)
    check_models(tmp_path, sites, folds([ALL, ("site-1", "site-2"), ALL]), final_at="site-3")
    [why] = refusals(caplog)
    assert "round 1: site 'site-3'" in why and f"transfer {tampered[0]!r} from 'site-3', record 1" in why
    assert "AES-GCM" in why
    assert sites["site-2"].session.swarm.stats["refused_updates"] == 1
    assert [rec.updates for rec in swarm_records(tmp_path)] == [ALL, ("site-1", "site-2"), ALL]
    assert [rec.sites for rec in round_records(tmp_path)] == [ALL, ("site-1", "site-2"), ALL]


# -- 2. forged senders -----------------------------------------------------------------------------------------------
class EitherCA(Certificates):
    """A forger's certificate checks: this project's CA or another's."""

    def __init__(self, ca: bytes, other_ca: bytes) -> None:
        super().__init__(ca)
        self.other = Certificates(other_ca)

    def check(self, cert_pem: bytes, name: str, role: str) -> Any:
        try:
            return super().check(cert_pem, name, role)
        except SealError:
            return self.other.check(cert_pem, name, role)


class AnyCert(Certificates):
    """A forger's certificate checks: any certificate, for any name."""

    def check(self, cert_pem: bytes, name: str, role: str) -> Any:
        return x509.load_pem_x509_certificate(cert_pem).public_key()


def peers_of(task: pb.Task) -> dict[str, bytes]:
    return {n: pem.encode() for n, pem in json.loads(task.peers_json).items()}


def refused_open(c: Any, transfer: str, header: bytes) -> str:
    """A RelayOpen the relay must refuse: its error's text."""
    req = pb.RelayOpen(site=c.site, transfer_id=transfer, header=header, records=2, max_bytes=1 << 20)
    with pytest.raises(FLError) as e:
        c.call("RelayOpen", req, "a forged open", timeout=10)
    return str(e.value)


def test_an_update_sealed_under_another_projects_certificate_is_refused(tmp_path, kits, other, monkeypatch):
    """Round 0: site-2 first tries to open its update's transfer with a header sealed under a certificate of another
    project's CA that names site-2 (signed with that certificate's key). The relay checks headers against the
    project's CA and refuses it, naming why; site-2 then sends its update honestly and the job makes FedAvg's
    models. (The aggregator site checks the sender too: test_a_record_or_a_header_replayed... and seal.py's tests.)"""
    monkeypatch.chdir(tmp_path)
    send, refused = SwarmSite.send, []
    forged = load_site_kit(other.sites["site-2"])

    def forging_first(self: SwarmSite, task: pb.Task, params: dict, envelope: dict) -> pb.CommitReply:
        c = self.client
        if c.site == "site-2" and task.kind == pb.Task.TRAIN and task.round == 0:
            relay_transport(c)
            certs = EitherCA(c.kit.ca, forged.ca)
            header = Sealer(Identity.from_kit(forged), task.transfer_id, peers_of(task), certs).header
            refused.append(refused_open(c, task.transfer_id, header))
        return send(self, task, params, envelope)

    monkeypatch.setattr(SwarmSite, "send", forging_first)
    with server(tmp_path, kits) as srv:
        sites = run_sites(srv.address, kits)
    no_errors(sites)
    check_models(tmp_path, sites, folds([ALL, ALL, ALL]), final_at="site-3")
    [why] = refused
    assert "its header is refused" in why and "site-2" in why, why


def test_the_relay_refuses_a_site_that_opens_anothers_transfer_or_claims_anothers_name(tmp_path, kits, monkeypatch):
    """Round 1: before it sends its update, site-3 tries to open the round's model transfer (site-1 sealed it) as
    its own, and to open its own update's transfer with a header that names site-1 as the sender (its own
    certificate and key). The relay refuses both, naming the transfer and the sender it expects; site-3 then sends
    its update and the job makes FedAvg's models."""
    monkeypatch.chdir(tmp_path)
    send, refused = SwarmSite.send, []

    def forging_first(self: SwarmSite, task: pb.Task, params: dict, envelope: dict) -> pb.CommitReply:
        c = self.client
        if c.site == "site-3" and task.kind == pb.Task.TRAIN and task.round == 1:
            relay_transport(c)
            honest = self._sealer(task).header
            me = Identity.from_kit(c.kit)
            posing = Identity("site-1", me.key_pem, me.cert_pem, me.ca_pem)  # its own key, another's name
            claim = Sealer(posing, task.transfer_id, peers_of(task), AnyCert(c.kit.ca)).header
            for transfer, header in ((task.model_transfer, honest), (task.transfer_id, claim)):
                refused.append(refused_open(c, transfer, header))
        return send(self, task, params, envelope)

    monkeypatch.setattr(SwarmSite, "send", forging_first)
    with server(tmp_path, kits) as srv:
        sites = run_sites(srv.address, kits)
    no_errors(sites)
    check_models(tmp_path, sites, folds([ALL, ALL, ALL]), final_at="site-3")
    assert len(refused) == 2
    assert "site 'site-3' may not open" in refused[0] and "only its sender 'site-1' may" in refused[0]
    assert "its header is refused" in refused[1] and "not 'site-1'" in refused[1]  # the CA check names the lie


# -- 3. replays ------------------------------------------------------------------------------------------------------
def test_a_record_or_a_header_replayed_from_an_earlier_transfer_is_refused(tmp_path, kits, monkeypatch, caplog):
    """Round 1 (site-2 folds it): record 1 of site-3's update is replaced, in the relay's spool file, by record 1
    of site-3's round-0 update (same index, same length, signed by site-3: only its transfer differs). Round 2
    (site-3 folds it): site-1's update is served with the header of site-1's round-1 update. Both are refused and
    left out; each round folds the other two sites' updates."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="fl_plugins.swarm.site")
    with server(tmp_path, kits) as srv:
        agg = srv.aggregator
        seen: dict[tuple[str, int], list[bytes]] = {}  # (sender, round) -> its update's records, as the relay got them
        headers: dict[tuple[str, int], bytes] = {}

        def keep(transfer_id: str, record: bytes) -> None:
            t = agg.relay.transfer(transfer_id)
            if t is not None and t.purpose == "update":
                seen.setdefault((t.sender, t.round), []).append(record)

        def replay(t: RelayTransfer) -> None:
            headers[(t.sender, t.round)] = t.header or b""
            if (t.sender, t.round) == ("site-3", 1):
                offset, n = record_span(t, 1)
                old = seen[("site-3", 0)][1]
                assert len(old) == n and old != seen[("site-3", 1)][1]
                write_at(t, offset, old)
            elif (t.sender, t.round) == ("site-1", 2):
                with t.lock:
                    t.header = headers[("site-1", 1)]

        agg.relay.on_record = keep
        after_count(monkeypatch, agg, replay)
        sites = run_sites(srv.address, kits)
    no_errors(sites)
    check_models(tmp_path, sites, folds([ALL, ("site-1", "site-2"), ("site-2", "site-3")]), final_at="site-3")
    record, header = refusals(caplog)
    assert "round 1: site 'site-3'" in record and "record 1: its signature does not verify" in record
    assert "round 2: site 'site-1'" in header and "replayed from another transfer" in header


# -- 4. the round's aggregator site fails -----------------------------------------------------------------------------
def test_the_aggregator_site_dies_mid_fold_and_another_folds_the_resent_updates(tmp_path, kits, monkeypatch, caplog):
    """Round 2 (site-3 folds it): site-3 folds, puts all but the last record of the new model at the relay, and
    dies (its connection closes). Once it has been silent for --site-timeout the aggregator picks site-1; site-1
    and site-2 send their kept updates again, sealed for site-1, without training again; site-3's update is lost
    with it and its partial model is dropped. The final model is the fold of site-1's and site-2's updates."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    steps = count_steps(monkeypatch)
    with server(tmp_path, kits, site_timeout=SILENT) as srv:
        agg, put, partial = srv.aggregator, site_module.put_sealed, []

        def dying_put(client: Any, transfer_id: str, sealer: Sealer, source: Any, envelope: Any = None) -> Any:
            t = agg.relay.transfer(transfer_id)
            if client.site != "site-3" or t is None or t.purpose != "model" or t.round != ROUNDS:
                return put(client, transfer_id, sealer, source, envelope)
            partial.append(t)
            try:
                return put(client, transfer_id, sealer, Dies(source), envelope)
            finally:
                client.close()  # the process is gone

        monkeypatch.setattr(site_module, "put_sealed", dying_put)
        sites = run_sites(srv.address, kits)
    no_errors({n: t for n, t in sites.items() if n != "site-3"})
    assert steps == {"site-1": ROUNDS, "site-2": ROUNDS, "site-3": ROUNDS}  # nobody trained again
    check_models(tmp_path, sites, folds([ALL, ALL, ("site-1", "site-2")]), final_at="site-1")
    [t] = partial
    assert t.held == t.records_declared - 1 and not t.committed and t.dropped and not t.path.exists()
    assert [(rec.round, rec.site) for rec in swarm_records(tmp_path)] == [(0, "site-1"), (1, "site-2"), (2, "site-1")]
    text = caplog.text
    assert f"aggregator site 'site-3' is replaced: it was silent for {SILENT:g} s" in text
    assert "site 'site-3''s update no longer counts" in text


class Dies:
    """A model's records, but asking for the last one kills the put (the site dies before it is whole)."""

    def __init__(self, source: Any) -> None:
        self.source, self.count, self.nbytes = source, source.count, source.nbytes

    def record(self, i: int) -> Any:
        if i == self.count - 1:
            raise FLError("the site died")
        return self.source.record(i)


def test_an_aggregator_site_that_cannot_fold_hands_the_round_to_another(tmp_path, kits, monkeypatch, caplog):
    """Round 1 (site-2 folds it): site-2's fold fails (an error in aggregate). It tells the aggregator, which
    picks site-3; every site sends its kept update again, sealed for site-3, without training again, and the job
    makes FedAvg's models."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    steps = count_steps(monkeypatch)
    aggregate, failed = SwarmSite.aggregate, []

    def failing(self: SwarmSite, task: pb.Task) -> Any:
        if self.client.site == "site-2" and task.round == 1 and not failed:
            failed.append(task.transfer_id)
            raise FLError("no space left on the device for round 1's model")
        return aggregate(self, task)

    monkeypatch.setattr(SwarmSite, "aggregate", failing)
    with server(tmp_path, kits) as srv:
        sites = run_sites(srv.address, kits)
    no_errors(sites)
    assert failed and steps == dict.fromkeys(SITES, ROUNDS)
    check_models(tmp_path, sites, folds([ALL, ALL, ALL]), final_at="site-3")
    assert [(rec.round, rec.site) for rec in swarm_records(tmp_path)] == [(0, "site-1"), (1, "site-3"), (2, "site-3")]
    assert "aggregator site 'site-2' is replaced: it could not fold the round: no space left" in caplog.text


# -- 5. no initial model ----------------------------------------------------------------------------------------------
def test_a_sites_offered_weights_are_sealed_for_every_site_the_round_needs(tmp_path, kits, monkeypatch):
    """No --initial-model: site-2 offers its weights. It asks for its first task alone (the others have not
    started yet); the offer waits for the sites round 0 needs, so its weights are sealed for all three, and the
    job makes the same models as with --initial-model."""
    monkeypatch.chdir(tmp_path)
    with server(tmp_path, kits, initial_model=None) as srv:
        workflow, asked = srv.aggregator.job.training, threading.Event()
        next_task = workflow.next_task

        def noting(s: Any, *args: Any) -> Any:
            if s.name == "site-2":
                asked.set()
            return next_task(s, *args)

        monkeypatch.setattr(workflow, "next_task", noting)
        first = start(srv.address, kits, ["site-2"], offer="site-2")
        assert asked.wait(JOIN), "site-2 never asked for a task"
        sites = join({**first, **start(srv.address, kits, ["site-1", "site-3"])})
    no_errors(sites)
    check_models(tmp_path, sites, folds([ALL, ALL, ALL]), final_at="site-3")
    assert all(sorted(t.received) == [0, 1, 2] for t in sites.values())


# -- 6. a wrong recipient certificate ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("wrong", "trained", "firsts"),
    [
        ("site-2", 1, ("it could not fold the round", "will not seal its update for it")),
        ("site-1", 2, ("will not seal its update for it", "it could not fold the round")),
    ],
)
def test_a_wrong_recipient_certificate_is_refused_and_the_job_stops_saying_so(
    tmp_path, kits, other, monkeypatch, caplog, wrong, trained, firsts
):
    """The aggregator hands out another project's certificate as `wrong`'s (a broken or hostile aggregator). No site
    seals anything for it, each refusing with a SealError that names the site and why, and the round cannot carry
    on: every global model is sealed for every site alive, `wrong` included. Each refusal is told to the aggregator,
    which hands the round to another site; once every site that could fold round 0 has failed to, the job stops
    with an error that names each failure (it had gone round the sites for ever), and every site's script hears it.

    site-2 wrong: round 0's updates are sealed for site-1 and counted; site-1 will not seal the model for site-2, so
    site-2 is picked; the sites will not seal their kept updates for site-2 (they keep them), so site-3 is picked;
    they send them to site-3 (no site trains again), which will not seal the model for site-2 either.
    site-1 wrong (round 0's aggregator site): no site seals its update for site-1, so site-2 is picked, and each
    site trains round 0 again (it kept nothing); then as above: site-2, and site-3, will not seal the model."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    steps = count_steps(monkeypatch)
    cert = load_site_kit(other.sites[wrong]).cert.decode()
    with server(tmp_path, kits) as srv:
        agg = srv.aggregator
        hello = agg.hello

        def swapping(site: str, can_offer: bool, pem: bytes | None = None, inbound: str = "") -> dict[str, Any]:
            reply = hello(site, can_offer, pem, inbound)
            if site == wrong:
                with agg.lock:
                    agg.certs[site] = cert
            return reply

        monkeypatch.setattr(agg, "hello", swapping)
        sites = run_sites(srv.address, kits)
        failed = dict(agg.failed)
    assert steps == dict.fromkeys(SITES, trained)
    bad = f"the recipient {wrong!r}: not a party's certificate signed by this project's CA"
    assert list(failed) == ["site-1", "site-2", "site-3"] and all(bad in why for why in failed.values())
    assert firsts[0] in failed["site-1"] and firsts[1] in failed["site-2"]
    assert "it could not fold the round" in failed["site-3"]
    for t in sites.values():
        assert "round 0: no site could fold it" in str(t.error) and bad in str(t.error)
        assert sorted(t.received) == [0]
    assert not swarm_records(tmp_path)
    assert "no evaluation is running" not in caplog.text  # the sites that say so after the first are answered


# -- a site that cannot open the round's model ------------------------------------------------------------------------
def test_a_site_left_out_of_a_model_does_not_hold_up_its_round(tmp_path, kits, monkeypatch):
    """Round 0 closes while site-3 counts as silent (its last call is moved back by --site-timeout at the close),
    so round 1's model is sealed for site-1 and site-2 only. site-3 is heard again at once and the round needs 3
    sites, but site-3 cannot open that model: it sits round 1 out (the round had waited for it for ever), round 1
    folds site-1's and site-2's updates, and round 2's model, sealed for all three, brings site-3 back."""
    monkeypatch.chdir(tmp_path)
    with server(tmp_path, kits) as srv:
        agg = srv.aggregator
        finalize = agg._finalize

        def closing() -> None:
            with agg.lock:
                if agg.rounds.round == 0:
                    agg.rounds.sites["site-3"].last_seen -= agg.config.site_timeout
                finalize()

        monkeypatch.setattr(agg, "_finalize", closing)
        sites = run_sites(srv.address, kits)
    no_errors(sites)
    assert sorted(sites["site-3"].received) == [0, 2]
    check_models(tmp_path, sites, folds([ALL, ("site-1", "site-2"), ALL]), final_at="site-3")
    assert [(rec.round, rec.site, rec.updates) for rec in swarm_records(tmp_path)] == [
        (0, "site-1", ALL),
        (1, "site-2", ("site-1", "site-2")),
        (2, "site-3", ALL),
    ]


def test_the_aggregator_site_dies_before_the_close_and_the_round_waits_for_the_resends(tmp_path, kits, monkeypatch):
    """Round 2 (site-3 folds it): site-1's and site-2's updates are counted, sealed for site-3, and site-3 dies as
    it is about to send its own. After --site-timeout site-1 is picked and the two updates are owed to it; site-2
    sends its own again only once the round is closing. The round waits for both resends, in the same attempt,
    and folds them (it had started new attempts, nothing to wait for, it thought, until the job failed for want of
    attempts; and it had folded site-1's update alone, closing without waiting for site-2's)."""
    monkeypatch.chdir(tmp_path)
    steps = count_steps(monkeypatch)
    both = threading.Event()
    send = SwarmSite.send

    def dying(self: SwarmSite, task: pb.Task, params: dict, envelope: dict) -> pb.CommitReply:
        if self.client.site == "site-3" and task.kind == pb.Task.TRAIN and task.round == 2:
            assert both.wait(JOIN), "site-1's and site-2's round-2 updates were never counted"
            self.client.close()  # the process is gone
            raise ConnectionError("site-3 died")
        return send(self, task, params, envelope)

    monkeypatch.setattr(SwarmSite, "send", dying)
    with server(tmp_path, kits, site_timeout=SILENT) as srv:
        agg, resend = srv.aggregator, SwarmSite.resend

        def late(self: SwarmSite, task: pb.Task, kept: Any) -> None:
            if self.client.site == "site-2" and task.round == 2:
                with agg.lock:
                    assert agg.lock.wait_for(lambda: agg.rounds.closing is not None, JOIN), "the round never closed"
            resend(self, task, kept)

        monkeypatch.setattr(SwarmSite, "resend", late)

        def counted(t: RelayTransfer) -> None:
            if t.round == 2 and {"site-1", "site-2"} <= set(agg.rounds.counted):
                both.set()

        after_count(monkeypatch, agg, counted)
        sites = run_sites(srv.address, kits)
    no_errors({n: t for n, t in sites.items() if n != "site-3"})
    assert steps == dict.fromkeys(SITES, ROUNDS)
    check_models(tmp_path, sites, folds([ALL, ALL, ("site-1", "site-2")]), final_at="site-1")
    recs = read_records(tmp_path / "run" / "metrics.jsonl")
    assert not [rec for rec in recs if isinstance(rec, AttemptRecord)]
    assert [(rec.round, rec.attempt, rec.sites) for rec in round_records(tmp_path)][-1] == (2, 0, ("site-1", "site-2"))
