"""The server strategies on one recipe: the global model's validation curve, final accuracy and swing per strategy.

    python benchmarks/strategies.py                                   # recipes/peft_sentiment.yaml, 7 runs (~25 min)
    python benchmarks/strategies.py --strategies fedavg,fedavgm,fedadam@0.03 --seed 1
    python benchmarks/strategies.py recipes/other.yaml --rounds 5 --out runs/strat --json /tmp/strat.json

Runs the recipe once per strategy, one run after another (never two at once), each with `fl-plugins run` on a
copy of the recipe (OUT/recipes/LABEL.yaml) whose `strategy:` section is `{type: NAME, lr: LR}` (`NAME@LR` in
`--strategies`; without `@LR` the strategy's default server lr: 1 for fedavgm, 0.01 for the adaptive ones; the
other hyper-parameters keep their defaults), into OUT/LABEL/. FedAvg is the baseline and always runs first.

Per strategy, from its run directory:
- per round R: the global model that round R starts from, evaluated by every site on its own validation part
  before it trains (the "round" record's metrics in RUN_DIR/metrics.jsonl: the sites' values averaged with the
  updates' weights; round 0 is the initial model);
- final: the last global model on the pooled validation set (RUN_DIR/baselines.json, a built-in task with
  `baselines: true`), beside the best site's local-only model on the same set;
- swing: the mean absolute round-to-round change of that per-round accuracy over the last `--last` changes
  (default: half the rounds; with 10 rounds, rounds 4..9), and the largest drop from one round to the next.
Prints the per-round accuracy and loss of every strategy side by side, then a summary with ratios against
FedAvg and the strategy the rule picks (the best final pooled accuracy among those that beat FedAvg's with a
smaller swing; else FedAvg); writes OUT/strategies.png (accuracy and loss per round, every strategy overlaid;
the final pooled value as a star). A label whose run directory already holds a finished run of the same recipe
copy is not run again (shown as reused), so a second call reprints and replots.

`--seed N` sets the built-in task's `task.seed` (the generated data, the initial weights, the batch order) and
`task.split.seed` (which site gets which rows): another draw of the same federation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment  # noqa: E402

from fl_plugins.checks import STRATEGIES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "peft_sentiment.yaml"
DEFAULT_STRATEGIES = "fedavg,fedavgm,fedavgm@0.1,fedadam,fedadam@0.03,fedyogi,fedadagrad"
BASELINE = "fedavg"


def parse_strategies(text: str) -> list[tuple[str, str, float | None]]:
    """`fedavg,fedadam@0.03` -> [(label, name, lr or None)], FedAvg first (added when missing)."""
    out: list[tuple[str, str, float | None]] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, lr_text = item.partition("@")
        if name not in STRATEGIES:
            raise SystemExit(f"--strategies: {name!r} is not a strategy; known: {', '.join(STRATEGIES)}")
        try:
            lr = float(lr_text) if lr_text else None
        except ValueError:
            raise SystemExit(f"--strategies: {item!r}: the server lr after '@' must be a number") from None
        if lr is not None and (name == BASELINE or not lr > 0):
            raise SystemExit(f"--strategies: {item!r}: fedavg takes no lr; another strategy's lr must be > 0")
        label = name if lr is None else f"{name}@{lr:g}"
        if label not in (x[0] for x in out):
            out.append((label, name, lr))
    out = [x for x in out if x[1] == BASELINE and x[2] is None] + [x for x in out if x[0] != BASELINE]
    if out[0][0] != BASELINE:
        out.insert(0, (BASELINE, BASELINE, None))
    return out


def _absolute(recipe: dict, folder: Path) -> dict:
    """The recipe's relative paths made absolute, so that its copy elsewhere names the same files."""

    def fix(v: Any) -> Any:
        if isinstance(v, str) and not v.startswith("demo:") and not Path(v).expanduser().is_absolute():
            p = folder / Path(v).expanduser()
            return str(p.resolve()) if p.exists() else v
        return v

    for key in ("script", "initial_model"):
        if key in recipe:
            recipe[key] = fix(recipe[key])
    task = recipe.get("task")
    if isinstance(task, dict):
        for key in ("model", "data"):
            if key in task:
                task[key] = fix(task[key])
    return recipe


