"""A site's side of transfer compression: the job's `update_compression` and `model_compression` (config.py), as
the aggregator's Hello tells them; the encodings are wire/quantize.py's.

Updates are encoded once, at send (`Compression.pack`): each F32, F16 or BF16 tensor that `worth_encoding` travels
as U8 bytes of its encoding, and the manifest's `encoded` table says what it stands for (wire/layout.py).

- int8 and nf4 (lossy) travel as a DIFF, with error feedback (feedback.py): a FULL update is made a DIFF here,
  against the global model this site received for the round (a float32 copy kept at the download), so the
  aggregator adds the sites' averaged DIFFs to its exact global model, and what the encoding drops from one round's
  DIFF is added to the next one's instead of random-walking into the global model. A LoRA factor trained at a
  smaller rank than the received one is a DIFF against the received factor cut to its rank (lora_ranks.py).
- bf16: the update as sent (FULL or DIFF), its float32 tensors rounded to bfloat16.
- With a `model_compression` set, a FULL update is made a DIFF as well, against the decoded model received: the
  error of the model a site trained from then stays out of the average (the aggregator adds the DIFFs to its own
  full-precision model).

An update that cannot be made a DIFF (a tensor the received model does not hold at a shape it can be cut to)
goes FULL, encoded without feedback, with a warning. A refold's RESEND sends the bytes encoded at send again: the
residual is never applied twice.

Memory at the site: the float32 copy of the received global model (4 bytes per floating-point element; kept
only while a lossy update encoding or a model encoding is set), the error-feedback residuals (4 bytes per encoded
element), and the encoded update kept for a RESEND until the next task (about 1.06 bytes per element for int8,
0.56 for nf4, 2 for bf16).

Downloads: a TRAIN task's manifest says which tensors of the global model travel encoded; `DecodingSink` decodes
each verified chunk into the tensor's own memory, in its dtype, a batch of blocks at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_plugins import lora_ranks, tensors
from fl_plugins.client.feedback import ErrorFeedback
from fl_plugins.wire import quantize
from fl_plugins.wire.layout import EncodedTensor, Manifest, TensorInfo, numpy_dtype

log = logging.getLogger(__name__)

LOSSY = ("int8", "nf4")  # sent as DIFFs with error feedback


@dataclass
class Packed:
    """An update as it travels: its tensors (some encoded, as uint8 arrays), envelope and `encoded` table."""

    params: Mapping[str, Any]
    envelope: dict[str, Any]
    encoded: dict[str, EncodedTensor]


def as_numpy(x: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor (numpy or torch) as a numpy array of safetensors `dtype` over its bytes (no copy where it can)."""
    return np.frombuffer(tensors.byte_view(x), numpy_dtype(dtype)).reshape(shape)


