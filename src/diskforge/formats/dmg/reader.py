"""Reading a UDIF image as a BlockDevice.

The whole chunk map is built at open (udif.build_chunk_map: validated, sorted,
contiguous). A read finds its first run by bisection and walks the runs it touches:
zero-fill, ignore and gaps are filled with zeros, raw chunks are read straight from the
file into the caller's buffer, and compressed chunks are decompressed whole, once, into
a small LRU cache (a read of 4 KiB inside a 1 MiB chunk costs one decompression, the
next read in it none). ``extents()`` reports zero-fill, ignore and gaps as ZERO, so a
convert of a DMG stays sparse.

Sequential readers (convert, compare, verify) get read-ahead: once reads walk forward
through compressed chunks, the next few are decompressed on diskforge's shared decoding
pool (``parallel.submit``; zlib, bz2, lzma and lzfse release the GIL) while the caller
copies and writes the current one, at most READAHEAD_BYTES of output in flight. With
one decoding thread (``convert -m 1``) there is no read-ahead.
"""

from __future__ import annotations

import bisect
import collections
import threading
import zlib

from ... import parallel
from ...blockdev import Extent, ExtentKind, FileDevice, ImageInfo, coalesce, fill_zero
from ...errors import FormatError
from . import codecs, udif
from .crc import crc32_combine, crc32_zeros
from .structs import CHECKSUM_NONE, KOLY_SIZE, SECTOR

CACHE_BYTES = 16 << 20      # decompressed chunks kept (at least one)
READAHEAD_BYTES = 8 << 20   # decompressed bytes being prepared ahead of the reader


