"""``check [-r leaks|all]``: recount every reference and compare with the refcounts,
as qemu's qcow2_check_refcounts does, with its messages and result fields.

References counted: the header cluster, the active L1 table and every snapshot's,
each L2 table once per L1 table that reaches it and each data cluster once per L2
table visit (so clusters shared with snapshots count once per L1), compressed
clusters for every host cluster their sectors touch, the snapshot table, the
refcount table and blocks, the bitmap directory, tables and data. On-disk count
higher than the references: a leak. Lower: corruption. Zero while referenced: the
refcount structure must be rebuilt. Overlapping metadata shows up as a count that is
too low. The COPIED flags of the active tables must say exactly "refcount is 1".

Repair (``leaks`` or ``all``) fixes counts in place, or, when a referenced cluster
has no count at all or the structure itself is broken, writes a new refcount table
and blocks past the end of the file; ``all`` also fixes COPIED flags and drops L2
entries that point outside the file or into the header. A second, read-only pass
then reports what is left, as ``qemu-img check -r`` does.
"""

from __future__ import annotations

from array import array

from ...byteorder import be_array
from ...blockdev import skip_filled
from ...errors import FormatError, LimitError
from ...limits import check_alloc
from ...checks import CheckResult, Problem, ProblemKind, Repair
from .bitmaps import read_directory, read_table, table_entry_error
from .maintenance import rebuild_refcounts
from .refcount import decode, refcount_layout
from .structs import (BME_TABLE_ENTRY_OFFSET_MASK, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                      QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DIRTY,
                      QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                      REFT_OFFSET_MASK, SUBCLUSTERS)


def _used(table: array, step: int = 1):
    """Indices (multiples of ``step``) of the entries of ``table`` that are not zero,
    empty stretches skipped at memory speed: a walk bounded by what the table holds,
    not by the virtual size it could map."""
    i, n = 0, len(table)
    while i < n:
        i = skip_filled(table, i, n)
        if i >= n:
            return
        i -= i % step
        yield i
        i += step


# bytes of distinct snapshot L1 tables one check reads (qemu's limits allow 65536
# snapshots of up to 32 MiB each: 2 TiB of tables, all of which a sparse file can hold)
SNAPSHOT_L1_BUDGET = 1 << 30


class _Counter:
    """Computed references per cluster: an array inside the file, a dict past it (a
    hostile table cannot make us allocate for offsets it merely names). The array is
    sized by the file, which a sparse file makes as large as it likes: it asks the
    memory budget first."""

    def __init__(self, nb: int, cs: int, path: str | None = None, also: int = 0):
        self.nb = nb
        self.cs = cs
        # ``also``: bytes per cluster the caller will hold beside (the on-disk counts)
        check_alloc((4 + also) * nb, path, "check", f"reference counts ({4 + also}"
                    " bytes per cluster of the file)")
        self.inside = array("I", bytes(4 * nb))
        self.outside: dict[int, int] = {}

    def add(self, offset: int, length: int, delta: int = 1) -> None:
        cs = self.cs
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            if c < self.nb:  # (saturating: weights can multiply past 32 bits)
                self.inside[c] = min(self.inside[c] + delta, 0xFFFF_FFFF)
            else:
                self.outside[c] = self.outside.get(c, 0) + delta

    def get(self, c: int) -> int:
        return self.inside[c] if c < self.nb else self.outside.get(c, 0)

    def highest(self) -> int:
        top = max(self.outside, default=-1)
        if top >= 0:
            return top
        raw = memoryview(self.inside).cast("B")
        end = len(raw)
        while end > 0:  # back from the end, a chunk at a time at memory speed
            start = max(0, end - (1 << 20))
            chunk = raw[start:end].tobytes().rstrip(b"\0")
            if chunk:
                return (start + len(chunk) - 1) // 4
            end = start
        return -1


def check(dev, repair: Repair = Repair.NONE) -> CheckResult:
    result = first = _Check(dev, repair).run()
    if repair and (first.leaks_fixed or first.corruptions_fixed):
        dev.flush()
        result = _Check(dev, Repair.NONE).run()
        result.problems[:0] = first.problems + [
            Problem(ProblemKind.NOTE, "Double checking the fixed image now...")]
        result.leaks_fixed = first.leaks_fixed
        result.corruptions_fixed = first.corruptions_fixed
    if repair and not result.corruptions and not result.check_errors:
        _mark_clean(dev)  # as qemu: a repaired image is neither dirty nor corrupt
    return result


