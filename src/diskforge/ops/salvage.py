"""``convert --salvage``: read errors become zeros, and every one is reported.

qemu-img's ``--salvage`` keeps converting past sectors it cannot read (a failing disk,
a damaged image) and writes zeros there. This wrapper does the same over any
BlockDevice: a failed read is retried in smaller pieces down to 512 bytes, so only the
sectors that really fail are zeroed; each zeroed range is kept in ``failures`` (and
handed to ``report``) so the caller can say what was lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..blockdev import BlockDevice, Extent, ImageInfo
from ..errors import DiskforgeError

SECTOR = 512


class SalvagingDevice(BlockDevice):
    """Reads ``inner``; ranges it cannot read read as zeros."""

    def __init__(self, inner: BlockDevice,
                 report: "Callable[[int, int, str], None] | None" = None):
        self.inner = inner
        self.size, self.format, self.path = inner.size, inner.format, inner.path
        self.report = report
        self.failures: list[tuple[int, int]] = []

    def load_bitmaps(self, *, data: bool = True):
        """The source's own (``convert --salvage --bitmaps``)."""
        return self.inner.load_bitmaps(data=data)

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        self._read(offset, mv, max(SECTOR, len(mv)))
        return len(mv)

    def _read(self, offset: int, mv: memoryview, step: int) -> None:
        try:
            self.inner.readinto(offset, mv)
            return
        except DiskforgeError as e:
            if len(mv) <= SECTOR:
                mv[:] = bytes(len(mv))
                self.failures.append((offset, len(mv)))
                if self.report is not None:
                    self.report(offset, len(mv), str(e))
                return
        # retry in pieces 64 times smaller (1 MiB -> 16 KiB -> 512 B), sector aligned
        step = max(SECTOR, (len(mv) // 64) // SECTOR * SECTOR)
        pos = 0
        while pos < len(mv):
            n = min(step, len(mv) - pos)
            self._read(offset + pos, mv[pos:pos + n], step)
            pos += n

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        try:
            yield from list(self.inner.extents(offset, length))
        except DiskforgeError:  # a map that cannot be read: read everything
            from ..blockdev import ExtentKind
            n = self.size - offset if length is None else length
            yield Extent(offset, n, ExtentKind.DATA)

    @property
    def backing(self):  # type: ignore[override]
        return self.inner.backing

    def info(self) -> ImageInfo:
        return self.inner.info()

    def files(self) -> list[str]:
        return self.inner.files()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()
