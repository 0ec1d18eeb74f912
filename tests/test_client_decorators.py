"""FLARE's decorator form (`@flare.train`, `@flare.evaluate`) over the in-memory transport: the tutorial's loop
runs with the import swapped, the evaluated metrics travel with the update, and misuse says what to return."""

from __future__ import annotations

import numpy as np
import pytest

import fl_plugins.client as flare
from fl_plugins.errors import ConfigError

pytestmark = pytest.mark.usefixtures("no_sockets")


@pytest.fixture
def fed(in_memory):
    return lambda **kw: in_memory(initial={"w": np.zeros(3, np.float32)}, **kw)


def test_the_tutorial_loop_runs_with_the_import_swapped(fed):
    f = fed(rounds=2)
    f.activate("site-1")
    seen: list[tuple[str, int]] = []

    @flare.train
    def train(input_model=None, step=1.0):
        seen.append(("train", input_model.current_round))
        return flare.FLModel(params={"w": input_model.params["w"] + step}, meta={"NUM_STEPS_CURRENT_ROUND": 2})

    @flare.evaluate
    def evaluate(input_model):
        seen.append(("evaluate", input_model.current_round))
        return float(input_model.params["w"][0])  # a number: travels as {"metric": value}

    while flare.is_running():
        input_model = flare.receive()
        evaluate(input_model=input_model)
        train(input_model=input_model, step=0.5)
    assert seen == [("evaluate", 0), ("train", 0), ("evaluate", 1), ("train", 1)]
    updates = f.events("update")
    assert [(u["round"], u["weight"], u["metrics"]) for u in updates] == [
        (0, 2, {"metric": 0.0}),
        (1, 2, {"metric": 0.5}),
    ]
    f.wait()


def test_a_positional_model_is_replaced_and_the_other_arguments_kept(fed):
    f = fed(rounds=1)
    f.activate("site-1")

    @flare.train
    def train(model, step):
        return flare.FLModel(params={"w": model.params["w"] + step})

    train("placeholder", 2.0)
    assert not flare.is_running()
    f.wait()
    from conftest import load_round

    np.testing.assert_array_equal(load_round(f.run_dir, 1)["w"], np.full(3, 2.0, np.float32))


def test_misuse_says_what_to_return(fed):
    f = fed(rounds=1)
    f.activate("site-1")

    @flare.train
    def no_model(input_model=None):
        return {"w": input_model.params["w"]}

    @flare.evaluate
    def nothing(input_model=None):
        return None

    with pytest.raises(ConfigError, match="must return an FLModel"):
        no_model()
    with pytest.raises(ConfigError, match="returned None"):
        nothing()
