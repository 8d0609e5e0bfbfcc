"""Process memory tuning for a lock: glibc's malloc returns big freed blocks to the system, and
Python's cyclic garbage collector waits while the lock builds its tables.

glibc serves an allocation of at least the *mmap threshold* (128 KiB at start) with its own
``mmap`` and unmaps it on ``free``. By default the threshold is dynamic: freeing such a block
raises it to that block's size (up to 32 MiB), and the trim threshold to twice that, so later
blocks of up to that size come from the heaps — one per thread that allocates — and stay
resident after they are freed (mallopt(3), "M_MMAP_THRESHOLD"). A cold lock frees a few
multi-MiB buffers in several threads (compressed indices, xz decoders' dictionaries), then builds
its universe: with the dynamic threshold its peak RSS was ~15-30 MB higher than the memory in use.
Setting the threshold explicitly turns the adjustment off.

A cold lock creates ~70k small objects per index scan and universe (stanza heads, table rows),
none of them in reference cycles. Each 700 allocations start a collection that walks the young
objects, and the older generations are walked again and again as they grow: ~50-80 ms of a cold
lock's CPU. :func:`gc_paused` holds the collector for a block (objects are still freed by their
reference counts; cycles, if any, are collected when it ends).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 128 << 10  # glibc's initial value


def unmap_big_blocks() -> bool:
    """Fix glibc's mmap threshold at its initial 128 KiB (see the module doc). Returns whether it
    was set: False on a C library without ``mallopt`` (musl), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector during the block (see the module doc); it runs
    again afterwards if it ran before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
