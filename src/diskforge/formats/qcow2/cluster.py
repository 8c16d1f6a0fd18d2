"""Cluster mapping (as QEMU's qcow2-cluster.c): guest offsets through L1 and L2 to
host offsets, the extent map and reads.

Reading maps each guest cluster through L1 → L2 (qcow2.txt "Cluster mapping"),
coalescing neighbouring clusters whose host offsets continue so that a convert reads
each stretch with one ``preadv``. Every table offset is validated when the table is
first loaded (aligned, not in the header cluster, inside the file); L2 tables are
kept in a bounded LRU cache.
"""

from __future__ import annotations

import bisect
from array import array

from ... import parallel
from ...byteorder import be_array
from ...blockdev import Extent, ExtentKind, coalesce, fill_zero, plain_host, skip_filled
from ...errors import DiskforgeError, FormatError
from . import codec
from .structs import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW2_SUBCLUSTER_COMPRESSED,
                      QCOW2_SUBCLUSTER_NORMAL, QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC,
                      QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, QCOW2_SUBCLUSTER_ZERO_ALLOC,
                      QCOW2_SUBCLUSTER_ZERO_PLAIN, QCOW_OFLAG_COMPRESSED,
                      QCOW_OFLAG_COPIED, SUBCLUSTERS, l2_entry_type)

# runs whose host offset steps with the guest offset; runs that carry no host offset
# (merged by kind alone); runs never merged (one compressed cluster each)
_HOST_STEPS = (QCOW2_SUBCLUSTER_NORMAL, QCOW2_SUBCLUSTER_ZERO_ALLOC)
_HOSTLESS = (QCOW2_SUBCLUSTER_ZERO_PLAIN, QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN)
_UNMERGED = (QCOW2_SUBCLUSTER_COMPRESSED,)
_UNALLOCATED = (QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC)


# the largest read whose successor is decoded ahead (memory: this, and its compressed
# bytes, per device)
AHEAD_MAX = 8 << 20


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



