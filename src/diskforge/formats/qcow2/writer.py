"""The sequential qcow2 writer behind ``create`` and ``convert -O qcow2``.

Extents arrive in increasing offset order, so host clusters are handed out in order
too: cluster 0 holds the header, the L1 table follows, then data clusters with each
L2 table placed just before the first cluster it maps (qemu's own layout), and the
refcount table and blocks go at the end, once every cluster is known. Only the L2
table being filled is in memory; refcounts need no memory at all (every cluster is
counted once) except with compression, where a host cluster holds several
compressed clusters: then one 32-bit count per host cluster.

Compressed clusters are packed byte by byte as qemu packs them: a cluster continues
in the current host cluster's free tail, or in the next one when that one is free,
else a new one starts; a host cluster never holds more compressed clusters than its
refcount width can count. The compression itself runs in the convert pipeline's
threads (``prepare``), the packing in order (``write_prepared``).

The output is an AtomicFile (and the external data file, if any, another), so an
interrupted run leaves nothing under the final names.
"""

from __future__ import annotations

from array import array

from ...byteorder import be_array, be_bytes
from ...atomic import AtomicFile, reserve_ahead
from ...blockdev import ZEROES, Backing, ImageWriter, is_zero
from ..._fallocate import allocate
from ...errors import FormatError, ImageIOError, UnsupportedError, UsageError
from ...policy import beside
from . import bitmaps as bitmap_store
from . import codec
from .header import BitmapsExt, Header
from .refcount import all_ones_block, encode, refcount_layout
from .structs import (BME_FLAG_AUTO, COMPRESSION_ZSTD, QCOW2_AUTOCLEAR_BITMAPS,
                      QCOW2_AUTOCLEAR_DATA_FILE_RAW,
                      QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT_COMPRESSION,
                      QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_EXTL2, QCOW_MAX_L1_SIZE,
                      QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, SUBCLUSTERS, V2_HEADER_LENGTH,
                      V3_HEADER_LENGTH_WITH_COMPRESSION, Geometry)

ALL_ALLOC = (1 << SUBCLUSTERS) - 1
CBUF_FLUSH = 1 << 20




