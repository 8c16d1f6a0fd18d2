"""The ``-o`` options of VHDX output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...errors import UnsupportedError, UsageError
from ...options import Options, option


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
