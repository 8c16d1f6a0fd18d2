"""An open qcow2 image as a BlockDevice: reads, the extent map, and (opened writable)
random-access writes with copy-on-write, exact refcounts and crash-safe ordering.

Reading maps each guest cluster through L1 → L2 (qcow2.txt "Cluster mapping"),
coalescing neighbouring clusters whose host offsets continue so that a convert reads
each stretch with one ``preadv``. Every table offset is validated when the table is
first loaded (aligned, not in the header cluster, inside the file); L2 tables are
kept in a bounded LRU cache.

Writes allocate from the refcounts, copy-on-write anything shared (snapshots, the
backing file for partial clusters, compressed clusters) and keep the COPIED flags
exact (``qemu-img check`` counts a wrong one as corruption). ``flush`` writes the
metadata in a crash-safe order with a barrier between stages: data (already written),
refcount increments, L2 tables, L1 table and header, then the decrements of what
the new tables no longer use. An interrupted run can leak clusters; it cannot leave a
table pointing at a cluster whose count says it is free.
"""

from __future__ import annotations

import bisect
import collections
import os
from array import array

from ...byteorder import be_array, be_bytes
from ...blockdev import (ZEROES, Extent, ExtentKind, FileBackend, FileDevice, ImageInfo,
                         coalesce, fill_zero, pieces, skip_filled)
from ...checks import CheckResult, Repair
from ...errors import FormatError, SafetyError, UnsupportedError, UsageError
from ...policy import OpenPolicy
from ...registry import open_image
from . import codec, maintenance
from . import snapshot as snapshot_table
from .bitmaps import Bitmaps, read_directory
from .check import check as check_image
from .header import Header, parse as parse_header
from .refcount import Refcounts
from .structs import (AUTOCLEAR_KNOWN, MAGIC, Geometry, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                      QCOW2_SUBCLUSTER_COMPRESSED, QCOW2_SUBCLUSTER_NORMAL,
                      QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC,
                      QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, QCOW2_SUBCLUSTER_ZERO_ALLOC,
                      QCOW2_SUBCLUSTER_ZERO_PLAIN, QCOW_OFLAG_COMPRESSED,
                      QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, SUBCLUSTERS, l2_entry_type)

# runs whose host offset steps with the guest offset; runs that carry no host offset
# (merged by kind alone); runs never merged (one compressed cluster each)
_HOST_STEPS = (QCOW2_SUBCLUSTER_NORMAL, QCOW2_SUBCLUSTER_ZERO_ALLOC)
_HOSTLESS = (QCOW2_SUBCLUSTER_ZERO_PLAIN, QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN)
_UNMERGED = (QCOW2_SUBCLUSTER_COMPRESSED,)
_UNALLOCATED = (QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC)
ALL_ALLOC = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOC << SUBCLUSTERS
L2_CACHE_BYTES = 32 << 20





def _expected(first: int, step: int, i: int, j: int) -> array:
    if step:
        return array("Q", range(first + i * step, first + j * step, step))
    return array("Q", [first]) * (j - i)


def _run_length(table: array, start: int, stop: int, first: int, step: int) -> int:
    """How many entries from ``table[start]`` (== ``first``) go on as ``first + j *
    step``, at most ``stop - start``: galloping, then bisecting, with C-level slice
    comparisons."""
    n = stop - start
    good, probe = 1, 8
    while good < n:
        m = min(n, good + probe)
        if table[start + good:start + m] == _expected(first, step, good, m):
            good = m
            probe *= 4
            continue
        lo, hi = good, m  # a prefix of length lo matches, of length hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if table[start + lo:start + mid] == _expected(first, step, lo, mid):
                lo = mid
            else:
                hi = mid
        return lo
    return n


