"""``check`` for sparse extents: grain directories and tables against the file, as
``qemu-img check`` does for vmdk (a grain that points past the end of the file), plus
what qemu does not look at: the redundant grain directory and its tables against the
primary ones, and grain tables or grains that overlap the header, the directories or
each other. Nothing is repaired (qemu-img cannot repair a vmdk either).

Bounded by what is allocated: unallocated directory entries and grain table entries
are skipped at memory speed (``skip_filled``), and the whole-table checks are array
operations (``max``), so a mostly empty huge disk checks in moments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...blockdev import skip_filled
from ...limits import check_alloc
from .sparse import SparseExtent
from .structs import GTE_ZEROED, SECTOR


@dataclass
class ExtentStats:
    total: int = 0                   # grains the extent maps
    allocated: int = 0               # grains stored (zeroed grains not counted)
    problems: list[tuple[str, str, str]] = field(default_factory=list)


def check_extent(ext: SparseExtent, disk_start: int) -> ExtentStats:
    """Check one sparse extent, whose first byte is at ``disk_start`` of the disk."""
    st = ExtentStats(total=-(-ext.size // ext.grain))
    end = ext.backend.size
    structure = ext.structure
    zeroed = ext.zeroed_grains
    used: list[tuple[int, int, str]] = []    # (start, end, what) of stored grains
    for i in ext.allocated_tables():
        gt = ext._gt(i)
        used.append((ext.gd[i] * SECTOR, ext.gd[i] * SECTOR + ext.gt_bytes,
                     f"grain table {i}"))
        j, n = 0, len(gt)
        while j < n:
            j = skip_filled(gt, j, n)
            if j >= n:
                break
            e = gt[j]
            g = i * ext.gtes + j
            j += 1
            if zeroed and e == GTE_ZEROED:
                continue
            st.allocated += 1
            if e * SECTOR >= end:
                sector = (disk_start + g * ext.grain) // SECTOR
                st.problems.append((f"cluster offset for sector {sector} points after"
                                    " EOF", "GrainTable", f"entry[{g}]"))
            elif not ext.compressed:
                used.append((e * SECTOR, e * SECTOR + ext.grain, f"grain {g}"))
    if ext.rgd is not None:
        _compare_directories(ext, st)
    _overlaps(ext, used, st)
    return st


def _compare_directories(ext: SparseExtent, st: ExtentStats) -> None:
    """Every grain table of the redundant directory must say what the primary says."""
    gd, rgd = ext.gd, ext.rgd
    for i in range(len(gd)):
        if not gd[i] and not rgd[i]:
            continue
        if bool(gd[i]) != bool(rgd[i]):
            st.problems.append((f"grain directory entry {i}: the primary has"
                                f" {gd[i]}, the redundant copy {rgd[i]}",
                                "SparseExtentHeader", "rgdOffset"))
            continue
        if rgd[i] * SECTOR + ext.gt_bytes > ext.backend.size:
            st.problems.append((f"redundant grain table {i} is past the end of the file",
                                "SparseExtentHeader", "rgdOffset"))
            continue
        primary = ext._gt(i)
        copy = ext.backend.read_exact(rgd[i] * SECTOR, ext.gt_bytes, "grain table")
        if primary.tobytes() != copy and _le(primary) != copy:
            st.problems.append((f"grain table {i} differs between the primary and the"
                                " redundant grain directory", "GrainTable",
                                f"rgd entry {i}"))


def _le(gt) -> bytes:
    from ...byteorder import le_bytes
    return le_bytes(gt)


def _overlaps(ext: SparseExtent, used: list[tuple[int, int, str]],
              st: ExtentStats) -> None:
    """Grains and grain tables that overlap each other or the directories."""
    gd_bytes = -(-ext.ngt * 4 // SECTOR) * SECTOR
    used.append((0, SECTOR, "the header"))
    used.append((ext.gd_at, ext.gd_at + gd_bytes, "the grain directory"))
    if ext.rgd is not None:
        used.append((ext.rgd_at, ext.rgd_at + gd_bytes, "the redundant grain directory"))
        i, n = 0, len(ext.rgd)
        while i < n:
            i = skip_filled(ext.rgd, i, n)
            if i < n:
                at = ext.rgd[i] * SECTOR
                used.append((at, at + ext.gt_bytes, f"redundant grain table {i}"))
            i += 1
    check_alloc(len(used) * 100, ext.path, "GrainTable", "entries (sorted to check for"
                " overlaps)")
    used.sort()
    last_end, last_what = 0, None
    for start, stop, what in used:
        if last_what is not None and start < last_end:
            st.problems.append((f"{what} at offset {start} overlaps {last_what}",
                                "GrainTable", None))
        if stop > last_end:
            last_end, last_what = stop, what