def recipe_copy(source: Path, name: str, lr: float | None, label: str, args) -> str:
    """The YAML text of the recipe with this strategy (and `--rounds`, `--seed`)."""
    import yaml

    recipe = _absolute(yaml.safe_load(source.read_text(encoding="utf-8")), source.resolve().parent)
    recipe["name"] = f"{recipe.get('name', source.stem)}-{label.replace('@', '-lr')}"
    recipe["strategy"] = {"type": name} if lr is None else {"type": name, "lr": lr}
    if args.rounds is not None:
        recipe["rounds"] = args.rounds
    if args.seed is not None:
        task = recipe.get("task")
        if not isinstance(task, dict):
            raise SystemExit(f"--seed: {source} has no built-in `task:` whose seed it could set")
        task["seed"] = args.seed
        split = task.get("split", {"method": "dirichlet"})
        task["split"] = {**({"method": split} if isinstance(split, str) else split), "seed": args.seed}
    header = f"# {source} with strategy {label} (benchmarks/strategies.py)\n"
    return header + yaml.safe_dump(recipe, sort_keys=False)


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("exit_code") == 0
    except (OSError, ValueError):
        return False


def run_one(recipe: Path, run_dir: Path, log: Path, timeout: float) -> float:
    """`fl-plugins run RECIPE --run-dir RUN_DIR` in its own process group; its wall seconds. Interrupted, failed
    or timed out: the group gets SIGINT (the runner stops its aggregator and sites), then SIGKILL."""
    cmd = [sys.executable, "-m", "fl_plugins.cli", "run", str(recipe), "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with rc={rc}; see {log}")
    return time.perf_counter() - t0


def figures(run_dir: Path, last: int | None) -> dict:
    """The per-round curve, the final pooled-validation figures and the swing of one finished run."""
    from fl_plugins.report import load_run

    run = load_run(run_dir)
    keys = [k for r in sorted(run.rounds) for k in run.rounds[r].metrics]
    acc_key = next((k for k in keys if "acc" in k.lower()), None)
    loss_key = next((k for k in keys if "loss" in k.lower()), None)
    per_round = [
        {"round": r, "accuracy": run.rounds[r].metrics.get(acc_key), "loss": run.rounds[r].metrics.get(loss_key)}
        for r in sorted(run.rounds)
    ]
    acc = [x["accuracy"] for x in per_round]
    out: dict[str, Any] = {"run_dir": str(run_dir), "metrics": [acc_key, loss_key], "per_round": per_round}
    base = run.baselines
    final = (base.global_metrics or {}) if base else {}
    out["final_accuracy"] = next((v for k, v in final.items() if "acc" in k.lower()), None)
    out["final_loss"] = next((v for k, v in final.items() if "loss" in k.lower()), None)
    out["final_round"] = base.round if base else None
    alone = [
        next((v for k, v in m.items() if "acc" in k.lower()), None) for m in (base.local_only if base else {}).values()
    ]
    out["best_local_only_accuracy"] = max((a for a in alone if a is not None), default=None)
    if None in acc or len(acc) < 2:
        out.update(swing=None, max_drop=None, swing_rounds=None)
        return out
    k = last if last is not None else len(acc) // 2
    tail = acc[-(k + 1) :] if k + 1 <= len(acc) else acc  # k changes: the last k+1 rounds
    out["swing_rounds"] = [per_round[-len(tail)]["round"], per_round[-1]["round"]]
    out["swing"] = statistics.mean(abs(b - a) for a, b in zip(tail, tail[1:], strict=False))
    out["max_drop"] = max(0.0, *(a - b for a, b in zip(acc, acc[1:], strict=False)))
    return out


