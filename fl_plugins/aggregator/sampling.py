"""Which sites train an attempt: FedAvg's seeded sample (`sample_sites`), or the cyclic workflow's one site a visit.

FedAvg with `sample_sites`: k of the n sites alive when the attempt starts (rounds.py's docstring states the rule,
`draw` applies it). Cyclic (FLARE's cyclic weight transfer): every round of the aggregator is one *visit*: one
site trains on the model the previous site sent, and its update (alone) becomes the next global model; `rounds`
counts cycles, each of `min_sites` visits (config.py's `total_rounds`). Visit L of the job goes to the site at
position L in the turn order: the sites known to the aggregator, by name (`cyclic_order="fixed"`), or shuffled per
cycle with a generator seeded by ("seed:cycle:C") (`"shuffle"`); with more sites connected than `min_sites` the
turns go on around all of them. A site whose turn it is but that is not connected is skipped (the next connected
one in the order trains), and so is one that left during its visit: the attempt that follows draws again.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from decimal import ROUND_HALF_UP, Decimal

from fl_plugins.config import AggregatorConfig


def sample_size(size: float, n: int) -> int:
    """Sites sampled of `n` by `sample_sites` = `size`: a fraction of them, rounded half up (the decimal the user
    wrote: 0.58 of 25 is 15, where the float product is 14.4999...), at least one; or a count, at most `n`."""
    if size < 1:
        return max(1, int((Decimal(str(size)) * n).quantize(Decimal(1), ROUND_HALF_UP)))
    return min(int(size), n)


def draw(
    rules: AggregatorConfig,
    round_: int,
    attempt: int,
    alive: list[str],
    kept: set[str],
    known: Collection[str],
) -> frozenset[str] | None:
    """The attempt's sample: None (every site) without sampling; `alive` sorted, `kept` the sites a new attempt
    keeps (counted, or sampled before and still alive), `known` every site seen."""
    if rules.workflow.startswith("cyclic"):
        return frozenset([turn(rules, round_, alive, known)]) if alive else frozenset()
    size = rules.sample_sites
    if size is None:
        return None
    pool = [n for n in alive if n not in kept]  # sorted: the draw depends on the names, not on arrival order
    more = min(max(0, sample_size(size, len(pool) + len(kept)) - len(kept)), len(pool))
    rng = random.Random(f"{rules.seed}:{round_}:{attempt}")  # a str seed is hashed (sha512): not salted
    return frozenset(kept.union(rng.sample(pool, more)))


def turn(rules: AggregatorConfig, visit: int, alive: list[str], known: Collection[str]) -> str:
    """The site that trains visit `visit` of a cyclic job: the one at its position in the turn order, or the next
    connected one after it."""
    order = sorted(set(known) | set(alive))
    cycle = visit // max(1, rules.min_sites)
    if rules.cyclic_order == "shuffle":
        random.Random(f"{rules.seed}:cycle:{cycle}").shuffle(order)
    first = visit % len(order)
    for i in range(len(order)):
        name = order[(first + i) % len(order)]
        if name in alive:
            return name
    raise AssertionError("no site is connected")  # (the caller draws only with a site alive)
