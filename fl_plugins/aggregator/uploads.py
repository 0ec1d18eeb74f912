"""Uploads in flight: what one upload is, the registry of the live ones, and the checks on what a site declares.

An `Upload` is one send() (or one resend, or an offered initial model) on its way in: its manifest, one
`ShardReceiver` per shard (verifying each chunk), and where its bytes go (a `FoldSink` into the strategy, or the
offer's files). `Uploads` keeps the live ones and the accumulator's *epoch*: every update upload that could fold
into the accumulator since its last reset, so the close can find partial updates (rounds.py's rules). The
caller holds the coordinator's lock around every `Uploads` call; `Gate` orders folds against the close.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fl_plugins.aggregator.lora import fit_plan
from fl_plugins.aggregator.rounds import Counted, RoundState
from fl_plugins.aggregator.scaffold import is_control_variate, missing_message
from fl_plugins.aggregator.store import same_tensors
from fl_plugins.aggregator.strategy import KeepsUpdates, Strategy
from fl_plugins.errors import AuthError, ModelMismatchError, ProtocolError
from fl_plugins.wire import limits, quantize
from fl_plugins.wire.layout import Manifest, TensorInfo, build_header, short_repr
from fl_plugins.wire.stream import ShardReceiver

log = logging.getLogger(__name__)

MAX_HEADER_SLACK = 64 << 10  # an update's shard header may exceed the one we would build by this much (metadata)
# the largest log2 of weight * |value| folded: fedavg.py's bound for F32 and BF16 (a float32 accumulator holds sums
# below 2^128, so products up to 2^100 leave room for 2^27 sites), applied to decoded values
MAX_FOLD_LOG2 = 100


class Stream(Protocol):
    """A live upload stream (a gRPC context): cancelled when its upload is dropped."""

    def cancel(self) -> Any: ...


class Sink(Protocol):
    def header(self, shard: int, prefix: bytes) -> None: ...

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None: ...

    def close(self) -> None: ...


@dataclass
class Upload:
    id: str
    site: str
    round: int
    attempt: int
    manifest: Manifest
    weight: float
    params_type: str
    initial: bool
    nonce: str = ""
    manifest_sha: bytes = b""
    epoch: int = 0  # the accumulator epoch its chunks fold into
    resend_of: Counted | None = None  # a refold's resend of this counted update
    receivers: list[ShardReceiver] = field(default_factory=list)
    folded: bool = False  # some of its bytes reached the accumulator (set before the fold, under the fold gate)
    committed: bool = False
    dead: bool = False  # its round attempt ended: any further chunk is refused
    bytes_received: int = 0
    corrupted_chunks: int = 0
    started: float = 0.0
    last_progress: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    sink: Sink | None = None  # where an offered initial model's (or a submitted model's) bytes go
    task_id: str = ""  # a SUBMIT_MODEL task's answer: the site's local model (models.py)
    streams: list[Stream] = field(default_factory=list)  # live streams, cancelled when the upload is dropped

    def receive_into(self, sink: Sink | FoldSink) -> None:
        self.receivers = [ShardReceiver(self.manifest, i, sink) for i in range(len(self.manifest.shards))]


class FoldSink:
    """Where an update's verified chunks go: checked, then folded into the strategy with the update's weight.

    An encoded tensor (the manifest's `encoded` table, wire/quantize.py) has a `Decoder` for this upload: each
    chunk's bytes are checked (their scales) and bounded (`peak` x weight, fedavg.py's overflow rule) before any of
    them is folded, then folded as float32 values, as a F32 tensor of the declared shape. The decoders live as long
    as the upload, so a resumed stream goes on where the last one stopped (mid-block too); a resend or a refold
    gets a new FoldSink and new decoders."""

    def __init__(self, strategy: Strategy, weight: float, upload: Upload, check_finite: bool) -> None:
        self.strategy, self.weight, self.upload, self.check_finite = strategy, weight, upload, check_finite
        self.diff = upload.params_type == "DIFF"
        self.keeps = strategy if isinstance(strategy, KeepsUpdates) else None  # flexlora: folded by upload
        declared = upload.manifest.model_tensors()
        self.decoders = {
            name: quantize.Decoder(e.encoding, declared[name].numel, name=name)
            for name, e in upload.manifest.encoded.items()
        }
        self.as_f32 = {  # what a decoded tensor folds as
            name: TensorInfo(name, "F32", declared[name].shape, 0, 4 * declared[name].numel) for name in self.decoders
        }

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        decoder = self.decoders.get(tensor.name)
        if decoder is not None:
            return self._decoded(decoder, self.as_f32[tensor.name], lo, payload)
        self.strategy.check(tensor, lo, payload, finite=self.check_finite, weight=self.weight)  # before the fold
        self.upload.folded = True  # before the fold, under the fold gate: the close's check sees it
        self._fold(tensor, lo, payload)

    def _fold(self, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        if self.keeps is not None:
            self.keeps.fold_update(self.upload.id, tensor, lo, payload, self.weight, diff=self.diff)
        else:
            self.strategy.fold(tensor, lo, payload, self.weight, diff=self.diff)

    def _decoded(self, decoder: quantize.Decoder, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        values = decoder.feed(lo, payload)  # ProtocolError here, before anything of the chunk is decoded
        if self.check_finite and decoder.peak and math.log2(decoder.peak) + math.log2(self.weight) > MAX_FOLD_LOG2:
            raise ModelMismatchError(
                f"tensor {tensor.name!r} holds values up to {decoder.peak:.3g}; times the update's weight "
                f"{self.weight:g} that is over 2^{MAX_FOLD_LOG2}, where the running sum could overflow the "
                "accumulator: check the site's training for divergence, or send a smaller NUM_STEPS_CURRENT_ROUND"
            )
        self.upload.folded = True
        for e0, v in values:
            self._fold(tensor, 4 * e0, v.view(np.uint8).data)


class Uploads:
    """The live uploads by id, and the accumulator's epoch (see the module docstring). Lock held by the caller."""

    def __init__(self) -> None:
        self.live: dict[str, Upload] = {}
        self.epoch = 0
        self.in_epoch: list[Upload] = []  # every update upload that could fold into this epoch

    def get(self, upload_id: str) -> Upload | None:
        return self.live.get(upload_id)

    def add(self, u: Upload) -> None:
        self.live[u.id] = u
        if not u.initial:
            self.in_epoch.append(u)

    def new_epoch(self) -> None:
        """The accumulator was reset: nothing folded before counts against it."""
        self.epoch += 1
        self.in_epoch = []

    def partial(self) -> list[Upload]:
        """Uploads that folded bytes into this epoch and were not counted: partial updates."""
        return [u for u in self.in_epoch if u.folded and not u.committed]

    def resending(self, c: Counted) -> bool:
        return any(u.resend_of is c for u in self.live.values())

    def kill(self, u: Upload, rounds: RoundState) -> None:
        """Drop an upload. One that folded bytes and will not count leaves a partial update: its site sits out
        the attempt (the close's check under the fold gate finds the bytes and refolds)."""
        if not u.initial and u.folded and not u.committed and u.round == rounds.round and not u.dead:
            rounds.sit_out(u.site)
        u.dead = True
        for ctx in u.streams:
            ctx.cancel()
        if u.sink is not None:
            u.sink.close()
        self.live.pop(u.id, None)

    def kill_all(self, rounds: RoundState, *, keep_resends: bool = False) -> None:
        """Drop every live upload (at a round's end), or every one not counted yet except resends (the close)."""
        for u in list(self.live.values()):
            if not keep_resends or (not u.committed and u.resend_of is None):
                self.kill(u, rounds)

    def drop_idle(self, now: float, rounds: RoundState, idle_timeout: float) -> None:
        """Drop uploads that moved no bytes for `idle_timeout` (a site that is alive begins again); a resend
        dropped so loses the update it resends."""
        for u in list(self.live.values()):
            if not u.committed and now - u.last_progress > idle_timeout:
                log.warning("site %r: upload moved no bytes for %.0f s; dropped", u.site, idle_timeout)
                if u.resend_of is not None:
                    rounds.lose(u.resend_of, f"its resend moved no bytes for {idle_timeout:.0f} s")
                self.kill(u, rounds)

    def drop_gone(self, now: float, rounds: RoundState) -> None:
        """Drop the uploads of sites that left (silent, or refused by their policy)."""
        for u in list(self.live.values()):
            if not u.committed and not rounds.alive(rounds.sites[u.site], now):
                log.warning("site %r left mid-upload; its upload is dropped", u.site)
                if u.resend_of is not None:
                    rounds.lose(u.resend_of, "the site left while sending it again")
                self.kill(u, rounds)


