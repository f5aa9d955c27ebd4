"""Give freed large buffers back to the system (glibc's malloc).

glibc serves an allocation of M_MMAP_THRESHOLD bytes or more (128 KiB to start with) with a mapping of its own,
returned to the system when freed; but each time such a block is freed, the threshold slides up to its size,
and later blocks of that size come from the heap, whose freed memory stays in the process. aiokafka reads each
fetch response into one buffer of up to 1 MiB per partition. When the faust agent runtime of earlier releases sent
the consumer back to a skipped record, the fetcher briefly held many of them at once: the worker's RSS went up
by 80-100 MB and stayed there (bench/results/profile.md, "Memory"); any burst of large fetches does the same. With
the threshold fixed, it comes back down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: mallopt's parameter number for the threshold (malloc.h).
M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at `kib` KiB (which also stops it sliding); False if `kib` is 0 (glibc's sliding
    threshold is kept) or this is not glibc."""
    if kib <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, kib * 1024))
