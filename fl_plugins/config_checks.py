"""Checks of settings that hold together across several of them (config.py's `AggregatorConfig.__post_init__`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fl_plugins.errors import ConfigError

if TYPE_CHECKING:
    from fl_plugins.config import AggregatorConfig


def check_swarm(config: AggregatorConfig) -> None:
    """What a swarm job cannot do yet (docs/swarm.md): the sites fold with FedAvg, and evaluations between and after
    the rounds are the sites' own (each keeps the global model that scored best on its data)."""
    if config.strategy != "fedavg":
        raise ConfigError(
            f"`strategy` {config.strategy} (--strategy) keeps state between rounds at the aggregator; in a swarm job "
            "a different site folds each round: use fedavg (the default) with --workflow swarm"
        )
    if config.update_compression != "none" or config.model_compression != "none":
        raise ConfigError(
            "--workflow swarm does not compress transfers (yet): its sites seal and fold each other's weights; drop "
            "`update_compression` and `model_compression` (transfer.*) or use the fedavg workflow"
        )
    if config.accumulator_dir is not None or config.keep_rounds is not None:
        raise ConfigError(
            "--workflow swarm folds at the sites and keeps no global rounds at the aggregator: drop "
            "`accumulator_dir` and `keep_rounds` (aggregation.*)"
        )
    if config.evaluate_every or config.sample_sites is not None:
        raise ConfigError(
            "--workflow swarm does not take `evaluate_every` or `sample_sites` (yet): every site trains each round and "
            "evaluates each global model it receives; drop those settings"
        )