def parse_update(site: str, manifest_json: str) -> tuple[Manifest, str, float]:
    """An update's manifest, params_type and weight, checked: whatever is malformed is a ProtocolError."""
    manifest = Manifest.from_json(manifest_json, f"update manifest from site {site!r}")
    env = manifest.envelope
    params_type = str(env.get("params_type", "FULL")).upper()
    if params_type not in ("FULL", "DIFF"):
        raise ProtocolError(f"site {site!r}: params_type must be FULL or DIFF (got {short_repr(params_type)})")
    for key in ("meta", "metrics"):
        if env.get(key) is not None and not isinstance(env[key], dict):
            raise ProtocolError(f"site {site!r}: envelope `{key}` must be an object (got {short_repr(env[key])})")
        if env.get(key) is not None:  # bounded: the round's metrics go into the next global model's manifest
            limits.check_envelope_dict(f"site {site!r}", key, env[key])
    weight = (env.get("meta") or {}).get("NUM_STEPS_CURRENT_ROUND", 1)
    w = limits.finite_float(weight)
    if w is None or not w > 0:
        raise ProtocolError(
            f"site {site!r}: NUM_STEPS_CURRENT_ROUND must be a finite number > 0 (got {short_repr(weight)})"
        )
    return manifest, params_type, w