def pick(results: dict[str, dict]) -> tuple[str | None, str]:
    """The rule: the best final pooled accuracy among the strategies whose final accuracy beats FedAvg's with a
    smaller swing; FedAvg when none does; None without FedAvg's final figures. (label, why)"""
    base = results[BASELINE]
    if None in (base["final_accuracy"], base["swing"]):
        return None, "FedAvg's run has no final pooled accuracy: it needs a built-in task with `baselines: true`"
    ok = [
        (lab, r)
        for lab, r in results.items()
        if lab != BASELINE
        and None not in (r["final_accuracy"], r["swing"])
        and r["final_accuracy"] > base["final_accuracy"]
        and r["swing"] < base["swing"]
    ]
    if not ok:
        return BASELINE, "no strategy beats FedAvg's final pooled accuracy with a smaller swing"
    lab, r = max(ok, key=lambda x: x[1]["final_accuracy"])
    return lab, (
        f"final pooled accuracy {r['final_accuracy']:.3f} > {base['final_accuracy']:.3f} (FedAvg), swing "
        f"{r['swing']:.3f} < {base['swing']:.3f}"
    )


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def report(out: dict) -> list[str]:
    res: dict[str, dict] = out["results"]
    labels = list(res)
    first = res[labels[0]]
    seed = "" if out["seed"] is None else f", seed {out['seed']}"
    lines = [
        f"{out['recipe']}: {len(labels)} strategies, one run each{seed}; per round: the global model the round "
        f"starts from, on the sites' validation parts (weighted; {', '.join(k for k in first['metrics'] if k)}); "
        "final: the last global model on the pooled validation set (baselines.json)"
    ]
    env = out.get("env", {})
    lines.append(
        f"fl-plugins at {env.get('git_head', '?')[:12]}{' (+ local changes)' if env.get('fl_plugins_dirty') else ''}"
    )
    w = max(14, *(len(lab) + 2 for lab in labels))
    lines.append(f"{'':>5}" + "".join(f"{lab:>{w}}" for lab in labels))
    lines.append(f"{'round':>5}" + "".join(f"{'acc / loss':>{w}}" for _ in labels))
    rounds = sorted({x["round"] for r in res.values() for x in r["per_round"]})
    for rnd in rounds:
        cells = []
        for r in res.values():
            x = next((x for x in r["per_round"] if x["round"] == rnd), None)
            cells.append("-" if x is None else f"{_f(x['accuracy'])} / {_f(x['loss'])}")
        lines.append(f"{rnd:>5}" + "".join(f"{c:>{w}}" for c in cells))
    final = [f"{_f(r['final_accuracy'])} / {_f(r['final_loss'])}" for r in res.values()]
    lines.append(f"{'final':>5}" + "".join(f"{c:>{w}}" for c in final) + "   (pooled validation)")
    span = first.get("swing_rounds")
    lines.append("")
    lines.append(
        f"{'strategy':<{w}}{'final acc':>10}{'x FedAvg':>9}{'final loss':>11}{'swing':>8}{'x FedAvg':>9}"
        f"{'max drop':>9}{'best alone':>11}{'run s':>7}"
    )
    b = res[BASELINE]
    for lab, r in res.items():
        secs = "reused" if r.get("reused") else f"{r['seconds']:.0f}"
        lines.append(
            f"{lab:<{w}}{_f(r['final_accuracy']):>10}{_ratio(r['final_accuracy'], b['final_accuracy']):>9}"
            f"{_f(r['final_loss']):>11}{_f(r['swing']):>8}{_ratio(r['swing'], b['swing']):>9}"
            f"{_f(r['max_drop']):>9}{_f(r['best_local_only_accuracy']):>11}{secs:>7}"
        )
    if span:
        lines.append(
            f"swing: mean |change| of the per-round accuracy over rounds {span[0]}..{span[1]}; max drop: the "
            "largest fall from one round to the next; best alone: the best site's local-only model, pooled "
            "validation"
        )
    label, why = out["pick"]
    if label is None:
        lines.append(f"no pick: {why}")
    else:
        lines.append(f"pick by the rule: {label} ({why}); one seed: confirm on another (--seed N)")
    lines.append(f"plot: {out['png']}")
    return lines


