"""TensorBoard: plain scalars in event files (RUN_DIR/tensorboard by default), written with tensorboard's own event
writer (tensorboardX when tensorboard is not installed): no torch or TensorFlow in the aggregator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fl_plugins.tracking._points import Point
from fl_plugins.tracking._spec import installed


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, options: dict[str, Any], job: str, params: dict[str, Any]) -> None:
        d = Path(options.get("log_dir") or "tensorboard").expanduser()
        log_dir = d if d.is_absolute() else run_dir / d
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir = log_dir
        if installed("tensorboard"):  # tensorboard's own event writer: protobuf only, no torch, no TensorFlow
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            w = EventFileWriter(str(log_dir))

            def add(p: Point) -> None:  # a plain scalar (simple_value), as torch's and Keras' writers store them
                value = Summary.Value(tag=p.name, simple_value=p.value)
                w.add_event(Event(wall_time=p.time or time.time(), step=p.step, summary=Summary(value=[value])))
        else:
            from tensorboardX import SummaryWriter

            w = SummaryWriter(str(log_dir))

            def add(p: Point) -> None:
                w.add_scalar(p.name, p.value, p.step, walltime=p.time)

        self._add = add
        self.writer = w

    def where(self) -> str:
        return f"tensorboard ({self.log_dir})"

    def write(self, points: list[Point]) -> None:
        for p in points:
            self._add(p)
        self.writer.flush()

    def close(self, code: int) -> None:
        self.writer.close()
