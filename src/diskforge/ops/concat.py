"""Several images read as one disk, end to end: ``convert A B C OUT`` as qemu-img does.

qemu-img's convert with more than one source writes them one after another into the
target, whose virtual size is the sum. This device does the same over any readable
BlockDevices, so the whole convert pipeline (extents, zero detection, compression)
works unchanged; each source keeps its own extent map.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..blockdev import BlockDevice, Extent, ExtentKind, ImageInfo


class ConcatDevice(BlockDevice):
    """Read-only: ``parts`` one after another. Closing it closes every part."""

    def __init__(self, parts: list[BlockDevice]):
        self.parts = list(parts)
        self.starts = []
        total = 0
        for p in self.parts:
            self.starts.append(total)
            total += p.size
        self.size = total
        self.format = self.parts[0].format if self.parts else "raw"
        self.path = self.parts[0].path if self.parts else None

    def _spans(self, offset: int, length: int):
        """(part, offset in it, offset in the whole, length) over the range."""
        end = offset + length
        for part, start in zip(self.parts, self.starts):
            lo, hi = max(offset, start), min(end, start + part.size)
            if lo < hi:
                yield part, lo - start, lo, hi - lo

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        self.check_range(offset, len(mv))
        for part, inner, whole, n in self._spans(offset, len(mv)):
            part.readinto(inner, mv[whole - offset:whole - offset + n])
        return len(mv)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self.size - offset
        for part, inner, whole, n in self._spans(offset, length):
            for e in part.extents(inner, n):
                # a part's BACKING extents read through its own chain: DATA here
                kind = ExtentKind.DATA if e.kind is ExtentKind.BACKING else e.kind
                yield Extent(e.offset - inner + whole, e.length, kind)

    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path or "", format=self.format,
                         virtual_size=self.size)

    def files(self) -> list[str]:
        return [f for p in self.parts for f in p.files()]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self.parts:
            p.close()
