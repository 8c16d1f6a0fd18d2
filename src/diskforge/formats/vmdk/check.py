"""``check`` for sparse extents: grain directories and tables against the file, as
``qemu-img check`` does for vmdk (a grain that points past the end of the file), plus
what qemu does not look at: the redundant grain directory and its tables against the
primary ones, and grain tables or grains that overlap the header, the directories or
each other. Nothing is repaired (qemu-img cannot repair a vmdk either).

Bounded by what is allocated: unallocated directory entries and grain table entries
are skipped at memory speed (``skip_filled``), grain tables that lie in holes of the
file (qemu allocates every table of a new disk without writing it) are known empty
without being read, and the overlap check keeps 8 bytes per table and per grain
(sorted only when the file is not already in order), asking the memory budget first.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass, field

from ...blockdev import skip_filled
from ...byteorder import le_bytes
from ...limits import check_alloc
from .sparse import SparseExtent
from .structs import GRAIN_MARKER_SIZE, GTE_ZEROED, SECTOR, GrainMarker


@dataclass
class ExtentStats:
    """What checking one extent found."""
    total: int = 0                   # grains the extent maps
    allocated: int = 0               # grains stored (zeroed grains not counted)
    problems: list[tuple[str, str, str | None]] = field(default_factory=list)


class _Holes:
    """Which byte ranges of a file are holes, asked with one SEEK_DATA per data
    region when ranges are asked in increasing order."""

    def __init__(self, ext: SparseExtent) -> None:
        self.ext = ext
        self.lo = self.hi = 0       # [lo, hi) is known to be a hole

    def empty(self, at: int, n: int) -> bool:
        if self.lo <= at and at + n <= self.hi:
            return True
        size = self.ext.backend.size
        data_at = next((o for o, _, d in self.ext.backend.data_ranges(at, size) if d),
                       size)
        self.lo, self.hi = at, data_at
        return at + n <= data_at


def nonzero(table: array):
    """Indices of the non-zero entries: dense stretches entry by entry, empty ones
    skipped at memory speed."""
    i, n = 0, len(table)
    while i < n:
        if table[i]:
            yield i
            i += 1
        else:
            i = skip_filled(table, i, n)


def _sorted(starts: array, path: str, what: str) -> array:
    if all(starts[k] <= starts[k + 1] for k in range(len(starts) - 1)):
        return starts
    check_alloc(len(starts) * 40, path, what, "entries (sorted to check for overlaps)")
    return array("Q", sorted(starts))


def check_extent(ext: SparseExtent, disk_start: int) -> ExtentStats:
    """Check one sparse extent, whose first byte is at ``disk_start`` of the disk."""
    st = ExtentStats(total=-(-ext.size // ext.grain))
    end = ext.backend.size
    holes = _Holes(ext)
    tables, grains = array("Q"), array("Q")
    for i in nonzero(ext.gd):
        at = ext.gd[i] * SECTOR
        tables.append(at)
        if not holes.empty(at, ext.gt_bytes):
            _entries(ext, i, end, disk_start, grains, st)
    rtables = array("Q")
    if ext.rgd is not None:
        _compare_directories(ext, holes, _Holes(ext), rtables, st)
    _overlaps(ext, (tables, rtables), grains, st)
    return st


def _entries(ext: SparseExtent, i: int, end: int, disk_start: int, grains: array,
             st: ExtentStats) -> None:
    gt = ext._gt(i)
    j, n = 0, len(gt)
    while j < n:
        j = skip_filled(gt, j, n)
        if j >= n:
            break
        e = gt[j]
        g = i * ext.gtes + j
        j += 1
        if ext.zeroed_grains and e == GTE_ZEROED:
            continue
        st.allocated += 1
        if e * SECTOR >= end:
            sector = (disk_start + g * ext.grain) // SECTOR
            st.problems.append((f"cluster offset for sector {sector} points after EOF",
                                "GrainTable", f"entry[{g}]"))
        elif not ext.compressed:
            grains.append(e * SECTOR)
        elif ext.markers:
            _marker(ext, g, e, end, st)


def _marker(ext: SparseExtent, g: int, e: int, end: int, st: ExtentStats) -> None:
    """A compressed grain's marker must name the grain that points at it and fit in
    the file (12 bytes read per grain; the data is not inflated)."""
    m = GrainMarker.parse(ext.backend.pread(e * SECTOR, GRAIN_MARKER_SIZE)
                          .ljust(GRAIN_MARKER_SIZE, b"\0"))
    if m.lba != g * ext.grain_sectors:
        st.problems.append((f"the grain marker at sector {e} says lba {m.lba}, but the"
                            f" grain table entry of grain {g} (lba"
                            f" {g * ext.grain_sectors}) points at it", "GrainMarker", "lba"))
    elif not 0 < m.size <= 2 * ext.grain + SECTOR or \
            e * SECTOR + GRAIN_MARKER_SIZE + m.size > end:
        st.problems.append((f"compressed grain {g} at sector {e} claims {m.size} bytes",
                            "GrainMarker", "size"))


def _compare_directories(ext: SparseExtent, holes: _Holes, rholes: _Holes,
                         tables: array, st: ExtentStats) -> None:
    """Every grain table of the redundant directory must say what the primary says."""
    gd, rgd = ext.gd, ext.rgd
    size = ext.backend.size
    for i in nonzero(rgd):
        if not gd[i]:
            st.problems.append((f"grain directory entry {i}: the primary has none, the"
                                f" redundant copy has {rgd[i]}", "SparseExtentHeader",
                                "rgdOffset"))
    for i in nonzero(gd):
        if not rgd[i]:
            st.problems.append((f"grain directory entry {i}: the primary has {gd[i]},"
                                " the redundant copy none", "SparseExtentHeader",
                                "rgdOffset"))
            continue
        at = rgd[i] * SECTOR
        tables.append(at)
        if at + ext.gt_bytes > size:
            st.problems.append((f"redundant grain table {i} is past the end of the file",
                                "SparseExtentHeader", "rgdOffset"))
        elif not (holes.empty(gd[i] * SECTOR, ext.gt_bytes)
                  and rholes.empty(at, ext.gt_bytes)):
            copy = ext.backend.read_exact(at, ext.gt_bytes, "grain table")
            if le_bytes(ext._gt(i)) != copy:
                st.problems.append((f"grain table {i} differs between the primary and"
                                    " the redundant grain directory", "GrainTable",
                                    f"redundant directory entry {i}"))


def _overlaps(ext: SparseExtent, tables: tuple[array, array], grains: array,
              st: ExtentStats) -> None:
    """Grains and grain tables that overlap each other or the other structures."""
    gd_bytes = -(-ext.ngt * 4 // SECTOR) * SECTOR
    header = 2048 if ext.structure == "COWDiskHeader" else SECTOR
    meta = [(0, header, "the header"), (ext.gd_at, ext.gd_at + gd_bytes,
                                       "the grain directory")]
    if ext.rgd is not None:
        meta.append((ext.rgd_at, ext.rgd_at + gd_bytes, "the redundant grain directory"))
    gt, grain = ext.gt_bytes, ext.grain
    # each directory's tables and the grains are in file order already in the files
    # VMware and qemu write (sorted only when not), then merged
    regions = heapq.merge(
        sorted(meta),
        *(((t, t + gt, "a grain table") for t in _sorted(ts, ext.path, "GrainDirectory"))
          for ts in tables),
        ((g, g + grain, "a grain") for g in _sorted(grains, ext.path, "GrainTable")))
    last_end, last_what = 0, None
    for start, stop, what in regions:
        if last_what is not None and start < last_end:
            st.problems.append((f"{what} at offset {start} overlaps {last_what}",
                                "GrainTable" if what == "a grain" else "GrainDirectory",
                                None))
            if len(st.problems) > 10000:        # enough to say the file is damaged
                return
        if stop > last_end:
            last_end, last_what = stop, what