def _mark_clean(dev) -> None:
    h = dev.header
    dev.needs_repair = False
    if h.incompatible_features & (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY):
        h.incompatible_features &= ~(QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY)
        dev.flush()
        dev.write_header()
        dev.barrier()


class _Check:
    def __init__(self, dev, repair: Repair):
        self.dev = dev
        self.repair = repair
        self.cs = dev.cs
        self.fsize = dev.backend.size
        self.nb = -(-self.fsize // self.cs)
        self.refs = _Counter(self.nb, self.cs, dev.path,
                             max(1, dev.geo.refcount_bits // 8))
        self.res = CheckResult(filename=dev.path, format="qcow2")
        self.res.total_clusters = -(-dev.header.size // self.cs)
        self.res.allocated_clusters = self.res.fragmented_clusters = 0
        self.res.compressed_clusters = 0
        self.rebuild = self.rebuilt = False
        self.next_contiguous = 0
        # how many references the table being walked stands for: snapshot tables that
        # many snapshots share are walked once, their references counted that often
        self.weight = 1

    def error(self, msg: str, structure: str | None = None, field: str | None = None,
              *, repairable: bool = False) -> None:
        """A corruption, counted once for every reference the walked table stands for."""
        self.res.add(ProblemKind.CORRUPTION, msg, structure, field, repairable=repairable,
                     count=self.weight)

    def count(self, offset: int, length: int) -> None:
        """One reference to [offset, offset + length). As qemu: the last cluster may
        reach past the end of the file, a whole cluster or more is an error and is not
        counted (nor does it move the image end)."""
        if offset + length - self.fsize >= self.cs:
            self.error("ERROR: counting reference for region exceeding the end of the file"
                       f" by one cluster or more: offset 0x{offset:x} size 0x{length:x}")
            return
        self.refs.add(offset, length, self.weight)

    # -- counting references -------------------------------------------------------------
    def run(self) -> CheckResult:
        dev, h, cs = self.dev, self.dev.header, self.cs
        self.count(0, cs)
        if dev.snapshot is None:
            active = dev.l1
        else:
            active = self._read_l1(h.l1_table_offset, h.l1_size)
        self.walk_l1(h.l1_table_offset, active, True)
        self._walk_snapshots()
        if h.nb_snapshots:
            self.count(h.snapshots_offset, dev.snapshot_table_size)
        self.count(h.refcount_table_offset, h.refcount_table_clusters * cs)
        self.old_meta = [(h.refcount_table_offset, h.refcount_table_clusters * cs)]
        table = self._refcount_table()
        for ti in _used(table):
            off = table[ti] & REFT_OFFSET_MASK
            if not off:
                continue
            if off % cs or off < cs:
                self.error(f"ERROR refcount block {ti} is not cluster aligned; refcount"
                           " table entry corrupted", "RefcountTable", "offset")
                self.rebuild = True
                table[ti] = 0
                continue
            if off + cs > self.fsize:
                self.error(f"ERROR refcount block {ti} is outside image", "RefcountTable",
                           "offset")
                self.rebuild = True
                table[ti] = 0
                continue
            self.count(off, cs)
            self.old_meta.append((off, cs))
        self._bitmaps()
        if h.crypto is not None:
            self.count(h.crypto[0], max(1, h.crypto[1]))
        self.compare(table)
        self.check_copied()
        top = self.refs.highest()
        if not self.repair.leaks:  # as qemu-img: leaked clusters still end the image
            top = max(top, getattr(self, "ondisk_top", -1))
        self.res.image_end_offset = (top + 1) * cs
        return self.res

    def _walk_snapshots(self) -> None:
        """Count every snapshot's references as qemu does (once per snapshot), but walk
        each distinct L1 table and each L2 table once, with the number of times it is
        reached as the weight: tens of thousands of snapshots sharing their tables (the
        usual case, and a hostile one) cost one walk, not one per snapshot."""
        cs = self.cs
        l1s: dict[tuple[int, int], int] = {}
        for s in self.dev.snapshots:
            key = (s.l1_table_offset, s.l1_size)
            l1s[key] = l1s.get(key, 0) + 1
        walked = sum(size * 8 for _, size in l1s)
        if walked > SNAPSHOT_L1_BUDGET:
            raise LimitError(f"QCowSnapshotHeader.l1_size: the snapshots' distinct L1"
                             f" tables hold {walked} bytes, more than the"
                             f" {SNAPSHOT_L1_BUDGET >> 20} MiB check walks for one"
                             " command", self.dev.path)
        l2s: dict[int, int] = {}
        for (offset, size), n in l1s.items():
            self.weight = n
            l1 = self._read_l1(offset, size)
            if size:
                self.count(offset, size * 8)
            for i in _used(l1):
                off = l1[i] & L1E_OFFSET_MASK
                if not off:
                    continue
                if not self._table_ok(off):
                    self.error(f"ERROR l2_offset={off:x}: Table is not cluster aligned, in"
                               " the header or past the end of the file; L1 entry"
                               " corrupted", "L1 entry", "offset")
                    continue
                self.count(off, cs)
                l2s[off] = l2s.get(off, 0) + n
        for off, n in l2s.items():
            self.weight = n
            self.walk_l2(off, self.dev.l2_table(off), False)
        self.weight = 1

    def _read_l1(self, offset: int, size: int) -> array:
        return be_array(self.dev.backend.read_exact(offset, size * 8, "L1 table"))

    def _table_ok(self, off: int) -> bool:
        return off % self.cs == 0 and off >= self.cs and off + self.cs <= self.fsize

    def walk_l1(self, l1_offset: int, l1: array, active: bool) -> None:
        dev, cs = self.dev, self.cs
        if len(l1):
            self.count(l1_offset, len(l1) * 8)
        seen: set[int] = set()
        repeats: dict[int, int] = {}
        for i in _used(l1):
            e = l1[i]
            off = e & L1E_OFFSET_MASK
            if not off:
                continue
            if not self._table_ok(off):
                self.error(f"ERROR l2_offset={off:x}: Table is not cluster aligned, in the"
                           " header or past the end of the file; L1 entry corrupted",
                           "L1 entry", "offset", repairable=active and self.repair.errors)
                if active and self.repair.errors:
                    l1[i] = 0
                    dev.l1_dirty = True
                    self.res.corruptions_fixed += 1
                continue
            self.count(off, cs)
            if off in seen:     # several L1 entries naming one L2 table (hostile, or
                repeats[off] = repeats.get(off, 0) + 1   # corrupt): walked once more,
                continue                                  # weighted, below
            seen.add(off)
            self.walk_l2(off, dev.l2_table(off), active)
        for off, n in repeats.items():
            self.weight = n
            self.walk_l2(off, dev.l2_table(off), active)
        self.weight = 1

    def walk_l2(self, l2_off: int, l2: array, active: bool) -> None:
        dev, cs, geo = self.dev, self.cs, self.dev.geo
        ext = dev.extended
        step = 2 if ext else 1
        has_df = dev.has_data_file
        res = self.res
        fixed = False
        for i in _used(l2, step):
            e = l2[i]
            if e & QCOW_OFLAG_COMPRESSED:
                if e & QCOW_OFLAG_COPIED:
                    self.error(f"ERROR: cluster {i // step}: copied flag must never be set"
                               " for compressed clusters", "L2 entry", "QCOW_OFLAG_COPIED",
                               repairable=active and self.repair.errors)
                    if active and self.repair.errors:
                        l2[i] = e & ~QCOW_OFLAG_COPIED
                        fixed = True
                        res.corruptions_fixed += 1
                if has_df:
                    self.error("ERROR: compressed cluster in an image with an external"
                               " data file", "L2 entry", "QCOW_OFLAG_COMPRESSED")
                    continue
                if ext and l2[i + 1]:
                    self.error(f"ERROR: compressed cluster {i // step} has a non-zero"
                               " subcluster bitmap", "extended L2 entry",
                               "subcluster bitmap")
                off, n = geo.compressed_range(e)
                if off < cs:
                    self.error(f"ERROR: compressed cluster {i // step} points into the"
                               " header", "Compressed Clusters Descriptor", "host offset")
                    continue
                self.count(off, n)
                if active:
                    res.allocated_clusters += self.weight
                    res.compressed_clusters += self.weight
                    res.fragmented_clusters += self.weight
                continue
            host = e & L2E_OFFSET_MASK
            if ext:
                bitmap = l2[i + 1]
                if (bitmap >> SUBCLUSTERS) & bitmap & ((1 << SUBCLUSTERS) - 1):
                    self.error(f"ERROR: cluster {i // step}: subclusters both allocated"
                               " and zero", "extended L2 entry", "subcluster bitmap")
                if bitmap & ((1 << SUBCLUSTERS) - 1) and not host and not has_df:
                    self.error(f"ERROR: cluster {i // step}: allocated subclusters without"
                               " a host cluster", "extended L2 entry", "offset")
            if not host and not (has_df and e & QCOW_OFLAG_COPIED):
                continue  # unallocated or a plain zero cluster
            if not has_df:
                if host % cs or host < cs:
                    self.error(f"ERROR offset={host:x}: Cluster is not properly aligned or"
                               " points into the header; L2 entry corrupted", "L2 entry",
                               "offset", repairable=active and self.repair.errors)
                    if active and self.repair.errors:
                        l2[i] = QCOW_OFLAG_ZERO if dev.header.version >= 3 and not ext \
                            else 0
                        if ext:
                            l2[i + 1] = 0
                        fixed = True
                        res.corruptions_fixed += 1
                    continue
                self.count(host, cs)
            if active:
                res.allocated_clusters += self.weight
                if self.next_contiguous and host != self.next_contiguous:
                    res.fragmented_clusters += 1
                self.next_contiguous = host + cs
        if fixed:
            dev.l2_dirty.add(l2_off)

    def _bitmaps(self) -> None:
        dev = self.dev
        if dev.header.bitmaps is None:
            return
        ext = dev.header.bitmaps
        self.count(ext.directory_offset, ext.directory_size)
        try:
            bitmaps = read_directory(dev)
        except FormatError as e:
            self.error(f"ERROR bitmap directory: {e.message}", "Qcow2BitmapDirEntry")
            return
        for b in bitmaps:
            if b.table_size:
                self.count(b.table_offset, b.table_size * 8)
            try:
                table = read_table(dev, b)
            except FormatError as e:
                self.error(f"ERROR bitmap '{b.name}': {e.message}", "Qcow2BitmapDirEntry",
                           "bitmap_table_offset")
                continue
            for i in _used(table):
                why = table_entry_error(table[i], self.cs)
                if why is not None:  # (qemu counts these as corruptions, silently)
                    self.error(f"ERROR bitmap '{b.name}': table entry {i}"
                               f" ({table[i]:#x}): {why}", "bitmap table entry",
                               f"entry {i}")
                    continue
                off = table[i] & BME_TABLE_ENTRY_OFFSET_MASK
                if off:  # (counted as qemu counts it: wherever it points, a cluster
                    self.count(off, self.cs)  # counted twice shows as corruption)

    # -- comparing with the refcounts ----------------------------------------------------
    def _refcount_table(self) -> array:
        h = self.dev.header
        if self.dev.refs is not None:
            return array("Q", self.dev.refs.table)
        raw = self.dev.backend.read_exact(h.refcount_table_offset,
                                          h.refcount_table_clusters * self.cs,
                                          "refcount table")
        return be_array(raw)

    def compare(self, table: array) -> None:
        dev, cs, res = self.dev, self.cs, self.res
        order = dev.geo.refcount_order
        epb = dev.geo.refblock_entries
        top = max(self.nb, self.refs.highest() + 1)
        ondisk: dict[int, array] = {}
        for ti in _used(table):
            off = table[ti] & REFT_OFFSET_MASK
            if off and ti * epb < top:
                if dev.refs is not None and ti in dev.refs.blocks:
                    raw = bytes(dev.refs.blocks[ti])
                else:
                    raw = dev.backend.read_exact(off, cs, "refcount block")
                ondisk[ti] = decode(raw, order)
        self.ondisk = ondisk
        self.ondisk_top = _highest_counted(ondisk, epb, top)
        fix_leaks = self.repair.leaks
        fix_errors = self.repair.errors
        inplace: list[tuple[int, int]] = []
        for c in self._differing(ondisk, epb, top):
            blk = ondisk.get(c // epb)
            have = blk[c % epb] if blk is not None else 0
            want = self.refs.get(c)
            if have == want:
                continue
            if have == 0:
                self.rebuild = True
                fixable = fix_errors
            elif have > want:
                fixable = fix_leaks
            else:
                fixable = fix_errors
            kind = "Repairing" if fixable else ("ERROR" if have < want else "Leaked")
            res.add(ProblemKind.CORRUPTION if have < want else ProblemKind.LEAK,
                    f"{kind} cluster {c} refcount={have} reference={want}",
                    "RefcountBlock", "refcount", repairable=fixable)
            if fixable and have:
                inplace.append((c, want))
        if self.rebuild and fix_errors:
            self._rebuild()
            res.corruptions_fixed += res.corruptions
            res.leaks_fixed += res.leaks
            res.corruptions = res.leaks = 0
            return
        for c, want in inplace:
            blk = ondisk[c // epb]
            if blk[c % epb] > want:
                res.leaks_fixed += 1
                res.leaks -= 1
            else:
                res.corruptions_fixed += 1
                res.corruptions -= 1
            blk[c % epb] = want
            dev.refs.set(c, want)
        if inplace:
            dev.refs.write_blocks()

    def _differing(self, ondisk: dict, epb: int, top: int):
        """Clusters below ``top`` whose on-disk count may differ from the computed one:
        whole refcount blocks that agree (or are absent where nothing is counted) are
        passed over with one array comparison, so a sparse, mostly empty file costs
        memory-speed work, not a Python step per cluster."""
        inside, nb = self.refs.inside, self.refs.nb
        for ti in range(-(-top // epb)):
            lo = ti * epb
            hi = min(top, lo + epb)
            his = min(hi, nb)
            blk = ondisk.get(ti)
            if hi == his and lo < his:
                if blk is None:
                    if skip_filled(inside, lo, his) == his:
                        continue
                elif blk[:his - lo] == inside[lo:his]:
                    continue
            yield from range(lo, hi)

    def _rebuild(self) -> None:
        """New refcount table and blocks past everything in use, holding exactly the
        computed counts (plus their own); the old structure becomes free space."""
        top = max(self.nb, self.refs.highest() + 1)
        for off, n in self.old_meta:  # the old structure will not be referenced
            self.refs.add(off, n, -1)
        rebuild_refcounts(self.dev, self.refs.get, top, self.dev.geo.refcount_order)
        tc, nb = refcount_layout(top, self.cs, self.dev.geo.refcount_order)
        for c in range(top, top + tc + nb):
            self.refs.add(c * self.cs, self.cs)
        self.rebuilt = True

    def check_copied(self) -> None:
        """Bit 63 of active L1 and L2 entries must say "refcount is exactly 1"."""
        dev = self.dev
        if dev.snapshot is not None:
            return
        cs, epb = self.cs, dev.geo.refblock_entries

        def count(c: int) -> int:
            if self.repair.errors or self.rebuilt:
                return self.refs.get(c)
            blk = self.ondisk.get(c // epb)
            return blk[c % epb] if blk is not None else 0

        fix = self.repair.errors
        step = 2 if dev.extended else 1
        seen: set[int] = set()
        for i in _used(dev.l1):
            e = dev.l1[i]
            off = e & L1E_OFFSET_MASK
            if not off or not self._table_ok(off):
                continue
            rc = count(off // cs)
            if (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                self.error(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x}"
                           f" refcount={rc}", "L1 entry", "QCOW_OFLAG_COPIED",
                           repairable=fix)
                if fix:
                    dev.l1[i] = off | (QCOW_OFLAG_COPIED if rc == 1 else 0)
                    dev.l1_dirty = True
                    self.res.corruptions_fixed += 1
                    self.res.corruptions -= 1
            if off in seen:     # an L2 table named again: its entries were looked at
                continue
            seen.add(off)
            l2 = dev.l2_table(off)
            changed = False
            for j in _used(l2, step):
                x = l2[j]
                if x & QCOW_OFLAG_COMPRESSED:
                    continue
                host = x & L2E_OFFSET_MASK
                if dev.has_data_file:
                    rc = 1 if (host or x & QCOW_OFLAG_COPIED) else 0
                    if not rc:
                        continue
                elif not host or host % cs:
                    continue  # (past the end of the file: its refcount is 0, as qemu says)
                else:
                    rc = count(host // cs)
                if (rc == 1) != bool(x & QCOW_OFLAG_COPIED):
                    self.error(f"ERROR OFLAG_COPIED data cluster: l2_entry={x:x}"
                               f" refcount={rc}", "L2 entry", "QCOW_OFLAG_COPIED",
                               repairable=fix)
                    if fix:
                        l2[j] = (x & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if rc == 1
                                                            else 0)
                        changed = True
                        self.res.corruptions_fixed += 1
                        self.res.corruptions -= 1
            if changed:
                dev.l2_dirty.add(off)


def _highest_counted(ondisk: "dict[int, array]", epb: int, top: int) -> int:
    """The highest cluster below ``top`` whose on-disk refcount is not zero (-1: none).
    qemu-img's image end offset counts these too, leaked or not; the scan goes down
    from the last refcount block read and stops at the first one in use."""
    for ti in sorted(ondisk, reverse=True):
        blk = ondisk[ti]
        for i in range(min(epb, top - ti * epb) - 1, -1, -1):
            if blk[i]:
                return ti * epb + i
    return -1
