"""Persistent dirty bitmaps (qcow2.txt "Bitmaps extension", "Bitmap directory",
"Bitmap table"; qemu's block/qcow2-bitmap.c): the directory read and validated with
qemu's rules, whole bitmaps loaded and stored, and the bitmaps kept true when
diskforge writes into an image that has them.

Whole bitmaps (``load``/``store``: the ``bitmap`` subcommand, ``convert --bitmaps``,
resize) go through ``dirty_bitmaps.DirtyBitmap``; storing writes them as qemu does
when it closes an image: new data clusters (only where a bit is set) and a new table
for every consistent bitmap, in-use ones left as they are, a new directory, the header
last, and only then are the old clusters freed.

A bitmap with the ``auto`` flag must record every write. So, as qemu does, writing
into such an image first marks those bitmaps ``in_use`` on disk, sets the bits of
every written range (granularity = one bit per ``1 << granularity_bits`` bytes, least
significant bit first), stores the changed bitmap clusters on ``flush``, and clears
``in_use`` on ``close`` (``Bitmaps``). A crash leaves ``in_use`` set: the bitmap is
then known to be inconsistent rather than silently wrong. Bitmaps without ``auto``
(disabled) are left as they are; nothing is ever dropped.
"""

from __future__ import annotations

import collections
from array import array
from dataclasses import dataclass

from ...byteorder import be_array, be_bytes
from ...dirty_bitmaps import DirtyBitmap, set_bits
from ...errors import FormatError, UnsupportedError, UsageError
from ...limits import check_alloc
from .header import BitmapsExt
from .structs import (BITMAP_DIR_ENTRY_SIZE, BME_FLAG_AUTO,
                      BME_FLAG_EXTRA_DATA_COMPATIBLE, BME_FLAG_IN_USE,
                      BME_MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE,
                      BME_MAX_TABLE_SIZE, BME_MIN_GRANULARITY_BITS, BME_RESERVED_FLAGS,
                      BME_TABLE_ENTRY_FLAG_ALL_ONES, BME_TABLE_ENTRY_OFFSET_MASK,
                      BME_TABLE_ENTRY_RESERVED_MASK, BT_DIRTY_TRACKING_BITMAP,
                      QCOW2_AUTOCLEAR_BITMAPS, QCOW_MAX_BITMAPS, Qcow2BitmapDirEntry)



@dataclass
class Bitmap:
    """A persistent dirty bitmap's directory entry."""
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
    """Parse and validate the bitmap directory named by the header extension, with
    qemu's rules (bitmap_list_load, check_dir_entry) and its words: an entry past the
    directory is a "Broken bitmap directory", more or fewer entries than the header
    says, extra data (which qemu does not support) and an entry outside qemu's
    constraints are refused, each naming the field."""
    ext = dev.header.bitmaps
    if ext is None:
        return []
    path = dev.path
    if ext.directory_size == 0:
        raise FormatError("Requested bitmap directory size is zero", path,
                          structure="Qcow2BitmapHeaderExt", field="bitmap_directory_size")
    raw = dev.backend.read_exact(ext.directory_offset, ext.directory_size,
                                 "bitmap directory")
    out: list[Bitmap] = []
    names: set[str] = set()
    pos = 0
    cs = dev.cs
    fsize = dev.backend.size
    while pos < len(raw):
        i = len(out)
        if pos + BITMAP_DIR_ENTRY_SIZE > len(raw):
            raise FormatError(f"Broken bitmap directory: entry {i} at byte {pos} runs past"
                              f" its {len(raw)} bytes", path,
                              structure="Qcow2BitmapHeaderExt",
                              field="bitmap_directory_size")
        if i + 1 > ext.nb_bitmaps:
            raise FormatError(f"More bitmaps found than specified in header extension"
                              f" ({ext.nb_bitmaps})", path,
                              structure="Qcow2BitmapHeaderExt", field="nb_bitmaps")
        e = Qcow2BitmapDirEntry.parse(raw[pos:pos + BITMAP_DIR_ENTRY_SIZE])
        end = pos + BITMAP_DIR_ENTRY_SIZE + e.extra_data_size + e.name_size
        if end + (-end % 8) > len(raw):
            raise FormatError(f"Broken bitmap directory: entry {i} (name {e.name_size}"
                              f" bytes, extra data {e.extra_data_size} bytes) runs past"
                              f" its {len(raw)} bytes", path,
                              structure="Qcow2BitmapDirEntry", field="name_size")
        if e.extra_data_size:
            raise FormatError(f"Bitmap extra data is not supported (entry {i}:"
                              f" {e.extra_data_size} bytes)", path,
                              structure="Qcow2BitmapDirEntry", field="extra_data_size")
        name_at = pos + BITMAP_DIR_ENTRY_SIZE
        name = raw[name_at:name_at + e.name_size].decode("utf-8", "replace")
        bad = _constraint(e, cs, fsize, dev.size)
        if bad is not None:
            fld, why = bad
            raise FormatError(f"Bitmap '{name}' doesn't satisfy the constraints: {why}",
                              path, structure="Qcow2BitmapDirEntry", field=fld)
        if name in names:
            raise FormatError(f"Bitmap already exists: {name} (entry {i})", path,
                              structure="Qcow2BitmapDirEntry", field="name")
        names.add(name)
        out.append(Bitmap(ext.directory_offset + pos, e.bitmap_table_offset,
                          e.bitmap_table_size, e.flags, e.type, e.granularity_bits, name,
                          e.extra_data_size))
        pos = end + (-end % 8)
    if len(out) != ext.nb_bitmaps:
        raise FormatError(f"Less bitmaps found than specified in header extension"
                          f" ({len(out)} of {ext.nb_bitmaps})", path,
                          structure="Qcow2BitmapHeaderExt", field="nb_bitmaps")
    return out


