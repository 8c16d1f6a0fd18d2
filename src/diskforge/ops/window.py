"""A window onto part of a BlockDevice: ``qemu-img dd``'s ``skip=`` and ``count=``.

The window reads, maps and describes only ``[start, start+size)`` of the device below,
so the convert pipeline copies that part alone, holes kept. Past ``data`` bytes (and
past the end of the device below) a window reads zeros: an output rounded up to whole
sectors holds only what was asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..blockdev import BlockDevice, Extent, ExtentKind, ImageInfo


class WindowDevice(BlockDevice):
    """Read-only view of ``inner``; closing the window closes ``inner``."""

    def __init__(self, inner: BlockDevice, start: int, size: int, data: int | None = None):
        self.inner, self.start, self.size = inner, start, size
        self.limit = min(size if data is None else data, max(0, inner.size - start))
        self.format, self.path = inner.format, inner.path

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        self.check_range(offset, len(mv))
        inside = max(0, min(len(mv), self.limit - offset))
        if inside:
            self.inner.readinto(self.start + offset, mv[:inside])
        mv[inside:] = bytes(len(mv) - inside)
        return len(mv)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self.size - offset
        inside = max(0, min(length, self.limit - offset))
        if inside:
            for e in self.inner.extents(self.start + offset, inside):
                kind = ExtentKind.DATA if e.kind is ExtentKind.BACKING else e.kind
                yield Extent(e.offset - self.start, e.length, kind)
        if length > inside:
            yield Extent(offset + inside, length - inside, ExtentKind.ZERO)

    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path or "", format=self.format,
                         virtual_size=self.size)

    def files(self) -> list[str]:
        return self.inner.files()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()