class Qcow2Writer(ImageWriter):
    def __init__(self, path: str, size: int, opts, backing: Backing | None,
                 resume: dict | None = None):
        self.path = path
        # qemu reads a qcow2's size in whole 512-byte sectors (it floors), and rounds
        # sizes up when it writes one; do the same, or a disk whose size is not a
        # multiple of 512 would lose its last bytes in qemu
        self.size = size = -(-size // 512) * 512
        self.opts = opts
        self.backing = backing
        self.version = opts.version
        self.geo = geo = Geometry(opts.cluster_size.bit_length() - 1,
                                  opts.refcount_bits.bit_length() - 1, opts.extended_l2)
        self.cs = cs = geo.cluster_size
        self.cb = geo.cluster_bits
        self.l2e, self.l2b = geo.l2_entries, geo.l2_bits
        self.ext = opts.extended_l2
        self.compress = opts.compress
        self.ctype = COMPRESSION_ZSTD if opts.compression_type == "zstd" else 0
        self.prealloc = opts.preallocation
        self.unit = geo.subcluster_size if self.ext and not self.compress else cs
        self.granularity = self.unit
        self.parallel = self.compress
        self.l1_size = geo.l1_entries_for(size)
        if self.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise UsageError(f"a {size}-byte disk needs an L1 table larger than qemu's"
                             f" {QCOW_MAX_L1_SIZE >> 20} MiB limit with {cs}-byte"
                             " clusters; use a larger cluster_size", path)
        if resume is not None and (opts.data_file or opts.preallocation != "off"):
            raise UnsupportedError("not supported yet: resuming qcow2 output with a data"
                                   " file or preallocation", path)
        self.out = AtomicFile.reopen(path, resume["partial"]) if resume is not None \
            else AtomicFile(path)
        self.data = self.out
        self.data_name = opts.data_file or None
        # clusters are appended: their blocks reserved ahead of the writes (see
        # _fallocate.ReserveAhead), for the plain layout only
        self.reserve = None
        try:
            if self.data_name:
                self.data = AtomicFile(beside(path, self.data_name))
                self.data.truncate(size)
            elif resume is None and self.prealloc == "off" and not self.compress:
                self.reserve = reserve_ahead(self.out)
        except BaseException:
            self.out.discard()
            raise
        self.l1 = array("Q", bytes(8 * self.l1_size))
        l1_clusters = -(-self.l1_size * 8 // cs)
        self.next_cluster = 1 + l1_clusters
        self.cref = array("I", [1]) * self.next_cluster if self.compress else None
        self.cur_l1i = -1
        self.cur_l2: array | None = None
        self.cur_l2_off = 0
        self.cbyte = 0                  # next free byte of the compressed stream
        self.cbuf = bytearray()
        self.cbuf_off = 0
        self.part: tuple[int, bytearray] | None = None
        self.adv = 0                    # preallocation: clusters given a host so far
        self.has_backing = backing is not None
        self.bitmaps: list = []         # DirtyBitmaps to store (convert --bitmaps)
        if resume is not None:
            self._restore(resume)

    # -- host allocation ------------------------------------------------------------------
    def _alloc(self, n: int, count: int = 1) -> int:
        c = self.next_cluster
        self.next_cluster += n
        if self.cref is not None:
            self.cref.extend(array("I", [count]) * n)
        return c

    def _l2(self, l1i: int) -> array:
        """The L2 table of ``l1i``, with a host cluster (placed before its data)."""
        if l1i != self.cur_l1i:
            if l1i < self.cur_l1i:  # tables are filled in order, each exactly once
                raise AssertionError(f"qcow2 writer went back to L2 table {l1i}")
            self._flush_l2()
            self.cur_l1i = l1i
            self.cur_l2 = array("Q", bytes(self.cs))
            self.cur_l2_off = 0
        if not self.cur_l2_off:
            self.cur_l2_off = self._alloc(1) * self.cs
        return self.cur_l2

    def _flush_l2(self) -> None:
        if self.cur_l2 is not None and self.cur_l2_off:
            self.out.pwrite(self.cur_l2_off, be_bytes(self.cur_l2))
            self.l1[self.cur_l1i] = self.cur_l2_off | QCOW_OFLAG_COPIED
        self.cur_l2 = None
        self.cur_l1i = -1
        self.cur_l2_off = 0

    def _advance(self, ci_end: int) -> None:
        """Preallocation: give every guest cluster before ``ci_end`` a host cluster,
        in guest order, each L2 table before its clusters."""
        cs, cb = self.cs, self.cb
        while self.adv < ci_end:
            c0 = self.adv
            l1i = c0 >> self.l2b
            c1 = min(ci_end, (l1i + 1) << self.l2b)
            l2 = self._l2(l1i)
            i0, i1 = c0 & (self.l2e - 1), ((c1 - 1) & (self.l2e - 1)) + 1
            if self.data_name:
                hosts = array("Q", range((c0 << cb) | QCOW_OFLAG_COPIED,
                                         (c1 << cb) | QCOW_OFLAG_COPIED, cs))
            else:
                h = self._alloc(c1 - c0) * cs
                hosts = array("Q", range(h | QCOW_OFLAG_COPIED,
                                         (h + (c1 - c0) * cs) | QCOW_OFLAG_COPIED, cs))
            if self.ext:
                l2[2 * i0:2 * i1:2] = hosts
                if not self.has_backing:
                    l2[2 * i0 + 1:2 * i1 + 1:2] = array("Q", [ALL_ALLOC]) * (i1 - i0)
            else:
                l2[i0:i1] = hosts
            self.adv = c1

    # -- the ImageWriter interface ---------------------------------------------------------
    def prepare(self, offset: int, data):
        """Compress the whole clusters of ``data`` (thread-safe: no state touched).
        Returns ``(offset, length, compressed or None, view or None)`` pieces; a view
        is a slice of ``data``, which the pipeline keeps alive until write_prepared."""
        if not self.compress:
            return data
        cs = self.cs
        mv = memoryview(data)
        out = []
        pos, end = offset, offset + len(mv)
        while pos < end:
            cstart = pos - pos % cs
            cend = min(cstart + cs, self.size)
            if pos == cstart and end >= cend:
                chunk = mv[pos - offset:cend - offset]
                if len(chunk) < cs:  # the disk's last, short cluster: pad as qemu does
                    chunk = bytes(chunk) + bytes(cs - len(chunk))
                blob = codec.compress(self.ctype, chunk)
                out.append((pos, cend - pos, blob,
                            None if blob is not None else mv[pos - offset:cend - offset]))
                pos = cend
            else:
                n = min(end, cend) - pos
                out.append((pos, n, None, mv[pos - offset:pos - offset + n]))
                pos += n
        return out

    def write_prepared(self, offset: int, prepared) -> None:
        if not self.compress:
            self._put(offset, memoryview(prepared).cast("B"), None)
            return
        for pos, n, blob, view in prepared:
            if blob is not None:
                self._before(pos)
                self._compressed(pos >> self.cb, blob)
            else:
                self._put(pos, view, None)

    def zero(self, offset: int, length: int) -> None:
        self._put(offset, None, length)

    # -- placing ranges ------------------------------------------------------------------
    def _before(self, pos: int) -> None:
        if self.part is not None and self.part[0] != pos // self.unit:
            self._flush_part()

    def _put(self, offset: int, view, length: int | None) -> None:
        """Data (``view``) or zeros (``length``) at ``offset``: whole units go straight
        out, pieces of units through the partial-unit buffer."""
        unit = self.unit
        n = len(view) if view is not None else length
        pos, end = offset, offset + n
        while pos < end:
            self._before(pos)
            ustart = pos - pos % unit
            uend = min(ustart + unit, self.size)
            if pos == ustart and end >= uend:
                stop = end if end == self.size else end - (end - ustart) % unit
                stop = max(stop, uend)
                if view is not None:
                    self._data(pos, view[pos - offset:stop - offset])
                else:
                    self._zeros(pos, stop - pos)
                pos = stop
            else:
                k = min(end, uend) - pos
                piece = None if view is None else view[pos - offset:pos - offset + k]
                self._part_put(pos, piece, k)
                pos += k

    def _part_put(self, pos: int, view, k: int) -> None:
        u = pos // self.unit
        if self.part is None:
            base = u * self.unit
            buf = bytearray(min(self.unit, self.size - base))
            if self.backing is not None:
                dev = self.backing.device
                if dev is None:
                    raise UnsupportedError("not supported: a partial-cluster write over a"
                                           " backing file that is not opened", self.path)
                inside = max(0, min(len(buf), dev.size - base))
                if inside:
                    dev.readinto(base, memoryview(buf)[:inside])
            self.part = (u, buf)
        within = pos - self.part[0] * self.unit
        if view is None:
            self.part[1][within:within + k] = ZEROES[:k]
        else:
            self.part[1][within:within + k] = view

    def _flush_part(self) -> None:
        if self.part is None:
            return
        u, buf = self.part
        self.part = None
        base = u * self.unit
        if self.backing is None and is_zero(buf):
            self._zeros(base, len(buf))
        elif self.compress and self.unit == self.cs:
            chunk = bytes(buf) + bytes(self.cs - len(buf))
            blob = codec.compress(self.ctype, chunk)
            if blob is not None:
                self._compressed(u, blob)
            else:
                self._data(base, memoryview(buf))
        else:
            self._data(base, memoryview(buf))

    def _data(self, pos: int, view) -> None:
        """Unit-aligned data (ending on a unit boundary or at the end of the disk)."""
        cs, cb = self.cs, self.cb
        end = pos + len(view)
        c_first, c_last = pos >> cb, (end - 1) >> cb
        if self.ext:
            self._data_ext(pos, view)
            return
        c = c_first
        while c <= c_last:
            l1i = c >> self.l2b
            c1 = min(c_last + 1, (l1i + 1) << self.l2b)
            if self.prealloc != "off":
                self._advance(c1)
            l2 = self._l2(l1i)
            i0, i1 = c & (self.l2e - 1), ((c1 - 1) & (self.l2e - 1)) + 1
            a, b = (c << cb) - pos, min(end, c1 << cb) - pos
            if self.data_name:
                l2[i0:i1] = array("Q", range((c << cb) | QCOW_OFLAG_COPIED,
                                             (c1 << cb) | QCOW_OFLAG_COPIED, cs))
                self.data.pwrite(c << cb, view[a:b])
            elif self.prealloc != "off":
                self.data.pwrite(l2[i0] & ~QCOW_OFLAG_COPIED, view[a:b])
            else:
                h = self._alloc(c1 - c) * cs
                l2[i0:i1] = array("Q", range(h | QCOW_OFLAG_COPIED,
                                             (h + (c1 - c) * cs) | QCOW_OFLAG_COPIED, cs))
                if self.reserve:
                    self.reserve.write(h, b - a)
                self.data.pwrite(h, view[a:b])
            c = c1

    def _ext_runs(self, pos: int, end: int):
        """Per cluster of [pos, end) with extended L2 entries: (p, q, cluster start, L2
        table, entry index, mask of the subclusters [p, q) touches)."""
        cs, cb, scs = self.cs, self.cb, self.geo.subcluster_size
        p = pos
        while p < end:
            c = p >> cb
            cstart = c << cb
            q = min(end, cstart + cs)
            if self.prealloc != "off":
                self._advance(c + 1)
            s0, s1 = (p - cstart) // scs, (q - 1 - cstart) // scs
            yield (p, q, cstart, self._l2(c >> self.l2b), c & (self.l2e - 1),
                   ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1))
            p = q

    def _data_ext(self, pos: int, view) -> None:
        for p, q, cstart, l2, i, mask in self._ext_runs(pos, pos + len(view)):
            word = l2[2 * i]
            host = word & ~QCOW_OFLAG_COPIED
            if self.data_name:
                host = cstart
            elif not word:
                host = self._alloc(1) * self.cs
            l2[2 * i] = host | QCOW_OFLAG_COPIED
            l2[2 * i + 1] = (l2[2 * i + 1] | mask) & ~(mask << SUBCLUSTERS)
            self.data.pwrite(host + p - cstart, view[p - pos:q - pos])

    def _zeros(self, pos: int, n: int) -> None:
        """A unit-aligned range that must read as zeros (over the backing file too)."""
        cs, cb = self.cs, self.cb
        end = pos + n
        c_last = (end - 1) >> cb
        if not self.has_backing:
            if self.prealloc != "off":
                self._advance(c_last + 1)
            return  # unallocated or freshly preallocated (a hole): reads as zeros
        if self.ext:
            for _, _, _, l2, i, mask in self._ext_runs(pos, end):
                l2[2 * i + 1] = (l2[2 * i + 1] & ~mask) | (mask << SUBCLUSTERS)
            return
        if self.prealloc != "off":  # (not reached: preallocation needs extended L2 here)
            self._advance(c_last + 1)
            return
        c, c_last1 = pos >> cb, c_last + 1
        while c < c_last1:
            l1i = c >> self.l2b
            c1 = min(c_last1, (l1i + 1) << self.l2b)
            l2 = self._l2(l1i)
            i0, i1 = c & (self.l2e - 1), ((c1 - 1) & (self.l2e - 1)) + 1
            if self.version >= 3:
                l2[i0:i1] = array("Q", [QCOW_OFLAG_ZERO]) * (i1 - i0)
            elif self.data_name:
                l2[i0:i1] = array("Q", range((c << cb) | QCOW_OFLAG_COPIED,
                                             (c1 << cb) | QCOW_OFLAG_COPIED, cs))
            else:  # version 2 has no zero flag: allocate, leaving a hole (zeros)
                h = self._alloc(c1 - c) * cs
                l2[i0:i1] = array("Q", range(h | QCOW_OFLAG_COPIED,
                                             (h + (c1 - c) * cs) | QCOW_OFLAG_COPIED, cs))
            c = c1

    def _compressed(self, ci: int, blob: bytes) -> None:
        cs = self.cs
        l2 = self._l2(ci >> self.l2b)  # the table first, so it is not in the stream
        n = len(blob)
        off = self.cbyte
        cref = self.cref
        cmax = self.geo.refcount_max
        if off % cs and cref[off // cs] < cmax:
            if off % cs + n > cs:  # spills into the next host cluster: is it free?
                if off // cs + 1 == self.next_cluster:
                    self._alloc(1, 0)
                else:
                    off = 0
        else:
            off = 0
        if not off:
            off = self._alloc(1, 0) * cs
        for c in range(off // cs, (off + n - 1) // cs + 1):
            cref[c] += 1
        self.cbyte = off + n
        if self.cbuf and self.cbuf_off + len(self.cbuf) == off:
            self.cbuf += blob
        else:
            self._flush_cbuf()
            self.cbuf_off = off
            self.cbuf = bytearray(blob)
        if len(self.cbuf) >= CBUF_FLUSH:
            self._flush_cbuf()
        entry = self.geo.compressed_entry(off, n)
        i = ci & (self.l2e - 1)
        if self.ext:
            l2[2 * i], l2[2 * i + 1] = entry, 0
        else:
            l2[i] = entry

    def _flush_cbuf(self) -> None:
        if self.cbuf:
            self.out.pwrite(self.cbuf_off, self.cbuf)
        self.cbuf = bytearray()

    # -- persistent bitmaps (convert --bitmaps) --------------------------------------------
    @property
    def supports_bitmaps(self) -> bool:
        return self.version >= 3

    def add_bitmaps(self, bitmaps: list) -> None:
        """Store these ``DirtyBitmap``s in the image when it is finished."""
        if bitmaps and not self.supports_bitmaps:
            raise UsageError("Format driver 'qcow2' does not support bitmaps (compat=0.10)",
                             self.path)
        for bm in bitmaps:
            bm.resize(self.size)
        self.bitmaps.extend(bitmaps)

    def _write_bitmaps(self) -> BitmapsExt | None:
        """Data clusters, tables and directory after the guest data, before the
        refcounts (which then count them like every other cluster)."""
        if not self.bitmaps:
            return None
        cs = self.cs
        entries = []
        for bm in self.bitmaps:
            size, clusters = bitmap_store.serialize(bm, cs)
            table = array("Q", bytes(8 * size))
            for i, chunk in clusters:
                table[i] = self._alloc(1) * cs
                self.out.pwrite(table[i], chunk)
            toff = self._alloc(-(-size * 8 // cs)) * cs
            self.out.pwrite(toff, be_bytes(table))
            entries.append((toff, size, BME_FLAG_AUTO if bm.enabled else 0,
                            bm.granularity.bit_length() - 1, bm.name))
        raw = bitmap_store.build_directory(entries)
        doff = self._alloc(-(-len(raw) // cs)) * cs
        self.out.pwrite(doff, raw)
        return BitmapsExt(len(entries), len(raw), doff)

    # -- resumable output (imaging) ---------------------------------------------------------
    def checkpoint(self) -> dict:
        """Write out what only memory holds (the partial unit, compressed bytes, the L2
        table being filled, L1), sync, and return the counters that rebuild the rest:
        clusters are handed out in order, so the file up to ``next_cluster`` is
        everything a resumed writer needs."""
        if self.data_name or self.prealloc != "off":
            raise UnsupportedError("not supported yet: resuming qcow2 output with a data"
                                   " file or preallocation", self.path)
        if self.out.in_place:
            raise UnsupportedError("not supported yet: resuming qcow2 output written in"
                                   " place on a block device", self.path)
        import base64
        import zlib
        self._flush_part()
        self._flush_cbuf()
        if self.cur_l2 is not None and self.cur_l2_off:
            self.out.pwrite(self.cur_l2_off, be_bytes(self.cur_l2))
        if self.l1_size:
            self.out.pwrite(self.cs, be_bytes(self.l1))
        self.out.flush(durable=True)
        cref = None
        if self.cref is not None:
            cref = base64.b64encode(zlib.compress(self.cref.tobytes())).decode()
        return {"partial": self.out.tmp_path, "next_cluster": self.next_cluster,
                "cbyte": self.cbyte, "cur_l1i": self.cur_l1i,
                "cur_l2_off": self.cur_l2_off, "cref": cref}

    def _restore(self, state: dict) -> None:
        import base64
        import zlib
        try:
            nxt, cbyte = int(state["next_cluster"]), int(state["cbyte"])
            l1i, l2_off = int(state["cur_l1i"]), int(state["cur_l2_off"])
            cref = state.get("cref")
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"resume state is incomplete: {e}", self.path) from None
        file_clusters = -(-self.out.size // self.cs)
        if not 1 <= nxt <= file_clusters or not -1 <= l1i < self.l1_size \
                or l2_off % self.cs or not 0 <= l2_off < nxt * self.cs \
                or not 0 <= cbyte <= nxt * self.cs:
            raise FormatError("resume state does not fit the partial file", self.path)
        self.out.truncate(nxt * self.cs)  # whatever came after the checkpoint is gone
        if self.l1_size:
            self.l1 = be_array(self.out.read_exact(self.cs, 8 * self.l1_size, "L1"))
        self.next_cluster, self.cbyte = nxt, cbyte
        if l1i >= 0 and l2_off:
            self.cur_l1i, self.cur_l2_off = l1i, l2_off
            self.cur_l2 = be_array(self.out.read_exact(l2_off, self.cs, "L2 table"))
        if self.compress:
            if not cref:
                raise FormatError("resume state lacks the compressed refcounts", self.path)
            self.cref = array("I")
            self.cref.frombytes(zlib.decompress(base64.b64decode(cref)))
            if len(self.cref) != nxt:
                raise FormatError("resume state's refcounts do not fit", self.path)

    def suspend(self) -> None:
        self.out.detach()

    # -- finishing -----------------------------------------------------------------------
    def _finish(self) -> None:
        cs = self.cs
        self._flush_part()
        if self.prealloc != "off":
            self._advance(-(-self.size // cs))
        self._flush_l2()
        self._flush_cbuf()
        if self.l1_size:
            self.out.pwrite(cs, be_bytes(self.l1))
        bitmaps = self._write_bitmaps()
        used = self.next_cluster
        table, blocks = refcount_layout(used, cs, self.geo.refcount_order)
        total = used + table + blocks
        epb = self.geo.refblock_entries
        order = self.geo.refcount_order
        rt = array("Q", bytes(table * cs))
        for i in range(blocks):
            rt[i] = (used + table + i) * cs
        self.out.pwrite(used * cs, be_bytes(rt))
        for i in range(blocks):
            first = i * epb
            count = max(0, min(epb, total - first))
            if self.cref is not None and first < used:
                vals = array("I", self.cref[first:min(first + epb, used)])
                vals.extend(array("I", [1]) * (count - len(vals)))
                vals.extend(array("I", bytes(4 * (epb - len(vals)))))
                raw = encode(vals, order)
            else:
                raw = all_ones_block(count, epb, order)
            self.out.pwrite((used + table + i) * cs, raw)
        h = self._header(used * cs, table)
        if bitmaps is not None:
            h.bitmaps = bitmaps
            h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS
        buf = h.build()
        self.out.pwrite(0, buf)
        if self.reserve:
            self.reserve.trim()
        self._preallocate(total * cs)

    def _commit(self) -> None:
        """The external data file goes in place first: an image under its final name
        always finds its data."""
        if self.data is not self.out:
            self.data.commit()
        self.out.commit()

    def _preallocate(self, file_end: int) -> None:
        target = self.data if self.data is not self.out else self.out
        end = self.size if self.data is not self.out else file_end
        if self.prealloc == "falloc" and end:
            try:
                allocate(target.fd, 0, end)
            except OSError as e:
                raise ImageIOError.from_os(e, self.path) from None
        elif self.prealloc == "full":
            for o, n, is_data in list(target.data_ranges(0, end)):
                if not is_data:
                    target.write_zeroes(o, n)

    def _header(self, rt_offset: int, rt_clusters: int) -> Header:
        o = self.opts
        h = Header(version=self.version, cluster_bits=self.cb, size=self.size,
                   crypt_method=0, l1_size=self.l1_size, l1_table_offset=self.cs,
                   refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
                   nb_snapshots=0, snapshots_offset=0,
                   refcount_order=self.geo.refcount_order,
                   header_length=V2_HEADER_LENGTH if self.version == 2
                   else V3_HEADER_LENGTH_WITH_COMPRESSION)
        if self.version >= 3:
            if o.lazy_refcounts:
                h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
            if self.ctype:
                h.compression_type = self.ctype
                h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION
            if self.ext:
                h.incompatible_features |= QCOW2_INCOMPAT_EXTL2
            if self.data_name:
                h.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE
                h.data_file = self.data_name
                if o.data_file_raw:
                    h.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
        if self.backing is not None:
            h.backing_file = self.backing.name
            h.backing_format = self.backing.format or None
        return h

    def abort(self) -> None:
        if self.data is not self.out:
            self.data.discard()
        self.out.discard()
