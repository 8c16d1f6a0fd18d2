"""seSparse extents (ESXi 6.5+ snapshot deltas and thin disks), read only, as qemu
reads them.

VMware has not published the format; what is read here is what qemu's
``block/vmdk.c`` reads, with its strict checks (version 0x200000001, 4 KiB grains,
4096-entry grain tables, no flags, a clean journal). A grain directory of 64-bit
entries (0: no table; top 32 bits 0x10000000: the low 32 bits index a table after
``grain_tables_offset``) maps 64-bit grain table entries whose top nibble says what
the grain is: 0 unallocated, 1 unmapped and 2 zero (both read as zeros), 3
allocated (the cluster number is the low 48 bits shifted up 12, or-ed with the next
12 bits; the grain is at ``grains_offset`` + cluster * grain size).
"""

from __future__ import annotations

from array import array

from ...blockdev import FileBackend, fill_zero, pieces
from ...byteorder import le_array
from ...errors import FormatError, UnsupportedError
from ...limits import check_alloc
from .extents import DATA, UNALLOCATED, ZERO, Below, VmdkExtent
from .structs import (SECTOR, SESPARSE_GRAIN_SECTORS, SESPARSE_GT_SECTORS, SESPARSE_MAGIC,
                      SESPARSE_VERSION, SESPARSE_VOLATILE_MAGIC, SESparseConstHeader,
                      SESparseVolatileHeader)

GT_CACHE = 1024
_GD_ALLOCATED = 0x10000000


