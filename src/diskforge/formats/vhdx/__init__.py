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

import dataclasses

from ...errors import UnsupportedError, UsageError
from ...options import Options, option
from ...registry import Format, Measurement


@dataclasses.dataclass
class VhdxOptions(Options):
    """``-o`` options of VHDX output."""
    subformat: str = option("dynamic", "dynamic: blocks allocated as data arrives; fixed:"
                            " every block allocated (the file stays sparse)",
                            choices=("dynamic", "fixed"))
    block_size: int = option(0, "payload block size, a power of two from 1M to 256M;"
                             " 0: qemu-img's choice (8M up to 1G, 16M up to 100G, 32M up to"
                             " 32T, then 64M), or 2M for a differencing disk",
                             kind="size")
    log_size: int = option(1 << 20, "log size, a multiple of 1M", kind="size")
    logical_sector_size: int = option(0, "512 or 4096; 0: 512, or the parent's for a"
                                      " differencing disk")
    physical_sector_size: int = option(4096, "512 or 4096 (what the guest is told)")
    # qemu-img's key, accepted so its scripts run: in qemu it only changes a fixed disk
    # (blocks PAYLOAD_BLOCK_ZERO instead of FULLY_PRESENT); diskforge's fixed disks keep
    # FULLY_PRESENT blocks (over a sparse file, reading as zeros), which is what off means
    block_state_zero: bool = option(False, "qemu-img's: ZERO payload state for a fixed"
                                    " disk's blocks; on with subformat=fixed is not"
                                    " supported yet (diskforge writes them FULLY_PRESENT)")

    def validate(self) -> None:
        bs = self.block_size
        if bs and (bs < 1 << 20 or bs > 256 << 20 or bs & (bs - 1)):
            raise UsageError(f"invalid value {bs} for option 'block_size': a power of two"
                             " from 1M to 256M")
        if self.log_size < 1 << 20 or self.log_size % (1 << 20) or self.log_size >= 1 << 32:
            raise UsageError(f"invalid value {self.log_size} for option 'log_size': a"
                             " multiple of 1M below 4G")
        if self.logical_sector_size not in (0, 512, 4096):
            raise UsageError(f"invalid value {self.logical_sector_size} for option"
                             " 'logical_sector_size': 512 or 4096")
        if self.physical_sector_size not in (512, 4096):
            raise UsageError(f"invalid value {self.physical_sector_size} for option"
                             " 'physical_sector_size': 512 or 4096")
        if self.block_state_zero and self.subformat == "fixed":
            raise UnsupportedError("not supported yet: block_state_zero=on for a fixed VHDX"
                                   " (diskforge writes its blocks FULLY_PRESENT, as"
                                   " block_state_zero=off)")


class VhdxFormat(Format):
    name = "vhdx"
    extensions = ("vhdx", "avhdx")
    description = "Hyper-V VHDX: fixed, dynamic, differencing; log replay"
    options = VhdxOptions
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
        if not isinstance(options, VhdxOptions):
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
