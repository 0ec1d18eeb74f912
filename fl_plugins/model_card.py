"""The model card (README.md) `fl-plugins export` writes beside the exported model: what was trained, where, how.

It states the federation as the run directory recorded it: the job, the sites and the updates each sent, the
rounds with their metrics (metrics.jsonl's "round" records: the weighted mean of the sites' metrics of each
round's global model), the final evaluation and the baselines when the run has them, the recipe (run.json's copy
of what the sites ran), and the version and git commit of the fl-plugins that exported it. The front matter is
the Hugging Face Hub's (library_name, base_model, tags).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_plugins._version import __version__
from fl_plugins.record_files import RunMetrics, read_object, read_records

if TYPE_CHECKING:
    from fl_plugins.export import Description


def commit() -> str:
    """The git commit of this fl-plugins checkout ("+ local changes" when its tree differs), or why not known."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", str(here)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return sha + (" + local changes" if dirty else "")


def _metric_names(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for m in rows:
        names += [k for k, v in m.items() if isinstance(v, (int, float)) and k not in names]
    return names[:6]


def _rounds_table(run: RunMetrics) -> list[str]:
    rows = [run.rounds[r] for r in sorted(run.rounds)]
    names = _metric_names([r.metrics for r in rows])
    out = ["| round | sites | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for rec in rows:
        cells = [f"{rec.metrics[n]:.4g}" if isinstance(rec.metrics.get(n), (int, float)) else "" for n in names]
        out.append(f"| {rec.round} | {', '.join(rec.sites or ())} | " + " | ".join(cells) + " |")
    return out


def _loading(desc: Description) -> list[str]:
    base = (desc.peft or {}).get("base_model_name_or_path") or desc.info.get("base_model") or "BASE"
    cls = desc.info.get("class", "AutoModel")
    labels = len(desc.config.get("id2label") or {})
    extra = f", num_labels={labels}" if labels and "SequenceClassification" in str(cls) else ""
    if desc.peft is not None:
        code = [
            f"from transformers import {cls}",
            "from peft import PeftModel",
            f'base = {cls}.from_pretrained("{base}"{extra})  # the base model the sites fine-tuned',
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
        ]
    else:
        code = [f"from transformers import {cls}", f'model = {cls}.from_pretrained("THIS_FOLDER")']
    return ["```python", *code, "```"]


def card(run_dir: Path, round_: int, desc: Description) -> str:
    run = RunMetrics()
    run.add(read_records(run_dir / "metrics.jsonl"))
    identity = read_object(run_dir / "run.json") or {}
    summary = read_object(run_dir / "summary.json") or {}
    baselines = read_object(run_dir / "baselines.json")
    recipe = (identity.get("recipe") or {}).get("job") or {}
    sites: dict[str, int] = {}
    for u in run.updates:
        sites[u.site] = sites.get(u.site, 0) + 1
    library = "peft" if desc.peft is not None else "transformers"
    base = desc.info.get("base_model") or ""
    lines = ["---", f"library_name: {library}"]
    lines += [f"base_model: {json.dumps(base)}"] if hub_id(base) else []  # the Hub's field: a model id, no path
    lines += ["tags: [federated-learning, fl-plugins]", "---", ""]
    name = identity.get("job_id") or summary.get("name") or run_dir.name
    lines += [f"# {name}", ""]
    what = f"a {(desc.peft or {}).get('peft_type', 'PEFT')} adapter" if desc.peft is not None else "a full fine-tune"
    lines += [
        f"{what[0].upper()}{what[1:]} of `{base or desc.info.get('class')}` trained by federated learning with "
        f"fl-plugins: {len(sites)} sites kept their data and sent only weights. This is the run's global model "
        f"{round_} (RUN_DIR/global/round-{round_:05d}), written when round {round_ - 1} closed.",
        "",
        "## Federation",
        "",
        f"- job: `{name}`; rounds: {len(run.rounds)} of {summary.get('rounds_planned') or len(run.rounds)}",
        "- sites (updates counted): " + ", ".join(f"{s} ({n})" for s, n in sorted(sites.items())),
        f"- exported: global model {round_}; run directory: `{run_dir.resolve()}`",
        f"- fl-plugins {identity.get('fl_plugins_version') or __version__} ran it; exported by fl-plugins "
        f"{__version__}, commit {commit()}",
        "",
        "## Rounds",
        "",
        "The sites' metrics of each round's global model (weighted by their steps), as metrics.jsonl recorded them:",
        "",
        *_rounds_table(run),
        "",
    ]
    if summary.get("final_evaluation"):
        lines += ["Final evaluation: `" + json.dumps(summary["final_evaluation"].get("metrics")) + "`", ""]
    if baselines:
        lines += ["## Baselines (pooled validation set)", "", "```json", json.dumps(baselines, indent=2), "```", ""]
    lines += ["## Loading", "", *_loading(desc), ""]
    if recipe:
        lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub model id ("org/model", "model"), not a site's local folder."""
    if not name or name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not Path(name).exists()


def write_card(run_dir: Path, out: Path, round_: int, desc: Description) -> Path:
    path = out / "README.md"
    path.write_text(card(run_dir, round_, desc))
    return path
