"""rebase: give an overlay another backing file, like ``qemu-img rebase``.

Safe mode keeps what the overlay reads: wherever the overlay itself stores nothing
(BACKING extents) and the old and new backing files differ, the old backing data is
copied into the overlay first; then the header names the new file. Unsafe mode
(``-u``) only changes the name. Written against BlockDevice (``extents``, ``write``,
``set_backing``), so every format with backing files can use it.
"""

from __future__ import annotations

import os
from typing import Callable

from ..blockdev import BlockDevice, ExtentKind, pieces
from ..errors import SafetyError

BATCH = 1 << 20
GRANULE = 64 * 1024


def _read(dev: BlockDevice | None, offset: int, buf: bytearray) -> None:
    """``buf`` from ``dev`` at ``offset``; zeros past its end (or with no device)."""
    n = len(buf)
    inside = 0 if dev is None else max(0, min(n, dev.size - offset))
    if inside:
        dev.readinto(offset, memoryview(buf)[:inside])
    if inside < n:
        buf[inside:] = bytes(n - inside)


def rebase(image: BlockDevice, new_backing: BlockDevice | None, name: str | None,
           fmt: str | None, *, unsafe: bool = False,
           progress: Callable[[int, int], None] | None = None) -> int:
    """Point ``image`` (open writable, with its current backing chain) at
    ``new_backing`` (recorded as ``name``/``fmt``; None: no backing file). Returns the
    bytes copied into the image."""
    if new_backing is not None and image.path and os.path.realpath(image.path) in {
            os.path.realpath(f) for f in new_backing.files()}:
        raise SafetyError("the new backing file chain contains the image itself",
                          image.path)
    copied = 0
    if not unsafe:
        old = image.backing
        total = image.size
        for ext in list(image.extents()):
            # an image without a backing file stores nothing in its ZERO extents either:
            # once it has one they may read from it, so they are compared too
            if ext.kind is ExtentKind.BACKING or (old is None and
                                                  ext.kind is ExtentKind.ZERO):
                for off, n in pieces(ext.offset, ext.length, BATCH):
                    ob, nb = bytearray(n), bytearray(n)
                    _read(old, off, ob)
                    _read(new_backing, off, nb)
                    if ob != nb:
                        for g, k in pieces(off, n, GRANULE):
                            i = g - off
                            if ob[i:i + k] != nb[i:i + k]:
                                image.write(g, memoryview(ob)[i:i + k])
                                copied += k
                    if progress:
                        progress(off + n, total)
            elif progress:
                progress(ext.end, total)
        image.flush()
    image.set_backing(name, fmt)
    image.flush()
    return copied
