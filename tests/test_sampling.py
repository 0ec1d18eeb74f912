"""Client sampling (`sample_sites`, `seed`): aggregator/rounds.py's draw, its sizes, what a new attempt keeps, and
the real aggregator over gRPC training only the sampled sites. tests/test_round_state.py's SampledRules runs the
rules with sampling as a state machine; these are the cases a reader checks by eye."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SiteThread, join_sites, load_round

from fl_plugins import record_files, records
from fl_plugins.aggregator.rounds import Close, Counted, Decision, RoundState
from fl_plugins.aggregator.sampling import sample_size
from fl_plugins.aggregator.service import AggregatorServer
from fl_plugins.config import AggregatorConfig
from fl_plugins.errors import RoundError
from fl_plugins.records import RoundRecord, SampleRecord, UpdateRecord

SITES = ["site-1", "site-2", "site-3"]
STATS = ("refolds", "updates_refused", "updates_accepted", "updates_lost", "round_restarts")


def rules(**kw: Any) -> tuple[RoundState, list[records.MetricsRecord]]:
    """Round 0's rules (RoundState alone, time passed in), and the records they emit."""
    kw = {"run_dir": "unused", "rounds": 3, "min_sites": 1, "site_timeout": 30.0, **kw}
    emitted: list[records.MetricsRecord] = []
    rs = RoundState(AggregatorConfig(**kw), dict.fromkeys(STATS, 0), emitted.append)
    rs.open(0)
    return rs, emitted


def connect(rs: RoundState, names: list[str], now: float = 0.0) -> None:
    for name in names:
        rs.touch(name, now)


def counted(site: str, attempt: int = 0) -> Counted:
    return Counted(site, attempt, f"n-{site}", b"sha", 1.0, "FULL", ["d"], [[b"c"]], {"site": site})


def draws(emitted: list[records.MetricsRecord]) -> list[SampleRecord]:
    return [r for r in emitted if isinstance(r, SampleRecord)]


# -- the size of a sample -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "alive", "k"),
    [
        (0.5, 3, 2),  # 1.5: half up
        (0.5, 5, 3),  # 2.5: half up, not to even
        (0.25, 10, 3),
        (0.58, 25, 15),  # the decimal written: 14.5, where the float product is 14.499999999999998
        (0.3, 10, 3),
        (0.1, 3, 1),  # 0.3 rounds to 0: at least one site
        (0.99, 3, 3),
        (0.5, 1, 1),
        (1.0, 4, 1),  # a count of one
        (2.0, 3, 2),
        (5.0, 3, 3),  # more than are alive: every alive site
    ],
)
def test_sample_size_rounds_half_up_and_caps_a_count(size, alive, k):
    assert sample_size(size, alive) == k


@pytest.mark.parametrize(("size", "k"), [(0.5, 2), (5.0, 3), (2.0, 2)])
def test_the_draw_takes_k_of_the_alive_sites_and_records_them(size, k):
    rs, emitted = rules(sample_sites=size, seed=3, min_sites=3)
    connect(rs, [*SITES, "gone"])
    rs.sites["gone"].last_seen = -100.0  # silent past site_timeout: not alive, not drawn
    given = {name for name in SITES if rs.offer_task(rs.sites[name], 1.0)}
    (rec,) = draws(emitted)
    assert (rec.round, rec.attempt, rec.alive, rec.seed) == (0, 0, 3, 3) and len(rec.sites) == k
    assert set(rec.sites) == given == rs.sample and set(rec.sites) <= set(SITES)


def test_the_same_seed_and_sites_draw_the_same_sample_and_the_seed_matters():
    def sample(seed: int, order: list[str], round_: int = 0) -> tuple[str, ...]:
        rs, emitted = rules(sample_sites=2.0, seed=seed, min_sites=len(order))
        rs.open(round_)
        connect(rs, order)
        rs.offer_task(rs.sites[order[-1]], 1.0)
        return draws(emitted)[0].sites

    names = [f"site-{i}" for i in range(6)]
    assert sample(7, names) == sample(7, names[::-1])  # the order sites connected in does not matter
    assert len({sample(seed, names) for seed in range(12)}) > 1
    assert len({sample(7, names, r) for r in range(12)}) > 1  # each round draws again