def _constraint(e, cs: int, fsize: int, disk_size: int) -> tuple[str, str] | None:
    """The first of qemu's check_dir_entry rules an entry breaks, as (field, why)."""
    if e.bitmap_table_size == 0:
        return "bitmap_table_size", "the table is empty"
    if e.bitmap_table_size > BME_MAX_TABLE_SIZE:
        return "bitmap_table_size", (f"{e.bitmap_table_size} entries is more than"
                                     f" {BME_MAX_TABLE_SIZE}")
    if e.bitmap_table_offset == 0 or e.bitmap_table_offset % cs:
        return "bitmap_table_offset", (f"{e.bitmap_table_offset:#x} is not a cluster"
                                       " past the header")
    if e.bitmap_table_offset + e.bitmap_table_size * 8 > fsize:
        return "bitmap_table_offset", (f"the table at {e.bitmap_table_offset:#x}"
                                       f" (+{e.bitmap_table_size * 8}) is past the end"
                                       f" of the file ({fsize} bytes)")
    if not BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= BME_MAX_GRANULARITY_BITS:
        return "granularity_bits", f"{e.granularity_bits} is outside 9..31"
    if e.flags & BME_RESERVED_FLAGS:
        return "flags", f"reserved bits set ({e.flags:#x})"
    if e.name_size > BME_MAX_NAME_SIZE:
        return "name_size", f"{e.name_size} bytes is more than {BME_MAX_NAME_SIZE}"
    if e.type != BT_DIRTY_TRACKING_BITMAP:
        return "type", f"{e.type} is not a dirty tracking bitmap (1)"
    phys = e.bitmap_table_size * cs
    if phys > BME_MAX_PHYS_SIZE:
        return "bitmap_table_size", (f"{e.bitmap_table_size} clusters of bitmap data is"
                                     f" more than {BME_MAX_PHYS_SIZE} bytes")
    if not e.flags & BME_FLAG_IN_USE and disk_size > (phys * 8) << e.granularity_bits:
        return "bitmap_table_size", (f"{e.bitmap_table_size} entries cannot cover a"
                                     f" {disk_size}-byte disk")
    return None


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


def table_entry_error(entry: int, cs: int) -> str | None:
    """What is wrong with a bitmap table entry (qemu's check_table_entry), or None."""
    if entry & BME_TABLE_ENTRY_RESERVED_MASK:
        return "reserved bits set"
    off = entry & BME_TABLE_ENTRY_OFFSET_MASK
    if off and entry & BME_TABLE_ENTRY_FLAG_ALL_ONES:
        return "both an offset and the all-ones flag"
    if off % cs:
        return "offset not cluster aligned"
    return None


# -- whole bitmaps in memory (the 'bitmap' subcommand, convert --bitmaps, resize) ----------

def supports_bitmaps(dev) -> bool:
    """qemu stores persistent bitmaps only in version 3 images (autoclear bits)."""
    return dev.header.version >= 3


def default_granularity(cs: int) -> int:
    """qemu's bdrv_get_default_bitmap_granularity: the cluster size, within 4-64 KiB."""
    return min(65536, max(4096, cs))


def load(dev, *, data: bool = True) -> list[DirtyBitmap]:
    """Every bitmap of the image, with its bits (``data``) unless it is in use
    (inconsistent). Bitmaps that this open is tracking writes into are written out and
    marked consistent first, so what is read is what they hold."""
    tracker = dev.bitmaps
    if tracker is not None and tracker.in_use:
        dev.flush()
        tracker.close()
    out = []
    for b in read_directory(dev):
        bm = DirtyBitmap(b.name, 1 << b.granularity_bits, dev.size,
                         bool(b.flags & BME_FLAG_AUTO))
        if data and not b.flags & BME_FLAG_IN_USE:
            bm.bits = _load_bits(dev, b)
        elif not b.flags & BME_FLAG_IN_USE:
            bm.bits = bytearray()   # consistent; contents not asked for
        out.append(bm)
    return out


