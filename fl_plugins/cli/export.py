"""`fl-plugins export RUN_DIR [--round N] -o DIR [--base PATH]`: the run's global model as a Hugging Face folder
(fl_plugins/export.py), with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fl_plugins.cli.levels import add_log_level


def add(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="write a run's global model as a folder transformers / peft load, with a model card",
        description="Write RUN_DIR's global model (the last round, or --round N) into DIR: adapter_config.json + "
        "adapter_model.safetensors for a PEFT adapter (PeftModel.from_pretrained(base, DIR)), config.json + "
        "model.safetensors for a full fine-tune (AutoModel*.from_pretrained(DIR)), and README.md, the model card.",
    )
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory of `fl-plugins run` or `server`")
    e.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="the folder to write")
    e.add_argument("--round", type=int, default=None, metavar="N", help="a kept round's model (default: the last)")
    e.add_argument(
        "--base", default=None, metavar="PATH", help="the base model's folder or hub id, if not the sites' path"
    )
    add_log_level(e, "warning")


def command(args: argparse.Namespace) -> int:
    from fl_plugins.export import export

    out = export(args.run_dir, args.output, args.round, args.base)
    print(f"exported to {out} (README.md is its model card)")
    return 0
