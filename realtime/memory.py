"""Let a long-running worker give freed buffers back to the operating system.

Outgoing frames are allocated per connection. With glibc's default dynamic
threshold, buffers of a few hundred KiB (a slow client's backlog, a big event
fanned out) come from the heap, and the heap keeps its high-water mark after
they are freed: measured here, a worker that survived 320 abusive connections
stayed 40 MiB above its baseline and grew again on a second round. Serving
allocations of 64 KiB and more with mmap returns them on free (+3 MiB per
round instead). Small allocations, the common case, are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["return_freed_memory_to_os"]

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD = 64 * 1024


def return_freed_memory_to_os() -> bool:
    """Set glibc's mmap threshold; return False where that does not apply (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