class Compression:
    """One site's compression state: the settings, the received model's float32 copy, the feedback residuals."""

    def __init__(self, update: str = "none", model: str = "none") -> None:
        self.update, self.model = update or "none", model or "none"
        for enc in {self.update, self.model} - {"none"}:
            quantize.encoding(enc)  # ValueError naming the known ones
        self.feedback = ErrorFeedback(self.update) if self.update in LOSSY else None
        self.base: dict[str, np.ndarray] | None = None  # the received global model: float tensors as float32

    @property
    def makes_diffs(self) -> bool:
        """Whether a FULL update is sent as a DIFF against the received model (the module docstring)."""
        return self.update in LOSSY or self.model != "none"

    @property
    def base_nbytes(self) -> int:
        return sum(a.nbytes for a in (self.base or {}).values())

    def received(self, params: Mapping[str, Any]) -> None:
        """A TRAIN task's global model arrived (`params`): keep its copy when updates are made DIFFs."""
        if not self.makes_diffs:
            return
        self.base = {}
        for name, dtype, shape in tensors.describe(params):
            a = as_numpy(params[name], dtype, shape)
            self.base[name] = a.astype(np.float32) if dtype in quantize.SOURCE_DTYPES else a.copy()

    def pack(self, params: Mapping[str, Any], envelope: dict[str, Any]) -> Packed:
        """The update `params` with `envelope` as it travels (the module docstring); `params` itself when the job
        compresses nothing."""
        if self.update == "none" and not self.makes_diffs:
            return Packed(params, envelope, {})
        described = tensors.describe(params)
        sent_diff = str(envelope.get("params_type", "FULL")).upper() == "DIFF"
        make_diff = not sent_diff and self.makes_diffs and self._fits(described)
        diff = sent_diff or make_diff
        if self.feedback is not None and not diff:
            self.feedback.reset()  # a FULL update in between: the residuals of earlier DIFFs no longer apply
        out: dict[str, Any] = {}
        encoded: dict[str, EncodedTensor] = {}
        for name, dtype, shape in described:
            x = params[name]
            if make_diff:
                x = self._minus(name, as_numpy(x, dtype, shape), dtype)
            if self.update != "none" and quantize.worth_encoding(self.update, dtype, int(np.prod(shape))):
                out[name] = self._encode(name, as_numpy(x, dtype, shape) if not make_diff else x, diff)
                encoded[name] = EncodedTensor(self.update, dtype, shape)
            else:
                out[name] = x.astype(numpy_dtype(dtype), copy=False) if make_diff else x
        env = dict(envelope, params_type="DIFF") if make_diff else envelope
        return Packed(out, env, encoded)

    def _fits(self, described: list[tuple[str, str, tuple[int, ...]]]) -> bool:
        """Whether every tensor has a counterpart in the received model to be a DIFF against; warns if not."""
        base = self.base or {}
        bad = [
            name
            for name, _, shape in described
            if name not in base
            or (base[name].shape != shape and lora_ranks.other_rank(name, shape, base[name].shape) is None)
        ]
        if bad or self.base is None:
            log.warning(
                "the update is sent FULL, encoded without error feedback: %s",
                f"the received model holds no {bad[:5]} at a shape they can be cut to" if bad else "no model received",
            )
            return False
        return True

    def _minus(self, name: str, x: np.ndarray, dtype: str) -> np.ndarray:
        """x - the received tensor `name` (a LoRA factor cut to x's rank): float32 for F32/F16/BF16, else in the
        tensor's own dtype (integers wrap, as fedavg.py reads a DIFF); BOOL tensors as they are (not averaged)."""
        assert self.base is not None
        b = self.base[name]
        if b.shape != x.shape:
            b = lora_ranks.truncate(name, b, x.shape[lora_ranks.rank_dim(name) or 0])
        if dtype == "BOOL":
            return x
        if dtype in quantize.SOURCE_DTYPES:
            return x.astype(np.float32) - b
        return np.subtract(x, b, dtype=x.dtype, casting="unsafe")

    def _encode(self, name: str, x: np.ndarray, diff: bool) -> np.ndarray:
        if diff and self.feedback is not None:
            return self.feedback.encode(name, x.astype(np.float32, copy=False))
        return quantize.encode(self.update, x, name=name)


class DecodingSink:
    """Where a download's verified bytes go when some of its tensors travel encoded: decoded into the tensors'
    memory (`views`: each tensor's writable bytes, in its declared dtype); the others copied as they are."""

    def __init__(self, views: Mapping[str, memoryview], manifest: Manifest) -> None:
        self.views = views
        declared = manifest.model_tensors()
        self.decoders = {
            name: quantize.Decoder(e.encoding, declared[name].numel, name=name) for name, e in manifest.encoded.items()
        }
        self.dtypes = {name: numpy_dtype(e.dtype) for name, e in manifest.encoded.items()}

    def header(self, shard: int, prefix: bytes) -> None:
        pass

    def data(self, shard: int, tensor: TensorInfo, lo: int, payload: memoryview) -> None:
        decoder = self.decoders.get(tensor.name)
        if decoder is None:
            self.views[tensor.name][lo : lo + len(payload)] = payload
            return
        dst = np.frombuffer(self.views[tensor.name], self.dtypes[tensor.name])
        for e0, v in decoder.feed(lo, payload):
            dst[e0 : e0 + len(v)] = v

    def finish(self) -> None:
        """ProtocolError unless every encoded tensor arrived whole."""
        for d in self.decoders.values():
            d.finish()
