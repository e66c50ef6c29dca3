"""Host memory for CPU training: keep freed memory in the process instead of handing it back to the kernel.

A CPU training step allocates and frees the same large activation and gradient buffers every
step (tens of MB at batch 256). glibc's malloc serves blocks that large with ``mmap`` and unmaps
them when they are freed, and trims the heap's top back to the kernel once enough of it is
free, so every step page-faults the same memory in again. With no ``mmap`` for large blocks,
no trimming and a 256 MB top pad, freed memory is reused. Measured with the bench's own loop
(seed CNN, batch 256, 1 thread): the train bench's ``plain-loop`` against ``plain-loop-glibc-malloc``.

The cost: a process keeps its peak heap until it exits, which a training worker reaches in its
first steps anyway. ``PIPELINE_KEEP_FREED_MEMORY=0`` turns it off; other C libraries (musl)
are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD = 256 << 20
ENV_VAR = "PIPELINE_KEEP_FREED_MEMORY"  # "0": leave malloc as it comes


def wanted() -> bool:
    """False when ``PIPELINE_KEEP_FREED_MEMORY=0`` asks to leave malloc alone."""
    return os.environ.get(ENV_VAR, "1") != "0"


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory (see the module doc); True when it was set."""
    if not wanted() or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)


__all__ = ["ENV_VAR", "keep_freed_memory", "wanted"]
