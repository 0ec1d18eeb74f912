"""`python -m fl_plugins.cli`: the `fl-plugins` command."""

import sys

from fl_plugins.cli import main

sys.exit(main())