# -- the close rules use the sample -------------------------------------------------------------------------------
def test_a_sample_smaller_than_min_sites_closes_all_in():
    """min_sites 3 starts the round; two sampled updates are all it waits for (rule (a) with needed = 2)."""
    rs, _ = rules(sample_sites=2.0, min_sites=3)
    connect(rs, SITES)
    for name in SITES:
        rs.offer_task(rs.sites[name], 1.0)
    assert rs.needed(Close.ALL_IN) == 2
    (outside,) = set(SITES) - set(rs.sample or ())
    with pytest.raises(RoundError, match=f"site {outside!r} was not given round 0's task"):
        rs.may_update(rs.sites[outside], 0, 0, 1.0)
    first, second = sorted(rs.sample or ())
    rs.count(counted(first))
    assert rs.decide(2.0) is None  # the other sampled site is still training
    rs.count(counted(second))
    assert rs.decide(2.0) is Decision.CLOSE and rs.closing is Close.ALL_IN and rs.settle()


def test_the_deadline_needs_at_most_the_sample():
    rs, _ = rules(sample_sites=1.0, min_updates=2, round_deadline=10.0)
    connect(rs, SITES)
    (name,) = [n for n in SITES if rs.offer_task(rs.sites[n], 1.0)]
    rs.count(counted(name))
    assert rs.needed(Close.DEADLINE) == 1
    rs.sites[name].took = None  # (so rule (a) does not close first: the deadline's rule alone)
    assert rs.decide(12.0) is Decision.CLOSE


# -- a sampled site that leaves -----------------------------------------------------------------------------------
def test_a_new_attempt_keeps_the_counted_and_the_alive_and_replaces_the_gone():
    """5 sites, 3 sampled: one sends, one leaves, one is slow; past the deadline attempt 1 keeps the counted and the
    slow site (it may still be training) and draws the gone one's replacement. Back, the gone site is refused."""
    names = [*SITES, "site-4", "site-5"]
    rs, emitted = rules(sample_sites=3.0, seed=5, min_sites=4, round_deadline=10.0, min_updates=3)
    connect(rs, names)
    for name in names:
        rs.offer_task(rs.sites[name], 1.0)
    sent, gone, slow = sorted(rs.sample or ())
    rs.began_update(rs.sites[sent], 0, 0)
    rs.count(counted(sent))
    for name in names:
        if name != gone:
            rs.touch(name, 40.0)
    assert rs.decide(40.0) is Decision.NEW_ATTEMPT  # past the deadline with 1 of 3
    assert rs.new_attempt(40.0)
    rec = draws(emitted)[-1]
    assert (rec.attempt, rec.alive) == (1, 4) and len(rec.sites) == 3
    assert {sent, slow} <= set(rec.sites) and gone not in rec.sites, "counted and alive: kept; gone: replaced"
    (new,) = set(rec.sites) - {sent, slow}
    assert rs.offer_task(rs.sites[new], 41.0) and rs.offer_task(rs.sites[slow], 41.0)
    assert not rs.offer_task(rs.sites[sent], 41.0)
    rs.touch(gone, 42.0)
    assert not rs.offer_task(rs.sites[gone], 42.0)
    with pytest.raises(RoundError, match=f"site {gone!r} is not in the sample of round 0 attempt 1"):
        rs.may_update(rs.sites[gone], 0, 0, 42.0)  # it holds attempt 0's task
    rs.may_update(rs.sites[slow], 0, 0, 42.0)  # attempt 0's task, still sampled: its update is taken


def test_a_new_attempt_with_fewer_than_min_sites_alive_waits_for_them_to_draw():
    """Its sampled site gone, a round of 2 sites (min_sites 2) has 1 alive at its new attempt: it draws once the
    gone site is back, as the round's start would, instead of drawing no one and burning its attempts."""
    rs, emitted = rules(sample_sites=1.0, seed=2, min_sites=2, round_deadline=10.0)
    connect(rs, SITES[:2])
    for name in SITES[:2]:
        rs.offer_task(rs.sites[name], 1.0)
    (gone,) = rs.sample or ()
    (other,) = set(SITES[:2]) - {gone}
    rs.touch(other, 40.0)
    assert rs.decide(40.0) is Decision.NEW_ATTEMPT and rs.new_attempt(40.0)
    assert rs.started is None and rs.decide(41.0) is None and not rs.offer_task(rs.sites[other], 41.0)
    assert len(draws(emitted)) == 1
    rs.touch(gone, 50.0)
    rs.offer_task(rs.sites[other], 50.0)
    assert rs.started == 50.0 and draws(emitted)[-1].attempt == 1 and draws(emitted)[-1].alive == 2


