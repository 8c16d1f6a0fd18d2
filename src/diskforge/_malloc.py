"""Keep freed heap memory in the process while a pipeline churns through buffers.

Why: reading a compressed image allocates and frees, per 1 MiB batch, a buffer for the
compressed bytes, a read-ahead buffer and one 64 KiB output per cluster or grain, on
three threads. glibc's defaults hand such memory back to the kernel as soon as the top
of a heap is free (``M_TRIM_THRESHOLD``, 128 KiB, and a sliding mmap threshold), and
the next batch faults every page in again, zero-filled by the kernel. Measured on the
2 GiB mixed disk, stream VMDK → raw: 191,000 minor faults and 1.35 s of system CPU
with glibc's defaults; 7,000 faults and 0.94 s with the thresholds below (qemu-img:
943 faults), peak RSS +2 MB. qcow2 zlib → raw: 42,000 → 6,000 faults.

The thresholds bound what is kept: at most ``TRIM`` free bytes at the top of each
heap (one heap per thread that allocates), and blocks of ``MMAP`` bytes or more still
come from (and go back to) mmap. A user's own ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_MMAP_THRESHOLD_`` wins, ``DISKFORGE_MALLOC=glibc`` keeps glibc's defaults
(measuring), and outside glibc nothing is done. Called when a decode
pool or a convert pipeline starts, never at import (ctypes costs start-up time).
"""

from __future__ import annotations

import os

TRIM = 32 << 20
MMAP = 16 << 20
_M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds once per process (True when set)."""
    global _done
    if _done:
        return False
    _done = True
    env = os.environ
    if env.get("MALLOC_TRIM_THRESHOLD_") or env.get("MALLOC_MMAP_THRESHOLD_") or \
            env.get("DISKFORGE_MALLOC") == "glibc":
        return False
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt   # glibc (musl and macOS have none)
    except (OSError, AttributeError, ImportError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM))
