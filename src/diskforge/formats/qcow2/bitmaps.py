"""Persistent dirty bitmaps (qcow2.txt "Bitmaps"): read for ``info`` and ``check``,
and kept true when diskforge writes into an image that has them.

A bitmap with the ``auto`` flag must record every write. So, as qemu does, writing
into such an image first marks those bitmaps ``in_use`` on disk, sets the bits of
every written range (granularity = one bit per ``1 << granularity_bits`` bytes, least
significant bit first), stores the changed bitmap clusters on ``flush``, and clears
``in_use`` on ``close``. A crash leaves ``in_use`` set: the bitmap is then known to be
inconsistent rather than silently wrong. Bitmaps without ``auto`` (disabled) are
left as they are; nothing is ever dropped.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from ...byteorder import be_array
from ...errors import FormatError, UnsupportedError
from ...limits import check_alloc
from .structs import (BITMAP_DIR_ENTRY_SIZE, BME_FLAG_AUTO,
                      BME_FLAG_EXTRA_DATA_COMPATIBLE, BME_FLAG_IN_USE,
                      BME_MAX_NAME_SIZE, BME_MAX_TABLE_SIZE,
                      BME_TABLE_ENTRY_FLAG_ALL_ONES, BME_TABLE_ENTRY_OFFSET_MASK,
                      QCOW_MAX_BITMAPS, Qcow2BitmapDirEntry)



@dataclass
class Bitmap:
    entry_offset: int          # where its directory entry starts in the file
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data_size: int

    def to_json(self) -> dict:
        flags = []
        if self.flags & BME_FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            flags.append("auto")
        return {"flags": flags, "name": self.name,
                "granularity": 1 << self.granularity_bits}


def read_directory(dev) -> list[Bitmap]:
    """Parse and validate the bitmap directory named by the header extension."""
    ext = dev.header.bitmaps
    if ext is None:
        return []
    raw = dev.backend.read_exact(ext.directory_offset, ext.directory_size,
                                 "bitmap directory")
    out: list[Bitmap] = []
    pos = 0
    cs = dev.cs
    fsize = dev.backend.size
    while pos < len(raw):
        if len(out) >= min(ext.nb_bitmaps, QCOW_MAX_BITMAPS):
            break
        if pos + BITMAP_DIR_ENTRY_SIZE > len(raw):
            raise FormatError("bitmap directory entry runs past the directory", dev.path,
                              structure="Qcow2BitmapDirEntry")
        e = Qcow2BitmapDirEntry.parse(raw[pos:pos + BITMAP_DIR_ENTRY_SIZE])
        end = pos + BITMAP_DIR_ENTRY_SIZE + e.extra_data_size + e.name_size
        if e.name_size == 0 or e.name_size > BME_MAX_NAME_SIZE or end > len(raw):
            raise FormatError(f"bitmap {len(out)}: name of {e.name_size} bytes is empty,"
                              " too long or past the directory", dev.path,
                              structure="Qcow2BitmapDirEntry", field="name_size")
        if e.bitmap_table_size > BME_MAX_TABLE_SIZE or e.bitmap_table_offset % cs \
                or (e.bitmap_table_size and e.bitmap_table_offset < cs) \
                or e.bitmap_table_offset + e.bitmap_table_size * 8 > fsize:
            raise FormatError(f"bitmap {len(out)}: table at {e.bitmap_table_offset:#x}"
                              f" ({e.bitmap_table_size} entries) is invalid", dev.path,
                              structure="Qcow2BitmapDirEntry",
                              field="bitmap_table_offset")
        if not 0 <= e.granularity_bits <= 63:
            raise FormatError(f"bitmap {len(out)}: granularity_bits {e.granularity_bits}",
                              dev.path, structure="Qcow2BitmapDirEntry")
        name_at = pos + BITMAP_DIR_ENTRY_SIZE + e.extra_data_size
        name = raw[name_at:name_at + e.name_size].decode("utf-8", "replace")
        out.append(Bitmap(ext.directory_offset + pos, e.bitmap_table_offset,
                          e.bitmap_table_size, e.flags, e.type, e.granularity_bits, name,
                          e.extra_data_size))
        pos = end + (-end % 8)
    return out


def read_table(dev, bm: Bitmap) -> array:
    """A bitmap table as an array of entries. Its size comes from the directory and
    was checked only against the file (which a sparse file satisfies): it must also
    be no more than the disk needs, and fit the memory budget, before it is read."""
    bits = -(-dev.size // (1 << bm.granularity_bits))
    needed = -(-bits // (8 * dev.cs))
    if bm.table_size > needed + 1:
        raise FormatError(f"bitmap '{bm.name}': a table of {bm.table_size} entries is"
                          f" more than a {dev.size}-byte disk needs ({needed})", dev.path,
                          structure="Qcow2BitmapDirEntry", field="bitmap_table_size")
    check_alloc(bm.table_size * 8, dev.path, "Qcow2BitmapDirEntry", "bitmap_table_size")
    raw = dev.backend.read_exact(bm.table_offset, bm.table_size * 8, "bitmap table")
    return be_array(raw)


def _set_bits(buf: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) of ``buf``, least significant first."""
    b0, b1 = first // 8, last // 8
    if b0 == b1:
        buf[b0] |= ((0xFF << (first % 8)) & (0xFF >> (7 - last % 8)))
        return
    buf[b0] |= (0xFF << (first % 8)) & 0xFF
    if b1 > b0 + 1:
        buf[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
    buf[b1] |= 0xFF >> (7 - last % 8)


class Bitmaps:
    """The enabled (``auto``) bitmaps of an image open for writing."""

    def __init__(self, dev):
        self.dev = dev
        self.all = read_directory(dev)
        self.tracked = [b for b in self.all if b.flags & BME_FLAG_AUTO
                        and not b.flags & BME_FLAG_IN_USE and b.type == 1
                        and (b.extra_data_size == 0
                             or b.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)]
        for b in self.tracked:
            if not 9 <= b.granularity_bits <= 31:
                raise UnsupportedError(f"not supported: bitmap '{b.name}' with granularity"
                                       f" 2^{b.granularity_bits}", dev.path)
        self.tables: dict[str, list[int]] = {}
        self.clusters: dict[tuple[str, int], bytearray] = {}
        self.dirty_tables: set[str] = set()
        self.in_use = False

    def _start(self) -> None:
        """Mark the tracked bitmaps in use on disk before the first write."""
        for b in self.tracked:
            self.tables[b.name] = read_table(self.dev, b)
            self._write_flags(b, b.flags | BME_FLAG_IN_USE)
        self.dev.barrier()
        self.in_use = True

    def _write_flags(self, b: Bitmap, flags: int) -> None:
        b.flags = flags
        self.dev.backend.pwrite(b.entry_offset + 12, flags.to_bytes(4, "big"))

    def mark(self, offset: int, length: int) -> None:
        if not self.tracked or length <= 0:
            return
        if not self.in_use:
            self._start()
        cs = self.dev.cs
        bits_per_cluster = cs * 8
        for b in self.tracked:
            g = b.granularity_bits
            first, last = offset >> g, (offset + length - 1) >> g
            table = self.tables[b.name]
            while first <= last:
                ci = first // bits_per_cluster
                stop = min(last, (ci + 1) * bits_per_cluster - 1)
                if ci < len(table):
                    e = table[ci]
                    if not (e & BME_TABLE_ENTRY_OFFSET_MASK) and e & \
                            BME_TABLE_ENTRY_FLAG_ALL_ONES:
                        first = stop + 1
                        continue
                    buf = self._cluster(b, ci)
                    base = ci * bits_per_cluster
                    _set_bits(buf, first - base, stop - base)
                first = stop + 1

    def mark_all(self) -> None:
        """Everything changed (a snapshot was applied, the image emptied)."""
        if not self.tracked:
            return
        if not self.in_use:
            self._start()
        for b in self.tracked:
            table = self.tables[b.name]
            for i, e in enumerate(table):
                off = e & BME_TABLE_ENTRY_OFFSET_MASK
                if off:
                    self.dev.refs.free(off // self.dev.cs)
                table[i] = BME_TABLE_ENTRY_FLAG_ALL_ONES
                self.clusters.pop((b.name, i), None)
            self.dirty_tables.add(b.name)

    def _cluster(self, b: Bitmap, ci: int) -> bytearray:
        key = (b.name, ci)
        buf = self.clusters.get(key)
        if buf is None:
            off = self.tables[b.name][ci] & BME_TABLE_ENTRY_OFFSET_MASK
            if off:
                self.dev.check_table_offset(off, "bitmap data cluster")
                buf = bytearray(self.dev.backend.read_exact(off, self.dev.cs,
                                                            "bitmap data"))
            else:
                buf = bytearray(self.dev.cs)
            self.clusters[key] = buf
        return buf

    def flush_data(self) -> None:
        """Write changed bitmap clusters (allocating where the table had none)."""
        cs = self.dev.cs
        for (name, ci), buf in self.clusters.items():
            table = self.tables[name]
            off = table[ci] & BME_TABLE_ENTRY_OFFSET_MASK
            if not off:
                off = self.dev.refs.alloc(1) * cs
                table[ci] = off
                self.dirty_tables.add(name)
            self.dev.backend.pwrite(off, buf)
        self.clusters.clear()

    def write_tables(self) -> None:
        for b in self.tracked:
            if b.name in self.dirty_tables:
                raw = b"".join(e.to_bytes(8, "big") for e in self.tables[b.name])
                self.dev.backend.pwrite(b.table_offset, raw)
        self.dirty_tables.clear()

    def close(self) -> None:
        """After the last flush: the bitmaps are consistent again."""
        if self.in_use:
            for b in self.tracked:
                self._write_flags(b, b.flags & ~BME_FLAG_IN_USE)
            self.in_use = False
