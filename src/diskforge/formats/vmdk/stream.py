"""Writing streamOptimized VMDKs, as ESXi, vSphere's OVF import, AWS VM Import and
VirtualBox accept them.

The layout (Virtual Disk Format 5.0, "Stream-Optimized Compressed Sparse Extents"),
written front to back in one pass:

    sector 0      header: version 3, flags newline test + compressed + markers
                  (0x30001, what VMware's tools write: no redundant directory),
                  compressAlgorithm 1 (deflate), gdOffset GD_AT_END
    sector 1-20   the descriptor (open-vmdk's keys, see ``layout.build_descriptor``)
    sector 128    grains (overHead 128, as VMware's and VirtualBox's files): each a
                  grain marker (lba, compressed size), the zlib stream, zeros to the
                  sector's end; all-zero grains are not written
                  after the last grain of each grain table's span: a GT marker and the
                  table (4 sectors); a table with no grains is left out, its directory
                  entry 0 (VirtualBox writes it so)
    ...           GD marker and the grain directory
                  footer marker and the footer: the header again with the real gdOffset
                  the end-of-stream marker: a zero sector, the file's last

The footer sits at the file's end minus 1 KiB, where VirtualBox looks for it when the
header says GD_AT_END, and the end-of-stream marker is what qemu-img's output lacks
(qemu issue 1357: ESXi's OVF import refuses such files).

Compression runs in convert's thread pool: ``prepare`` deflates whole grains (zlib
releases the GIL), ``write_prepared`` lays them out in order, so the output is the same
whatever the number of threads. Grain parts (a disk whose size is not a whole number of
sectors, or writes that do not cover a grain at once) are gathered and compressed when
the writer moves past them. The last grain of a disk that is not a whole number of
grains is stored as a whole grain, zero-padded (see ``_deflate``).
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from array import array

from ...atomic import AtomicFile
from ...blockdev import ImageWriter, is_zero
from ...byteorder import le_bytes
from ...errors import UnsupportedError, UsageError
from .descriptor import ExtentLine
from .layout import (GT_SECTORS, SparseLayout, build_descriptor, capacity_sectors,
                     new_cid, sparse_header)
from .structs import (COMPRESSION_DEFLATE, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES_PER_GT,
                      FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE_TEST, GD_AT_END,
                      MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
                      MetadataMarker, sectors)
from .writer import check_request

GRAIN_BYTES = DEFAULT_GRAIN_SECTORS * SECTOR
STREAM_VERSION = 3        # ESXi refuses stream files below 3 ("sparse VMDK version too old")
STREAM_FLAGS = FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS
STREAM_OVERHEAD = 128     # grains start here, as in VMware's and VirtualBox's files
ZLIB_LEVEL = 6            # qemu's Z_DEFAULT_COMPRESSION: sizes comparable to qemu-img's
_FLUSH_AT = 4 << 20
_GRAIN_MARKER = struct.Struct("<QI")   # spec: lba, size (GrainMarker in structs)


def metadata_marker(kind: int, num_sectors: int) -> bytes:
    """A metadata marker sector (spec: "Stream-Optimized ... Markers")."""
    return MetadataMarker.build(dict(numSectors=num_sectors, size=0, type=kind,
                                     pad=bytes(496)))


class StreamWriter(ImageWriter):
    """streamOptimized output (see the module docstring). ``seed`` fixes the random
    CID and longContentID (reproducible output); None draws them from the system."""

    parallel = True
    granularity = GRAIN_BYTES

    def __init__(self, path: str, size: int, options, backing=None, *,
                 seed: int | None = None):
        check_request(path, size, options, backing)
        if backing is not None:
            raise UnsupportedError("not supported yet: streamOptimized delta disks"
                                   " (VMware's tools write stream VMDKs without a parent;"
                                   " use subformat=monolithicSparse for a delta disk)",
                                   path)
        self.path = path
        self.options = options
        self.rng = random.Random(seed if seed is not None else os.urandom(16))
        self.cap = capacity_sectors(size)
        self.size = size
        self.disk_bytes = self.cap * SECTOR
        self.layout = SparseLayout(self.cap)
        self.gd = array("I", bytes(4 * self.layout.gt_count))
        self.gt: array | None = None
        self.gt_index = -1
        self.last_grain = -1
        self.pending: tuple[int, bytearray] | None = None
        self.pos = STREAM_OVERHEAD            # the next sector to write
        self.wbuf = bytearray()
        self.wbuf_at = self.pos
        self.out = AtomicFile(path, trailer="end-of-stream marker", stream=True)

    def _grain_len(self, grain: int) -> int:
        """Bytes of disk grain ``grain`` holds (the last one may be short)."""
        return min(GRAIN_BYTES, self.disk_bytes - grain * GRAIN_BYTES)

    def _deflate(self, data) -> bytes:
        """A grain's zlib stream. A short last grain is padded with zeros to a whole
        grain: 7-Zip reports a data error on a grain that inflates to less (qemu and
        libvmdk take either; open-vmdk writes the short form)."""
        if len(data) < GRAIN_BYTES:
            data = bytes(data) + bytes(GRAIN_BYTES - len(data))
        return zlib.compress(data, ZLIB_LEVEL)

    # -- the parallel stage ------------------------------------------------------------------
    def prepare(self, offset: int, data):
        """Deflate the whole grains of ``data``; parts of grains are copied out raw.
        Thread-safe: reads only fixed fields. Returns ``(grain, blob)`` for a grain
        (``blob`` None when it is all zeros) and ``(-1 - offset, bytes)`` for a part."""
        mv = memoryview(data).cast("B")
        out = []
        pos, end = offset, offset + len(mv)
        while pos < end:
            grain, inside = divmod(pos, GRAIN_BYTES)
            gend = grain * GRAIN_BYTES + self._grain_len(grain)
            if inside == 0 and end >= gend:
                chunk = mv[pos - offset:gend - offset]
                blob = self._deflate(chunk)
                if len(blob) < 256 and is_zero(chunk):
                    blob = None   # all zeros: the grain is skipped
                out.append((grain, blob))
                pos = gend
            else:
                k = min(end, (grain + 1) * GRAIN_BYTES) - pos
                out.append((-1 - pos, bytes(mv[pos - offset:pos - offset + k])))
                pos += k
        return out

    # -- in order ----------------------------------------------------------------------------
    def write_prepared(self, offset: int, prepared) -> None:
        for key, blob in prepared:
            if key >= 0:
                self._flush_pending()
                self._grain(key, blob)
            else:
                pos = -1 - key
                grain, inside = divmod(pos, GRAIN_BYTES)
                if self.pending is not None and self.pending[0] != grain:
                    self._flush_pending()
                if self.pending is None:
                    self.pending = (grain, bytearray(self._grain_len(grain)))
                self.pending[1][inside:inside + len(blob)] = blob

    def zero(self, offset: int, length: int) -> None:
        """A new stream disk reads zeros wherever no grain was written."""

    def _flush_pending(self) -> None:
        if self.pending is None:
            return
        grain, buf = self.pending
        self.pending = None
        if not is_zero(buf):
            self._grain(grain, self._deflate(buf))

    def _write(self, data) -> None:
        self.wbuf += data
        self.pos += sectors(len(data))
        pad = -len(self.wbuf) % SECTOR
        if pad:
            self.wbuf += bytes(pad)
        if len(self.wbuf) >= _FLUSH_AT:
            self._drain()

    def _drain(self) -> None:
        if self.wbuf:
            self.out.pwrite(self.wbuf_at * SECTOR, self.wbuf)
        self.wbuf = bytearray()
        self.wbuf_at = self.pos

    def _grain(self, grain: int, blob: bytes | None) -> None:
        if blob is None:
            return
        if grain <= self.last_grain:
            raise UsageError(f"internal: stream grains out of order ({grain} after"
                             f" {self.last_grain})", self.path)
        self.last_grain = grain
        gt_index, entry = divmod(grain, DEFAULT_GTES_PER_GT)
        if gt_index != self.gt_index:
            self._close_table()
            self.gt_index = gt_index
            self.gt = array("I", bytes(4 * DEFAULT_GTES_PER_GT))
        if self.pos > 0xFFFFFFFF:
            raise UsageError("the stream would pass 2 TiB, beyond 32-bit grain offsets",
                             self.path)
        self.gt[entry] = self.pos
        self._write(_GRAIN_MARKER.pack(grain * DEFAULT_GRAIN_SECTORS, len(blob)) + blob)

    def _close_table(self) -> None:
        if self.gt is None:
            return
        self._write(metadata_marker(MARKER_GT, GT_SECTORS))
        self.gd[self.gt_index] = self.pos
        self._write(le_bytes(self.gt))
        self.gt = None

    def _finish(self) -> None:
        self._flush_pending()
        self._close_table()
        lay = self.layout
        self._write(metadata_marker(MARKER_GD, lay.gd_sectors))
        gd_at = self.pos
        self._write(le_bytes(self.gd))
        header = dict(version=STREAM_VERSION, flags=STREAM_FLAGS, rgd_offset=0,
                      overhead=STREAM_OVERHEAD, compress=COMPRESSION_DEFLATE)
        self._write(metadata_marker(MARKER_FOOTER, 1))
        self._write(sparse_header(lay, gd_offset=gd_at, **header))
        self._write(metadata_marker(MARKER_EOS, 0))
        self._drain()
        name = os.path.basename(self.path)
        desc = build_descriptor(subformat="streamOptimized", capacity=self.cap,
                                extents=[ExtentLine("RW", self.cap, "SPARSE", name)],
                                options=self.options, cid=new_cid(self.rng), rng=self.rng)
        text = desc.render().encode("utf-8")
        if len(text) > lay.descriptor_sectors * SECTOR:
            raise UsageError("internal: the stream descriptor does not fit", self.path)
        self.out.pwrite(lay.descriptor_offset * SECTOR, text)
        self.out.pwrite(0, sparse_header(lay, gd_offset=GD_AT_END, **header))

    def abort(self) -> None:
        self.out.discard()