def test_a_sampled_site_that_leaves_is_not_replaced_within_the_attempt():
    """As a site that leaves without sampling: rule (b) closes the round with the updates it has."""
    rs, _ = rules(sample_sites=2.0, min_sites=3)
    connect(rs, SITES)
    for name in SITES:
        rs.offer_task(rs.sites[name], 1.0)
    stays, leaves = sorted(rs.sample or ())
    rs.count(counted(stays))
    rs.touch(stays, 40.0)
    (other,) = set(SITES) - {stays, leaves}
    rs.touch(other, 40.0)
    assert not rs.offer_task(rs.sites[other], 40.0)
    assert rs.decide(40.0) is Decision.CLOSE and rs.closing is Close.SITES_LEFT  # rule (b): closes with 1


def test_after_a_restart_the_same_sites_draw_the_same_sample():
    """A site resuming its upload after an aggregator restart starts the round: the draw is made again, and with
    the same sites alive it is the same one, so a sampled site's upload goes on and another site's is refused."""
    before, emitted = rules(sample_sites=2.0, seed=9, min_sites=3)
    connect(before, SITES)
    before.offer_task(before.sites[SITES[0]], 1.0)
    sample = draws(emitted)[0].sites
    (outside,) = set(SITES) - set(sample)
    for site, ok in ((sample[0], True), (outside, False)):
        after, emitted = rules(sample_sites=2.0, seed=9, min_sites=3)
        after.restarted_at = 0
        connect(after, SITES[::-1])
        if ok:
            after.may_update(after.sites[site], 0, 0, 2.0)  # resumes the round
        else:
            with pytest.raises(RoundError, match=f"site {site!r} is not in the sample of round 0 attempt 0"):
                after.may_update(after.sites[site], 0, 0, 2.0)
        assert after.started == 2.0 and draws(emitted)[0].sites == sample


def test_without_sample_sites_nothing_is_drawn():
    rs, emitted = rules(min_sites=3)
    connect(rs, SITES)
    assert all(rs.offer_task(rs.sites[n], 1.0) for n in SITES) and rs.sample is None and not draws(emitted)


# -- the real aggregator over gRPC ----------------------------------------------------------------------------------
def federation(run_dir: Path, initial: Path, seed: int) -> dict[str, SiteThread]:
    """3 sites on 127.0.0.1, 2 sampled a round, 2 rounds; site-i sends all values i with weight i."""
    cfg = AggregatorConfig(run_dir=run_dir, rounds=2, min_sites=3, initial_model=initial, sample_sites=2, seed=seed,
                           linger=0.2)  # fmt: skip
    srv = AggregatorServer(cfg).start()
    try:
        sites = {}
        for i, name in enumerate(SITES, 1):

            def step(r: int, params: dict, i: int = i) -> tuple[dict, str, float]:
                return {"w": np.full(4, float(i), np.float32)}, "FULL", float(i)

            sites[name] = SiteThread(srv.address, name, step)
        join_sites(*sites.values(), timeout=60)
    finally:
        srv.stop(0)
    return sites


def test_the_aggregator_trains_only_the_sampled_sites(tmp_path):
    from safetensors.numpy import save_file

    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, str(initial))
    sites = federation(tmp_path / "run", initial, seed=4)
    recs = record_files.read_records(tmp_path / "run" / records.METRICS)
    samples = {r.round: r for r in recs if isinstance(r, SampleRecord)}
    assert sorted(samples) == [0, 1]
    for r, rec in samples.items():
        chosen = set(rec.sites)
        assert len(chosen) == 2 and (rec.attempt, rec.alive, rec.seed) == (0, 3, 4)
        assert {u.site for u in recs if isinstance(u, UpdateRecord) and u.round == r} == chosen
        (done,) = [x for x in recs if isinstance(x, RoundRecord) and x.round == r]
        assert set(done.sites or ()) == chosen
        trained = {name for name, s in sites.items() if r in s.received}
        assert trained == chosen, "only the sampled sites got round r's task"
        weights = {int(n[-1]): float(n[-1]) for n in chosen}  # site-i: value i, weight i
        mean = sum(v * w for v, w in weights.items()) / sum(weights.values())
        np.testing.assert_allclose(load_round(tmp_path / "run", r + 1)["w"], mean, rtol=1e-6)
    again = federation(tmp_path / "again", initial, seed=4)
    redo = [r for r in record_files.read_records(tmp_path / "again" / records.METRICS) if isinstance(r, SampleRecord)]
    assert [r.sites for r in redo] == [samples[0].sites, samples[1].sites], "the same seed draws the same sites"
    assert {n: sorted(s.received) for n, s in again.items()} == {n: sorted(s.received) for n, s in sites.items()}
