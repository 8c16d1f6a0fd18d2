"""fallocate(2) with flags, which the os module does not offer (it has only
posix_fallocate).

Loaded lazily, and libc with it: the qcow2 writer imports ``allocate`` (plain
``os.posix_fallocate``) at start-up, and this module used to load libc there through
``ctypes.util.find_library``, which runs ``ldconfig -p`` in a subprocess (and imports
subprocess and shutil): 10 ms of every qcow2 write's start-up. ``ctypes.CDLL(None)``
is the C library the interpreter already has loaded.
"""

from __future__ import annotations

import functools
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

@functools.cache
def _load():
    """libc's fallocate, or None where there is none (loaded once)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, ImportError):
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
    return fn


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` keeping the file size; False when the
    file system or platform cannot (the caller then writes zeros)."""
    if length <= 0:
        return False
    fn = _load()
    if fn is None:
        return False
    return fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0


def allocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks (preallocation=falloc); raises OSError when it cannot."""
    os.posix_fallocate(fd, offset, length)