def plot(out: dict, path: Path) -> Path:
    from matplotlib import colormaps

    from fl_plugins.report import figure

    res: dict[str, dict] = out["results"]
    cmap = colormaps["tab10"]
    fig = figure(figsize=(12.4, 5.2))
    axes = fig.subplots(1, 2)
    for ax, (what, key, fkey) in zip(
        axes, (("accuracy", "accuracy", "final_accuracy"), ("loss", "loss", "final_loss")), strict=True
    ):
        for i, (lab, r) in enumerate(res.items()):
            c = "black" if lab == BASELINE else cmap(i % 10)
            pts = [(x["round"], x[key]) for x in r["per_round"] if x[key] is not None]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    ms=4,
                    lw=2.4 if lab == BASELINE else 1.6,
                    color=c,
                    label=lab + (" (baseline)" if lab == BASELINE else ""),
                )
            if r[fkey] is not None:
                x = r["final_round"] if r["final_round"] is not None else max((p[0] for p in pts), default=0) + 1
                ax.plot([x], [r[fkey]], marker="*", ms=13, ls="", color=c)
        ax.set_title(f"global model: validation {what}")
        ax.set_xlabel("round (the global model it starts from); star: final model, pooled validation")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    seed = "" if out["seed"] is None else f", seed {out['seed']}"
    fig.suptitle(f"{Path(out['recipe']).name}: server strategies, one run each{seed}")
    fig.savefig(path, dpi=110)
    return path


def run(args) -> dict:
    strategies = parse_strategies(args.strategies)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or ROOT / "runs" / f"strategies-{args.recipe.stem}-{stamp}"
    (out_dir / "recipes").mkdir(parents=True, exist_ok=True)
    out: dict = {
        "recipe": str(args.recipe),
        "out": str(out_dir),
        "strategies": [s[0] for s in strategies],
        "rounds": args.rounds,
        "seed": args.seed,
        "last": args.last,
        "env": environment(),
        "results": {},
    }
    for i, (label, name, lr) in enumerate(strategies):
        slug = label.replace("@", "-lr")
        text = recipe_copy(args.recipe, name, lr, label, args)
        recipe, run_dir = out_dir / "recipes" / f"{slug}.yaml", out_dir / slug
        reused = _finished(run_dir) and recipe.exists() and recipe.read_text() == text
        if reused:
            print(f"[{i + 1}/{len(strategies)}] {label}: reusing the finished run in {run_dir}", flush=True)
            seconds = None
        else:
            if run_dir.exists():
                raise SystemExit(f"{run_dir} holds another or an unfinished run; remove it or give another --out")
            recipe.write_text(text)
            print(f"[{i + 1}/{len(strategies)}] {label}: fl-plugins run {recipe} --run-dir {run_dir}", flush=True)
            seconds = run_one(recipe, run_dir, out_dir / f"{slug}.log", args.timeout)
        r = figures(run_dir, args.last)
        r.update(strategy=name, lr=lr, seconds=seconds, reused=reused)
        out["results"][label] = r
        print(
            f"    final pooled accuracy {_f(r['final_accuracy'])}, swing {_f(r['swing'])}"
            + ("" if seconds is None else f", {seconds:.0f} s"),
            flush=True,
        )
    out["pick"] = list(pick(out["results"]))
    out["png"] = str(plot(out, out_dir / "strategies.png"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "recipe", nargs="?", type=Path, default=DEFAULT_RECIPE, help="the recipe (default recipes/peft_sentiment.yaml)"
    )
    p.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help="NAME or NAME@SERVER_LR, comma-separated; fedavg always runs, first (default %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    p.add_argument("--seed", type=int, default=None, help="set task.seed and task.split.seed (a built-in task)")
    p.add_argument(
        "--last", type=int, default=None, help="swing over the last N round-to-round changes (default: half the rounds)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the recipe copies, run directories, logs and strategies.png (default runs/strategies-STEM-TIME)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each run (default %(default)s)")
    p.add_argument("--json", type=Path, help="write all figures here as JSON")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1 (got {args.rounds})")
    if args.last is not None and args.last < 1:
        p.error(f"--last must be >= 1 (got {args.last})")
    out: dict = {}
    try:
        out = run(args)
        print("\n".join(report(out)))
    finally:
        if args.json and out:
            args.json.write_text(json.dumps(out, indent=1, default=str))
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