def _load_bits(dev, b: Bitmap) -> bytearray:
    cs = dev.cs
    nbits = DirtyBitmap.bit_count(dev.size, 1 << b.granularity_bits)
    nbytes = -(-nbits // 8)
    need = -(-nbytes // cs)
    if b.table_size != need:
        raise FormatError(f"Could not read bitmap '{b.name}' from image: its table has"
                          f" {b.table_size} entries, the disk needs {need}", dev.path,
                          structure="Qcow2BitmapDirEntry", field="bitmap_table_size")
    table = read_table(dev, b)
    check_alloc(nbytes, dev.path, "Qcow2BitmapDirEntry", "granularity_bits")
    bits = bytearray(nbytes)
    for i, entry in enumerate(table):
        why = table_entry_error(entry, cs)
        if why is not None:
            raise FormatError(f"Could not read bitmap_table table from image for bitmap"
                              f" '{b.name}': entry {i} ({entry:#x}): {why}", dev.path,
                              structure="bitmap table", field=f"entry {i}")
        off = entry & BME_TABLE_ENTRY_OFFSET_MASK
        lo, hi = i * cs, min(nbytes, (i + 1) * cs)
        if off:
            if off < cs or off + cs > dev.backend.size:
                raise FormatError(f"bitmap '{b.name}': data cluster at {off:#x} is in the"
                                  " header or past the end of the file"
                                  f" ({dev.backend.size} bytes)", dev.path,
                                  structure="bitmap table", field=f"entry {i}")
            bits[lo:hi] = dev.backend.read_exact(off, cs, "bitmap data")[:hi - lo]
        elif entry & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            bits[lo:hi] = b"\xff" * (hi - lo)
    if nbits % 8:
        bits[-1] &= (1 << (nbits % 8)) - 1
    return bits


def serialize(bm: DirtyBitmap, cs: int) -> tuple[int, list[tuple[int, bytes]]]:
    """(table entries, [(table index, cluster bytes)]) of a bitmap stored with
    ``cs``-byte clusters: as qemu's store_bitmap_data, only clusters holding a set
    bit get a data cluster; the others stay 0 in the table."""
    assert bm.bits is not None
    nbytes = -(-bm.nbits // 8)
    size = -(-nbytes // cs)
    bits = bm.bits
    clusters = []
    for i in range(size):
        chunk = bytes(bits[i * cs:(i + 1) * cs])
        if chunk.count(0) != len(chunk):
            clusters.append((i, chunk + bytes(cs - len(chunk))))
    return size, clusters


def measure_bitmaps(bitmaps: list[DirtyBitmap], cs: int) -> int:
    """Bytes these bitmaps take in a new image of ``cs``-byte clusters, counted as
    qemu's qcow2_get_persistent_dirty_bitmap_size: every data cluster allocated, the
    tables, and the directory."""
    total = dir_size = 0
    for bm in bitmaps:
        clusters = -(-(-(-bm.nbits // 8)) // cs)
        total += clusters * cs + -(-clusters * 8 // cs) * cs
        dir_size += BITMAP_DIR_ENTRY_SIZE + len(bm.name.encode("utf-8"))
        dir_size += -dir_size % 8
    return total + -(-dir_size // cs) * cs


def build_directory(entries: list[tuple[int, int, int, int, str]]) -> bytes:
    """The bitmap directory for (table offset, table size, flags, granularity bits,
    name) entries, each padded to 8 bytes (qcow2.txt "Bitmap directory")."""
    out = bytearray()
    for offset, size, flags, gbits, name in entries:
        raw = name.encode("utf-8")
        out += Qcow2BitmapDirEntry.build(dict(
            bitmap_table_offset=offset, bitmap_table_size=size, flags=flags,
            type=BT_DIRTY_TRACKING_BITMAP, granularity_bits=gbits, name_size=len(raw),
            extra_data_size=0))
        out += raw + bytes(-(BITMAP_DIR_ENTRY_SIZE + len(raw)) % 8)
    return bytes(out)


def _old_clusters(dev, dropped: list[Bitmap]) -> "collections.Counter[int]":
    """Clusters (with how many references) that storing a new directory frees: the
    data clusters and tables of ``dropped``, and the old directory."""
    cs = dev.cs
    out: collections.Counter[int] = collections.Counter()
    for ob in dropped:
        for entry in read_table(dev, ob):
            off = entry & BME_TABLE_ENTRY_OFFSET_MASK
            if off and table_entry_error(entry, cs) is None:
                out[off // cs] += 1
        first = ob.table_offset // cs
        out.update(range(first, first + -(-ob.table_size * 8 // cs)))
    ext = dev.header.bitmaps
    if ext is not None:
        first = ext.directory_offset // cs
        out.update(range(first, first + -(-ext.directory_size // cs)))
    return out


def check_new(dev, name: str, granularity: int) -> None:
    """qemu's qcow2_co_can_store_new_dirty_bitmap, with its words."""
    where = f"Can't make bitmap '{name}' persistent in '{dev.path}': "
    if not supports_bitmaps(dev):
        raise UsageError(where + "Cannot store dirty bitmaps in qcow2 v2 files")
    if granularity > 1 << BME_MAX_GRANULARITY_BITS:
        raise UsageError(where + f"Granularity exceeds maximum"
                         f" ({1 << BME_MAX_GRANULARITY_BITS} bytes)")
    nbytes = -(-DirtyBitmap.bit_count(dev.size, granularity) // 8)
    if nbytes > BME_MAX_PHYS_SIZE or nbytes > BME_MAX_TABLE_SIZE * dev.cs:
        raise UsageError(where + "Too much space will be occupied by the bitmap. Use"
                         " larger granularity")
    if len(name.encode("utf-8")) > BME_MAX_NAME_SIZE:
        raise UsageError(where + f"Name length exceeds maximum ({BME_MAX_NAME_SIZE}"
                         " characters)")
    ext = dev.header.bitmaps
    if ext is not None and ext.nb_bitmaps + 1 > QCOW_MAX_BITMAPS:
        raise UsageError(where + "Maximum number of persistent bitmaps is already"
                         " reached")


def store(dev, bitmaps: list[DirtyBitmap]) -> None:
    """Write ``bitmaps`` as the image's whole bitmap directory, as qemu stores them on
    close (qcow2_store_persistent_dirty_bitmaps): each consistent bitmap gets new data
    clusters and a new table, inconsistent ones keep theirs, a new directory is
    written, then the header names it; what the old directory used is freed only
    after that (the refcount order of ``flush``: a crash leaks, never loses)."""
    dev.prepare_write()
    h = dev.header
    if bitmaps and not supports_bitmaps(dev):
        raise UsageError("Cannot store dirty bitmaps in qcow2 v2 files", dev.path)
    load(dev, data=False)              # writes tracked so far are on disk, consistent
    old = {b.name: b for b in read_directory(dev)}
    cs = dev.cs
    refs = dev.refs
    kept_names = {bm.name for bm in bitmaps if bm.bits is None}
    frees = _old_clusters(dev, [b for n, b in old.items() if n not in kept_names])
    for c, n in frees.items():  # before anything changes: a cluster two bitmaps share
        if refs.get(c) < n:      # (or one named twice) cannot be freed twice
            raise FormatError(f"cluster {c} is named {n} times by bitmap tables or the"
                              f" directory but counted {refs.get(c)} times; run"
                              " 'diskforge check -r all'", dev.path,
                              structure="bitmap table", field="offset")
    dev.bitmaps = None
    entries = []
    for bm in bitmaps:
        gbits = bm.granularity.bit_length() - 1
        if bm.bits is None:           # inconsistent: stays as it is on disk
            ob = old[bm.name]
            entries.append((ob.table_offset, ob.table_size, ob.flags, gbits, bm.name))
            continue
        if bm.size != dev.size:
            bm.resize(dev.size)
        tb_size, clusters = serialize(bm, cs)
        table = array("Q", bytes(8 * tb_size))
        for i, chunk in clusters:
            off = refs.alloc(1) * cs
            dev.backend.pwrite(off, chunk)
            table[i] = off
        toff = refs.alloc(-(-tb_size * 8 // cs)) * cs
        dev.backend.pwrite(toff, be_bytes(table))
        entries.append((toff, tb_size, BME_FLAG_AUTO if bm.enabled else 0, gbits,
                        bm.name))
    for c, n in frees.items():         # freed once the header no longer names them
        for _ in range(n):
            refs.free(c)
    if entries:
        raw = build_directory(entries)
        doff = refs.alloc(-(-len(raw) // cs)) * cs
        dev.backend.pwrite(doff, raw)
        h.bitmaps = BitmapsExt(len(entries), len(raw), doff)
        h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS
    else:
        h.bitmaps = None
        h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS
    dev.header_dirty = True
    dev.flush()
    if h.bitmaps is not None:
        dev.bitmaps = Bitmaps(dev)


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
                    set_bits(buf, first - base, stop - base)
                first = stop + 1

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
