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
    # the job's last task is the final evaluation: evaluate() answers it, and train() has nothing left to train
    assert seen == [("evaluate", 0), ("train", 0), ("evaluate", 1), ("train", 1), ("evaluate", 2)]
    updates = f.events("update")
    assert [(u["round"], u["weight"], u["metrics"]) for u in updates] == [
        (0, 2, {"metric": 0.0}),
        (1, 2, {"metric": 0.5}),
    ]
    f.wait()
    assert [(e["round"], e["metrics"]) for e in f.events("evaluation")] == [(2, {"metric": 1.0})]


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


def test_the_three_decorators_answer_a_cross_site_evaluation(fed):
    """Training, then SUBMIT_MODEL (the site's best model) and EVALUATE of every model: each decorated function
    answers its task; the matrix holds what `evaluate` returned."""
    f = fed(rounds=1, workflow="fedavg,cross-site-eval")
    f.activate("site-1")
    best = {"w": np.full(3, 7.0, np.float32)}

    @flare.train
    def train(input_model):
        return flare.FLModel(params={"w": input_model.params["w"] + 1}, meta={"NUM_STEPS_CURRENT_ROUND": 1})

    @flare.evaluate
    def evaluate(input_model):
        return {"mean": float(np.mean(input_model.params["w"]))}

    @flare.submit_model
    def submit(input_model):
        assert input_model.meta[flare.MetaKey.SUBMIT_MODEL_NAME] == "best_model"
        return best  # the params dict: sent as FULL params

    tasks = []
    while flare.is_running():
        input_model = flare.receive()
        tasks.append(flare.get_task_name())
        if flare.is_submit_model():
            submit(input_model=input_model)
        elif flare.is_evaluate():
            evaluate(input_model=input_model)
        else:
            with pytest.raises(ConfigError, match="called during a 'train' task"):
                submit(input_model=input_model)
            train(input_model=input_model)
    assert tasks == ["train", "submit_model", "validate", "validate"]
    f.wait()
    import json

    m = json.loads((f.run_dir / "cross_site_eval.json").read_text())
    assert m["results"]["global"]["site-1"] == {"metrics": {"mean": 1.0}}
    assert m["results"]["site-1"]["site-1"] == {"metrics": {"mean": 7.0}}
