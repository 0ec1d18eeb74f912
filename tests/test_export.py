"""Taking the model home: at the end of a job the HF callback leaves the final global model in `trainer.model` and
saves it to `args.output_dir`; `fl-plugins export` writes the run's global model as a folder transformers / peft
load (the same outputs as the global model's tensors), with a model card; what cannot be exported says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import SiteThread, load_round  # noqa: E402
from test_hf import Rows, args, tiny_bert  # noqa: E402
from transformers import BertForSequenceClassification, Trainer  # noqa: E402

import fl_plugins.hf as flare  # noqa: E402
from fl_plugins.errors import ConfigError  # noqa: E402
from fl_plugins.export import descriptions, export  # noqa: E402
from fl_plugins.integrations.hf_take_home import PIECE, records  # noqa: E402
from fl_plugins.model_card import hub_id  # noqa: E402
from fl_plugins.records import LogRecord  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _federate(server_factory, site, tmp_path, model, rounds=2):
    """The HF site and a second site that sends back what it received (so the global model is the mean of the
    two, not the HF site's own weights). Returns (trainer, aggregator server)."""
    srv = server_factory(rounds=rounds, min_sites=2, initial=None)
    other = SiteThread(srv.address, "site-2", lambda r, p: ({k: np.array(v) for k, v in p.items()}, "FULL", 4))
    other.start()
    site(srv, "site-1")
    tr = Trainer(model=model, args=args(tmp_path, max_steps=4), train_dataset=Rows(),
                 callbacks=[flare.FLTrainerCallback(local_steps=4)])  # fmt: skip
    tr.train()
    other.join(60)
    assert not other.is_alive() and other.error is None
    assert srv.wait() == 0
    return tr, srv


def _logits(model, rows=Rows(n=8, seed=9)) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=rows.ids, attention_mask=torch.ones_like(rows.ids)).logits


@pytest.mark.integration
def test_the_callback_leaves_the_final_global_model_and_export_reloads_it(server_factory, site, tmp_path):
    tr, srv = _federate(server_factory, site, tmp_path, tiny_bert())
    run_dir = srv.aggregator.config.run_dir
    final = load_round(run_dir, 2)
    local = {k: v.detach().numpy() for k, v in tr.model.state_dict().items()}
    for k, v in final.items():  # trainer.model is the global model, not this site's last local model
        np.testing.assert_array_equal(local[k], v, err_msg=k)
    saved = BertForSequenceClassification.from_pretrained(tmp_path / "out")  # output_dir, as save_model() does
    assert torch.equal(_logits(saved), _logits(tr.model))

    out = export(run_dir, tmp_path / "exported")
    home = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(home) is BertForSequenceClassification
    assert torch.equal(_logits(home), _logits(tr.model))
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "site-1 (2), site-2 (2)" in card
    assert "| 0 | site-1, site-2 |" in card and "commit " in card


