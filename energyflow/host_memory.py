"""Keep the CPU tensors a training step frees in the process for the next step (glibc's ``malloc``).

glibc serves an allocation above its mmap threshold (128 KiB at first, adapted upwards to at most 32 MiB) with
a fresh ``mmap`` and hands it back to the kernel on ``free``; it also trims free memory from the top of the heap
past 128 KiB. A training step allocates and frees the same large tensors every step, so each step faults those
pages in again, and the kernel zeroes each one first. The EBT's step is hit hardest: its second-order graph
holds ~3 GiB at xxs against ~0.5 GiB for the Transformer++ (``benchmarks/train_step.py``), and on this 2-core
machine 77,000 minor page faults and 0.63 s of kernel time per 6.4 s step went to that; retained, 10,500 and
0.15 s per 6.1 s step (``benchmarks/host_memory.py``).

:func:`retain_freed_memory` raises the mmap threshold and turns trimming off (``mallopt``), so freed memory
stays in the heap and the next step reuses it: the resident set stays at the step's high-water mark, which it
reaches anyway. :func:`release_freed_memory` (``malloc_trim(0)``) hands the free part back, e.g. when training
ends. The thresholds cannot be put back: once set, glibc no longer adapts them, and its fixed defaults would map
every tensor above 128 KiB afresh, so they stay set for the process. Elsewhere (macOS, Windows, musl) both
functions do nothing and return ``False``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# Above this an allocation still gets its own mapping: one tensor this large is rare, and costs far more to
# compute than to fault in. Where glibc refuses a threshold above DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit,
# the limit mallopt(3) documents), the second value is used.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only: musl and others have no such symbol
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return libc


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Make freed heap memory stay in the process (once per process). True where it took effect (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    if not any(libc.mallopt(M_MMAP_THRESHOLD, threshold) for threshold in MMAP_THRESHOLDS):
        return False
    # -1 disables trimming (mallopt(3)); without it the fixed threshold would still hand the heap's top back.
    return bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (``malloc_trim(0)``). True if any memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
