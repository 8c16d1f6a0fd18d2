"""Hyper-V: a dynamic VHDX as Hyper-V creates one.

Rules, from Microsoft's pages:

- "Hyper-V: generation 1 or 2" and ``New-VHD``
  (https://learn.microsoft.com/powershell/module/hyper-v/new-vhd): a generation 2
  VM boots only from VHDX; ``New-VHD -Dynamic`` uses 32 MiB blocks, 512-byte logical
  and 4096-byte physical sectors by default; VHDX holds up to 64 TiB.
- The VHDX specification ([MS-VHDX] 2.2, 2.3): every region (headers, log, BAT,
  metadata, payload blocks) sits on a 1 MiB boundary, the block size is a power of
  two from 1 MiB to 256 MiB, the virtual size a multiple of the logical sector.

The export writes with the ``vhdx`` plugin's writer through the registry:
``subformat=dynamic,block_size=32M,logical_sector_size=512,physical_sector_size=4096``
(the writer puts every structure on a 1 MiB boundary), the virtual size rounded up to
a whole MiB so that it is a whole number of every sector size and of Hyper-V's
"Edit disk" steps.
"""

from __future__ import annotations

from ..blockdev import BlockDevice
from .base import MiB, TiB, ExportOptions, Progress, round_up, write_disk
from .checkfile import CheckFile

NAME = "hyperv"
SUMMARY = "Hyper-V: dynamic VHDX, 32 MiB blocks, 1 MiB aligned (generation 1 and 2)"
BLOCK_SIZE = 32 * MiB
MAX_SIZE = 64 * TiB
WRITE_OPTIONS = ("subformat=dynamic,block_size=32M,logical_sector_size=512,"
                 "physical_sector_size=4096")


def export(source: BlockDevice, out: str, opts: ExportOptions,
           progress: Progress | None = None) -> list[str]:
    from ..errors import UsageError
    size = round_up(max(source.size, 1), MiB)
    if size > MAX_SIZE:
        raise UsageError("the disk is larger than 64 TiB, the most a VHDX holds", out)
    write_disk("vhdx", WRITE_OPTIONS, source, out, size, progress)
    return [out]


def check(f: CheckFile, policy=None) -> list[str]:
    fmt = f.format()
    if fmt == "vpc":
        return ["is a VHD: generation 2 VMs boot only from VHDX (a VHD attaches to"
                " generation 1 VMs only)"]
    if fmt != "vhdx":
        return [f"is {fmt}, not a VHDX: Hyper-V attaches VHDX (or VHD) files only"]
    info, unreadable = f.info("vhdx", policy)
    if info is None:
        return [unreadable]
    problems = []
    d = info.details
    if d.get("subformat") == "differencing" or info.backing_filename:
        problems.append("is a differencing disk: import needs a standalone disk (merge"
                        " it into its parent, or convert it)")
    if info.virtual_size > MAX_SIZE:
        problems.append(f"virtual size {info.virtual_size} bytes is more than 64 TiB")
    bs = int(d.get("block-size") or 0)
    if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
        problems.append(f"block size {bs} is not a power of two from 1 MiB to 256 MiB")
    return problems