@pytest.mark.integration
def test_a_lora_run_exports_an_adapter_peft_loads(server_factory, site, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    tr, srv = _federate(server_factory, site, tmp_path, peft.get_peft_model(tiny_bert(seed=0), cfg))
    out = export(srv.aggregator.config.run_dir, tmp_path / "exported", round_=1)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    home = peft.PeftModel.from_pretrained(tiny_bert(seed=0), out)  # the same base (its weights never travel)
    ref = peft.get_peft_model(tiny_bert(seed=0), cfg)
    round1 = {k: torch.from_numpy(v) for k, v in load_round(srv.aggregator.config.run_dir, 1).items()}
    peft.set_peft_model_state_dict(ref, round1)
    assert torch.equal(_logits(home), _logits(ref))
    assert not torch.equal(_logits(home), _logits(tr.model))  # round 1's, not the final (round 2) model
    assert "library_name: peft" in (out / "README.md").read_text()


def test_a_long_description_is_cut_into_pieces_and_joined(tmp_path):
    parts = {"info": {"library": "transformers", "class": "X"}, "config": {"labels": ["a" * 50] * 300}}
    recs = records(parts)
    assert len([r for r in recs if r["part"] == "config"]) > 1 and all(len(r["value"]) <= PIECE for r in recs)
    lines = [LogRecord.from_site("site-1", 0, dict(r)).to_json() for r in recs]
    lines.insert(1, {"round": 0, "key": "loss", "value": 1.0, "site": "site-1"})  # other records in between
    (tmp_path / "logs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (found,) = descriptions(tmp_path)
    assert (found.site, found.info, found.config) == ("site-1", parts["info"], parts["config"])


@pytest.mark.integration
def test_what_cannot_be_exported_says_why(server_factory, tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory"):
        export(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no global model was written here"):
        export(tmp_path / "empty", tmp_path / "out")
    srv = server_factory(rounds=1, initial={"w": np.ones(4, np.float32)})  # a client-API site: no description
    plain = SiteThread(srv.address, "site-1", lambda r, p: ({"w": p["w"] + 1}, "FULL", 1.0))
    plain.start()
    plain.join(60)
    assert srv.wait() == 0
    with pytest.raises(ConfigError, match="no site described its model .*client-API script"):
        export(srv.aggregator.config.run_dir, tmp_path / "out")


@pytest.mark.integration
def test_a_round_that_is_not_kept_is_named(server_factory, site, tmp_path):
    _, srv = _federate(server_factory, site, tmp_path, tiny_bert(), rounds=1)
    with pytest.raises(ConfigError, match=r"round 7's global model is not kept \(kept rounds: \[0, 1\]\)"):
        export(srv.aggregator.config.run_dir, tmp_path / "out", round_=7)
    cli = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "export", str(srv.aggregator.config.run_dir), "-o",
                          str(tmp_path / "cli")], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / "config.json").is_file()
    again = subprocess.run(cli.args, capture_output=True, text=True, cwd=ROOT, timeout=300)  # an earlier export
    assert again.returncode == 0, again.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"mine is not empty and holds no model or earlier export: give a new or empty"):
        export(srv.aggregator.config.run_dir, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_the_card_names_a_hub_base_model_and_keeps_a_sites_local_path_out_of_its_metadata(tmp_path):
    assert hub_id("meta-llama/Llama-2-7b-hf") and hub_id("gpt2")
    local = tmp_path / "models" / "llama"
    local.mkdir(parents=True)
    assert not hub_id(str(local)) and not hub_id("./llama") and not hub_id("~/models/llama")
    assert not hub_id("a/b/c") and not hub_id("C:\\models\\llama") and not hub_id("")


@pytest.mark.integration
def test_a_client_api_script_receives_the_final_model_once_the_job_is_over(server_factory):
    import fl_plugins.client as api

    srv = server_factory(rounds=2, min_sites=2, initial={"w": np.ones(10, np.float32)})
    other = SiteThread(srv.address, "site-2", lambda r, p: ({"w": p["w"] * 0}, "FULL", 1.0))
    other.start()
    try:
        api.init(srv.address, "site-1", params_format="numpy")
        assert api.receive_final() is None  # not before the end
        while api.is_running():
            m = api.receive()
            api.send(api.FLModel(params={"w": m.params["w"] + 4}, params_type="FULL"))
        final = api.receive_final()
        assert final is not None and final.current_round == 2 and final.meta["final"] is True
        np.testing.assert_array_equal(final.params["w"], load_round(srv.aggregator.config.run_dir, 2)["w"])
        np.testing.assert_array_equal(final.params["w"], np.full(10, 3.25, np.float32))  # ((1 + 4) / 2 + 4) / 2
        assert api.receive_final() is final  # fetched once
    finally:
        api.shutdown()
    other.join(60)
    assert other.error is None


@pytest.mark.integration
def test_the_final_model_is_fetched_at_end_even_if_the_aggregator_stops_soon_after(server_factory, site, tmp_path):
    """`fl-plugins server` stops `linger` seconds after the end (plus the streams still open): a trainer that is
    slow to reach on_train_end (saving, logging) still gets the final model, fetched as soon as END named it."""
    import threading

    from transformers import TrainerCallback

    srv = server_factory(rounds=1, min_sites=2, initial=None, linger=0.2)
    other = SiteThread(srv.address, "site-2", lambda r, p: ({k: np.array(v) for k, v in p.items()}, "FULL", 4))
    other.start()
    stopped = threading.Event()

    def serve_then_stop():  # what `fl-plugins server` does
        srv.wait()
        srv.stop(0)
        stopped.set()

    threading.Thread(target=serve_then_stop, daemon=True).start()

    class Slow(TrainerCallback):  # runs before FLTrainerCallback's on_train_end
        def on_train_end(self, args, state, control, **kwargs):
            assert stopped.wait(30), "the aggregator did not stop"

    site(srv, "site-1")
    model = tiny_bert()
    tr = Trainer(model=model, args=args(tmp_path, max_steps=4), train_dataset=Rows(),
                 callbacks=[Slow(), flare.FLTrainerCallback(local_steps=4)])  # fmt: skip
    tr.train()
    other.join(60)
    final = load_round(srv.aggregator.config.run_dir, 1)
    local = {k: v.detach().numpy() for k, v in tr.model.state_dict().items()}
    for k, v in final.items():
        np.testing.assert_array_equal(local[k], v, err_msg=k)


@pytest.mark.integration
def test_a_server_key_prefix_is_taken_off_the_exported_names(server_factory, site, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    srv = server_factory(rounds=1, min_sites=1, initial=None)
    site(srv, "site-1")
    tr = Trainer(model=peft.get_peft_model(tiny_bert(seed=0), cfg), args=args(tmp_path, max_steps=2),
                 train_dataset=Rows(),
                 callbacks=[flare.FLTrainerCallback(local_steps=2, server_key_prefix="model.")])  # fmt: skip
    tr.train()
    assert srv.wait() == 0
    assert all(k.startswith("model.") for k in load_round(srv.aggregator.config.run_dir, 1))
    home = peft.PeftModel.from_pretrained(tiny_bert(seed=0), export(srv.aggregator.config.run_dir, tmp_path / "o"))
    assert torch.equal(_logits(home), _logits(tr.model))
