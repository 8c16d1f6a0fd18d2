"""vhdx: Hyper-V's Virtual Hard Disk v2 format ([MS-VHDX]), fixed, dynamic and
differencing, read and written, with log replay.

The package: ``structs`` (the specification's structures and constants, the BAT
index arithmetic and the sector bitmap's bit order; it imports no sibling), ``crc32c``
(its checksum), ``bat`` (the BAT read in pieces),
``tables`` (header section and metadata region), ``log`` (log search, replay and
entries), ``device`` (the BlockDevice, random-access writes included),
``maintenance`` (resize, rebase, emptying and re-linking for commit), ``writer``
(new files for convert and create). See formats/vhdx.md.
"""

from __future__ import annotations

from ...errors import UsageError
from ...registry import Format, Measurement, OptionsFrom

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options


class VhdxFormat(Format):
    name = "vhdx"
    extensions = ("vhdx", "avhdx")
    description = "Hyper-V VHDX: fixed, dynamic, differencing; log replay"
    options = OptionsFrom("diskforge.formats.vhdx.options:VhdxOptions")
    random_write = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[:8] == b"vhdxfile" else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .device import VhdxDevice
        return VhdxDevice(path, writable=writable, policy=policy, backend=backend)

    def qemu_driver(self, device) -> str | None:
        """QEMU's vhdx driver reads dynamic and fixed disks of 512-byte logical
        sectors; it refuses 4096-byte sectors and differencing disks, and a file whose
        log holds pending entries (opened read-only, as ``--snapshot`` and ``attach``
        do, it refuses; read-write it replays the log into the file, and for a log
        that wraps around its end it replays the wrong entries, formats/vhdx.md)."""
        if device.lss != 512 or device.differencing or (
                device.replayed is not None and device.replayed.entries):
            return None
        return "vhdx"

    def writer(self, path: str, size: int, options: Options, *, backing=None):
        from .writer import VhdxWriter
        if not isinstance(options, self.options):
            raise UsageError("internal: vhdx writer given foreign options", path)
        return VhdxWriter(path, size, options, backing)

    def measure(self, size: int, options: Options, allocated) -> Measurement:
        from .writer import Geometry
        g = Geometry(size, options, False, None)
        full = g.data_offset + g.nblocks * g.block_size
        if g.fixed:
            return Measurement(required=full, fully_allocated=full)
        blocks = set()
        for e in allocated or ():
            first = e.offset // g.block_size
            last = (e.offset + e.length - 1) // g.block_size
            blocks.update(range(first, last + 1))
        return Measurement(required=g.data_offset + len(blocks) * g.block_size,
                           fully_allocated=full)


FORMAT = VhdxFormat()
