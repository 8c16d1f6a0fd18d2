"""The extents of a VMDK: what one line of the descriptor's extent section reads.

Every kind answers the same small interface, in bytes relative to the extent's own
start, so the device (``device.py``) only places extents one after another:

- ``readinto(offset, mv, below)``: fill ``mv``; where the extent stores nothing,
  ``below(offset, start, end)`` fills ``mv[start:end]`` (the parent's bytes, or zeros);
- ``map(offset, length)``: ``(offset, length, state, host)`` runs in order, ``state``
  one of DATA, ZERO (reads as zeros whatever lies below) and UNALLOCATED (reads from
  below); ``host`` is where an uncompressed run lives in the extent's file;
- ``write``/``write_zeroes`` where ``writable``; ``close``.

Here: the base class, FLAT/VMFS extents (a window of a file), ZERO extents and
NOACCESS extents (read as zeros, see ``formats/vmdk.md``). Sparse kinds are in
``sparse.py`` and ``sesparse.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ...blockdev import FileBackend, fill_zero
from .structs import SECTOR

DATA, ZERO, UNALLOCATED = "data", "zero", "unallocated"

# fills mv[start:end] with what lies below the extent at extent offset ``offset``
Below = Callable[[int, memoryview, int, int], None]


class VmdkExtent:
    """One extent: ``sectors`` long, of descriptor type ``type``."""

    type = "?"
    compressed = False
    writable = False            # can be written in place
    cluster_size: int | None = None
    backend: FileBackend | None = None
    path: str | None = None

    def __init__(self, sectors: int, access: str = "RW") -> None:
        self.sectors = sectors
        self.size = sectors * SECTOR
        self.access = access

    def readinto(self, offset: int, mv: memoryview, below: Below) -> None:
        raise NotImplementedError

    def map(self, offset: int, length: int) -> Iterator[tuple[int, int, str, int | None]]:
        raise NotImplementedError

    def write(self, offset: int, mv: memoryview, below: Below) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, below: Below | None) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, object]:
        """qemu-img's per-extent ``format-specific`` keys (``filename`` added by the
        device, which knows the path)."""
        out: dict[str, object] = {"virtual-size": self.size, "format": self.type}
        if self.cluster_size:
            out["cluster-size"] = self.cluster_size
        if self.compressed:
            out["compressed"] = True
        return out

    def close(self) -> None:
        """Backends are owned and closed by the device (several extents may share one)."""


class FlatExtent(VmdkExtent):
    """FLAT and VMFS extents: the disk bytes, ``start`` bytes into a file."""

    writable = True

    def __init__(self, backend: FileBackend, sectors: int, start: int, type_: str,
                 access: str = "RW") -> None:
        super().__init__(sectors, access)
        self.backend = backend
        self.path = backend.path
        self.start = start
        self.type = type_

    def readinto(self, offset: int, mv: memoryview, below: Below) -> None:
        got = self.backend.readinto(self.start + offset, mv)
        if got < len(mv):  # a short flat file reads as zeros past its end, as qemu
            fill_zero(mv, got, len(mv))

    def map(self, offset: int, length: int):
        for o, n, data in self.backend.data_ranges(self.start + offset,
                                                   self.start + offset + length):
            yield o - self.start, n, DATA if data else ZERO, o

    def write(self, offset: int, mv: memoryview, below: Below) -> None:
        self.backend.pwrite(self.start + offset, mv)

    def write_zeroes(self, offset: int, length: int, below: Below | None) -> None:
        self.backend.write_zeroes(self.start + offset, length)


class ZeroExtent(VmdkExtent):
    """ZERO extents (the spec's sparse-without-file), and NOACCESS extents, which the
    spec says must not be read: both read as zeros."""

    type = "ZERO"

    def __init__(self, sectors: int, access: str = "RW", type_: str = "ZERO") -> None:
        super().__init__(sectors, access)
        self.type = type_

    def readinto(self, offset: int, mv: memoryview, below: Below) -> None:
        fill_zero(mv)

    def map(self, offset: int, length: int):
        yield offset, length, ZERO, None
