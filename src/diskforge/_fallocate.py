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
EXT4_SUPER_MAGIC = 0xEF53  # statfs(2) f_type; ext2 and ext3 mounted by ext4 share it

@functools.cache
def _libc():
    """The C library the interpreter has loaded, or None (loaded once)."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, ImportError):
        return None


@functools.cache
def _load():
    """libc's fallocate, or None where there is none (loaded once)."""
    libc = _libc()
    if libc is None:
        return None
    import ctypes
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


def reserving_pays(fd: int) -> bool:
    """Whether reserving blocks ahead of buffered writes (``ReserveAhead``) makes them
    cheaper on the file system holding ``fd``: measured on ext4 only (formats/raw.md);
    on tmpfs it is slower, since fallocate there clears every page the write then
    overwrites."""
    libc = _libc()
    fstatfs = getattr(libc, "fstatfs", None)
    if fstatfs is None:
        return False
    import ctypes
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type first, a long
    return (fstatfs(fd, buf) == 0
            and ctypes.c_long.from_buffer(buf).value == EXT4_SUPER_MAGIC)


class ReserveAhead:
    """Blocks of a new output allocated (fallocate) a window ahead of its writes.

    Why: on ext4, buffered writes into allocated blocks cost markedly less kernel time
    than writes that delayed allocation must reserve page by page (formats/raw.md:
    raw -> raw of the mixed disk, median 0.45 -> 0.31 s; with the write-back's fsync
    counted, no worse, so the work is saved, not deferred). Why a window and not each
    write's own range: a fallocate per 1 MiB write scattered the file (305 extents,
    97 of them placed backwards, against 142 and 2 written plainly), while windows
    are laid out in one piece.

    Two kinds of writer use it, and give back what they did not use differently:
    - a sparse file written in offset order (raw: ``limit`` is its size, windows stay
      inside it): ``zeros`` punches the ranges it leaves as holes, and ``punch_rest``
      what lies past the highest write; a range reserved but neither written nor
      punched still reads as zeros, it is only allocated;
    - a file whose data is appended (qcow2's clusters, DMG's chunks): windows past
      the end of the file are reserved without changing its size
      (``FALLOC_FL_KEEP_SIZE``), writes of any size open them (every reserved block
      is written), and ``trim`` frees what is left past the end once the file is
      complete. UDZO of the mixed disk: the main thread's CPU 0.64-0.76 -> 0.51-0.61 s.

    Anything the file system refuses (no fallocate, no extents, no space for a
    window) turns the reserving off and the writes go on as before."""

    WINDOW = 32 << 20
    MIN_WRITE = 256 << 10  # sparse files: 64 KiB writes, each reserved, gained nothing

    def __init__(self, fd: int, limit: int | None = None):
        self.fd = fd
        self.limit = limit
        self.end = 0            # reserved below here
        self.written = 0        # the end of the highest write
        self.on: bool | None = None  # decided at the first write

    def write(self, offset: int, length: int) -> None:
        """Before ``length`` bytes are written at ``offset``."""
        end = offset + length
        self.written = max(self.written, end)
        if end <= self.end or self.on is False:
            return
        if length < self.MIN_WRITE and self.limit is not None:
            return  # in a sparse file, a scattered few small writes would cost punches
        if self.on is None:
            self.on = reserving_pays(self.fd)
            if not self.on:
                return
        start = max(offset, self.end)
        stop = max(end, start + self.WINDOW)
        if self.limit is not None:
            stop = min(stop, self.limit)
        mode = 0 if self.limit is not None else FALLOC_FL_KEEP_SIZE
        if not reserve(self.fd, start, stop - start, mode):
            self.on = False
            return
        self.end = stop

    def zeros(self, offset: int, length: int) -> None:
        """Where a sparse writer leaves ``[offset, offset+length)`` a hole."""
        stop = min(offset + length, self.end)
        if stop > offset and not punch_hole(self.fd, offset, stop - offset):
            self.on = False

    def punch_rest(self) -> None:
        """A sparse writer's end: give back what was reserved past the highest write."""
        self.zeros(self.written, self.end - self.written)

    def trim(self) -> None:
        """An appending writer's end: free what was reserved past the end of the file
        (a truncate to its own size frees blocks beyond it). Also after a refused
        window: the ones before it were granted."""
        try:
            size = os.fstat(self.fd).st_size
            if self.end > size:
                os.ftruncate(self.fd, size)
        except OSError:
            pass  # the blocks stay allocated past the end; the file is whole


def reserve(fd: int, offset: int, length: int, mode: int = 0) -> bool:
    """Allocate the blocks of ``[offset, offset+length)`` (fallocate with ``mode``: 0
    grows the file if need be, ``FALLOC_FL_KEEP_SIZE`` does not); False when the file
    system cannot.

    Not ``os.posix_fallocate``: where fallocate is refused (an ext3-style file without
    extents, say), glibc emulates it by writing every block."""
    fn = _load()
    return fn is not None and fn(fd, mode, offset, length) == 0


def allocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks (preallocation=falloc); raises OSError when it cannot."""
    os.posix_fallocate(fd, offset, length)
