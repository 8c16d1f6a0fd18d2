"""Sparse extents: hosted ``KDMV`` files (monolithicSparse, twoGbMaxExtentSparse,
streamOptimized) and ESX ``COWD`` files (vmfsSparse snapshot deltas).

Both map the extent through a grain directory (GD) of grain tables (GT) of 32-bit
grain table entries (GTE), each the sector where a grain lives (spec: "Grain Tables";
qemu's ``get_cluster_offset``). A GTE of 0 is unallocated (read from the parent, or
zeros); with the zeroed-grain flag a GTE of 1 reads as zeros even over a parent.
Compressed grains (``compressAlgorithm`` 1, what streamOptimized uses) are zlib
streams, after a grain marker (lba, size) when the markers flag is set.

Everything a header says is checked before it sizes anything: grain size a power of
two of 1-128 sectors, at most 512 entries per grain table (as qemu), the grain
directory inside the file and within the memory budget, every grain table it names
inside the file. A compressed grain never inflates past the grain
(``decompressobj`` with ``max_length``), and its marker must name the grain that
points at it.

Writing in place (uncompressed hosted sparse only): a new grain is appended at the
end of the file (rounded to a grain, as qemu), filled whole (the rest from below),
and only then are the GTEs in the primary and the redundant directory's tables set,
so a crash leaves at worst an unreferenced grain. A grain table the directory lacks
is appended too (both copies).
"""

from __future__ import annotations

import struct
import zlib
from array import array

from ... import deflate, parallel
from ...blockdev import FileBackend, fill_zero, pieces, skip_filled
from ...byteorder import le_array, le_bytes
from ...errors import DiskforgeError, FormatError, UnsupportedError
from ...limits import check_alloc
from .extents import DATA, UNALLOCATED, ZERO, Below, VmdkExtent
from .structs import (COMPRESSION_DEFLATE, COMPRESSION_NONE, COWD_GTES_PER_GT,
                      COWD_HEADER_SIZE, FLAG_MARKERS, FLAG_REDUNDANT_GT,
                      FLAG_VALID_NEWLINE_TEST, FLAG_ZEROED_GRAIN_GTE, FOOTER_FROM_END,
                      GD_AT_END, GRAIN_MARKER_SIZE, GTE_ZEROED, MARKER_EOS, MARKER_FOOTER,
                      MAX_GRAIN_SECTORS, NEWLINE_TEST, SECTOR, SPARSE_HEADER_SIZE,
                      SPARSE_MAGIC, COWDiskHeader, MetadataMarker,
                      SparseExtentHeader)

