"""Process-level tuning that the transport's speed and memory figures depend on."""

from __future__ import annotations

import os
import sys


def limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc's malloc arenas at `n` (what MALLOC_ARENA_MAX=n does), unless the environment sets it.

    gRPC frees each 4 MiB message on whichever thread handled it; with glibc's default of one arena per thread
    (up to 8 x cores) those buffers are not reused by the next allocation elsewhere, so RSS grows by hundreds
    of MiB (aggregator with 4 sites: accumulator + 600 MiB instead of + 200, benchmarks/transfer.py) and more
    fresh pages are touched. Takes full effect when called before threads start; harmless later."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass
