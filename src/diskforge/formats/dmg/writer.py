"""Writing UDIF images the way hdiutil does.

Layout of the output file, in order: the data fork (every stored chunk, in disk order),
the XML property list (``blkx`` entries, then ``plst``), the 512-byte ``koly`` trailer.

- 512-byte sectors; chunks of at most 2048 sectors (1 MiB; 128 sectors for bzip2, see
  BZIP2_CHUNK_BYTES), cut at absolute multiples of that size and at blkx boundaries;
  zero runs become zero-fill chunks (merged, at most 131072 sectors each, qemu's
  limit); a chunk that does not shrink when compressed is stored raw, as hdiutil does,
  and one whose samples do not shrink is stored raw without trying (_incompressible).
- One blkx entry per partition-map structure, partition and gap when the disk has a
  partition table, else one whole-disk entry (blkx_plan.py).
- Checksums: each blkx carries the CRC-32 of its decompressed stored chunks (zero-fill
  included, ignore chunks excluded -- what hdiutil computes, checked against every real
  sample); the trailer carries the CRC-32 of the data fork and the master CRC-32 over
  the blkx checksums. Our own ``verify`` and 7-Zip's test check them.

The writer sees the disk only as ``write``/``zero`` calls in increasing order, not as a
device, so it learns the partition table from the first MiB it receives: calls below
that are held (at most 1 MiB of data plus its compressed form) until the first MiB is
complete, then parsed with ``partitions.read_partitions`` over a small in-memory device.
Compression runs in the pipeline's thread pool (``prepare``); results are written in
order by ``write_prepared``. A chunk prepared before the layout was known that crosses
a blkx boundary is decompressed and split (only possible in the first few MiB).
"""

from __future__ import annotations

import base64
import os
import threading
import zlib

from ...atomic import AtomicFile, reserve_ahead
from ...blockdev import BlockDevice, ImageWriter, fill_zero, pieces
from ...errors import UsageError
from . import blkx_plan, codecs, udif
from .crc import crc32_combine, crc32_zeros
from .structs import CHUNK_STRUCT, SECTOR, BLKXTable, UDIFResourceFile

CHUNK_BYTES = 1 << 20               # hdiutil's chunk: 2048 sectors
# bzip2 chunks are kept to one 100 kB bzip2 block (64 KiB, even if bzip2's run-length
# stage grows it by a quarter): libmodi decodes only single-block streams of that size
BZIP2_CHUNK_BYTES = 64 << 10
MAX_ZERO_SECTORS = 131072           # qemu's DMG_SECTORCOUNTS_MAX (64 MiB)
HEAD_BYTES = 1 << 20                # where partition tables live
PROBE_STEP, PROBE_BYTES = 64 << 10, 2048  # the incompressibility probe (_incompressible)
VARIANTS = {"UDRO": codecs.RAW, "UDRW": codecs.RAW, "UDZO": codecs.ZLIB,
            "UDBZ": codecs.BZIP2, "ULFO": codecs.LZFSE, "ULMO": codecs.LZMA}
LZMA_PRESET = 6
# the plst resource hdiutil writes: 1032 bytes, two of them 1
PLST_DATA = bytes(517) + b"\x01\x00\x01" + bytes(512)
assert len(PLST_DATA) == 1032


class _Head(BlockDevice):
    """The first bytes of the disk being written, as a device of the full size (zeros
    beyond what we have), for partitions.read_partitions."""
    format = "dmg-head"

    def __init__(self, head: bytes | bytearray, size: int):
        self.head = head
        self.size = size

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        k = max(0, min(n, len(self.head) - offset))
        mv[:k] = self.head[offset:offset + k]
        fill_zero(mv, k)
        return n


class _Piece:
    """One chunk as prepared: where, its type, the bytes to store, the CRC-32 of its
    data (for the blkx checksum) and of the stored bytes (for the data-fork checksum),
    both computed in the worker thread."""
    __slots__ = ("offset", "length", "kind", "payload", "crc", "stored_crc")

    def __init__(self, offset: int, length: int, kind: int, payload, crc: int,
                 stored_crc: int):
        self.offset, self.length, self.kind, self.payload, self.crc, self.stored_crc = \
            offset, length, kind, payload, crc, stored_crc


