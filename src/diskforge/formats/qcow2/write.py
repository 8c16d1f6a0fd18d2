"""The write path (as QEMU's qcow2.c writes and qcow2-cluster.c allocates) and the
crash-safe flush ordering beside the refcounts.

Writes allocate from the refcounts, copy-on-write anything shared (snapshots, the
backing file for partial clusters, compressed clusters) and keep the COPIED flags
exact (``qemu-img check`` counts a wrong one as corruption). ``flush`` writes the
metadata in a crash-safe order with a barrier between stages: data (already written),
refcount increments, L2 tables, L1 table and header, then the decrements of what
the new tables no longer use. An interrupted run can leak clusters; it cannot leave a
table pointing at a cluster whose count says it is free.
"""

from __future__ import annotations

from array import array

from ...byteorder import be_bytes
from ...blockdev import ZEROES, pieces
from ...errors import FormatError, SafetyError, UnsupportedError
from .structs import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW2_AUTOCLEAR_MASK,
                      QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                      SUBCLUSTERS)

ALL_ALLOC = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOC << SUBCLUSTERS


class WritePath:
    """The write side of ``Qcow2Device`` (a mixin over ``ClusterMap``'s tables): the
    ``_write``/``_write_zeroes`` hooks ``BlockDevice`` calls after its checks, and
    ``flush``.

    Package API (for check, maintenance, snapshot, bitmaps): ``prepare_write`` (the
    preconditions of a first change), ``l2_for_write`` (an L2 table this L1 owns
    alone), ``fix_copied``, ``release_entry`` (queue an entry's clusters for freeing),
    ``barrier`` (a durable flush between ordered stages), ``write_header``,
    ``has_data_file``.
    """

    # -- writing ---------------------------------------------------------------------------
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
        if self.header.autoclear_features & ~QCOW2_AUTOCLEAR_MASK:
            # qcow2.txt: clear auto-clear bits we do not know before writing
            self.header.autoclear_features &= QCOW2_AUTOCLEAR_MASK
            self.write_header()
            self.barrier()
        if self.needs_repair:
            from ...checks import Repair
            from .check import check as check_image  # (imports maintenance: writers only)
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
        """A durable flush between two stages of the metadata order: what came before
        is on disk before anything after it is written."""
        self.backend.flush(durable=True)

    def write_header(self) -> None:
        """Write the header cluster from ``header`` with the current L1 and refcount
        table locations (the caller orders it with ``barrier``)."""
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