def upload_key(site: str, manifest_json: str, nonce: str) -> bytes:
    """An upload's manifest hash (a resume must send the same manifest), after checking its nonce."""
    if not isinstance(nonce, str) or not 1 <= len(nonce) <= 64:
        raise ProtocolError(f"site {site!r}: an upload's nonce must be 1-64 characters (got {short_repr(nonce)})")
    return hashlib.sha256(manifest_json.encode() if isinstance(manifest_json, str) else manifest_json).digest()


def check_chunk_bytes(site: str, manifest: Manifest, chunk_bytes: int) -> None:
    """An upload is chunked with the aggregator's size (Hello's): it bounds the digests kept and the frames."""
    if manifest.chunk_bytes != chunk_bytes:
        raise ProtocolError(
            f"site {site!r}: the manifest's chunk_bytes is {manifest.chunk_bytes}, the aggregator's is "
            f"{chunk_bytes}: chunk with the size Hello returned"
        )


def check_plan(
    global_manifest: Manifest,
    manifest: Manifest,
    what: str,
    *,
    submitted: bool = False,
    strategy: str = "fedavg",
    encoding: str = "none",
) -> None:
    """An update's tensors must be the global model's, in at most as many shards as it has tensors (no empty
    shards), with headers no larger than the ones we would build plus MAX_HEADER_SLACK. SCAFFOLD's control
    variates (scaffold.py) are part of an update; a submitted model (`submitted`) may leave them all out. Under
    `strategy` hetlora or flexlora, LoRA factors may have a smaller rank than the global model's (lora.py). An
    encoded tensor counts as the tensor it declares, and only in `encoding` (the job's `update_compression`)."""
    expected = {t.name: t for s in global_manifest.shards for t in s.tensors}
    got = manifest.model_tensors()
    if manifest.encoding and manifest.encoding != encoding:
        names = sorted(manifest.encoded)
        raise ProtocolError(
            f"{what} holds tensors encoded with {manifest.encoding} ({short_repr(names)}), but this job's "
            f"update_compression is {encoding}: a site encodes its updates as the aggregator's Hello says (an "
            "offered or submitted model travels unencoded)"
        )
    variates = [n for n in expected if is_control_variate(n)]
    missing = sorted(n for n in variates if n not in got)
    if submitted and len(missing) == len(variates):
        expected = {n: t for n, t in expected.items() if not is_control_variate(n)}
    elif missing:
        raise ModelMismatchError(missing_message(what, missing, len(variates)))
    same_tensors(fit_plan(expected, got, what, strategy, submitted=submitted), got, what)
    for shard in manifest.shards:
        if not shard.tensors:
            raise ProtocolError(f"{what}: shard {shard.name!r} holds no tensor; every shard must hold one")
        bound = len(build_header(shard.tensors)) + MAX_HEADER_SLACK
        if shard.data_start > bound:
            raise ProtocolError(
                f"{what}: shard {shard.name!r} declares a {shard.data_start}-byte header, over the {bound} bytes "
                f"its tensor table needs (+{MAX_HEADER_SLACK} for metadata)"
            )


def check_owner(u: Upload, site: str | None) -> None:
    if site is not None and site != u.site:
        raise AuthError(
            f"upload {u.id!r} belongs to site {u.site!r}, but the caller's certificate is site {site!r}; a site may "
            "only send its own update"
        )


class Gate:
    """Many folds at once (shared), or one round close (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    def acquire(self) -> None:
        """The exclusive side (a close), to be released by `release`, possibly on another thread: the close hands
        it to the thread that writes the checkpoint (closing.py)."""
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._shared:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()
