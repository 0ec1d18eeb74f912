"""Weights & Biases: always offline, in RUN_DIR/wandb (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it
later); nothing is sent over the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_plugins.tracking._points import Point


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, options: dict[str, Any], job: str, params: dict[str, Any]) -> None:
        import wandb

        wanted: dict[str, Any] = {
            "silent": True,
            "console": "off",
            "x_disable_stats": True,
            "x_disable_update_check": True,
            "save_code": False,
        }
        settings = wandb.Settings(**{k: v for k, v in wanted.items() if k in wandb.Settings.model_fields})
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run = wandb.init(
            project=options.get("project") or job,
            entity=options.get("entity"),
            name=options.get("name") or run_dir.resolve().name,
            group=options.get("group"),
            tags=list(options.get("tags") or ()),
            config=params,
            dir=str(run_dir),
            mode="offline",
            reinit="create_new",
            settings=settings,
        )
        self.run.define_metric("round", hidden=True)
        self._defined: set[str] = set()

    def where(self) -> str:
        return f"wandb (offline, {Path(self.run.dir).parent})"

    def write(self, points: list[Point]) -> None:
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for p in points:
            step_key = "round" if p.axis == "round" else f"{p.site}/step"
            if p.name not in self._defined:
                if step_key not in self._defined and step_key != "round":
                    self.run.define_metric(step_key, hidden=True)
                    self._defined.add(step_key)
                self.run.define_metric(p.name, step_metric=step_key)
                self._defined.add(p.name)
            rows.setdefault((step_key, p.step), {})[p.name] = p.value
        for (step_key, step), row in rows.items():
            self.run.log({**row, step_key: step})

    def close(self, code: int) -> None:
        self.run.finish(exit_code=code)