class DmgDevice(FileDevice):
    format = "dmg"

    def _open(self) -> None:
        file_size = self.backend.size
        if file_size < KOLY_SIZE:
            raise FormatError(f"file of {file_size} bytes is too short for a UDIF trailer",
                              self.path, structure="UDIFResourceFile")
        raw = self.backend.read_exact(file_size - KOLY_SIZE, KOLY_SIZE, "trailer")
        self.koly = udif.parse_trailer(raw, file_size, self.path)
        self.fork = udif.parse_plist(self._xml_pieces(), self.path)
        self.map, self.size = udif.build_chunk_map(self.koly, self.fork, self.path)
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._ahead: dict[int, object] = {}   # run index -> Future
        self._running: list = []              # dropped at a jump, but still decoding
        self._ahead_bytes = 0
        self._ahead_next = 0
        self._last_run = -1

    def _xml_pieces(self):
        """The property list, 1 MiB at a time (parsed as it is read)."""
        pos, end = self.koly.XMLOffset, self.koly.XMLOffset + self.koly.XMLLength
        while pos < end:
            n = min(1 << 20, end - pos)
            yield self.backend.read_exact(pos, n, "property list")
            pos += n

    # -- reading ----------------------------------------------------------------------
    def _run_at(self, offset: int) -> int:
        return bisect.bisect_right(self.map.start, offset, 0, len(self.map)) - 1

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        m = self.map
        i = self._run_at(offset) if n else 0
        done = 0
        while done < n:
            pos = offset + done
            while m.start[i + 1] <= pos:
                i += 1
            run_start = m.start[i]
            take = min(n - done, m.start[i + 1] - pos)
            dst = mv[done:done + take]
            kind = m.kind[i]
            if kind == codecs.RAW:
                got = self.backend.readinto(m.offset[i] + pos - run_start, dst)
                if got != take:
                    raise FormatError(f"raw chunk at file offset {m.offset[i]} is cut off"
                                      " (file truncated)", self.path)
            elif kind in codecs.COMPRESSED:
                data = self._chunk(i)
                dst[:] = memoryview(data)[pos - run_start:pos - run_start + take]
            else:
                fill_zero(dst)
            done += take
        return n

    def _decode(self, i: int) -> bytes:
        m = self.map
        size = m.start[i + 1] - m.start[i]
        src = bytearray(m.length[i])  # decoded from in place: no bytes() copy
        if self.backend.readinto(m.offset[i], src) != len(src):
            raise FormatError(f"chunk data at file offset {m.offset[i]} (+{len(src)}) is"
                              " past the end of the file: truncated", self.path)
        try:
            return codecs.decompress(m.kind[i], src, size)
        except codecs.ChunkError as e:
            raise FormatError(f"chunk at disk offset {m.start[i]} (file offset"
                              f" {m.offset[i]}, blkx entry {m.blkx[i]}): {e}", self.path,
                              structure="BLKXChunkEntry") from None

    def _chunk(self, i: int) -> bytes:
        """Chunk ``i`` decoded: from the cache, from read-ahead, or decoded now. The
        lock guards the cache and the read-ahead state (a device may be read from
        several threads, e.g. when served over NBD); decoding runs outside it."""
        fut = None
        with self._lock:
            data = self._cache.get(i)
            if data is not None:
                self._cache.move_to_end(i)
                return data
            fut = self._ahead.pop(i, None)
            if fut is not None:
                self._ahead_bytes -= self._run_size(i)
        data = fut.result() if fut is not None else self._decode(i)
        if isinstance(data, _Failed):
            raise data.exc
        with self._lock:
            self._cache[i] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)
            last, self._last_run = self._last_run, i
            if fut is not None or 0 < i - last <= 16:
                self._read_ahead(i)
            elif i != last:
                self._cancel_ahead()
        return data

    def _run_size(self, i: int) -> int:
        return self.map.start[i + 1] - self.map.start[i]

    def _read_ahead(self, i: int) -> None:
        """Start decompressing the next compressed runs after ``i`` (the reader walks
        forward), up to READAHEAD_BYTES of output and a bounded scan of the map."""
        if parallel.threads() < 2:
            return
        m = self.map
        j = max(i + 1, self._ahead_next)
        limit = min(len(m), j + 256)
        while j < limit and self._ahead_bytes < READAHEAD_BYTES:
            if m.kind[j] in codecs.COMPRESSED and j not in self._cache:
                self._ahead[j] = parallel.submit(self._decode_quietly, j)
                self._ahead_bytes += self._run_size(j)
            j += 1
        self._ahead_next = j

    def _cancel_ahead(self, wait: bool = False) -> None:
        """A jump: what was being prepared is probably not wanted any more. ``wait``:
        also wait for the decodes already running (before the file is closed)."""
        running = [f for f in self._running if not f.done()]
        for fut in self._ahead.values():
            if not fut.cancel():
                running.append(fut)   # already decoding: it reads the file until done
        if wait:
            for fut in running:
                fut.exception()       # the result (or a _Failed) is dropped
            running = []
        self._running = running
        self._ahead.clear()
        self._ahead_bytes = 0
        self._ahead_next = 0

    def _decode_quietly(self, i: int):
        try:
            return self._decode(i)
        except Exception as e:  # re-raised in the reader's thread if it needs this chunk
            return _Failed(e)

    # -- extents ----------------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(self._extents(offset, offset + length))

    def _extents(self, start: int, end: int):
        m = self.map
        if start >= end:
            return
        i = self._run_at(start)
        while i < len(m) and m.start[i] < end:
            a, b = max(start, m.start[i]), min(end, m.start[i + 1])
            kind = m.kind[i]
            if kind in codecs.STORED:
                host = m.offset[i] + a - m.start[i] if kind == codecs.RAW else None
                yield Extent(a, b - a, ExtentKind.DATA, True, host)
            else:
                yield Extent(a, b - a, ExtentKind.ZERO, kind == codecs.ZERO_FILL)
            i += 1

    # -- checksums --------------------------------------------------------------------
    def verify(self) -> list[str]:
        """hdiutil verify: the data fork CRC-32, each blkx CRC-32 (over the decompressed
        stored chunks), and the master CRC-32 (over the blkx checksums)."""
        problems = []
        k = self.koly
        want = udif.checksum_value(k.DataChecksum)
        if want is not None:
            crc, pos, end = 0, k.DataForkOffset, k.DataForkOffset + k.DataForkLength
            while pos < end:
                piece = self.backend.read_exact(pos, min(1 << 20, end - pos), "data fork")
                crc = zlib.crc32(piece, crc)
                pos += len(piece)
            if crc != want:
                problems.append(f"data fork CRC-32 is {crc:08x}, the trailer says {want:08x}")
        elif k.DataChecksum.Type != CHECKSUM_NONE:
            problems.append(f"data fork checksum type {k.DataChecksum.Type} cannot be"
                            " verified (only CRC-32 is known)")
        computed = self._blkx_crcs(problems)
        for entry in self.fork.blkx:
            t = entry.table.Checksum
            if entry.checksum is None:
                if t.Type != CHECKSUM_NONE:
                    problems.append(f"blkx entry {entry.index} ('{entry.name}'): checksum"
                                    f" type {t.Type} cannot be verified")
                continue
            got = computed.get(entry.index)
            if got is not None and got != entry.checksum:
                problems.append(f"blkx entry {entry.index} ('{entry.name}'): data CRC-32 is"
                                f" {got:08x}, the table says {entry.checksum:08x}")
        want = udif.checksum_value(k.MasterChecksum)
        if want is not None:
            got = master_checksum(self.fork.blkx)
            if got != want:
                problems.append(f"master CRC-32 is {got:08x}, the trailer says {want:08x}")
        elif k.MasterChecksum.Type != CHECKSUM_NONE:
            problems.append(f"master checksum type {k.MasterChecksum.Type} cannot be"
                            " verified")
        return problems

    def _blkx_crcs(self, problems: list[str]) -> dict[int, int | None]:
        """CRC-32 of each blkx entry's stored chunks (decompressed, in disk order)."""
        crcs: dict[int, int | None] = {e.index: 0 for e in self.fork.blkx}
        m = self.map
        for i in range(len(m)):
            bi = m.blkx[i]
            kind = m.kind[i]
            if bi < 0 or crcs.get(bi) is None or kind in (codecs.IGNORE, udif.GAP):
                continue
            n = m.start[i + 1] - m.start[i]
            if kind == codecs.ZERO_FILL:
                crcs[bi] = crc32_zeros(crcs[bi], n)
                continue
            try:
                if kind == codecs.RAW:
                    crc, pos = 0, 0
                    while pos < n:
                        piece = self.backend.read_exact(m.offset[i] + pos,
                                                        min(1 << 20, n - pos), "raw chunk")
                        crc = zlib.crc32(piece, crc)
                        pos += len(piece)
                else:
                    crc = zlib.crc32(self._decode(i))
            except FormatError as e:
                problems.append(e.message)
                crcs[bi] = None
                continue
            crcs[bi] = crc32_combine(crcs[bi], crc, n)
        return crcs

    # -- facts ------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        k = self.koly
        kinds: dict[str, int] = {}
        stored = 0
        m = self.map
        for i in range(len(m)):
            if m.kind[i] != udif.GAP:
                name = codecs.NAMES[m.kind[i]]
                kinds[name] = kinds.get(name, 0) + 1
                stored += m.length[i]
        partitions = [{"index": e.index, "name": e.name, "id": e.id,
                       "start": e.table.SectorNumber * SECTOR,
                       "length": e.table.SectorCount * SECTOR,
                       "chunks": sum(1 for c in e.chunks
                                     if c[0] not in codecs.MARKERS)}
                      for e in self.fork.blkx]
        specific = {"variant": variant_name(kinds), "chunk-types": kinds,
                    "blkx": partitions}
        details = {
            "koly-version": k.Version, "flags": k.Flags,
            "data-fork-offset": k.DataForkOffset, "data-fork-length": k.DataForkLength,
            "xml-offset": k.XMLOffset, "xml-length": k.XMLLength,
            "rsrc-fork-offset": k.RsrcForkOffset, "rsrc-fork-length": k.RsrcForkLength,
            "segment": f"{k.SegmentNumber}/{k.SegmentCount}",
            "segment-id": k.SegmentID.hex(), "image-variant": k.ImageVariant,
            "sector-count": k.SectorCount,
            "data-checksum": _checksum_text(k.DataChecksum),
            "master-checksum": _checksum_text(k.MasterChecksum),
            "stored-bytes": stored,
            "resources": {kind: items for kind, items in self.fork.other.items()},
        }
        return ImageInfo(filename=self.path, format=self.format, virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(),
                         format_specific=specific, details=details)

    def close(self) -> None:
        if not self.closed and (getattr(self, "_ahead", None) or
                                getattr(self, "_running", None)):
            with self._lock:
                self._cancel_ahead(wait=True)
        super().close()


class _Failed:
    """A read-ahead decode that failed: the error surfaces only if the chunk is read."""

    def __init__(self, exc: Exception):
        self.exc = exc


def master_checksum(entries) -> int:
    """CRC-32 over the blkx CRC-32s, each as 4 big-endian bytes, in plist order."""
    crc = 0
    for e in entries:
        if e.checksum is not None:
            crc = zlib.crc32(e.checksum.to_bytes(4, "big"), crc)
    return crc


def variant_name(kinds: dict[str, int]) -> str:
    """hdiutil's name for an image with these chunk types (the compressed one wins)."""
    for name, variant in (("lzma", "ULMO"), ("lzfse", "ULFO"), ("bzip2", "UDBZ"),
                          ("zlib", "UDZO"), ("adc", "UDCO")):
        if name in kinds:
            return variant
    return "UDRO"


def _checksum_text(ck) -> str:
    value = udif.checksum_value(ck)
    if value is not None:
        return f"CRC32 {value:08x}"
    return "none" if ck.Type == 0 else f"type {ck.Type}"
