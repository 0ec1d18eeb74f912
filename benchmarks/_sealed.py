"""`transfer.py --sealed`: the sealed path (swarm learning, issue 13) beside the mTLS path, same model, same run.

Kits from `provision_local` (the project's CA, an aggregator kit, kits for site-1 and site-2). Three processes,
as transfer.py's other cases: an mTLS `AggregatorServer` (its `--initial-model` written beforehand), site-1 and
site-2 (`SiteClient` with their kits, torch tensors).

  mTLS      site-1 runs the aggregator's FedAvg job alone (min_sites 1, 1 + repeats rounds): per round it times
            `download()` (aggregator -> site) and `upload()` until the commit is acknowledged (site -> aggregator,
            folded into the float32 accumulator). Round 0 is "first", the median of the later rounds "steady".
  sealed    after that job, per repeat: the aggregator expects a transfer from site-1 to site-2 at its relay
            (`agg.relay.expect`, as the swarm coordinator and tests/test_relay.py do); site-1 seals the model it
            holds for site-2's certificate (`ModelRecords.of`: the manifest and its shard digests, then
            `put_sealed`: seal each record, RelayOpen / RelayPut / RelayCommit, the relay spools the ciphertext to
            RUN_DIR/relay); site-2 then gets and opens it into tensors (`receive_model`, into the previous
            repeat's tensors after the first, as a steady mTLS download does); the transfer is dropped. The put is
            "site -> aggregator", the get "aggregator -> site". Repeat 0 is "first", the median of the rest
            "steady". site-1 also times sealing every record with no network ("seal only", CPU).

MB/s = the model's bytes (plaintext) / seconds, 1 MB = 1e6 bytes. Target: sealed/mTLS >= 0.8 each way (steady),
the issue's bound (AES-GCM runs at GB/s per core with AES-NI; the mTLS path encrypts too, in TLS).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from _common import CTX, Children, child_setup, gbps, maxrss, median, recv, tensor_specs, write_model

TARGET = 0.8
SITES = ("site-1", "site-2")


# -- the processes -----------------------------------------------------------------------------------------
def aggregator_main(conn, cfg: dict, server_kit: str) -> None:
    """Child: an mTLS AggregatorServer; then commands from the parent: expect or drop a relay transfer, stop."""
    child_setup("aggregator")
    try:
        from fl_plugins.aggregator.core import AggregatorConfig
        from fl_plugins.aggregator.service import AggregatorServer

        srv = AggregatorServer(AggregatorConfig(**cfg), "127.0.0.1:0", kit=server_kit).start()
        conn.send({"address": srv.address})
        relay = srv.aggregator.relay
        while True:
            cmd, *args = conn.recv()
            if cmd == "expect":  # (transfer id, sender, recipient)
                relay.expect(args[0], args[1], (args[2],), "model", 0, 0, lambda t, env: "relayed")
            elif cmd == "drop":
                relay.drop([args[0]])
            else:
                break
            conn.send({"ok": True})
        stats = dict(srv.aggregator.stats)
        srv.stop(0)
        conn.send({"maxrss": maxrss(), "stats": stats})
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


def site_main(conn, address: str, kit_dir: str, peer_kit: str | None) -> None:
    """Child: a site with its kit. Commands: "rounds" (site-1: the mTLS job to its end), "put" (site-1: seal the
    model it holds for `peer_kit`'s site and put it at the relay), "get" (site-2: get and open one), "stop"."""
    child_setup(Path(kit_dir).name)
    try:
        import torch  # noqa: F401  (loaded before the clock starts, as in a training script)

        from fl_plugins.client.site import SiteClient
        from fl_plugins.security.tls import load_site_kit

        kit = load_site_kit(kit_dir)
        site = _Site(SiteClient(address, kit=kit, heartbeat=0 if peer_kit is None else 5.0), kit, peer_kit)
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            conn.send(getattr(site, cmd)(*args))
        site.client.close()
        conn.send({"maxrss": maxrss(), "stats": dict(site.client.stats)})
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


class _Site:
    def __init__(self, client, kit, peer_kit: str | None) -> None:
        from fl_plugins.security.seal import Certificates, Identity
        from fl_plugins.security.tls import load_site_kit

        self.client, self.me, self.certs = client, Identity.from_kit(kit), Certificates(kit.ca)
        self.peer = load_site_kit(peer_kit) if peer_kit else None
        self.params = None  # the model this site holds: what it downloaded (site-1) or received sealed (site-2)

    def rounds(self) -> dict:
        from fl_plugins.wire.proto import fl_pb2 as pb

        c, out = self.client, []
        c.connect()
        while (task := c.next_task()).kind != pb.Task.END:
            t0 = time.perf_counter()
            manifest, self.params = c.download(task, "torch", into=self.params)
            t1 = time.perf_counter()
            envelope = {"params_type": "FULL", "meta": {"NUM_STEPS_CURRENT_ROUND": 1}}
            c.upload(task.round, task.attempt, self.params, envelope)
            out.append({"round": task.round, "bytes": manifest.total_bytes, "download_s": t1 - t0,
                        "upload_s": time.perf_counter() - t1})  # fmt: skip
        return {"rounds": out}

    def put(self, tid: str, chunk: int) -> dict:
        from fl_plugins.client.relay import ModelRecords, put_sealed
        from fl_plugins.security.seal import Sealer

        peers = {self.peer.site: self.peer.cert}
        t0 = time.perf_counter()
        records = ModelRecords.of(self.params, {"params_type": "FULL"}, chunk_bytes=chunk)
        put_sealed(self.client, tid, Sealer(self.me, tid, peers, self.certs), records, {"metrics": {}})
        seconds = time.perf_counter() - t0
        sealer = Sealer(self.me, f"{tid}-local", peers, self.certs)  # sealing alone: no network, no relay
        t1 = time.perf_counter()
        for i in range(records.count):
            sealer.seal(i, records.record(i), last=i == records.count - 1)
        return {"seconds": seconds, "seal_only_s": time.perf_counter() - t1, "bytes": records.manifest.total_bytes}

    def get(self, tid: str, sender: str) -> dict:
        from fl_plugins.client.relay import receive_model
        from fl_plugins.security.seal import Opener

        def opener(header: bytes) -> Opener:
            return Opener(self.me, header, transfer_id=tid, sender=sender, certs=self.certs)

        t0 = time.perf_counter()
        manifest, self.params = receive_model(self.client, tid, opener, "torch", into=self.params)
        return {"seconds": time.perf_counter() - t0, "bytes": manifest.total_bytes}


# -- the run -----------------------------------------------------------------------------------------------
def run_sealed(root: Path, dtype: str, model_bytes: int, n_tensors: int, repeats: int, chunk: int,
               timeout: float, settle: float) -> dict:  # fmt: skip
    """The mTLS job (1 + repeats rounds), then 1 + repeats sealed transfers site-1 -> site-2, one aggregator."""
    from fl_plugins.security.provision import provision_local

    d = root / f"sealed-{dtype.lower()}"
    d.mkdir(parents=True)
    try:
        kits = provision_local(d / "kits", list(SITES))
        size = write_model(d / "init.safetensors", tensor_specs(model_bytes, dtype, n_tensors))
        cfg = {"run_dir": d / "run", "rounds": 1 + repeats, "min_sites": 1, "initial_model": d / "init.safetensors",
               "chunk_bytes": chunk, "linger": 0.5}  # fmt: skip
        with Children() as ch:
            agg = _child(ch, aggregator_main, "aggregator", cfg, str(kits.server))
            address = recv(agg, timeout, "aggregator start")["address"]
            s1 = _child(ch, site_main, "site-1", address, str(kits.sites["site-1"]), str(kits.sites["site-2"]))
            s2 = _child(ch, site_main, "site-2", address, str(kits.sites["site-2"]), None)
            time.sleep(settle)
            mtls = _ask(s1, timeout, "site-1 mTLS rounds", "rounds")["rounds"]
            puts, gets = [], []
            for k in range(1 + repeats):
                tid = f"bench-{k}"
                if k == 0:
                    time.sleep(settle)
                _ask(agg, timeout, "aggregator expect", "expect", tid, "site-1", "site-2")
                puts.append(_ask(s1, timeout, f"site-1 put {tid}", "put", tid, chunk))
                gets.append(_ask(s2, timeout, f"site-2 get {tid}", "get", tid, "site-1"))
                _ask(agg, timeout, "aggregator drop", "drop", tid)
            ends = {name: _ask(p, 60, f"{name} stop", "stop") for name, p in (("site-1", s1), ("site-2", s2))}
            ends["aggregator"] = _ask(agg, 60, "aggregator stop", "stop")
        return _figures(size, mtls, puts, gets, ends)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _child(ch: Children, target, name: str, *args):
    parent, child = CTX.Pipe()
    ch.start(target, child, *args, name=name)
    child.close()
    return parent


def _ask(conn, timeout: float, what: str, *cmd):
    conn.send(cmd)
    return recv(conn, timeout, what)


def _figures(size: int, mtls: list[dict], puts: list[dict], gets: list[dict], ends: dict) -> dict:
    seconds = {
        "mtls": {"upload": [r["upload_s"] for r in mtls], "download": [r["download_s"] for r in mtls]},
        "sealed": {"upload": [p["seconds"] for p in puts], "download": [g["seconds"] for g in gets]},
        "seal_only": [p["seal_only_s"] for p in puts],
    }
    for path in ("mtls", "sealed"):
        s = seconds[path]
        s["both"] = [u + d for u, d in zip(s["upload"], s["download"], strict=True)]
    mbps = {
        path: {d: {"first": _mbps(size, v[0]), "steady": _mbps(size, median(v[1:]))} for d, v in cases.items()}
        for path, cases in seconds.items()
        if path != "seal_only"
    }
    ratio = {d: _ratio(mbps["sealed"][d]["steady"], mbps["mtls"][d]["steady"]) for d in ("upload", "download", "both")}
    return {
        "model_bytes": size,
        "repeats": len(puts) - 1,
        "seconds": seconds,
        "mbps": mbps,
        "ratio": ratio,
        "seal_only_mbps": _mbps(size, median(seconds["seal_only"])),
        "maxrss": {k: v["maxrss"] for k, v in ends.items()},
        "stats": {k: v["stats"] for k, v in ends.items()},
    }


def _mbps(nbytes: int, seconds: float | None) -> float | None:
    g = gbps(nbytes, seconds)
    return None if g is None else g * 1e3


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if (a and b) else None


def _f(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def report(res: dict, dtype: str, chunk_mib: int) -> list[str]:
    """The figures as lines, and the targets (sealed/mTLS >= 0.8 steady, each way) as PASS/FAIL."""
    m, r = res["mbps"], res["ratio"]
    lines = [
        f"mTLS vs sealed: {dtype} model {res['model_bytes'] / 1e6:,.0f} MB, chunk {chunk_mib} MiB, site-1 -> "
        f"aggregator -> site-2; steady = median of {res['repeats']} repeats (first: the first, new memory)",
        f"{'direction':<42}{'mTLS MB/s':>11}{'sealed MB/s':>13}{'sealed/mTLS':>13}   first: mTLS / sealed MB/s",
    ]
    names = {
        "upload": "site -> aggregator (upload / seal+put)",
        "download": "aggregator -> site (download / get+open)",
        "both": "site -> aggregator -> site (the two)",
    }
    for d, name in names.items():
        a, b = m["mtls"][d], m["sealed"][d]
        lines.append(f"{name:<42}{_f(a['steady']):>11}{_f(b['steady']):>13}{_f(r[d], '.2f'):>13}   "
                     f"{_f(a['first'])} / {_f(b['first'])}")  # fmt: skip
    rss = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in res["maxrss"].items())
    lines.append(f"sealing alone (site-1, one core, no network): {_f(res['seal_only_mbps'])} MB/s; peak RSS: {rss}")
    checks = [(f"sealed/mTLS {d} steady >= {TARGET}", r[d] is not None and r[d] >= TARGET, _f(r[d], ".2f"))
              for d in ("upload", "download")]  # fmt: skip
    lines += ["", "targets:"] + [f"  [{'PASS' if ok else 'FAIL'}] {w}: {v}" for w, ok, v in checks]
    res["targets"] = {w: {"pass": ok, "value": v} for w, ok, v in checks}
    return lines
