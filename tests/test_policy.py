"""A site's policy (policy.yaml in its kit): the site refuses jobs and task types it has not allowed, says so in
its log and to the aggregator, and the job goes on with the other sites."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")

from conftest import SiteThread, join_sites, save_numpy  # noqa: E402

from fl_plugins.aggregator.core import AggregatorConfig  # noqa: E402
from fl_plugins.aggregator.service import AggregatorServer  # noqa: E402
from fl_plugins.client.site import SiteClient  # noqa: E402
from fl_plugins.errors import ConfigError, PolicyError  # noqa: E402
from fl_plugins.security.policy import load_policy, parse_policy  # noqa: E402
from fl_plugins.security.provision import provision_local  # noqa: E402
from fl_plugins.wire.proto import fl_pb2 as pb  # noqa: E402

INITIAL = {"w": np.arange(4, dtype=np.float32)}


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_local(tmp_path_factory.mktemp("kits") / "kits", ["site-1", "site-2"])


def _server(tmp_path: Path, kits, job_id: str, min_sites: int = 1) -> AggregatorServer:
    cfg = AggregatorConfig(run_dir=tmp_path / "run", rounds=1, min_sites=min_sites, job_id=job_id, linger=0.5,
                           initial_model=save_numpy(tmp_path / "init.safetensors", INITIAL))  # fmt: skip
    return AggregatorServer(cfg, "127.0.0.1:0", kit=kits.server).start()


def _with_policy(kits, site: str, text: str, into: Path) -> Path:
    kit = into / site
    shutil.copytree(kits.sites[site], kit)
    (kit / "policy.yaml").write_text(text)
    return kit


def _records(tmp_path: Path) -> list[dict]:
    p = tmp_path / "run" / "logs.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.integration
def test_a_job_the_policy_does_not_list_is_refused_at_the_site(kits, tmp_path):
    kit = _with_policy(kits, "site-2", "jobs: ['sentiment-*']\n", tmp_path)
    srv = _server(tmp_path, kits, job_id="fraud-detection")
    try:
        refused = SiteThread(srv.address, "site-2", lambda r, p: (p, "FULL", 1.0), kit=kit, heartbeat=0)
        good = SiteThread(srv.address, "site-1", lambda r, p: ({k: v + 1 for k, v in p.items()}, "FULL", 1.0),
                          kit=kits.sites["site-1"])  # fmt: skip
        refused.start()
        refused.join(30)
        assert isinstance(refused.error, PolicyError)
        assert "does not accept job 'fraud-detection'" in str(refused.error)
        assert "sentiment-*" in str(refused.error)
        join_sites(good)  # the job goes on with the other site
        assert srv.wait() == 0
    finally:
        srv.stop(0)
    notes = [r for r in _records(tmp_path) if r["key"] == "policy_refused"]
    assert [(r["site"], r["round"]) for r in notes] == [("site-2", 0)]  # the aggregator was told, by whom
    assert "fraud-detection" in notes[0]["value"]


@pytest.mark.integration
def test_a_task_type_the_policy_does_not_allow_is_refused_and_an_allowed_job_runs(kits, tmp_path):
    kit = _with_policy(kits, "site-1", "tasks: [evaluate]\njobs: [demo-*]\n", tmp_path)
    srv = _server(tmp_path, kits, job_id="demo-7")
    try:
        site = SiteThread(srv.address, "site-1", lambda r, p: (p, "FULL", 1.0), kit=kit, heartbeat=0)
        site.start()
        site.join(30)
        assert isinstance(site.error, PolicyError) and "does not run 'train' tasks" in str(site.error)
        assert site.received == {}  # refused before downloading anything
        allowed = _with_policy(kits, "site-2", "tasks: [train, evaluate]\njobs: [demo-*]\n", tmp_path / "b")
        join_sites(SiteThread(srv.address, "site-2", lambda r, p: (p, "FULL", 1.0), kit=allowed))
        assert srv.wait() == 0
    finally:
        srv.stop(0)


@pytest.mark.parametrize(("text", "expected"), [
    ("task: [train]\n", "unknown key `task`; did you mean `tasks`?"),
    ("tasks: [trian]\n", "`tasks[0]` must be one of train, evaluate, submit_model (got 'trian'); did you mean"),
    ("tasks: train\n", "`tasks` must be a list"),
    ("jobs: []\n", "`jobs` must be a non-empty list"),
    ("- train\n", "a site policy is a mapping"),
])  # fmt: skip
def test_policy_file_errors_name_the_file_and_key(tmp_path, text, expected):
    (tmp_path / "policy.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_policy(tmp_path)
    assert expected in str(e.value) and str(tmp_path / "policy.yaml") in str(e.value)


def test_no_policy_file_allows_everything_and_patterns_match(tmp_path):
    assert load_policy(tmp_path) is None
    p = parse_policy({"jobs": ["a*", "exact"]}, tmp_path / "policy.yaml")
    p.check_job("abc")
    p.check_job("exact")
    p.check_task("submit_model")
    with pytest.raises(PolicyError):
        p.check_job("exactly")


def _restart(tmp_path: Path, kits, address: str, job_id: str) -> AggregatorServer:
    """Another aggregator on the same address under `job_id`, as after `fl-plugins server --job-id` again."""
    cfg = AggregatorConfig(run_dir=tmp_path / f"run-{job_id}", rounds=1, min_sites=1, job_id=job_id, linger=0.5,
                           initial_model=save_numpy(tmp_path / "init.safetensors", INITIAL))  # fmt: skip
    return AggregatorServer(cfg, address, kit=kits.server).start()


@pytest.mark.integration
def test_an_aggregator_restarted_under_a_job_the_policy_does_not_list_is_refused_at_the_next_task(
        kits, tmp_path, caplog):  # fmt: skip
    kit = _with_policy(kits, "site-1", "jobs: ['demo-*']\n", tmp_path)
    srv = _server(tmp_path, kits, job_id="demo-1")
    address = srv.address
    site = SiteClient(address, kit=kit, heartbeat=0, retry_timeout=30)
    try:
        site.connect()
        assert site.job_id == "demo-1"
        srv.stop(0)
        srv = _restart(tmp_path, kits, address, "demo-2")  # another job the policy lists: the site goes on
        with caplog.at_level("WARNING"):
            assert site.next_task(poll=2).kind == pb.Task.TRAIN
        assert site.job_id == "demo-2"
        assert "now runs job 'demo-2' (this site connected to job 'demo-1')" in caplog.text
        srv.stop(0)
        srv = _restart(tmp_path, kits, address, "fraud-detection")  # one it does not list: refused at the site
        with pytest.raises(PolicyError, match=r"policy \(.*policy.yaml\) does not accept job 'fraud-detection': it "
                                              r"accepts demo-\*; add the job to `jobs:`"):  # fmt: skip
            site.next_task(poll=2)
        assert "site 'site-1' refuses: this site's policy" in caplog.text
    finally:
        site.close()
        srv.stop(0)
    notes = [json.loads(x) for x in (tmp_path / "run-fraud-detection" / "logs.jsonl").read_text().splitlines()]
    assert [(r["key"], r["site"]) for r in notes] == [("policy_refused", "site-1")]  # the aggregator was told
    assert "does not accept job 'fraud-detection'" in notes[0]["value"]
