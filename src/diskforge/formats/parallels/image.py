"""Reading and checking one Parallels expandable image file (a bare ``.hds``/``.hdd``
file, or an extent of a bundle), read-only.

Opening validates the header as qemu's ``parallels_open`` does (magic and version,
tracks, BAT size) before any size or offset in it is used, then reads the BAT whole
(after ``limits.check_alloc``). A BAT entry is 0 (not allocated: zeros, or the parent
image's bytes in a bundle's snapshot chain) or where the cluster is: in sectors for
"WithoutFreeSpace" images, in clusters for "WithouFreSpacExt" ones. Disk bytes past
the BAT read as zeros, as qemu reads them. A cluster that starts past the end of the
file raises a one-line CorruptImage naming the BAT entry when it is read (qemu would
read zeros); ``check`` reports it as qemu-img does.

An image whose in_use field says it was not closed (``HEADER_INUSE_MAGIC``) opens
read-only as qemu opens it read-only; ``check`` counts it as a corruption, as
``qemu-img check`` does. The format extension cluster (dirty bitmaps) is not needed
to read the disk and is not read.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from ...blockdev import (RUN_DATA, RUN_UNALLOCATED, BlockDevice, ImageInfo, TableDevice,
                         merge_runs, skip_filled)
from ...byteorder import to_host_le
from ...checks import CheckResult, ProblemKind, Repair
from ...errors import CorruptImage, UnsupportedError
from ...limits import check_alloc
from .structs import (EMPTY_IMAGE_FLAG, HEADER_INUSE_MAGIC, HEADER_MAGIC, HEADER_MAGIC2,
                      HEADER_SIZE, HEADER_VERSION, MAX_BAT_ENTRIES, MAX_TRACKS, SECTOR,
                      ParallelsHeader)



class ParallelsImage(TableDevice):
    """One expandable image file as a block device; ``parent`` (a bundle's older
    snapshot of the same extent) supplies what the BAT does not allocate."""

    format = "parallels"

    def _open(self, parent: BlockDevice | None = None) -> None:
        if self.writable:
            raise UnsupportedError("not supported yet: writing parallels images",
                                   self.path)
        f = self.backend
        self.file_size = size = f.size
        if size < HEADER_SIZE:
            raise self._err(f"the file is {size} bytes, too small for a Parallels header",
                            "ParallelsHeader")
        h = self.header = ParallelsHeader.parse(f.read_exact(0, HEADER_SIZE,
                                                             "ParallelsHeader"))
        if h.magic == HEADER_MAGIC:
            self.off_multiplier = 1
            nb_sectors = h.nb_sectors & 0xFFFFFFFF
        elif h.magic == HEADER_MAGIC2:
            self.off_multiplier = h.tracks
            nb_sectors = h.nb_sectors
        else:
            raise self._err("magic is neither 'WithoutFreeSpace' nor 'WithouFreSpacExt':"
                            " not a Parallels image", "ParallelsHeader", "magic")
        if h.version != HEADER_VERSION:
            raise self._err(f"version {h.version} is not 2", "ParallelsHeader", "version")
        if h.tracks == 0:
            raise self._err("zero sectors per cluster", "ParallelsHeader", "tracks")
        if h.tracks > MAX_TRACKS:
            raise self._err(f"{h.tracks} sectors per cluster is too big a cluster",
                            "ParallelsHeader", "tracks")
        if h.bat_entries > MAX_BAT_ENTRIES:
            raise self._err(f"{h.bat_entries} BAT entries: the catalog is too large",
                            "ParallelsHeader", "bat_entries")
        self.tracks = h.tracks
        self.cs = h.tracks * SECTOR
        self.size = nb_sectors * SECTOR
        n = h.bat_entries
        check_alloc(4 * n, self.path, "ParallelsHeader", "bat_entries")
        if HEADER_SIZE + 4 * n > size:
            raise self._err(f"the BAT ({n} entries) runs past the end of the file ({size}"
                            " bytes)", "ParallelsHeader", "bat_entries")
        # read straight into the array: one copy of a large BAT in memory, not three
        self.bat = array("I", [0]) * n
        if f.readinto(HEADER_SIZE, self.bat) != 4 * n:
            raise self._err("the BAT is cut short by the end of the file",
                            "ParallelsHeader", "bat_entries")
        to_host_le(self.bat)
        # where the data area starts, in sectors (parallels.txt "data_off")
        self.data_off = h.data_off or -(-(HEADER_SIZE + 4 * n) // SECTOR)
        self.unclean = h.inuse == HEADER_INUSE_MAGIC
        self.backing = parent

    def _host(self, index: int) -> int:
        """Byte offset of the cluster BAT entry ``index`` names (it is not 0)."""
        return self.bat[index] * self.off_multiplier * SECTOR

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """``(offset, length, kind, host)`` pieces for ``merge_runs``: unallocated
        stretches found at memory speed (``skip_filled``)."""
        cs, nbat = self.cs, len(self.bat)
        end = offset + length
        pos = offset
        while pos < end:
            ci = pos // cs
            if ci >= nbat:
                kind, host, stop = RUN_UNALLOCATED, 0, end
            elif self.bat[ci] == 0:
                nxt = skip_filled(self.bat, ci, min(nbat, -(-end // cs)))
                kind, host = RUN_UNALLOCATED, 0
                stop = end if nxt >= nbat else min(end, nxt * cs)
            else:
                start = self._host(ci)
                if start >= self.file_size:
                    raise CorruptImage(f"BAT entry {ci}: cluster at offset {start} is past"
                                       f" the end of the file ({self.file_size} bytes)",
                                       self.path, structure="BAT", field=str(ci))
                kind, host = RUN_DATA, start + pos % cs
                stop = min(end, (ci + 1) * cs)
            yield pos, stop - pos, kind, host
            pos = stop

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        return merge_runs(self._pieces(offset, length))

    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        """As qemu 7.2's parallels_co_check: an image not closed cleanly and clusters
        outside the file are corruptions, space after the last cluster is leaked.
        Repairing needs a writable image: not supported yet."""
        res = CheckResult(filename=self.path, format="parallels")
        # qemu measures the file in whole sectors (bdrv_getlength rounds up)
        size, cs = -(-self.file_size // SECTOR) * SECTOR, self.cs
        if self.unclean:
            res.add(ProblemKind.CORRUPTION, "ERROR image was not closed correctly",
                    "ParallelsHeader", "inuse")
        bat, nbat = self.bat, len(self.bat)
        res.total_clusters = nbat
        allocated = fragmented = 0
        high = prev = 0
        i = 0
        while i < nbat:
            i = skip_filled(bat, i, nbat)
            if i >= nbat:
                break
            off = self._host(i)
            if off > size:       # counted as allocated all the same, as qemu 7.2 does
                res.add(ProblemKind.CORRUPTION, f"ERROR cluster {i} is outside image",
                        "BAT", str(i))
            allocated += 1
            high = max(high, off)
            if prev and prev + cs != off:
                fragmented += 1
            prev = off
            i += 1
            if i < nbat and bat[i] == 0:
                prev = 0      # qemu restarts its contiguity test after a hole
        res.image_end_offset = high + cs if high else self.data_off * SECTOR
        if size > res.image_end_offset:
            leaked = size - res.image_end_offset
            res.add(ProblemKind.LEAK, f"ERROR space leaked at the end of the image"
                    f" {leaked}", "BAT", None, count=-(-leaked // cs))
        if allocated:
            res.allocated_clusters = allocated
            # as qemu-img, which leaves the counts out when they are zero
            res.fragmented_clusters = fragmented or None
        return res

    def info(self) -> ImageInfo:
        h = self.header
        details = {"magic": h.magic.decode("ascii"), "version": h.version,
                   "heads": h.heads, "cylinders": h.cylinders, "tracks": h.tracks,
                   "cluster-size": self.cs,
                   "bat-entries": h.bat_entries, "data-offset": self.data_off * SECTOR,
                   "in-use": f"{h.inuse:#010x}" + (" (not closed)" if self.unclean else ""),
                   "flags": h.flags}
        if h.flags & EMPTY_IMAGE_FLAG:
            details["empty-image-flag"] = True
        if h.ext_off:
            details["format-extension-offset"] = h.ext_off * SECTOR
        return ImageInfo(filename=self.path, format="parallels", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(),
                         dirty=self.unclean, details=details)
