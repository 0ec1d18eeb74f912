"""Error feedback at the site: what quantisation drops from one round's update is added to the next round's.

A site that sends a DIFF update encoded with int8 or nf4 (wire/quantize.py) sends q(d) instead of d; averaged
over sites and rounds the rounding errors d - q(d) do not cancel (a coordinate smaller than half a block's step
is sent as 0 every round, however long it keeps pointing the same way). With error feedback (EF-SGD, Seide et
al. 2014; Karimireddy et al. 2019) the site keeps the residual e = c - q(c) of what it sent and corrects the next
update before encoding it, c = d + e: the sum of what was sent over rounds then differs from the sum of the true
updates by the last residual only, at most half a step per element for int8, instead of growing with the rounds.

One `ErrorFeedback` per site (per job), keyed by tensor name. Memory: one float32 array per tensor encoded
through it (one float32 copy of the update), updated in place, plus a decoding scratch of 256 KiB. A tensor
whose shape changes starts again from a zero residual. Numpy only: a torch caller passes `t.numpy()` (a CPU
tensor) or a copy. The residual assumes every encoded update reaches the aggregate; an update that is lost
(refused, late) loses its whole diff anyway, so keeping its residual costs nothing worse than half a step.
"""

from __future__ import annotations

import numpy as np

from fl_plugins.wire import quantize


class ErrorFeedback:
    """The residuals of one site's compressed DIFF updates, by tensor name: `encode(name, diff)` sends
    diff + residual, encoded with `encoding`, and keeps what the encoding dropped for the next round."""

    def __init__(self, encoding: str) -> None:
        quantize.encoding(encoding)  # ValueError for an unknown one, here and not at the first send
        self.encoding = encoding
        self._residual: dict[str, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held in residuals."""
        return sum(r.nbytes for r in self._residual.values())

    def residual(self, name: str) -> np.ndarray | None:
        """The residual kept for tensor `name` (flat float32), or None if there is none yet."""
        return self._residual.get(name)

    def encode(self, name: str, diff: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """`diff` (this round's DIFF of tensor `name`: float32, float16 or bfloat16, any shape) plus the residual
        kept for `name`, encoded (uint8, `quantize.encoded_nbytes(encoding, diff.size)` bytes, into `out` if
        given); the new residual (what the encoding dropped) is kept. A NaN or an infinity in `diff` raises
        ValueError naming the tensor and drops its residual: nothing of a refused update is carried over."""
        if diff.dtype.name not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"tensor {name!r} is {diff.dtype}; only float32, float16 and bfloat16 updates are compressed: send "
                "integer and bool tensors raw, without error feedback"
            )
        r = self._residual.get(name)
        if r is None or r.shape != (diff.size,):  # first round, or the tensor changed shape: start from zero
            r = np.zeros(diff.size, np.float32)
            self._residual[name] = r
        r += np.ascontiguousarray(diff).reshape(-1)  # the corrected update c = d + e, in the residual's memory
        try:
            enc = quantize.encode(self.encoding, r, name=name, out=out)
        except ValueError:
            del self._residual[name]
            raise
        for e0, v in quantize.Decoder(self.encoding, r.size, name=name).feed(0, enc):
            r[e0 : e0 + len(v)] -= v  # e = c - q(c)
        return enc

    def reset(self, name: str | None = None) -> None:
        """Forget the residual of tensor `name`, or all of them (a new job, or a FULL update in between)."""
        if name is None:
            self._residual.clear()
        else:
            self._residual.pop(name, None)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The residuals, for a site that runs one process per round and must keep them across processes."""
        return {name: r.copy() for name, r in self._residual.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Take back residuals from `state_dict()`; each must be a flat float32 array."""
        for name, r in state.items():
            if r.dtype != np.float32 or r.ndim != 1:
                raise ValueError(
                    f"the residual of tensor {name!r} is {r.dtype} {r.shape}; a residual is a flat float32 "
                    "array, as state_dict() returns it"
                )
        self._residual = {name: r.copy() for name, r in state.items()}
