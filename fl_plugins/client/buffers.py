"""Receive buffers that outlive their round, for scripts that call `receive()` with no `into=` (FLARE's loop).

A plain `receive()` needs new tensors every round, and fresh memory costs a page fault (and the kernel zeroing
the page) on its first touch: that runs at 0.5-3 GB/s here, below the wire (benchmarks/transfer.py
--fresh-receive), so a plain loop downloads slower than one that receives into its model's own tensors. This pool
lends each large tensor an anonymous memory map and keeps the map after the round: once nothing references a
map any more (the script dropped that round's FLModel and every view of its tensors: the tensor made from the map
holds a reference to it, and so does every view of it), a later round's tensor of the same size is made from it,
already touched.

    take(nbytes)     a writable map of `nbytes` (a free one of that size if there is one, else a new one)
    round_done()     after a download: maps that stayed free through the whole round are given back to the OS

So the pool holds at most the maps in use plus one round's free ones: the peak is the same as without it (the
previous round's tensors are alive while the next round downloads in both cases); between rounds a process keeps
one more model's worth of memory instead of returning it. Small tensors (under `MIN_BYTES`) are left to the
allocator. A tensor made from a map cannot grow in place (`resize_` past its size raises), unlike one from
`torch.empty`.

Off unless `FL_RECEIVE_POOL=1`. Measured (benchmarks/round.py --plain --rounds 8, 1 GiB x 2 sites, session 9): the
sites' download of rounds 2-7 took 3.1-3.4 s with it against 4.0-5.0 s without (receive(into=): 3.4-3.6), but the
aggregator's checkpoint write, which still holds up the next round, took 2.1-2.3 s against 0.6-1.7 s (the memory
the sites keep lowers the kernel's dirty-page limit), so rounds came out even (8.9 vs 9.2 s). Session 11, with the
write off the round's path (aggregator/finished.py), `--rounds 5 --plain` twice each way in one sitting: the
download took 3.2-4.1 s with it against 3.6-4.8 s without, the upload 3.9-4.6 against 3.2-4.3, and the steady
rounds came out even again (9.14 and 8.92 s against 8.63 and 8.74 s): the CPU the pool saves on page faults the
sites' uploads spend, on 2 cores shared by three processes. It stays off.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading

MIN_BYTES = 1 << 20


class BufferPool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.maps: list[mmap.mmap] = [_new_map(1)]
        self.free = self._refs()[0]  # what a map only the pool holds reads, measured (Python versions differ)
        self.maps = []
        self.used: set[int] = set()  # id() of the maps lent since the last round_done()

    def _refs(self) -> list[int]:
        """Each map's reference count, read the same way as `free` was measured."""
        return [sys.getrefcount(m) for m in self.maps]

    def take(self, nbytes: int) -> mmap.mmap:
        with self.lock:
            for m, refs in zip(self.maps, self._refs(), strict=True):
                if len(m) == nbytes and id(m) not in self.used and refs <= self.free:
                    self.used.add(id(m))
                    return m
            m = _new_map(nbytes)
            self.maps.append(m)
            self.used.add(id(m))
            return m

    def round_done(self) -> None:
        """Give back the maps that nobody holds and that this round did not lend."""
        with self.lock:
            keep = []
            for m, refs in zip(self.maps, self._refs(), strict=True):
                if id(m) not in self.used and refs <= self.free:
                    m.close()
                else:
                    keep.append(m)
            self.maps, self.used = keep, set()

    def held_bytes(self) -> int:
        with self.lock:
            return sum(len(m) for m in self.maps)


def _new_map(nbytes: int) -> mmap.mmap:
    """Private anonymous memory: a forked process (a DataLoader worker) gets its own copy on write, as with
    malloc'd memory, never pages the pool lends again. (Huge pages were tried: no faster to touch first here.)"""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)


POOL = BufferPool()


def enabled() -> bool:
    """FL_RECEIVE_POOL=1, on Linux, and with the GIL (reference counts are not exact in a free-threaded build)."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return os.environ.get("FL_RECEIVE_POOL", "0") == "1" and sys.platform.startswith("linux") and gil
