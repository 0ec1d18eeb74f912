"""Private, durable files in the run directory: folders 0700 and files 0600 whatever the umask (the run directory
is private to its owner, like a startup kit), small files written atomically (tmp, fsync, rename, fsync the
folder). store.py and runfile.py write through these; the runner and the CLI use them for logs and summaries.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any

COPY_BUFFER = 8 << 20  # bytes: the reused buffer for copying and hashing files
DIR_MODE = 0o700  # the run directory's folders and files: private to the owner, as the startup kits are
FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in the folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_opener(path: str, flags: int) -> int:
    """`open(..., opener=private_opener)`: a file the open creates is 0600 from the moment it exists."""
    return os.open(path, flags, FILE_MODE)


def private_dir(path: str | os.PathLike) -> Path:
    """Make the folder `path` (its missing parents with the default mode) and give it mode 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if os.name == "posix" and path.stat().st_mode & 0o777 != DIR_MODE:
        with contextlib.suppress(PermissionError):  # not ours: leave it as it is
            os.chmod(path, DIR_MODE)
    return path


def private_file(path: str | os.PathLike, mode: str = "ab") -> IO[Any]:
    """Open `path` with `mode` and mode bits 0600 (also a file an older run left 0644), e.g. a log file."""
    f = open(path, mode, opener=private_opener)  # noqa: SIM115
    if os.name == "posix":
        with contextlib.suppress(PermissionError):
            os.fchmod(f.fileno(), FILE_MODE)
    return f


def write_private(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a small file, mode 0600."""
    with private_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file 0600 via `path.tmp`, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", opener=private_opener) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
