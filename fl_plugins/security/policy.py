"""A site's policy: what the site agrees to run, written by its owner into its startup kit.

    # kits/site-1/policy.yaml
    tasks: [train, evaluate]        # task types this site runs: train, evaluate, submit_model (default: all)
    jobs: ["sentiment-*", "a1b2*"]  # job ids it accepts, as glob patterns (default: any job)

The site checks it before it does anything for a job: the job id when it connects (`fl-plugins server --job-id
NAME` gives a job a name to list here), the task type of every task it is handed. Anything else is refused at the
site: a clear log line, a `policy_refused` record sent to the aggregator (RUN_DIR/logs.jsonl) so the job's owner
sees why the site left, and PolicyError in the site's process. The file lives in the site's kit, under the site's
control: the aggregator cannot change what a site accepts.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_plugins.errors import ConfigError, PolicyError

POLICY_FILE = "policy.yaml"
TASK_TYPES = ("train", "evaluate", "submit_model")
_KEYS = ("tasks", "jobs")


@dataclass(frozen=True)
class SitePolicy:
    source: Path
    tasks: frozenset[str] = frozenset(TASK_TYPES)
    jobs: tuple[str, ...] = ("*",)

    def check_job(self, job_id: str) -> None:
        if not any(fnmatch.fnmatchcase(job_id, p) for p in self.jobs):
            raise PolicyError(
                f"this site's policy ({self.source}) does not accept job {job_id!r}: it accepts "
                f"{', '.join(self.jobs)}; add the job to `jobs:` to take part"
            )

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise PolicyError(
                f"this site's policy ({self.source}) does not run {task!r} tasks: it runs "
                f"{', '.join(sorted(self.tasks))}; add it to `tasks:` to allow it"
            )


def parse_policy(data: Any, source: Path) -> SitePolicy:
    if data is None:
        return SitePolicy(source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a site policy is a mapping with `tasks:` and/or `jobs:` (got {type(data).__name__})"
        )
    for k in data:
        if k not in _KEYS:
            close = difflib.get_close_matches(str(k), _KEYS, n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else f"; known keys: {', '.join(_KEYS)}"
            raise ConfigError(f"{source}: unknown key `{k}`{hint}")
    tasks = data.get("tasks", list(TASK_TYPES))
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"{source}: `tasks` must be a list of task types ({', '.join(TASK_TYPES)}); got {tasks!r}")
    for i, t in enumerate(tasks):
        if t not in TASK_TYPES:
            close = difflib.get_close_matches(t, TASK_TYPES, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: `tasks[{i}]` must be one of {', '.join(TASK_TYPES)} (got {t!r}){hint}")
    jobs = data.get("jobs", ["*"])
    if isinstance(jobs, str):
        jobs = [jobs]
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, str) and j for j in jobs):
        raise ConfigError(f"{source}: `jobs` must be a non-empty list of job ids or glob patterns; got {jobs!r}")
    return SitePolicy(source, frozenset(tasks), tuple(jobs))


def load_policy(kit_dir: str | Path) -> SitePolicy | None:
    """The kit's policy.yaml, or None when the kit has none (the site then runs what the aggregator sends)."""
    path = Path(kit_dir) / POLICY_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_policy(data, path)
