"""app.memory: freed large buffers (aiokafka's fetch responses) go back to the system, not to glibc's heap."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from app.memory import fix_mmap_threshold
from app.settings import Settings

#: In a fresh interpreter: free one 4 MiB block (glibc's threshold slides up to 4 MiB unless it is fixed), take
#: 64 blocks of 1 MiB, touch them, free all but the last, and print how many MiB of RSS that gave back.
_PROBE = """
import ctypes, sys
from app.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(128)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
libc.free(libc.malloc(4 << 20))
blocks = [libc.malloc(1 << 20) for _ in range(64)]
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
before = rss()
for block in blocks[:-1]:
    libc.free(block)
print((before - rss()) >> 20)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def _released_mib(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* variables from the caller
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout)


@glibc
def test_with_the_threshold_fixed_freed_large_buffers_leave_the_process() -> None:
    assert _released_mib("fixed") >= 48


@glibc
def test_with_glibcs_sliding_threshold_they_stay_in_the_heap() -> None:
    """What the worker did before: the memory freed after a seek-back stayed in its RSS."""
    assert _released_mib("sliding") <= 8


def test_the_worker_fixes_the_threshold_at_128_kib_by_default_and_0_keeps_glibcs() -> None:
    assert Settings().malloc_mmap_threshold_kb == 128
    assert fix_mmap_threshold(0) is False
