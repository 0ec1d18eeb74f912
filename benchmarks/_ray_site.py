"""A site for `round.py --backend ray`: `site_api_main`'s loop (the FLARE-style client API) run as the script a Ray
actor starts (fl_plugins/backends/on_ray.py), its figures written as JSON to a file instead of a pipe.

    python _ray_site.py ADDRESS SITE OUT.json ADD_CONSTANT PLAIN(0|1)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import site_api_main  # noqa: E402


class _File:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def send(self, obj: dict) -> None:
        self.path.write_text(json.dumps(obj))


if __name__ == "__main__":
    address, name, out, add_constant, plain = sys.argv[1:6]
    site_api_main(_File(out), address, name, float(add_constant), plain == "1")
