"""fallocate(2) with flags, which the os module does not offer (it has only
posix_fallocate). Loaded lazily: ctypes costs import time that `info` should not pay."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` keeping the file size; False when the
    file system or platform cannot (the caller then writes zeros)."""
    if _fallocate is None or length <= 0:
        return False
    rc = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    return rc == 0


def allocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks (preallocation=falloc); raises OSError when it cannot."""
    os.posix_fallocate(fd, offset, length)
