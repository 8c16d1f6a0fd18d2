"""The BlockDevice of an ASIF image: chunks found through the current directory's
tables; unallocated chunks read as zeros. Read-only.

Every offset is validated before use: directories and tables must lie inside the file,
data chunks must start inside it (a chunk cut short by the end of the file reads as
zeros past it, as a truncated raw file would). Tables are read on demand (one chunk
each, through ``limits.check_alloc``) and a few kept; the walk over a table is bounded
by the table, and tables are skipped whole where the directory has none, so a huge
empty disk costs nothing.
"""

from __future__ import annotations

import collections
from array import array
from bisect import bisect_left

from ...blockdev import (Extent, ExtentKind, FileDevice, ImageInfo, coalesce, fill_zero,
                         skip_filled)
from ...byteorder import be_array
from ...errors import FormatError, UnsupportedError
from ...limits import check_alloc
from .structs import (ASIF_SIGNATURE, ASIF_VERSION, CHUNK_MASK, HEADER_SIZE, AsifHeader,
                      geometry)

_TABLE_CACHE = 8


class AsifDevice(FileDevice):
    format = "asif"

    def _open(self) -> None:
        if self.writable:
            raise UnsupportedError("not supported yet: writing asif images", self.path)
        self.file_size = fsize = self.backend.size
        raw = self.backend.read_exact(0, HEADER_SIZE, "AsifHeader")
        self.header = h = AsifHeader.parse(raw)
        if h.signature != ASIF_SIGNATURE:
            raise FormatError("not an ASIF header", self.path, structure="AsifHeader",
                              field="signature")
        if h.version != ASIF_VERSION:
            raise UnsupportedError(f"AsifHeader.version: not supported yet: version"
                                   f" {h.version}", self.path)
        self.geo = g = geometry(h, self.path)
        if h.sector_count > h.max_sector_count \
                or h.max_sector_count * g.block_size >= 1 << 63:
            raise FormatError(f"{h.sector_count} blocks (maximum {h.max_sector_count}) is"
                              " out of range", self.path, structure="AsifHeader",
                              field="sector_count")
        self.size = h.sector_count * g.block_size
        n = -(-self.size // g.bytes_per_table)  # tables the disk's own size needs
        check_alloc(8 * n, self.path, "ASIF directory")
        best = None
        for i, off in enumerate(h.directory_offsets):
            where = f"directory_offsets[{i}]"
            if off < HEADER_SIZE or off + 8 + 8 * n > fsize:
                raise FormatError(f"directory at {off} (+{8 + 8 * n}) is outside the file"
                                  f" ({fsize} bytes)", self.path, structure="AsifHeader",
                                  field=where)
            version = int.from_bytes(self.backend.read_exact(off, 8, "ASIF directory"),
                                     "big")
            if best is None or version > best[0]:
                best = (version, off)
        self.directory_version, self.directory_offset = best
        self.directory = be_array(self.backend.read_exact(
            self.directory_offset + 8, 8 * n, "ASIF directory")) if n else array("Q")
        self._tables: collections.OrderedDict[int, object] = collections.OrderedDict()

    # -- mapping ------------------------------------------------------------------------
    def _table(self, t: int):
        """Table ``t`` of the current directory as ``(entries, allocated)``, where
        ``allocated`` lists the chunk indices with a data chunk, in order; None when the
        directory has no table there or it maps nothing. Cached by the table's own
        chunk, so directory entries naming one table many times cost one read and one
        scan: the work is bounded by the tables the file holds."""
        chunk = self.directory[t] & CHUNK_MASK
        if not chunk:
            return None
        if chunk in self._tables:
            self._tables.move_to_end(chunk)
            return self._tables[chunk]
        g = self.geo
        off = chunk * g.chunk_size
        size = check_alloc(8 * g.entries, self.path, "ASIF table")
        if off + size > self.file_size:
            raise FormatError(f"directory entry {t}: table at {off} (+{size}) is past the"
                              f" end of the file ({self.file_size} bytes)", self.path,
                              structure="ASIF directory")
        table = be_array(self.backend.read_exact(off, size, "ASIF table"))
        allocated = array("Q")
        r = g.reserved_entries
        e = skip_filled(table, 0, len(table))
        while e < len(table):
            if e % (r + 1) != r and table[e] & CHUNK_MASK:  # not a group's extra entry
                allocated.append(e - e // (r + 1))
            e = skip_filled(table, e + 1, len(table))
        value = (table, allocated) if allocated else None
        self._tables[chunk] = value
        if len(self._tables) > _TABLE_CACHE:
            self._tables.popitem(last=False)
        return value

    def _runs(self, offset: int, length: int):
        """``(offset, length, host or None)`` pieces of ``[offset, offset+length)``: one
        per allocated chunk, one per stretch of unallocated ones."""
        g = self.geo
        cs = g.chunk_size
        end = offset + length
        pos = offset
        while pos < end:
            t, in_table = divmod(pos, g.bytes_per_table)
            base = t * g.bytes_per_table
            span_end = min(end, base + g.bytes_per_table)
            mapped = self._table(t)
            if mapped is None:
                yield pos, span_end - pos, None
                pos = span_end
                continue
            table, allocated = mapped
            while pos < span_end:
                c, within = divmod(pos - base, cs)
                i = bisect_left(allocated, c)
                if i == len(allocated) or allocated[i] != c:
                    nxt = base + allocated[i] * cs if i < len(allocated) else span_end
                    n = min(span_end, nxt) - pos
                    yield pos, n, None
                    pos += n
                    continue
                host = (table[g.entry_index(c)] & CHUNK_MASK) * cs
                if host >= self.file_size:
                    raise FormatError(f"table {t} entry {g.entry_index(c)}: chunk at {host}"
                                      f" is past the end of the file ({self.file_size}"
                                      " bytes)", self.path, structure="ASIF table")
                n = min(span_end - pos, cs - within)
                yield pos, n, host + within
                pos += n

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        for pos, k, host in self._runs(offset, n):
            dst = mv[pos - offset:pos - offset + k]
            if host is None:
                fill_zero(dst)
            else:
                got = self.backend.readinto(host, dst)
                if got < k:
                    fill_zero(dst, got)
        return n

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(Extent(pos, k, ExtentKind.ZERO, False, None) if host is None
                        else Extent(pos, k, ExtentKind.DATA, True, host)
                        for pos, k, host in self._runs(offset, length))

    def info(self) -> ImageInfo:
        h, g = self.header, self.geo
        guid = bytes(h.guid).hex()
        return ImageInfo(
            filename=self.path, format="asif", virtual_size=self.size,
            actual_size=self.backend.allocated_bytes(), cluster_size=g.chunk_size,
            details={"block-size": g.block_size, "chunk-size": g.chunk_size,
                     "max-size": h.max_sector_count * g.block_size,
                     "guid": f"{guid[:8]}-{guid[8:12]}-{guid[12:16]}-{guid[16:20]}-"
                             f"{guid[20:]}",
                     "directory-version": self.directory_version,
                     "directory-offset": self.directory_offset})