class Qcow2Device(FileDevice):
    format = "qcow2"
    backing = None
    refs: Refcounts | None = None       # the refcounts, loaded when opened writable
    bitmaps: Bitmaps | None = None      # persistent dirty bitmaps, kept when writable
    snapshot = None                     # the internal snapshot this view shows
    data: FileBackend | None = None     # where guest clusters live: the image itself
                                        # or its external data file

    # -- opening -------------------------------------------------------------------------
    def _open(self, snapshot: str | None = None) -> None:
        self.data = self.backend
        size = self.backend.size
        head = self.backend.pread(0, min(size, 1 << 16))
        if len(head) >= 24 and head[:4] == MAGIC:
            bits = int.from_bytes(head[20:24], "big")
            if 16 < bits <= 21:
                head = self.backend.pread(0, min(size, 1 << bits))
        self.header = h = parse_header(head, size, self.path)
        self.geo: Geometry = h.geometry
        self.cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.l2_entries = self.geo.l2_entries
        self.l2_bits = self.geo.l2_bits
        self.extended = h.extended_l2
        self.file_size = size
        self.snapshots, self.snapshot_table_size = snapshot_table.read_table(
            self.backend, h.snapshots_offset, h.nb_snapshots, self.cs, size, self.path)
        self.size = h.size
        self.l1_offset, self.l1_size = h.l1_table_offset, h.l1_size
        if snapshot is not None:
            if self.writable:
                raise UsageError("a snapshot view is read-only", self.path)
            snap = self.snapshot = snapshot_table.find(self.snapshots, snapshot, self.path)
            self.size = snap.disk_size if snap.disk_size is not None else h.size
            self.l1_offset, self.l1_size = snap.l1_table_offset, snap.l1_size
            if self.l1_size < self.geo.l1_entries_for(self.size):
                raise FormatError(f"snapshot {snap.id}: L1 table of {snap.l1_size} entries"
                                  f" cannot map {self.size} bytes", self.path,
                                  structure="QCowSnapshotHeader", field="l1_size")
        self.l1 = be_array(self.backend.read_exact(self.l1_offset, self.l1_size * 8,
                                                   "L1 table")) if self.l1_size \
            else array("Q")
        self.l1_dirty = False
        self.header_dirty = False
        self.l2_cache: collections.OrderedDict[int, array] = collections.OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_capacity = max(8, L2_CACHE_BYTES // self.cs)
        self._index_cache: dict[int, tuple[list[int], list[tuple]]] = {}
        self._table_base: dict[int, int] = {}
        self._comp_cache: tuple[int, bytes] | None = None
        if h.has_data_file:
            self._open_data_file()
        if h.backing_file:
            self.open_backing(h.backing_file, h.backing_format)
        if self.writable:
            self.refs = Refcounts(self.backend, self.geo, h.refcount_table_offset,
                                  h.refcount_table_clusters, self.path)
            if h.bitmaps is not None:
                self.bitmaps = Bitmaps(self)
        # lazy refcounts left inconsistent (the dirty bit): repaired before the first
        # change, as qemu does on opening; not at open, so that 'check' sees them
        self.needs_repair = self.writable and h.dirty

    def _open_data_file(self) -> None:
        name = self.header.data_file
        if not name:
            raise UnsupportedError("not supported yet: a qcow2 image with an external data"
                                   " file that it does not name", self.path)
        policy = self.policy or OpenPolicy()
        full = policy.resolve(self.path, name, "external data file")
        self.data = FileBackend(full, writable=self.writable)
        self.data_path = full

    def open_backing(self, name: str, fmt: str | None) -> None:
        if self.header.data_file_raw:
            raise FormatError("a raw external data file excludes a backing file", self.path,
                              structure="QCowHeader", field="backing_file_offset")
        policy = self.policy or OpenPolicy().descend(self.path)
        full = policy.resolve(self.path, name, "backing file")
        policy.check_backing_format(self.path, name, fmt,
                                    "QCowExtension 0xe2792aca (backing file format name)")
        self.backing = open_image(full, fmt or None, policy=policy)

    # -- L2 tables -------------------------------------------------------------------------
    def l2_table(self, offset: int) -> array:
        """The L2 table at host ``offset`` (validated, cached)."""
        t = self.l2_cache.get(offset)
        if t is not None:
            self.l2_cache.move_to_end(offset)
            return t
        self.check_table_offset(offset, "L2 table")
        t = be_array(self.backend.read_exact(offset, self.cs, "L2 table"))
        self._cache_l2(offset, t)
        return t

    def _cache_l2(self, offset: int, table: array, *, dirty: bool = False) -> None:
        """Cache a table, evicting the least recently used clean ones (dirty tables
        stay until ``flush``; ``write`` flushes when too many pile up)."""
        if dirty:
            self.l2_dirty.add(offset)
        self.l2_cache[offset] = table
        if len(self.l2_cache) > self.l2_capacity:
            for off in list(self.l2_cache):
                if len(self.l2_cache) <= self.l2_capacity:
                    break
                if off not in self.l2_dirty and off != offset:
                    del self.l2_cache[off]
                    self._index_cache.pop(off, None)

    def check_table_offset(self, offset: int, what: str) -> None:
        if offset % self.cs:
            raise FormatError(f"{what} at {offset:#x} is not cluster aligned", self.path,
                              structure="L1 entry" if what == "L2 table" else what)
        if offset < self.cs:
            raise FormatError(f"{what} points into the header (offset {offset:#x})",
                              self.path, structure="L1 entry")
        if offset + self.cs > self.backend.size:
            raise FormatError(f"{what} at {offset:#x} is past the end of the file"
                              f" ({self.backend.size} bytes)", self.path,
                              structure="L1 entry")

    def _l2_at(self, l1i: int) -> array | None:
        entry = self.l1[l1i]
        off = entry & L1E_OFFSET_MASK
        if not off:
            return None
        self._table_base[off] = l1i << self.l2_bits  # for messages naming the cluster
        return self.l2_table(off)

    # -- the map ---------------------------------------------------------------------------
    def runs(self, offset: int, length: int):
        """``(guest offset, length, kind, host)`` runs covering the range, merged where
        kind (a ``QCOW2_SUBCLUSTER_*`` type) and host continuity allow. ``host`` is the
        data offset (_NORMAL, _ZERO_ALLOC, _UNALLOCATED_ALLOC) or the L2 entry
        (_COMPRESSED)."""
        cb, cs = self.cluster_bits, self.cs
        l2e, l2b = self.l2_entries, self.l2_bits
        ext = self.extended
        scs = self.geo.subcluster_size
        has_df = self.data is not self.backend
        end = offset + length
        pos = offset
        cur = None  # [start, n, kind, host]
        while pos < end:
            ci = pos >> cb
            l1i = ci >> l2b
            span_end = min(end, (l1i + 1) << (l2b + cb))
            l2 = self._l2_at(l1i) if l1i < len(self.l1) else None
            if l2 is None:
                # the L1 entries after an empty one are usually empty too (a huge,
                # mostly unallocated disk): skip them at memory speed, so the walk is
                # bounded by the L2 tables present rather than by the virtual size
                stop = min(len(self.l1), ((end - 1) >> (l2b + cb)) + 1)
                if l1i + 1 < stop:
                    nxt = skip_filled(self.l1, l1i + 1, stop)
                    span_end = min(end, nxt << (l2b + cb))
                elif l1i >= len(self.l1):
                    span_end = end
                runs = ((pos, span_end - pos, QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, 0),)
                pos = span_end
            elif not ext and not self.writable:
                runs = self._indexed_runs(l1i, l2, pos, span_end)
                pos = span_end
            else:
                runs = []
                while pos < span_end:
                    ci = pos >> cb
                    cstart = ci << cb
                    cend = min(span_end, cstart + cs)
                    idx = ci & (l2e - 1)
                    if ext:
                        if not l2[2 * idx] and not l2[2 * idx + 1]:
                            # a stretch of unallocated entries: skip it whole
                            stop = (((span_end - 1) >> cb) & (l2e - 1)) + 1
                            k = (skip_filled(l2, 2 * idx, 2 * stop) // 2) - idx
                            run_end = min(span_end, (ci + max(k, 1)) << cb)
                            runs.append((pos, run_end - pos,
                                         QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, 0))
                            pos = run_end
                            continue
                        runs.extend(self._ext_runs(l2[2 * idx], l2[2 * idx + 1], pos, cend,
                                                   cstart, scs, has_df))
                        pos = cend
                        continue
                    e = l2[idx]
                    kind = l2_entry_type(e, has_df)
                    if kind == QCOW2_SUBCLUSTER_COMPRESSED:
                        runs.append((pos, cend - pos, kind, e))
                        pos = cend
                        continue
                    # whole runs of like entries at once (contiguous data, zeros,
                    # holes): one array comparison instead of a step per cluster
                    stop = (((span_end - 1) >> cb) & (l2e - 1)) + 1
                    host = e & L2E_OFFSET_MASK
                    step = cs if kind in _HOST_STEPS else 0
                    if kind == QCOW2_SUBCLUSTER_NORMAL and not has_df:
                        self._check_data_offset(host, ci)
                    k = _run_length(l2, idx, stop, e, step) if stop - idx > 1 else 1
                    run_end = min(span_end, (ci + k) << cb)
                    runs.append((pos, run_end - pos, kind,
                                 host + pos - cstart if step else 0))
                    pos = run_end
            for r in runs:
                if cur is not None and cur[2] == r[2] and r[2] not in _UNMERGED and (
                        r[2] in _HOSTLESS or cur[3] + cur[1] == r[3]):
                    cur[1] += r[1]
                else:
                    if cur is not None:
                        yield tuple(cur)
                    cur = list(r)
        if cur is not None:
            yield tuple(cur)

    def _indexed_runs(self, l1i: int, l2: array, pos: int, span_end: int) -> list:
        """_runs inside one standard L2 table through its run index: a bisection per
        call instead of a look at every entry (what makes 1 MiB reads cheap)."""
        cb = self.cluster_bits
        starts, kinds = self._run_index(self.l1[l1i] & L1E_OFFSET_MASK, l2)
        base = l1i << self.l2_bits
        j = bisect.bisect_right(starts, (pos >> cb) - base) - 1
        out = []
        while pos < span_end:
            kind, e, step = kinds[j]
            nxt = starts[j + 1] if j + 1 < len(starts) else self.l2_entries
            run_end = min(span_end, (base + nxt) << cb)
            if kind == QCOW2_SUBCLUSTER_COMPRESSED:
                host = e
            elif step:
                host = (e & L2E_OFFSET_MASK) + pos - ((base + starts[j]) << cb)
            else:
                host = 0
            out.append((pos, run_end - pos, kind, host))
            pos = run_end
            j += 1
        return out

    def _run_index(self, offset: int, l2: array) -> tuple[list[int], list[tuple]]:
        """Where the runs of like entries of a (read-only) L2 table start, and what each
        is: ``(kind, first entry, host step)``; built once per cached table."""
        index = self._index_cache.get(offset)
        if index is not None:
            return index
        cs = self.cs
        has_df = self.data is not self.backend
        starts, kinds = [], []
        i, n = 0, len(l2)
        base = self._table_base.get(offset, 0)
        while i < n:
            e = l2[i]
            kind = l2_entry_type(e, has_df)
            if kind == QCOW2_SUBCLUSTER_COMPRESSED:
                step, k = 0, 1
            else:
                step = cs if kind in _HOST_STEPS else 0
                if kind == QCOW2_SUBCLUSTER_NORMAL and not has_df:
                    self._check_data_offset(e & L2E_OFFSET_MASK, base + i)
                k = _run_length(l2, i, n, e, step) if n - i > 1 else 1
            starts.append(i)
            kinds.append((kind, e, step))
            i += k
        index = self._index_cache[offset] = (starts, kinds)
        return index

    def _ext_runs(self, word: int, bitmap: int, pos: int, cend: int, cstart: int, scs: int,
                  has_df: bool):
        if word & QCOW_OFLAG_COMPRESSED:
            return [(pos, cend - pos, QCOW2_SUBCLUSTER_COMPRESSED, word)]
        host = word & L2E_OFFSET_MASK
        if host and not has_df:
            self._check_data_offset(host, cstart >> self.cluster_bits)
        out = []
        while pos < cend:
            s = (pos - cstart) // scs
            send = min(cend, cstart + (s + 1) * scs)
            alloc, zero = bitmap >> s & 1, bitmap >> (SUBCLUSTERS + s) & 1
            if alloc:
                if zero or not (host or (has_df and word & QCOW_OFLAG_COPIED)):
                    raise FormatError(f"guest cluster {cstart >> self.cluster_bits}:"
                                      f" subcluster {s} is both allocated and zero, or"
                                      " allocated without a host cluster", self.path,
                                      structure="extended L2 entry")
                out.append((pos, send - pos, QCOW2_SUBCLUSTER_NORMAL, host + pos - cstart))
            elif zero:
                out.append((pos, send - pos, QCOW2_SUBCLUSTER_ZERO_ALLOC,
                            host + pos - cstart) if host
                           else (pos, send - pos, QCOW2_SUBCLUSTER_ZERO_PLAIN, 0))
            elif host:
                out.append((pos, send - pos, QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC,
                            host + pos - cstart))
            else:
                out.append((pos, send - pos, QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, 0))
            pos = send
        return out

    def _check_data_offset(self, host: int, ci: int) -> None:
        if host % self.cs:
            raise FormatError(f"guest cluster {ci}: data offset {host:#x} is not cluster"
                              " aligned", self.path, structure="L2 entry")
        if host < self.cs:
            raise FormatError(f"guest cluster {ci}: the L2 entry points into the header",
                              self.path, structure="L2 entry")

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        backing = self.backing is not None
        return coalesce(self._extents(offset, length, backing))

    def _extents(self, offset, length, backing):
        for g, n, kind, host in self.runs(offset, length):
            if kind == QCOW2_SUBCLUSTER_NORMAL:
                yield Extent(g, n, ExtentKind.DATA, True, host)
            elif kind == QCOW2_SUBCLUSTER_COMPRESSED:
                yield Extent(g, n, ExtentKind.DATA, True, None)
            elif kind == QCOW2_SUBCLUSTER_ZERO_PLAIN:
                yield Extent(g, n, ExtentKind.ZERO, True, None)
            elif kind == QCOW2_SUBCLUSTER_ZERO_ALLOC:
                yield Extent(g, n, ExtentKind.ZERO, True, host)
            elif backing:
                yield Extent(g, n, ExtentKind.BACKING, False, None)
            else:
                yield Extent(g, n, ExtentKind.ZERO, False,
                             host if kind == QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC else None)

    # -- reading ---------------------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        for g, k, kind, host in self.runs(offset, n):
            dst = mv[g - offset:g - offset + k]
            if kind == QCOW2_SUBCLUSTER_NORMAL:
                got = self.data.readinto(host, dst)
                if got < k:  # past the end of the file: qemu reads zeros there too
                    fill_zero(dst[got:])
            elif kind in _UNALLOCATED:
                self._read_backing(g, dst)
            elif kind == QCOW2_SUBCLUSTER_COMPRESSED:
                cstart = g >> self.cluster_bits << self.cluster_bits
                data = self._decompress(host, cstart)
                dst[:] = data[g - cstart:g - cstart + k]
            else:
                fill_zero(dst)
        return n

    def _read_backing(self, g: int, dst) -> None:
        k = len(dst)
        b = self.backing
        inside = 0 if b is None else max(0, min(k, b.size - g))
        if inside:
            b.readinto(g, dst[:inside])
        if inside < k:
            fill_zero(dst[inside:])

    def _decompress(self, entry: int, cstart: int) -> bytes:
        cached = self._comp_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        if self.data is not self.backend:
            raise FormatError("compressed cluster in an image with an external data file",
                              self.path, structure="L2 entry")
        off, csize = self.geo.compressed_range(entry)
        where = f"for guest offset {cstart:#x} at host {off:#x}"
        fsize = self.backend.size
        if off < self.cs:
            raise FormatError(f"compressed cluster {where} points into the header",
                              self.path, structure="L2 entry")
        if off >= fsize or off + csize > fsize + 511:
            raise FormatError(f"compressed cluster {where} (+{csize}) is past the end of"
                              f" the file ({fsize} bytes)", self.path, structure="L2 entry")
        raw = self.backend.pread(off, min(csize, fsize - off))
        data = codec.decompress(self.header.compression_type, raw, self.cs, where,
                                self.path)
        self._comp_cache = (entry, data)
        return data

    def read_cluster(self, ci: int) -> bytearray:
        """Guest cluster ``ci`` as it reads now (up to the end of the disk)."""
        start = ci << self.cluster_bits
        buf = bytearray(min(self.cs, self.size - start))
        if buf:
            self.readinto(start, buf)
        return buf

    # -- facts -----------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        h = self.header
        full = None
        if h.backing_file:
            full = h.backing_file if os.path.isabs(h.backing_file) else os.path.join(
                os.path.dirname(self.path), h.backing_file)
        return ImageInfo(
            filename=self.path, format="qcow2", virtual_size=self.size,
            actual_size=self.backend.allocated_bytes(), cluster_size=self.cs,
            backing_filename=h.backing_file, full_backing_filename=full,
            backing_format=h.backing_format, dirty=h.dirty,
            format_specific=self.format_specific(),
            snapshots=[s.to_json() for s in self.snapshots],
            details=self._details())

    def format_specific(self) -> dict:
        """qemu-img info's "format-specific" data, keys as qemu prints them."""
        h = self.header
        if h.version == 2:
            return {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
        d: dict = {"compat": "1.1", "compression-type": h.compression_name,
                   "lazy-refcounts": h.lazy_refcounts}
        if h.bitmaps is not None:
            d["bitmaps"] = [b.to_json() for b in read_directory(self)]
        d["refcount-bits"] = self.geo.refcount_bits
        d["corrupt"] = h.corrupt
        d["extended-l2"] = h.extended_l2
        if h.has_data_file:
            d["data-file"] = h.data_file
            d["data-file-raw"] = h.data_file_raw
        return d

    def _details(self) -> dict:
        h = self.header
        d = {"version": h.version, "header-length": h.header_length,
             "l1-size": h.l1_size, "l1-table-offset": h.l1_table_offset,
             "refcount-table-offset": h.refcount_table_offset,
             "refcount-table-clusters": h.refcount_table_clusters,
             "refcount-order": h.refcount_order, "snapshots": h.nb_snapshots}
        if h.version >= 3:
            d["incompatible-features"] = h.incompatible_features
            d["compatible-features"] = h.compatible_features
            d["autoclear-features"] = h.autoclear_features
        if h.unknown_extensions:
            d["unknown-extensions"] = [f"{m:#010x} ({len(b)} bytes)"
                                       for m, b in h.unknown_extensions]
        if self.snapshot is not None:
            d["snapshot-view"] = f"{self.snapshot.id} ({self.snapshot.name})"
        return d

    def files(self) -> list[str]:
        own = [self.path]
        if self.data is not self.backend:
            own.append(self.data_path)
        return own + (self.backing.files() if self.backing is not None else [])

    # == writing =============================================================================
    def _require_writable(self) -> None:
        """Refuse a change to a read-only image, then ``prepare_write``."""
        if not self.writable:
            raise UnsupportedError("qcow2 image is open read-only", self.path)
        self.prepare_write()

    def prepare_write(self) -> None:
        """What must hold before the first change to a writable image: refused when
        the corrupt bit is set; unknown autoclear bits cleared (qcow2.txt); refcounts
        that lazy refcounts left inconsistent repaired, as qemu does on opening."""
        if self.header.corrupt:
            raise SafetyError("the image is marked corrupt (by qemu or diskforge); repair"
                              " it with 'diskforge check -r all' before writing", self.path)
        if self.header.autoclear_features & ~AUTOCLEAR_KNOWN:
            # qcow2.txt: clear auto-clear bits we do not know before writing
            self.header.autoclear_features &= AUTOCLEAR_KNOWN
            self.write_header()
            self.barrier()
        if self.needs_repair:
            result = check_image(self, Repair.ALL)
            if result.corruptions or result.check_errors:
                raise SafetyError("the image's refcounts (dirty, lazy refcounts) could not"
                                  " be repaired; run 'diskforge check -r all'", self.path)

    @property
    def has_data_file(self) -> bool:
        return self.data is not self.backend

    def l2_for_write(self, l1i: int) -> tuple[int, array]:
        """(host offset, table) of the L2 table for L1 index ``l1i``, allocated or
        copied so that the active L1 table owns it alone."""
        if l1i >= len(self.l1):
            raise FormatError(f"L1 index {l1i} beyond the L1 table", self.path)
        entry = self.l1[l1i]
        off = entry & L1E_OFFSET_MASK
        if off and (entry & QCOW_OFLAG_COPIED or self.refs.get(off // self.cs) == 1):
            if not entry & QCOW_OFLAG_COPIED:
                self.l1[l1i] = off | QCOW_OFLAG_COPIED
                self.l1_dirty = True
            return off, self.l2_table(off)
        new = self.refs.alloc(1) * self.cs
        if off:  # shared with a snapshot: copy it
            table = array("Q", self.l2_table(off))
            self.fix_copied(table)
            self.refs.free(off // self.cs)
        else:
            table = array("Q", bytes(self.cs))
        self._cache_l2(new, table, dirty=True)
        self.l1[l1i] = new | QCOW_OFLAG_COPIED
        self.l1_dirty = True
        return new, table

    def fix_copied(self, table: array) -> bool:
        """Set bit 63 exactly on the entries whose cluster has refcount 1."""
        step = 2 if self.extended else 1
        changed = False
        for i in range(0, len(table), step):
            e = table[i]
            if e & QCOW_OFLAG_COMPRESSED:
                continue
            host = e & L2E_OFFSET_MASK
            if not host or self.has_data_file:
                continue
            want = QCOW_OFLAG_COPIED if self.refs.get(host // self.cs) == 1 else 0
            if e & QCOW_OFLAG_COPIED != want:
                table[i] = (e & ~QCOW_OFLAG_COPIED) | want
                changed = True
        return changed

    def release_entry(self, word: int) -> None:
        """Queue the clusters an L2 entry used for freeing."""
        if word & QCOW_OFLAG_COMPRESSED:
            off, n = self.geo.compressed_range(word)
            first = off // self.cs
            last = (off + n - 1) // self.cs
            self.refs.free(first, last - first + 1)
            return
        host = word & L2E_OFFSET_MASK
        if host and not self.has_data_file:
            self.refs.free(host // self.cs)

    def _owned(self, word: int) -> bool:
        """True when the entry's host cluster belongs to this table alone."""
        if word & QCOW_OFLAG_COMPRESSED:
            return False
        host = word & L2E_OFFSET_MASK
        if self.has_data_file:
            return bool(host or word & QCOW_OFLAG_COPIED)
        if not host:
            return False
        return bool(word & QCOW_OFLAG_COPIED) or self.refs.get(host // self.cs) == 1

    def _write(self, offset: int, mv: memoryview) -> None:
        self.prepare_write()
        n = len(mv)
        if self.bitmaps is not None:
            self.bitmaps.mark(offset, n)
        pending: list = []  # (host, view) of contiguous fresh clusters, one pwrite
        for pos, k in pieces(offset, n, self.cs):
            ci, within = divmod(pos, self.cs)
            self._write_cluster(ci, within, mv[pos - offset:pos - offset + k], pending)
        self._flush_pending(pending)
        if len(self.l2_dirty) > self.l2_capacity:
            self.flush()  # the data is on disk: the tables may follow

    def _flush_pending(self, pending: list) -> None:
        if not pending:
            return
        start = pending[0][0]
        views = [v for _, v in pending]
        if len(views) == 1:
            self.data.pwrite(start, views[0])
        else:
            self.data.pwrite(start, b"".join(views))
        pending.clear()

    def _queue(self, pending: list, host: int, view) -> None:
        if pending and pending[-1][0] + len(pending[-1][1]) != host:
            self._flush_pending(pending)
        pending.append((host, view))

    def _write_cluster(self, ci: int, within: int, piece, pending: list) -> None:
        cs = self.cs
        cstart = ci << self.cluster_bits
        clen = min(cs, self.size - cstart)
        l2off, l2 = self.l2_for_write(ci >> self.l2_bits)
        idx = ci & (self.l2_entries - 1)
        if self.extended:
            self._write_ext(l2off, l2, idx, ci, cstart, clen, within, piece, pending)
            return
        e = l2[idx]
        full = within == 0 and len(piece) == clen
        host = e & L2E_OFFSET_MASK
        if self._owned(e):
            if self.has_data_file:
                host = cstart
            if e & QCOW_OFLAG_ZERO and not full:
                buf = bytearray(clen)
                buf[within:within + len(piece)] = piece
                self._flush_pending(pending)
                self.data.pwrite(host, buf)
            else:
                self._queue(pending, host + within, piece)
            new_e = host | QCOW_OFLAG_COPIED
            if new_e != e:
                l2[idx] = new_e
                self.l2_dirty.add(l2off)
            return
        # allocate a fresh cluster, filling what the write does not cover
        if full:
            content = piece
        else:
            self._flush_pending(pending)
            content = self.read_cluster(ci)
            content[within:within + len(piece)] = piece
        if self.has_data_file:
            new = cstart
        else:
            new = self.refs.alloc(1) * cs
        self._queue(pending, new, content)
        if not self.has_data_file:
            self.release_entry(e)
        l2[idx] = new | QCOW_OFLAG_COPIED
        self.l2_dirty.add(l2off)

    def _write_ext(self, l2off, l2, idx, ci, cstart, clen, within, piece, pending) -> None:
        scs = self.geo.subcluster_size
        word, bitmap = l2[2 * idx], l2[2 * idx + 1]
        s0 = within // scs
        s1 = (within + len(piece) - 1) // scs
        a0, a1 = s0 * scs, min(clen, (s1 + 1) * scs)  # subcluster-aligned span
        mask = sum(1 << s for s in range(s0, s1 + 1))
        owned = self._owned(word)
        host = word & L2E_OFFSET_MASK
        if self.has_data_file:
            host = cstart
        if owned or (not word & QCOW_OFLAG_COMPRESSED and not host):
            if not owned and not self.has_data_file:
                host = self.refs.alloc(1) * self.cs
            if within == a0 and within + len(piece) == a1:
                self._queue(pending, host + a0, piece)
            else:
                self._flush_pending(pending)
                span = bytearray(a1 - a0)
                self.readinto(cstart + a0, span)
                span[within - a0:within - a0 + len(piece)] = piece
                self.data.pwrite(host + a0, span)
            new_word = host | QCOW_OFLAG_COPIED
            new_bitmap = (bitmap | mask) & ~(mask << SUBCLUSTERS)
        else:
            # compressed or shared: copy the whole cluster to a new one
            self._flush_pending(pending)
            content = self.read_cluster(ci)
            content[within:within + len(piece)] = piece
            new = cstart if self.has_data_file else self.refs.alloc(1) * self.cs
            self.data.pwrite(new, content)
            if not self.has_data_file:
                self.release_entry(word)
            new_word = new | QCOW_OFLAG_COPIED
            new_bitmap = ALL_ALLOC
        if (new_word, new_bitmap) != (word, bitmap):
            l2[2 * idx], l2[2 * idx + 1] = new_word, new_bitmap
            self.l2_dirty.add(l2off)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self.prepare_write()
        if self.bitmaps is not None:
            self.bitmaps.mark(offset, length)
        cs = self.cs
        for pos, n in pieces(offset, length, cs):
            ci, within = divmod(pos, cs)
            cstart = pos - within
            if not within and n == min(cs, self.size - cstart) \
                    and self._zero_cluster(ci, cstart):
                continue
            self._write(pos, ZEROES[:n])

    def _zero_cluster(self, ci: int, cstart: int) -> bool:
        """Make a whole guest cluster read as zeros through metadata alone; False when
        the image cannot (version 2 over a backing file, raw external data)."""
        backing = bool(self.header.backing_file)
        if self.has_data_file:
            if self.header.data_file_raw:
                return False
            # keep the mapping (host = guest offset), make the data file read zeros
            self._write(cstart, ZEROES[:min(self.cs, self.size - cstart)])
            return True
        if backing and self.header.version < 3:
            return False
        l1i = ci >> self.l2_bits
        idx = ci & (self.l2_entries - 1)
        if not backing:
            l1e = self.l1[l1i] if l1i < len(self.l1) else 0
            if not l1e & L1E_OFFSET_MASK:
                return True  # unallocated, no backing: already zeros
        l2off, l2 = self.l2_for_write(l1i)
        if self.extended:
            word, bitmap = l2[2 * idx], l2[2 * idx + 1]
            new = (0, ALL_ZERO if backing else 0)
            if (word, bitmap) != new:
                self.release_entry(word)
                l2[2 * idx], l2[2 * idx + 1] = new
                self.l2_dirty.add(l2off)
            return True
        e = l2[idx]
        new = QCOW_OFLAG_ZERO if backing else 0
        if e != new:
            self.release_entry(e)
            l2[idx] = new
            self.l2_dirty.add(l2off)
        return True

    # -- flushing ----------------------------------------------------------------------------
    def barrier(self) -> None:
        self.backend.flush(durable=True)

    def write_header(self) -> None:
        h = self.header
        h.l1_table_offset, h.l1_size = self.l1_offset, self.l1_size
        if self.refs is not None:
            h.refcount_table_offset = self.refs.table_offset
            h.refcount_table_clusters = self.refs.table_clusters
        buf = h.build()
        self.backend.pwrite(0, buf + bytes(self.cs - len(buf)))
        self.header_dirty = False

    def flush(self) -> None:
        if not self.writable or self.refs is None:
            return
        refs = self.refs
        if self.has_data_file:
            self.data.flush(durable=True)
        if self.bitmaps is not None:
            self.bitmaps.flush_data()
        if refs.dirty or refs.table_dirty:
            refs.write_blocks()
            self.barrier()
        if self.l2_dirty:
            for off in sorted(self.l2_dirty):
                self.backend.pwrite(off, be_bytes(self.l2_cache[off]))
            self.l2_dirty.clear()
            self.barrier()
        if self.l1_dirty:
            self.backend.pwrite(self.l1_offset, be_bytes(self.l1))
            self.l1_dirty = False
        if self.header_dirty or refs.table_moved:
            self.write_header()
        if self.bitmaps is not None:
            self.bitmaps.write_tables()
        self.barrier()
        if refs.pending or refs.old_tables:
            refs.release_old_tables()
            refs.apply_frees()
            refs.write_blocks()
            self.barrier()
            for off in [o for o in self.l2_cache if refs.get(o // self.cs) == 0]:
                del self.l2_cache[off]  # freed tables: their clusters may be reused

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.writable and self.refs is not None:
                self.flush()
                if self.bitmaps is not None:
                    self.bitmaps.close()
        finally:
            if self.data is not None and self.data is not self.backend:
                self.data.close()
            super().close()

    # == maintenance hooks ===================================================================
    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        return check_image(self, repair)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        self._require_writable()
        maintenance.resize(self, size, shrink=shrink)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        self._require_writable()
        maintenance.set_backing(self, name, fmt)

    def make_empty(self) -> None:
        self._require_writable()
        maintenance.make_empty(self)

    def amend(self, options, given: set[str]) -> None:
        self._require_writable()
        maintenance.amend(self, options, given)

    # snapshots
    def list_snapshots(self) -> list[dict]:
        return [s.to_json() for s in self.snapshots]

    def create_snapshot(self, name: str) -> None:
        self._require_writable()
        snapshot_table.create(self, name)

    def apply_snapshot(self, key: str) -> None:
        self._require_writable()
        snapshot_table.apply(self, key)

    def delete_snapshot(self, key: str) -> None:
        self._require_writable()
        snapshot_table.delete(self, key)


def open_device(path: str, *, writable: bool = False, policy=None,
                snapshot: str | None = None) -> Qcow2Device:
    return Qcow2Device(path, writable=writable, policy=policy, snapshot=snapshot)


__all__ = ["Qcow2Device", "open_device", "Header"]
