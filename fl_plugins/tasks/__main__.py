"""`python -m fl_plugins.tasks --recipe RECIPE.yaml [--baselines RUN_DIR]`: one site of a built-in task, or the
baselines after a run (fl_plugins/tasks/run.py). `fl-plugins run` starts this file on every site."""

import sys

from fl_plugins.tasks.run import main

if __name__ == "__main__":
    sys.exit(main())