class SeSparseExtent(VmdkExtent):
    type = "SESPARSE"
    structure = "SESparseConstHeader"

    def __init__(self, backend: FileBackend, access: str = "RW") -> None:
        path = backend.path
        size = backend.size
        if size < SECTOR:
            raise self._fail(f"the file is {size} bytes, too small for the const header:"
                             " truncated", path)
        h = SESparseConstHeader.parse(backend.read_exact(0, SECTOR, "const header"))
        if h.magic != SESPARSE_MAGIC:
            raise self._fail("no seSparse magic", path, "magic")
        for field, value, want in (("version", h.version, SESPARSE_VERSION),
                                   ("grain_size", h.grain_size, SESPARSE_GRAIN_SECTORS),
                                   ("grain_table_size", h.grain_table_size,
                                    SESPARSE_GT_SECTORS),
                                   ("flags", h.flags, 0)):
            if value != want:
                raise UnsupportedError(f"not supported yet: seSparse {field} {value:#x}"
                                       f" (qemu and diskforge read {want:#x})", path)
        if h.reserved1 or h.reserved2 or h.reserved3 or h.reserved4 or any(h.pad):
            raise UnsupportedError("not supported yet: seSparse header with reserved"
                                   " fields set", path)
        vat = h.volatile_header_offset * SECTOR
        if vat + SECTOR > size:
            raise self._fail("the volatile header is past the end of the file", path,
                             "volatile_header_offset")
        v = SESparseVolatileHeader.parse(backend.read_exact(vat, SECTOR, "volatile header"))
        if v.magic != SESPARSE_VOLATILE_MAGIC:
            raise self._fail("no volatile header magic", path, "volatile_header_offset",
                             "SESparseVolatileHeader")
        if v.replay_journal:
            raise UnsupportedError("not supported yet: a seSparse extent whose journal"
                                   " must be replayed (the disk was not closed cleanly)",
                                   path)
        super().__init__(h.capacity, access)
        self.backend, self.path = backend, path
        self.header = h
        self.grain = SESPARSE_GRAIN_SECTORS * SECTOR
        self.cluster_size = self.grain
        self.gtes = SESPARSE_GT_SECTORS * SECTOR // 8
        self.gt_bytes = self.gtes * 8
        self.file_size = size
        ngt = -(-h.capacity // (SESPARSE_GRAIN_SECTORS * self.gtes))
        nbytes = ngt * 8
        check_alloc(nbytes, path, self.structure, "grain_dir_size")
        if nbytes > h.grain_dir_size * SECTOR:
            raise self._fail(f"{h.grain_dir_size} sectors cannot hold the {ngt} entries"
                             f" {h.capacity} sectors need", path, "grain_dir_size")
        gd_at = h.grain_dir_offset * SECTOR
        if gd_at + nbytes > size:
            raise self._fail("the grain directory is past the end of the file", path,
                             "grain_dir_offset")
        self.gd = le_array(backend.read_exact(gd_at, nbytes, "grain directory"), "Q")
        self._gts: dict[int, array] = {}

    @classmethod
    def _fail(cls, message: str, path: str, field: str | None = None,
              structure: str | None = None) -> FormatError:
        return FormatError(message, path, structure=structure or cls.structure,
                           field=field)

    def _gt(self, i: int) -> array | None:
        gt = self._gts.get(i)
        if gt is not None:
            return gt
        e = self.gd[i]
        if e == 0:
            return None
        if e >> 32 != _GD_ALLOCATED:
            raise self._fail(f"grain directory entry {i} is {e:#x} (neither 0 nor an"
                             " allocated table)", self.path, "grain_dir_offset")
        at = (self.header.grain_tables_offset * SECTOR + (e & 0xFFFFFFFF) * self.gt_bytes)
        if at + self.gt_bytes > self.file_size:
            raise self._fail(f"grain directory entry {i} names a grain table past the"
                             " end of the file", self.path, "grain_dir_offset")
        if len(self._gts) >= GT_CACHE:
            self._gts.clear()
        gt = self._gts[i] = le_array(self.backend.read_exact(at, self.gt_bytes,
                                                             "grain table"), "Q")
        return gt

    def _grain(self, g: int) -> tuple[str, int | None]:
        """What grain ``g`` is: (state, host byte offset or None)."""
        i, j = divmod(g, self.gtes)
        gt = self._gt(i)
        if gt is None:
            return UNALLOCATED, None
        e = gt[j]
        top = e >> 60
        if top == 0:
            if e:
                raise self._fail(f"grain table entry for grain {g} is {e:#x}", self.path,
                                 "grain_tables_offset")
            return UNALLOCATED, None
        if top in (1, 2):
            return ZERO, None
        if top == 3:
            cluster = ((e & 0x0FFF000000000000) >> 48) | ((e & 0x0000FFFFFFFFFFFF) << 12)
            return DATA, (self.header.grains_offset + cluster * SESPARSE_GRAIN_SECTORS) \
                * SECTOR
        raise self._fail(f"grain table entry for grain {g} is {e:#x}", self.path,
                         "grain_tables_offset")

    def readinto(self, offset: int, mv: memoryview, below: Below) -> None:
        for pos, n in pieces(offset, len(mv), self.grain):
            at = pos - offset
            g, inside = divmod(pos, self.grain)
            state, host = self._grain(g)
            if state == UNALLOCATED:
                below(pos, mv, at, at + n)
            elif state == ZERO:
                fill_zero(mv, at, at + n)
            else:
                got = self.backend.readinto(host + inside, mv[at:at + n])
                if got < n:
                    fill_zero(mv, at + got, at + n)

    def map(self, offset: int, length: int):
        from ...blockdev import skip_filled
        pos, end = offset, offset + length
        span = self.gtes * self.grain
        while pos < end:
            g, inside = divmod(pos, self.grain)
            i = g // self.gtes
            if self.gd[i] == 0:
                nxt = skip_filled(self.gd, i + 1, (end - 1) // span + 1)
                stop = min(end, nxt * span)
                yield pos, stop - pos, UNALLOCATED, None
                pos = stop
                continue
            state, host = self._grain(g)
            stop = min(end, (g + 1) * self.grain)
            yield pos, stop - pos, state, None if host is None else host + inside
            pos = stop