# GrainMarker (lba, size) as struct.unpack_from reads it: construct's parse costs more than
# inflating a small grain, and it runs once per grain
_GRAIN_MARKER = struct.Struct("<QI")
MAX_GTES_PER_GT = 512           # qemu refuses more ("L2 table size too big")
GT_CACHE = 4096                 # grain tables kept per extent (8 MiB at 512 entries)
AHEAD_MAX = 8 << 20             # the largest read whose successor is decoded ahead
MAX_CAPACITY = (1 << 63) // SECTOR


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SparseExtent(VmdkExtent):
    """A grain-directory extent. Built by :func:`open_hosted` or :func:`open_cowd`."""

    structure = "SparseExtentHeader"

    def __init__(self, backend: FileBackend, *, capacity: int, grain_sectors: int,
                 gtes: int, gd_at: int, rgd_at: int, ngt: int, type_: str,
                 access: str = "RW", structure: str = "SparseExtentHeader") -> None:
        super().__init__(capacity, access)
        self.structure = structure
        self.backend = backend
        self.path = backend.path
        self.type = type_
        self.grain = grain_sectors * SECTOR
        self.grain_sectors = grain_sectors
        self.cluster_size = self.grain
        self.gtes = gtes
        self.gt_bytes = gtes * 4
        self.gd_at, self.rgd_at, self.ngt = gd_at, rgd_at, ngt
        self.zeroed_grains = False
        self.compressed = False
        self.markers = False
        self.file_size = backend.size
        self._gts: dict[int, array] = {}         # grain tables by sector
        self._empty: dict[int, bool] = {}        # whether a table maps nothing
        self._hole = (0, 0)                      # a run of the file known to be a hole
        self._last_grain: tuple[int, bytes] | None = None
        self._ahead: parallel.Ahead | None = None   # the next read, being decoded
        self._read_end = -1                       # where the last read ended
        self.gd = self._read_directory(gd_at, "gdOffset")
        self.rgd = self._read_directory(rgd_at, "rgdOffset") if rgd_at else None

    # -- tables ---------------------------------------------------------------------------
    def _err(self, message: str, field: str | None = None,
             structure: str | None = None) -> FormatError:
        return FormatError(message, self.path, structure=structure or self.structure,
                           field=field)

    def _read_directory(self, at: int, field: str) -> array:
        nbytes = self.ngt * 4
        check_alloc(nbytes, self.path, self.structure, field)
        if at < 0 or at + nbytes > self.file_size:
            raise self._err(f"the grain directory at byte {at} ({self.ngt} entries) is"
                            f" past the end of the file ({self.file_size} bytes)", field)
        gd = le_array(self.backend.read_exact(at, nbytes, "grain directory"), "I")
        if len(gd):
            last = max(gd)
            if last and last * SECTOR + self.gt_bytes > self.file_size:
                i = gd.index(last)
                raise self._err(f"entry {i} points at a grain table at sector {last},"
                                f" past the end of the file ({self.file_size} bytes)",
                                f"{field} (grain directory entry {i})")
        return gd

    def _gt(self, i: int) -> array | None:
        """Grain table ``i`` of the primary directory (None: not allocated). Cached by
        the table's sector, so directory entries naming one table share it."""
        at = self.gd[i]
        if not at:
            return None
        gt = self._gts.get(at)
        if gt is not None:
            return gt
        raw = self.backend.read_exact(at * SECTOR, self.gt_bytes, "grain table")
        if len(self._gts) >= GT_CACHE:
            self._gts.clear()
        gt = self._gts[at] = le_array(raw, "I")
        return gt

    def _table_empty(self, i: int) -> bool:
        """Whether grain table ``i`` (allocated) maps nothing. qemu allocates every
        grain table of a new disk without writing it: a 64 TiB disk has 8 GiB of them,
        all holes of the file, which one SEEK_DATA per run of holes answers without
        reading a table."""
        at = self.gd[i] * SECTOR
        if self._hole[0] <= at and at + self.gt_bytes <= self._hole[1]:
            return True
        known = self._empty.get(at)
        if known is not None:
            return known
        data_at = next((o for o, _, d in self.backend.data_ranges(at, self.file_size)
                        if d), self.file_size)
        if at + self.gt_bytes <= data_at:
            self._hole = (at, data_at)
            return True
        gt = self._gt(i)
        if len(self._empty) >= GT_CACHE:
            self._empty.clear()
        empty = self._empty[at] = skip_filled(gt, 0, len(gt)) == len(gt)
        return empty

    def entry(self, g: int) -> int:
        """The GTE of grain ``g`` (0 when its grain table is not allocated)."""
        i, j = divmod(g, self.gtes)
        gt = self._gt(i)
        return 0 if gt is None else gt[j]

    def _zeroed(self, e: int) -> bool:
        return self.zeroed_grains and e == GTE_ZEROED

    # -- reading ---------------------------------------------------------------------------
    def readinto(self, offset: int, mv: memoryview, below: Below) -> None:
        grain = self.grain
        run_host = run_at = run_len = 0      # consecutive uncompressed grains: one read
        compressed = []                      # (grain, sector, start in it, dst): at once

        def flush() -> None:
            if run_len:
                got = self.backend.readinto(run_host, mv[run_at:run_at + run_len])
                if got < run_len:  # past the end of the file: zeros (check reports it)
                    fill_zero(mv, run_at + got, run_at + run_len)

        for pos, n in pieces(offset, len(mv), grain):
            at = pos - offset
            g, inside = divmod(pos, grain)
            e = self.entry(g)
            if e == 0 or self._zeroed(e):
                flush()
                run_len = 0
                if e == 0:
                    below(pos, mv, at, at + n)
                else:
                    fill_zero(mv, at, at + n)
            elif self.compressed:
                compressed.append((g, e, inside, mv[at:at + n]))
            else:
                host = e * SECTOR + inside
                if run_len and run_host + run_len == host and run_at + run_len == at:
                    run_len += n
                else:
                    flush()
                    run_host, run_at, run_len = host, at, n
        flush()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and compressed and ahead.serve(
                [(g, e, inside, len(dst)) for g, e, inside, dst in compressed],
                [dst for _, _, _, dst in compressed]):
            pass
        elif len(compressed) == 1:
            g, e, inside, dst = compressed[0]
            self._place(g, e, self._inflate(g, e), inside, dst)
        elif compressed:
            parallel.run(self._decoder(compressed, cache_last=True), range(len(compressed)))
        elif ahead is not None:
            ahead.drop()
        # a reader walking forward (convert): the next range of this size is decoded
        # ahead while the caller uses this one
        n = len(mv)
        if len(compressed) > 1 and offset == self._read_end and n <= AHEAD_MAX and \
                parallel.threads() > 1:
            self._ahead = self._read_ahead(offset + n, min(n, self.size - offset - n))
        self._read_end = offset + n

    def _place(self, g: int, e: int, data, inside: int, dst: memoryview) -> None:
        if inside + len(dst) > len(data):
            raise self._err(f"grain {g} (sector {e}) decompresses to {len(data)}"
                            f" bytes, less than the {inside + len(dst)} read from it",
                            "grain", "GrainTable")
        dst[:] = memoryview(data)[inside:inside + len(dst)]

    def _decoder(self, units: list, *, cache_last: bool):
        """``decode(k)`` for the compressed grains ``(grain, sector, start in it,
        dst)`` of one read, run in parallel (``parallel.run``), each into its place.
        A stream's grains follow each other in the file, so where the next grain of the
        read starts bounds this one's marker and data: all of them come in one pread
        (``parallel.gather``, here), and a grain whose marker says more than that is
        read on its own, as before. The checks are those of ``_inflate``, made in the
        worker, and the first failing grain's error is the one raised."""
        limit = 2 * self.grain + SECTOR + (GRAIN_MARKER_SIZE if self.markers else 0)
        fsize = self.file_size
        spans = []
        for k, (g, e, _, _) in enumerate(units):
            host = e * SECTOR
            room = max(0, fsize - host)
            nxt = units[k + 1][1] * SECTOR if k + 1 < len(units) else 0
            if self.markers and host < nxt <= host + limit:
                spans.append((host, min(nxt - host, room)))
            elif self.markers:
                spans.append((host, min(self.grain + 2 * SECTOR, room)))
            else:
                spans.append((host, min(limit, room)))
        views = parallel.gather(self.backend, spans)
        last = len(units) - 1 if cache_last else -1

        def decode(k: int) -> None:
            g, e, inside, dst = units[k]
            data = self._inflate(g, e, views[k])
            self._place(g, e, data, inside, dst)
            if k == last and inside + len(dst) < len(data):
                self._last_grain = (e, data)   # the next read goes on in it

        return decode

    def _read_ahead(self, start: int, n: int) -> "parallel.Ahead | None":
        """Start decoding the compressed grains of ``[start, start+n)`` into a buffer
        of our own (at most ``AHEAD_MAX``), on the pool."""
        if n <= 0:
            return None
        try:
            keys = []
            for pos, k in pieces(start, n, self.grain):
                g, inside = divmod(pos, self.grain)
                e = self.entry(g)
                if e and not self._zeroed(e):
                    keys.append((g, e, inside, k, pos - start))
            if len(keys) < 2:
                return None
            buf = memoryview(bytearray(n))
            units = [(g, e, inside, buf[at:at + k]) for g, e, inside, k, at in keys]
            decode = self._decoder(units, cache_last=False)
        except DiskforgeError:
            return None   # the read that needs these reports it, in its turn
        return parallel.Ahead([key[:4] for key in keys], [u[3] for u in units],
                              parallel.start(decode, range(len(units))), len(units))

    def close(self) -> None:
        """Drop read-ahead, waiting for decodes in flight (before the file closes)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.drop()

    def _inflate(self, g: int, e: int, view: memoryview | None = None) -> bytes:
        """Grain ``g``, stored compressed at sector ``e``, decompressed (once: the last
        one is kept, so a read call walking a grain in pieces inflates it once).
        ``view``: the file's bytes from the grain on, when already read (a parallel
        read; then nothing is cached here); what it lacks is read from the file."""
        if view is None and self._last_grain is not None and self._last_grain[0] == e:
            return self._last_grain[1]
        host = e * SECTOR
        limit = 2 * self.grain + SECTOR      # what qemu reads for one grain
        if self.markers:
            head = view[:GRAIN_MARKER_SIZE] if view is not None and \
                len(view) >= GRAIN_MARKER_SIZE else \
                self.backend.read_exact(host, GRAIN_MARKER_SIZE, f"grain marker of grain {g}")
            lba, size = _GRAIN_MARKER.unpack_from(head)   # GrainMarker, per grain
            want = g * self.grain_sectors
            if lba != want:
                raise self._err(f"the marker at sector {e} says lba {lba}, but grain"
                                f" table entry for grain {g} (lba {want}) points at it",
                                "lba", "GrainMarker")
            if size == 0 or size > limit:
                raise self._err(f"compressed grain {g} at sector {e} claims {size}"
                                f" bytes (at most {limit} for a {self.grain}-byte grain)",
                                "size", "GrainMarker")
            if host + GRAIN_MARKER_SIZE + size > self.file_size:
                raise self._err(f"compressed grain {g} at sector {e} (+{size} bytes)"
                                " runs past the end of the file", "size", "GrainMarker")
            end = GRAIN_MARKER_SIZE + size
            raw = view[GRAIN_MARKER_SIZE:end] if view is not None and len(view) >= end \
                else self.backend.pread(host + GRAIN_MARKER_SIZE, size)
        else:
            want = min(limit, max(0, self.file_size - host))
            raw = view if view is not None and len(view) == want else \
                self.backend.pread(host, want)
        data = self._decompress(raw, g, e)
        if view is None:
            self._last_grain = (e, data)
        return data

    def _decompress(self, raw: bytes, g: int, e: int) -> bytes:
        for wbits in (15, -15):             # zlib streams (VMware, qemu); raw deflate
            d = deflate.decompressobj(wbits)
            try:
                out = d.decompress(raw, self.grain)
                if not d.eof and d.decompress(d.unconsumed_tail, 1):
                    raise self._err(f"compressed grain {g} at sector {e} inflates past"
                                    f" the {self.grain}-byte grain", "grain", "GrainTable")
                if not d.eof:
                    raise zlib.error("the stream ends early (truncated)")
                return out
            except deflate.ERRORS as exc:
                err = exc
        raise self._err(f"compressed grain {g} at sector {e} does not inflate: {err}",
                        "grain", "GrainTable")

    def map(self, offset: int, length: int):
        grain, gtes = self.grain, self.gtes
        pos, end = offset, offset + length
        last_g = (end - 1) // grain
        while pos < end:
            g = pos // grain
            i, j = divmod(g, gtes)
            last_i = last_g // gtes + 1
            k = i
            while k < last_i:
                if not self.gd[k]:
                    k = skip_filled(self.gd, k, last_i)
                elif self._table_empty(k):
                    k += 1
                else:
                    break
            if k > i:
                stop = min(end, k * gtes * grain)
                yield pos, stop - pos, UNALLOCATED, None
                pos = stop
                continue
            gt = self._gt(i)
            e = gt[j]
            if e == 0:
                limit = min(gtes, last_g - i * gtes + 1)
                nxt = skip_filled(gt, j + 1, limit)
                stop = min(end, (i * gtes + nxt) * grain)
                yield pos, stop - pos, UNALLOCATED, None
                pos = stop
                continue
            stop = min(end, (g + 1) * grain)
            if self._zeroed(e):
                yield pos, stop - pos, ZERO, None
            elif not self.compressed:
                # grains stored one after another (qemu-img and VMware write them in
                # disk order) are one run: one extent per run, not per grain, spares
                # convert an Extent and a coalesce step per 64 KiB (cProfile: 0.1 s of
                # a 512 MiB vmdk->raw)
                limit = min(gtes, last_g - i * gtes + 1)
                step = self.grain_sectors
                jj, want = j + 1, e + step
                while jj < limit and gt[jj] == want:
                    jj += 1
                    want += step
                stop = min(end, (i * gtes + jj) * grain)
                yield pos, stop - pos, DATA, e * SECTOR + pos - g * grain
            else:
                yield pos, stop - pos, DATA, None
            pos = stop

    # -- writing -------------------------------------------------------------------------
    def write(self, offset: int, mv: memoryview, below: Below) -> None:
        grain = self.grain
        for pos, n in pieces(offset, len(mv), grain):
            at = pos - offset
            g, inside = divmod(pos, grain)
            e = self.entry(g)
            if e and not self._zeroed(e):
                self.backend.pwrite(e * SECTOR + inside, mv[at:at + n])
                continue
            start = g * grain
            if n == grain:
                data = mv[at:at + n]
            else:  # a new grain holds what the disk showed around the write
                buf = bytearray(grain)
                whole = min(grain, self.size - start)
                if e == 0:
                    below(start, memoryview(buf), 0, whole)
                buf[inside:inside + n] = mv[at:at + n]
                data = buf
            self._set(g, self._append_grain(data))

    def write_zeroes(self, offset: int, length: int, below: Below | None) -> None:
        grain = self.grain
        for pos, n in pieces(offset, length, grain):
            g = pos // grain
            e = self.entry(g)
            if self._zeroed(e) or (e == 0 and below is None):
                continue                    # reads as zeros already
            if n == grain and self.zeroed_grains:
                self._set(g, GTE_ZEROED)
                continue
            self.write(pos, memoryview(bytes(n)), below or _zeros)

    def _append_grain(self, data) -> int:
        at = -(-self.file_size // self.grain) * self.grain
        self.backend.pwrite(at, data)
        self.file_size = at + self.grain
        return at // SECTOR

    def _set(self, g: int, value: int) -> None:
        i, j = divmod(g, self.gtes)
        entry = array("I", [value])
        for gd, gd_at in ((self.gd, self.gd_at), (self.rgd, self.rgd_at)):
            if gd is None:
                continue
            if not gd[i]:
                self._new_table(gd, gd_at, i)
            self.backend.pwrite(gd[i] * SECTOR + 4 * j, le_bytes(entry))
        gt = self._gts.get(self.gd[i])
        if gt is not None:
            gt[j] = value
        self._empty.pop(self.gd[i] * SECTOR, None)
        self._hole = (0, 0)
        self._last_grain = None

    def _new_table(self, gd: array, gd_at: int, i: int) -> None:
        """Append an empty grain table for directory entry ``i`` and record it."""
        at = -(-self.file_size // SECTOR) * SECTOR
        self.backend.pwrite(at, bytes(-(-self.gt_bytes // SECTOR) * SECTOR))
        self.file_size = at + -(-self.gt_bytes // SECTOR) * SECTOR
        gd[i] = at // SECTOR
        self.backend.pwrite(gd_at + 4 * i, le_bytes(array("I", [gd[i]])))
        self._hole = (0, 0)

    def clear(self) -> None:
        """Unmap every grain (commit's make_empty): every grain table zeroed in both
        directories. The grains stay in the file until a convert drops them."""
        empty = bytes(self.gt_bytes)
        for gd in (self.gd, self.rgd):
            if gd is None:
                continue
            i, n = 0, len(gd)
            while i < n:
                i = skip_filled(gd, i, n)
                if i < n:
                    self.backend.pwrite(gd[i] * SECTOR, empty)
                i += 1
        self._gts.clear()
        self._empty.clear()
        self._last_grain = None


def _zeros(offset: int, mv: memoryview, start: int, end: int) -> None:
    fill_zero(mv, start, end)


def open_hosted(backend: FileBackend, access: str = "RW", type_: str = "SPARSE",
                header: bytes | None = None) -> SparseExtent:
    """A hosted sparse (``KDMV``) extent, validated (module docstring)."""
    path = backend.path
    size = backend.size
    if header is None:
        if size < SPARSE_HEADER_SIZE:
            raise FormatError(f"the file is {size} bytes, too small for the 512-byte"
                              " header: truncated", path, structure="SparseExtentHeader")
        header = backend.read_exact(0, SPARSE_HEADER_SIZE, "sparse extent header")
    h = SparseExtentHeader.parse(header)
    notes: list[str] = []
    footer_used = False
    if h.gdOffset == GD_AT_END:
        h = _footer(backend, path, size)
        footer_used = True

    def err(message: str, field: str) -> FormatError:
        return FormatError(message, path, structure="SparseExtentHeader", field=field)

    if h.magicNumber != SPARSE_MAGIC:
        raise err("no 'KDMV' magic", "magicNumber")
    if not 1 <= h.version <= 3:
        raise UnsupportedError(f"not supported yet: hosted sparse extent version"
                               f" {h.version} (versions 1, 2 and 3 are read)", path)
    if not _power_of_two(h.grainSize) or h.grainSize > MAX_GRAIN_SECTORS:
        raise err(f"{h.grainSize} sectors is not a power of two from 1 to"
                  f" {MAX_GRAIN_SECTORS}", "grainSize")
    if not 1 <= h.numGTEsPerGT <= MAX_GTES_PER_GT:
        raise err(f"{h.numGTEsPerGT} entries per grain table (1 to {MAX_GTES_PER_GT})",
                  "numGTEsPerGT")
    if not 0 < h.capacity <= MAX_CAPACITY:
        raise err(f"{h.capacity} sectors is not a disk size", "capacity")
    if h.compressAlgorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        raise UnsupportedError(f"not supported yet: VMDK compressAlgorithm"
                               f" {h.compressAlgorithm}", path)
    if h.flags & FLAG_VALID_NEWLINE_TEST and h.newlineTest != NEWLINE_TEST:
        notes.append("the newline test characters are altered: the file was probably"
                     " transferred in text mode (FTP ASCII) and is damaged")
    per_gt = h.grainSize * h.numGTEsPerGT
    ngt = -(-h.capacity // per_gt)
    rgd = h.rgdOffset if h.flags & FLAG_REDUNDANT_GT else 0
    if h.gdOffset * SECTOR >= size:
        raise err(f"sector {h.gdOffset} is past the end of the file ({size} bytes)",
                  "gdOffset")
    ext = SparseExtent(backend, capacity=h.capacity, grain_sectors=h.grainSize,
                       gtes=h.numGTEsPerGT, gd_at=h.gdOffset * SECTOR,
                       rgd_at=rgd * SECTOR, ngt=ngt, type_=type_, access=access)
    ext.header = h
    ext.version = h.version
    ext.flags = h.flags
    ext.footer_used = footer_used
    ext.notes = notes
    ext.zeroed_grains = bool(h.flags & FLAG_ZEROED_GRAIN_GTE)
    ext.compressed = h.compressAlgorithm == COMPRESSION_DEFLATE
    ext.markers = bool(h.flags & FLAG_MARKERS)
    # writing in place: uncompressed only, and not version 3 (changed-block tracking,
    # which qemu opens read-only too)
    ext.writable = not ext.compressed and h.version < 3 and not footer_used
    return ext


def _footer(backend: FileBackend, path: str, size: int):
    """The footer of a stream-optimized extent: footer marker, footer, end-of-stream
    marker in the last three sectors, as qemu finds it."""
    if size < SPARSE_HEADER_SIZE + FOOTER_FROM_END:
        raise FormatError("gdOffset is GD_AT_END but the file is too small for a footer",
                          path, structure="SparseExtentHeader", field="gdOffset")
    raw = backend.read_exact(size - FOOTER_FROM_END, FOOTER_FROM_END, "footer")
    fm = MetadataMarker.parse(raw[:SECTOR])
    eos = MetadataMarker.parse(raw[2 * SECTOR:])
    if fm.size != 0 or fm.type != MARKER_FOOTER or raw[SECTOR:SECTOR + 4] != SPARSE_MAGIC \
            or eos.numSectors != 0 or eos.size != 0 or eos.type != MARKER_EOS:
        raise FormatError("gdOffset is GD_AT_END but the last three sectors are not a"
                          " footer marker, a footer and an end-of-stream marker", path,
                          structure="SparseExtentHeader", field="gdOffset")
    h = SparseExtentHeader.parse(raw[SECTOR:2 * SECTOR])
    if h.gdOffset == GD_AT_END:
        raise FormatError("the footer's gdOffset is GD_AT_END too", path,
                          structure="footer", field="gdOffset")
    return h


def open_cowd(backend: FileBackend, access: str = "RW",
              type_: str = "VMFSSPARSE") -> SparseExtent:
    """An ESX ``COWD`` extent (vmfsSparse deltas): 4096 entries per grain table."""
    path = backend.path
    size = backend.size
    if size < COWD_HEADER_SIZE:
        raise FormatError(f"the file is {size} bytes, too small for the 2048-byte COWD"
                          " header: truncated", path, structure="COWDiskHeader")
    h = COWDiskHeader.parse(backend.read_exact(0, COWD_HEADER_SIZE, "COWD header"))

    def err(message: str, field: str) -> FormatError:
        return FormatError(message, path, structure="COWDiskHeader", field=field)

    if not _power_of_two(h.grainSize) or h.grainSize > MAX_GRAIN_SECTORS:
        raise err(f"{h.grainSize} sectors is not a power of two from 1 to"
                  f" {MAX_GRAIN_SECTORS}", "grainSize")
    if h.numSectors == 0:
        raise err("0 sectors", "numSectors")
    need = -(-h.numSectors // (h.grainSize * COWD_GTES_PER_GT))
    if h.numGDEntries < need:
        raise err(f"{h.numGDEntries} grain directory entries cannot map"
                  f" {h.numSectors} sectors (needs {need})", "numGDEntries")
    ext = SparseExtent(backend, capacity=h.numSectors, grain_sectors=h.grainSize,
                       gtes=COWD_GTES_PER_GT, gd_at=h.gdOffset * SECTOR, rgd_at=0,
                       ngt=need, type_=type_, access=access, structure="COWDiskHeader")
    ext.header = h
    ext.version = h.version
    ext.flags = h.flags
    ext.footer_used = False
    ext.notes = []
    ext.writable = False
    return ext