class ClusterMap:
    """The read side of ``Qcow2Device``: L2 tables (cached), the runs of like entries
    a guest range maps to, extents and reads. A mixin: it uses what ``Qcow2Device._open``
    sets (``header``, ``geo``, ``cs``, ``cluster_bits``, ``l2_entries``, ``l2_bits``,
    ``extended``, ``l1``, the L2 cache, ``backend``, ``data``, ``backing``).

    Package API (for check, maintenance, snapshot): ``l2_table``, ``check_table_offset``,
    ``runs`` (``(guest offset, length, QCOW2_SUBCLUSTER_* type, host)``), ``read_cluster``.
    """

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
        """Refuse a table offset before anything is read there: cluster aligned, past
        the header cluster, a whole cluster inside the file."""
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

    def host_backend(self, extent: Extent):
        """Uncompressed clusters are stored as they are, in the image or its external
        data file (``convert -C``); encrypted ones are not the disk's bytes."""
        return plain_host(self.data, extent) if self.crypto is None else None

    def _extents(self, offset, length, backing):
        for g, n, kind, host in self.runs(offset, length):
            if kind == QCOW2_SUBCLUSTER_NORMAL:  # encrypted bytes are not the disk's:
                yield Extent(g, n, ExtentKind.DATA, True,  # no offset, as qemu
                             None if self.crypto is not None else host)
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
        compressed = []   # (guest offset, L2 entry, where its bytes go): decoded at once
        for g, k, kind, host in self.runs(offset, n):
            dst = mv[g - offset:g - offset + k]
            if kind == QCOW2_SUBCLUSTER_NORMAL and self.crypto is not None:
                self.crypto.read(self.data, host, dst, g)  # (g: the old AES's IV)
            elif kind == QCOW2_SUBCLUSTER_NORMAL:
                got = self.data.readinto(host, dst)
                if got < k:  # past the end of the file: qemu reads zeros there too
                    fill_zero(dst[got:])
            elif kind in _UNALLOCATED:
                self._read_backing(g, dst)
            elif kind == QCOW2_SUBCLUSTER_COMPRESSED:
                compressed.append((g, host, dst))
            else:
                fill_zero(dst)
        ahead, self._ahead = self._ahead, None
        if compressed:
            self._read_compressed(compressed, ahead)
        elif ahead is not None:
            ahead.drop()
        # a reader walking forward through compressed clusters (convert, compare):
        # the next range of the same size is decoded while the caller uses this one
        if len(compressed) > 1 and offset == self._read_end and not self.writable \
                and n <= AHEAD_MAX and parallel.threads() > 1:
            self._ahead = self._read_ahead(offset + n, min(n, self.size - offset - n))
        self._read_end = offset + n
        return n

    def _read_backing(self, g: int, dst) -> None:
        k = len(dst)
        b = self.backing
        inside = 0 if b is None else max(0, min(k, b.size - g))
        if inside:
            b.readinto(g, dst[:inside])
        if inside < k:
            fill_zero(dst[inside:])

    def _read_compressed(self, units: list, ahead: "parallel.Ahead | None" = None) -> None:
        """Fill the compressed clusters a read covers: ``(guest offset, L2 entry, dst)``.

        One cluster (a small read) is decoded here, through the one-cluster cache that
        makes a walk through a cluster in small reads inflate it once. Several (a
        convert's batch) are decoded in parallel (``parallel.run``): their bytes read
        with one pread per contiguous run of the file, each cluster inflated straight
        into its place in the caller's buffer -- or, when the previous read started
        decoding exactly these clusters ahead (``_read_ahead``), copied from there. The
        checks are the same every way; a bad L2 entry stops the list there, so its
        error comes after those of the clusters before it, as in a loop over them."""
        if ahead is not None and ahead.serve([(g, e, len(dst)) for g, e, dst in units],
                                             [dst for _, _, dst in units]):
            return
        cb = self.cluster_bits
        if len(units) == 1:
            g, entry, dst = units[0]
            cstart = g >> cb << cb
            data = self._decompress(entry, cstart)
            dst[:] = memoryview(data)[g - cstart:g - cstart + len(dst)]
            return
        decode, count, bad = self._decoder(units, cache_last=True)
        parallel.run(decode, range(count))
        if bad is not None:
            raise bad

    def _decoder(self, units: list, *, cache_last: bool):
        """``(decode, count, bad)`` for compressed ``units``: ``decode(i)`` inflates the
        i-th into its ``dst``; the bytes of all are read here (``parallel.gather``).
        ``bad``: the error of the first unit whose L2 entry fails its checks (only the
        ``count`` units before it are decoded)."""
        cb = self.cluster_bits
        fsize = self.backend.size if self.writable else self.file_size
        spans, wheres, bad = [], [], None
        for i, (g, entry, _) in enumerate(units):
            try:
                off, size, where = self._compressed_span(entry, g >> cb << cb, fsize)
            except FormatError as e:
                bad, units = e, units[:i]
                break
            spans.append((off, size))
            wheres.append(where)
        views = parallel.gather(self.backend, spans)
        ctype, cs, path = self.header.compression_type, self.cs, self.path
        last = len(units) - 1 if cache_last else -1

        def decode(i: int) -> None:
            g, entry, dst = units[i]
            data = codec.decompress(ctype, views[i], cs, wheres[i], path)
            inside = g & (cs - 1)
            dst[:] = memoryview(data)[inside:inside + len(dst)]
            if i == last and inside + len(dst) < cs:
                self._comp_cache = (entry, data)   # the next read goes on in it

        return decode, len(units), bad

    def _read_ahead(self, start: int, n: int) -> "parallel.Ahead | None":
        """Start decoding the compressed clusters of ``[start, start+n)`` into a buffer
        of our own, on the pool, while the caller uses what it read. Memory: one read's
        size and its compressed bytes (``AHEAD_MAX`` at most)."""
        if n <= 0:
            return None
        try:
            units = [(g, host, k) for g, k, kind, host in self.runs(start, n)
                     if kind == QCOW2_SUBCLUSTER_COMPRESSED]
            if len(units) < 2:
                return None
            buf = memoryview(bytearray(n))
            placed = [(g, e, buf[g - start:g - start + k]) for g, e, k in units]
            decode, count, bad = self._decoder(placed, cache_last=False)
        except DiskforgeError:
            return None   # the read that needs these reports it, in its turn
        return parallel.Ahead(units, [dst for _, _, dst in placed],
                              parallel.start(decode, range(count)), count, bad)

    def drop_read_ahead(self) -> None:
        """Forget read-ahead, waiting for decodes in flight (before the file closes)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.drop()

    def _compressed_span(self, entry: int, cstart: int, fsize: int) -> tuple[int, int, str]:
        """Where a compressed cluster's bytes are, checked against the file: ``(host
        offset, bytes to read, its description for messages)``."""
        if self.data is not self.backend:
            raise FormatError("compressed cluster in an image with an external data file",
                              self.path, structure="L2 entry")
        off, csize = self.geo.compressed_range(entry)
        where = f"for guest offset {cstart:#x} at host {off:#x}"
        if off < self.cs:
            raise FormatError(f"compressed cluster {where} points into the header",
                              self.path, structure="L2 entry")
        if off >= fsize or off + csize > fsize + 511:
            raise FormatError(f"compressed cluster {where} (+{csize}) is past the end of"
                              f" the file ({fsize} bytes)", self.path, structure="L2 entry")
        return off, min(csize, fsize - off), where

    def _decompress(self, entry: int, cstart: int) -> bytes:
        cached = self._comp_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        off, n, where = self._compressed_span(entry, cstart, self.backend.size)
        raw = self.backend.pread(off, n)
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
