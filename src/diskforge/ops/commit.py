"""commit: write an overlay's changes down into a backing image, like
``qemu-img commit``.

Everything that some layer above the base stores (data, and zero clusters that hide
the base) is written into the base, which grows first if it is smaller than the
overlay. The top image is emptied afterwards (``make_empty``) unless ``keep`` is set;
qemu-img's rule that ``-b`` implies ``-d`` is the caller's (the layers between would
otherwise show through). Written against BlockDevice (``map`` resolution, ``write``,
``write_zeroes``, ``resize``), so any format with backing files can use it.
"""

from __future__ import annotations

from typing import Callable

from ..blockdev import BlockDevice, pieces
from ..errors import UsageError
from .map import resolve

BATCH = 1 << 20


def chain_depth(top: BlockDevice, base_path: str) -> int:
    """How many layers below ``top`` the image at ``base_path`` is (1 = its backing)."""
    import os
    depth, dev = 1, top.backing
    while dev is not None:
        if dev.path and os.path.exists(dev.path) and os.path.samefile(dev.path, base_path):
            return depth
        dev, depth = dev.backing, depth + 1
    raise UsageError(f"'{base_path}' is not in the backing chain of the image", top.path)


def commit(top: BlockDevice, base: BlockDevice, depth: int, *,
           progress: Callable[[int, int], None] | None = None) -> int:
    """Copy into ``base`` (open writable; ``depth`` layers below ``top``) what the
    layers above it store. Returns the bytes written."""
    if base.size < top.size:
        base.resize(top.size)
    written = 0
    total = top.size
    buf = bytearray(BATCH)
    for e in list(resolve(top)):
        if e.depth < depth and e.present:
            if e.zero:
                base.write_zeroes(e.start, e.length)
            else:
                for off, n in pieces(e.start, e.length, BATCH):
                    view = memoryview(buf)[:n]
                    top.readinto(off, view)
                    base.write(off, view)
            written += e.length
        if progress:
            progress(e.start + e.length, total)
    base.flush()
    return written