class DmgWriter(ImageWriter):
    granularity = 4096

    def __init__(self, path: str, size: int, variant: str, zlib_level: int):
        if size % SECTOR:
            raise UsageError(f"a DMG holds whole 512-byte sectors; the disk size {size} is"
                             " not a multiple of 512", path)
        self.size = size
        self.variant = variant
        self.kind = VARIANTS[variant]
        self.compress = None
        if self.kind != codecs.RAW:
            level = zlib_level if self.kind == codecs.ZLIB else LZMA_PRESET
            self.compress = codecs.compressor(self.kind, level)
        self.parallel = self.compress is not None
        if self.compress is not None:
            # imported here, in the calling thread: two workers importing it at once
            # can be handed a half-initialised module (Python's import deadlock rule)
            import zstandard
            self._zstd = zstandard.ZstdCompressor
            self._local = threading.local()
        self.chunk_bytes = BZIP2_CHUNK_BYTES if self.kind == codecs.BZIP2 else CHUNK_BYTES
        # BLKXTable.BuffersNeeded: hdiutil writes a chunk plus 8 sectors (2056)
        self.buffers_needed = self.chunk_bytes // SECTOR + 8 if self.compress else 0
        self.out = AtomicFile(path, trailer="UDIF trailer (koly)", stream=True)
        # chunks are appended: their blocks reserved ahead (_fallocate.ReserveAhead)
        self.reserve = reserve_ahead(self.out)
        self.pos = 0                 # disk bytes accounted for
        self.data_pos = 0            # end of the data fork so far
        self.data_crc = 0
        self.layout: blkx_plan.Layout | None = None
        self.head = bytearray(min(HEAD_BYTES, size))
        self.held: list = []         # calls before the layout is known
        self.r = 0                   # current region
        self.entries = bytearray()   # chunk entries of the current region
        self.count = 0
        self.blkx_crc = 0
        self.zero_run: list[int] | None = None  # [first sector, count] not yet packed
        self.tables: list[tuple[blkx_plan.Region, bytes]] = []

    # -- the pipeline side (thread pool) ---------------------------------------------------
    def prepare(self, offset: int, data):
        """Cut ``data`` into chunks and compress each (runs in a worker thread)."""
        pieces = []
        lay = self.layout
        n = len(data)
        pos = 0
        while pos < n:
            o = offset + pos
            cut = min(n, (o // self.chunk_bytes + 1) * self.chunk_bytes - offset)
            if lay is not None:
                cut = min(cut, lay.next_boundary(o) - offset)
            pieces.append(self._piece(o, data[pos:cut]))
            pos = cut
        return pieces

    def _piece(self, offset: int, view) -> _Piece:
        crc = zlib.crc32(view)
        if self.compress is not None and not _incompressible(view, self._probe()):
            packed = self.compress(view)
            if len(packed) < len(view):
                return _Piece(offset, len(view), self.kind, packed, crc, zlib.crc32(packed))
            view = bytes(view)
        return _Piece(offset, len(view), codecs.RAW, view, crc, crc)

    def _probe(self):
        """This thread's zstd compressor for _incompressible (a ZstdCompressor must not
        be used by two threads at once, and making one costs 12 us)."""
        try:
            return self._local.compress
        except AttributeError:
            self._local.compress = self._zstd(level=1).compress
            return self._local.compress

    # -- the ordered side ------------------------------------------------------------------
    def write_prepared(self, offset: int, pieces) -> None:
        self._advance(offset)
        if self.layout is None:
            for p in pieces:
                if p.kind == codecs.RAW:
                    p.payload = bytes(p.payload)
                raw = p.payload if p.kind == codecs.RAW else \
                    codecs.decompress(p.kind, p.payload, p.length)
                k = min(p.length, len(self.head) - p.offset)
                if k > 0:
                    self.head[p.offset:p.offset + k] = raw[:k]
            self.held.append(("data", offset, pieces))
            self.pos = pieces[-1].offset + pieces[-1].length if pieces else offset
            self._maybe_plan()
            return
        for p in pieces:
            self._emit(p)
        if pieces:
            self.pos = pieces[-1].offset + pieces[-1].length

    def zero(self, offset: int, length: int) -> None:
        self._advance(offset)
        self._zero(offset, length)
        self.pos = offset + length

    def _advance(self, offset: int) -> None:
        """A range given to neither write nor zero reads as zeros (no backing here)."""
        if offset > self.pos:
            start = self.pos
            self._zero(start, offset - start)
            self.pos = offset

    def _zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self.layout is None:
            self.held.append(("zero", offset, length))
            self.pos = offset + length
            self._maybe_plan()
            return
        end = offset + length
        while offset < end:
            region = self.layout.regions[self.r]
            n = min(end, region.end_byte) - offset
            self._store_zero(offset, n)
            offset += n
            if offset == region.end_byte:
                self._close_region()

    def _maybe_plan(self) -> None:
        if self.pos < len(self.head) or self.layout is not None:
            return
        from ...partitions import read_partitions
        table = read_partitions(_Head(self.head, self.size)) if self.size else None
        self.layout = blkx_plan.plan(table, bytes(self.head[:2 * SECTOR]),
                                     self.size // SECTOR)
        held, self.held = self.held, []
        for item in held:
            if item[0] == "zero":
                self._zero(item[1], item[2])
            else:
                for p in item[2]:
                    self._emit(p)

    def _emit(self, p: _Piece) -> None:
        """Store one prepared chunk, splitting it where a blkx region ends."""
        while True:
            region = self.layout.regions[self.r]
            end = p.offset + p.length
            if end <= region.end_byte:
                self._store(p)
                if end == region.end_byte:
                    self._close_region()
                return
            raw = p.payload if p.kind == codecs.RAW else \
                codecs.decompress(p.kind, p.payload, p.length)
            k = region.end_byte - p.offset
            self._store(self._piece(p.offset, memoryview(raw)[:k]))
            self._close_region()
            p = self._piece(p.offset + k, memoryview(raw)[k:])

    def _store(self, p: _Piece) -> None:
        self._flush_zero_run()
        region = self.layout.regions[self.r]
        if self.reserve:
            self.reserve.write(self.data_pos, len(p.payload))
        self.out.pwrite(self.data_pos, p.payload)
        self.data_crc = crc32_combine(self.data_crc, p.stored_crc, len(p.payload))
        self._entry(p.kind, p.offset // SECTOR - region.start, p.length // SECTOR,
                    self.data_pos, len(p.payload))
        self.data_pos += len(p.payload)
        self.blkx_crc = crc32_combine(self.blkx_crc, p.crc, p.length)

    def _store_zero(self, offset: int, length: int) -> None:
        first, count = offset // SECTOR, length // SECTOR
        if self.variant == "UDRW":
            # read-write: every sector has its place in the file; zeros stay a hole
            self._flush_zero_run()
            start = self.layout.regions[self.r].start
            for sector, n in pieces(first, count, CHUNK_BYTES // SECTOR):
                self._entry(codecs.RAW, sector - start, n, self.data_pos, n * SECTOR)
                self.data_crc = crc32_zeros(self.data_crc, n * SECTOR)
                self.data_pos += n * SECTOR
        elif self.zero_run is not None and self.zero_run[0] + self.zero_run[1] == first:
            self.zero_run[1] += count
        else:
            self._flush_zero_run()
            self.zero_run = [first, count]
        self.blkx_crc = crc32_zeros(self.blkx_crc, length)

    def _flush_zero_run(self) -> None:
        if self.zero_run is None:
            return
        first, count = self.zero_run
        self.zero_run = None
        start = self.layout.regions[self.r].start
        while count > 0:
            n = min(count, MAX_ZERO_SECTORS)
            self._entry(codecs.ZERO_FILL, first - start, n, self.data_pos, 0)
            first += n
            count -= n

    def _entry(self, kind: int, sector: int, count: int, offset: int, length: int) -> None:
        self.entries += CHUNK_STRUCT.pack(kind, 0, sector, count, offset, length)
        self.count += 1

    def _close_region(self) -> None:
        self._flush_zero_run()
        region = self.layout.regions[self.r]
        self._entry(codecs.TERMINATOR, region.end - region.start, 0, self.data_pos, 0)
        header = BLKXTable.build({
            "Version": 1, "SectorNumber": region.start,
            "SectorCount": region.end - region.start, "DataOffset": 0,
            "BuffersNeeded": self.buffers_needed,
            "BlockDescriptors": region.descriptor, "Reserved": bytes(24),
            "Checksum": udif.make_checksum(self.blkx_crc),
            "NumberOfBlockChunks": self.count})
        self.tables.append((region, header + bytes(self.entries)))
        self.entries = bytearray()
        self.count = 0
        self.blkx_crc = 0
        self.r += 1

    # -- the end -----------------------------------------------------------------------------
    def _finish(self) -> None:
        self._advance(self.size)
        if self.layout is None:
            self.pos = max(self.pos, len(self.head))
            self._maybe_plan()
        while self.r < len(self.layout.regions):  # only an empty disk's single region
            self._close_region()
        xml = self._plist()
        self.out.pwrite(self.data_pos, xml)
        master = 0
        for _, table in self.tables:
            master = zlib.crc32(table[72:76], master)  # BLKXTable.Checksum.Data[:4]
        koly = UDIFResourceFile.build({
            "Version": 4, "HeaderSize": 512, "Flags": 1, "RunningDataForkOffset": 0,
            "DataForkOffset": 0, "DataForkLength": self.data_pos,
            "RsrcForkOffset": 0, "RsrcForkLength": 0,
            "SegmentNumber": 1, "SegmentCount": 1, "SegmentID": _uuid4(),
            "DataChecksum": udif.make_checksum(self.data_crc),
            "XMLOffset": self.data_pos, "XMLLength": len(xml), "Reserved1": bytes(120),
            "MasterChecksum": udif.make_checksum(master),
            "ImageVariant": 2 if len(self.tables) == 1 else 1,
            "SectorCount": self.size // SECTOR,
            "Reserved2": 0, "Reserved3": 0, "Reserved4": 0})
        self.out.pwrite(self.data_pos + len(xml), koly)
        if self.reserve:
            self.reserve.trim()

    def _plist(self) -> bytes:
        """The XML property list, laid out as hdiutil writes it."""
        lines = ['<?xml version="1.0" encoding="UTF-8"?>',
                 '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN"'
                 ' "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
                 '<plist version="1.0">', "<dict>", "\t<key>resource-fork</key>", "\t<dict>",
                 "\t\t<key>blkx</key>", "\t\t<array>"]
        for region, table in self.tables:
            lines += _resource(table, region.name, str(region.id), cfname=True)
        lines += ["\t\t</array>", "\t\t<key>plst</key>", "\t\t<array>"]
        lines += _resource(PLST_DATA, "", "0", cfname=False)
        lines += ["\t\t</array>", "\t</dict>", "</dict>", "</plist>", ""]
        return "\n".join(lines).encode("utf-8")

    def abort(self) -> None:
        self.out.discard()


def _incompressible(view, compress) -> bool:
    """True when every 2 KiB sample, one per 64 KiB, fails to shrink by a tenth under
    ``compress`` (zstd level 1, DmgWriter._probe): then the chunk is stored raw without
    compressing it whole (compressing random data costs 3x compressing text, for
    nothing). A compressible extent of 64 KiB or more always contains a sample, so at
    most a smaller one loses its compression.

    zstd, not zlib, judges: zlib level 1 takes 36 us for a 2 KiB random sample, zstd
    1.8 us (it gives up on incompressible data early), so the 16 samples of a random
    MiB cost 0.03 ms instead of 0.6 ms, half a second of CPU on the bench disk. On 313
    chunks of real files (packages, libraries, fonts, fixtures) the two agreed on 311;
    in the other two zstd found a sample compressible that zlib did not, and both
    chunks did shrink under zlib (to 81% and 93%)."""
    n = len(view)
    if n < PROBE_STEP:
        return False
    for off in range(0, n, PROBE_STEP):
        sample = view[off:off + PROBE_BYTES]
        if len(compress(sample)) < len(sample) * 9 // 10:
            return False
    return True


def _uuid4() -> bytes:
    """A random (version 4) UUID, as ``uuid.uuid4().bytes`` gives it (RFC 4122 4.4).

    Written out because ``import uuid`` (with ``platform``) cost 2.5 ms of every DMG
    write's start-up, for sixteen random bytes."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40   # version 4
    b[8] = b[8] & 0x3F | 0x80   # the RFC 4122 variant
    return bytes(b)


def _escape(text: str) -> str:
    """``&``, ``<`` and ``>`` as XML character data needs them (what
    ``xml.sax.saxutils.escape`` does; importing that imports ``urllib.request``, and
    with it ``email``, ``http``, ``ssl``: 20-30 ms of every DMG write's start-up)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _resource(data: bytes, name: str, ident: str, *, cfname: bool) -> list[str]:
    text = base64.b64encode(data).decode("ascii")
    out = ["\t\t\t<dict>", "\t\t\t\t<key>Attributes</key>", "\t\t\t\t<string>0x0050</string>"]
    if cfname:
        out += ["\t\t\t\t<key>CFName</key>", f"\t\t\t\t<string>{_escape(name)}</string>"]
    out += ["\t\t\t\t<key>Data</key>", "\t\t\t\t<data>"]
    out += [f"\t\t\t\t{text[i:i + 44]}" for i in range(0, len(text), 44)]
    out += ["\t\t\t\t</data>", "\t\t\t\t<key>ID</key>", f"\t\t\t\t<string>{ident}</string>",
            "\t\t\t\t<key>Name</key>", f"\t\t\t\t<string>{_escape(name)}</string>",
            "\t\t\t</dict>"]
    return out
