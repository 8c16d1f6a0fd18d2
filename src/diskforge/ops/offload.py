"""``convert -C``: copy offloading, as qemu-img's ``-C`` asks for.

The data moves inside the kernel (``copy_file_range``: no copy through user space, and
on file systems that share extents — XFS, Btrfs, NFS 4.2 — no data copy at all), one
call per allocated extent of the source, so holes stay holes. This needs the bytes of
the disk to be the bytes of the files on both sides: a raw source file and a raw
target file. Anything else is refused with "not supported yet", rather than quietly
copied another way.
"""

from __future__ import annotations

import os

from ..blockdev import BlockDevice, ExtentKind, ImageWriter
from ..errors import ImageIOError, UnsupportedError

CHUNK = 64 << 20  # one copy_file_range call at most (progress between calls)


def _fd_of_source(src: BlockDevice) -> int | None:
    backend = getattr(src, "backend", None)
    if src.format != "raw" or backend is None or src.backing is not None:
        return None
    return getattr(backend, "fd", None)


def offload_copy(src: BlockDevice, writer: ImageWriter, progress=None) -> None:
    """Copy ``src`` into ``writer`` with copy_file_range, extent by extent, then
    ``writer.finish()``; the writer is aborted (nothing left behind) on failure."""
    out = getattr(writer, "out", None)
    src_fd = _fd_of_source(src)
    out_fd = getattr(out, "fd", None)
    if src_fd is None or out_fd is None or getattr(writer, "in_place", True) \
            or not hasattr(os, "copy_file_range"):
        writer.abort()
        raise UnsupportedError("not supported yet: copy offloading (-C) other than from"
                               " a raw file to a new raw file", src.path)
    total, done = src.size, 0
    try:
        for ext in src.extents():
            if ext.kind is ExtentKind.DATA:
                off, end = ext.offset, ext.offset + ext.length
                while off < end:
                    try:
                        n = os.copy_file_range(src_fd, out_fd, min(CHUNK, end - off),
                                               off, off)
                    except OSError as e:
                        raise ImageIOError.from_os(e, src.path) from None
                    if n == 0:
                        raise ImageIOError("copy_file_range stopped before the end of"
                                           " the source", src.path)
                    off += n
                    if progress:
                        progress(done + (off - ext.offset), total)
            done += ext.length
            if progress:
                progress(done, total)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
