"""Give back the pages of the memory-mapped training files that this process has read, so its RSS stays flat in N.

The prepared training data (:mod:`flagm3.data.prepared`) is memory-mapped. Every page a process reads stays
mapped into it and counts in its resident set (``RssFile`` in ``/proc/self/status``), and the kernel maps up to
64 kB of already-cached neighbours around each page read (fault-around). Opening 1M prepared records (every
record batch's header, the list offsets of ``pos`` and ``neg``) mapped about 190 MB, and drawing the IDF corpus
(2,500 records at random) about 290 MB more: RSS that grows with the file, though these are clean pages of the
page cache, shared by every rank.

:func:`release_mapped_pages` calls ``madvise(MADV_DONTNEED)`` on this process' read-only mappings of the given
files (found in ``/proc/self/maps``): the mappings stay valid, the pages stay in the page cache, and the next read
of such a page maps it again from the cache (the same bytes: the files are never written in place, a cache
rewrite goes to a new directory). Writable mappings and deleted files are left alone. Elsewhere than on Linux it
does nothing. :class:`PageReleaser` calls it every ``every`` reads.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Iterable, List, Optional, Sequence

_LIBC: Optional[ctypes.CDLL] = None


def _madvise():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.madvise.restype = ctypes.c_int
    return _LIBC.madvise


def read_only_mappings(paths: Iterable[str]) -> List[tuple]:
    """``[(start, end), ...]`` address ranges of this process' read-only mappings of ``paths``."""
    wanted = {os.path.realpath(p) for p in paths}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in wanted and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_mapped_pages(paths: Sequence[str]) -> int:
    """Unmap (``MADV_DONTNEED``) the pages of this process' read-only mappings of ``paths``; the mappings stay
    usable. Returns the bytes of mappings advised (0 where this is not Linux)."""
    if not paths or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    madvise = _madvise()
    total = 0
    for start, end in read_only_mappings(paths):
        if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            total += end - start
    return total


class PageReleaser:
    """Calls :func:`release_mapped_pages` on ``paths`` once every ``every`` calls of :meth:`tick`."""

    def __init__(self, paths: Sequence[str], every: int = 256):
        self.paths = list(paths)
        self.every = every
        self.count = 0

    def tick(self, n: int = 1) -> None:
        self.count += n
        if self.count >= self.every:
            self.release()

    def release(self) -> None:
        self.count = 0
        release_mapped_pages(self.paths)
