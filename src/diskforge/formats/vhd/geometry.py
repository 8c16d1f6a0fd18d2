"""How big a VHD's disk is: CHS geometry, the current-size field, and whose rule wins.

A VHD footer states the size twice: as a CHS geometry (for the ATA disk Virtual PC
emulates) and as "Current Size" in bytes. The two rarely agree, because the
specification's CHS algorithm rounds down. Producers disagree on which one is the
disk: Virtual PC and qemu's default use the geometry; Hyper-V, disk2vhd, XenServer
and qemu's ``force_size`` use the current size. Readers follow the footer's "Creator
Application", exactly as qemu's vpc driver does (block/vpc.c, vpc_open and
vpc_ignore_current_size), so diskforge and qemu-img always see the same disk:

- creator ``win `` (Hyper-V, Windows), ``qem2`` (qemu with force_size), ``d2v ``
  (disk2vhd), ``CTXS`` (XenConverter), ``tap\\0`` (XenServer): the current size;
- every other creator (``vpc ``, ``vs  ``, ``qemu``, ``vbox``, diskforge's ``dskf``...):
  the geometry, unless the geometry is the maximum 65535/16/255, which means "too big
  for CHS, use the current size".
"""

from __future__ import annotations

from ...errors import FormatError, UsageError
from .structs import SECTOR

MAX_GEOMETRY = (65535, 16, 255)
MAX_GEOMETRY_SECTORS = 65535 * 16 * 255
# 2040 GiB: the most a VHD can address (qemu's VHD_MAX_SECTORS); Hyper-V's limit too
MAX_SECTORS = 0xFF000000
MAX_SIZE = MAX_SECTORS * SECTOR

# creator applications whose disks are as big as their current-size field (qemu's table)
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """The specification's CHS algorithm (appendix "CHS Calculation"): the largest
    geometry not above ``total_sectors``, capped at 65535/16/255."""
    total = min(total_sectors, MAX_GEOMETRY_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def geometry_sectors(geometry: tuple[int, int, int]) -> int:
    c, h, s = geometry
    return c * h * s


def disk_size(current_size: int, geometry: tuple[int, int, int], creator: bytes,
              path: str | None = None) -> tuple[int, str]:
    """The virtual size a reader sees, and which rule gave it ("chs" or
    "current_size"), exactly as qemu's vpc driver decides."""
    chs = geometry_sectors(geometry)
    if creator in CURRENT_SIZE_CREATORS or chs == MAX_GEOMETRY_SECTORS:
        sectors, rule = current_size // SECTOR, "current_size"
    else:
        sectors, rule = chs, "chs"
    if sectors > MAX_SECTORS:
        raise FormatError(f"disk of {sectors * SECTOR} bytes is larger than 2040 GiB, the"
                          " most a VHD can address", path, structure="VhdFooter",
                          field="current_size" if rule == "current_size" else "disk_geometry")
    return sectors * SECTOR, rule


def plan_size(requested: int, force_size: str) -> tuple[int, tuple[int, int, int]]:
    """The current size and geometry to write for a disk of ``requested`` bytes.

    ``force_size``:
    - ``off`` (qemu's default): round up to the next size the CHS geometry represents
      exactly, as qemu-img does, so Virtual PC sees the whole disk;
    - ``on`` (qemu's force_size): exactly the requested size, in whole sectors;
    - ``auto`` (diskforge's default): the requested size rounded up to a whole MiB,
      which Azure requires and Hyper-V accepts.
    With ``on`` and ``auto`` the geometry is the specification's when it represents the
    size exactly, else 65535/16/255, which qemu (and every current-size reader) takes as
    "use the current size".
    """
    sectors = -(-requested // SECTOR)
    if force_size == "off":
        geometry = (0, 0, 0)
        if sectors >= MAX_GEOMETRY_SECTORS:
            geometry = MAX_GEOMETRY
        else:
            i = 0
            while geometry_sectors(geometry) < sectors:
                geometry = chs_geometry(sectors + i)
                i += 1
        if geometry != MAX_GEOMETRY:
            sectors = geometry_sectors(geometry)
    else:
        if force_size == "auto":
            mib = 1 << 20
            sectors = -(-sectors * SECTOR // mib) * mib // SECTOR
        geometry = chs_geometry(sectors)
        if geometry_sectors(geometry) != sectors:
            geometry = MAX_GEOMETRY
    if sectors > MAX_SECTORS:
        raise UsageError(f"disk size {requested} is too large: a VHD holds at most 2040 GiB")
    return sectors * SECTOR, geometry
