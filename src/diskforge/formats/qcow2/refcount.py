"""qcow2 reference counts (qcow2.txt "Host cluster management"): the two-level table,
entries of 1 to 64 bits, and cluster allocation for images opened for writing.

A refcount block is kept as its on-disk bytes (big-endian, or packed LSB-first for
sub-byte widths) and read or written per entry; whole blocks are decoded into arrays
only by ``decode`` (the check). Every block of an image open for writing stays in
memory once loaded: 2 bytes per cluster at the default 16 bits, 32 KiB per GiB of
file at 64 KiB clusters.

Crash safety is the caller's: increments (new allocations) are written before the
L2/L1 tables that use them, decrements only after (``free`` queues them until
``apply_frees``), so a crash can leak clusters but never leave one in use with a
count of zero.
"""

from __future__ import annotations

import struct
from array import array

from ...byteorder import be_array, be_bytes
from ...errors import FormatError, UnsupportedError
from .structs import REFT_OFFSET_MASK, Geometry

_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
_STRUCTS = {3: struct.Struct(">B"), 4: struct.Struct(">H"), 5: struct.Struct(">I"),
            6: struct.Struct(">Q")}


def refcount_layout(clusters: int, cluster_size: int, refcount_order: int
                    ) -> tuple[int, int]:
    """(table clusters, block clusters) needed to count ``clusters`` clusters plus the
    refcount metadata itself: qemu's fixed point (qcow2_refcount_metadata_size), so
    ``measure`` and the writer agree with qemu-img."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    last, n = -1, 0
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return table, blocks


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    table, blocks = refcount_layout(clusters, cluster_size, refcount_order)
    return (table + blocks) * cluster_size


def decode(raw: bytes, order: int) -> array:
    """Every entry of one refcount block, as an array of ints."""
    if order >= 3:
        return be_array(raw, _TYPECODES[order])
    table = _expand_table(order)
    return array("B", b"".join(table[b] for b in raw))


_expanded: dict[int, list[bytes]] = {}


def _expand_table(order: int) -> list[bytes]:
    t = _expanded.get(order)
    if t is None:
        bits = 1 << order
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        t = [bytes((b >> (i * bits)) & mask for i in range(per_byte)) for b in range(256)]
        _expanded[order] = t
    return t


def encode(values, order: int) -> bytes:
    """The on-disk bytes of a refcount block holding ``values`` (an int sequence)."""
    if order >= 3:
        return be_bytes(array(_TYPECODES[order], values))
    bits = 1 << order
    per_byte = 8 // bits
    out = bytearray(-(-len(values) // per_byte))
    for i, v in enumerate(values):
        if v:
            out[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(out)


def get_entry(raw, order: int, i: int) -> int:
    if order >= 3:
        return _STRUCTS[order].unpack_from(raw, i << (order - 3))[0]
    bits = 1 << order
    per_byte = 8 // bits
    return (raw[i // per_byte] >> ((i % per_byte) * bits)) & ((1 << bits) - 1)


def set_entry(raw: bytearray, order: int, i: int, value: int) -> None:
    if order >= 3:
        _STRUCTS[order].pack_into(raw, i << (order - 3), value)
        return
    bits = 1 << order
    per_byte = 8 // bits
    shift = (i % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    raw[i // per_byte] = (raw[i // per_byte] & ~mask) | (value << shift)


def all_ones_block(count: int, total: int, order: int) -> bytes:
    """A block whose first ``count`` of ``total`` entries are 1, the rest 0 (the
    sequential writer's common case, built without a per-entry loop)."""
    if order >= 3:
        width = 1 << (order - 3)
        one = (1).to_bytes(width, "big")
        return one * count + bytes(width * (total - count))
    bits = 1 << order
    per_byte = 8 // bits
    full_byte = sum(1 << (i * bits) for i in range(per_byte))
    whole, rest = divmod(count, per_byte)
    out = bytearray(bytes([full_byte]) * whole)
    if rest:
        out.append(sum(1 << (i * bits) for i in range(rest)))
    out += bytes(total // per_byte - len(out))
    return bytes(out)


class Refcounts:
    """The refcount structure of an image open for writing: lookups, allocation of
    free clusters, and growth of the table when the file outgrows it."""

    def __init__(self, backend, geometry: Geometry, table_offset: int, table_clusters: int,
                 path: str):
        self.backend = backend
        self.geo = geometry
        self.cs = geometry.cluster_size
        self.order = geometry.refcount_order
        self.epb = geometry.refblock_entries
        self.max = geometry.refcount_max
        self.path = path
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = backend.read_exact(table_offset, table_clusters * self.cs, "refcount table")
        self.table = be_array(raw)
        self.blocks: dict[int, bytearray] = {}
        self.dirty: set[int] = set()
        self.table_dirty = False
        self.table_moved = False
        self.pending: list[tuple[int, int]] = []   # (cluster, count) to free after L2/L1
        self.old_tables: list[tuple[int, int]] = []
        self.free_hint = 0
        self.end = -(-backend.size // self.cs)      # first cluster past the file

    # -- lookups -----------------------------------------------------------------------
    def _block(self, ti: int) -> bytearray | None:
        b = self.blocks.get(ti)
        if b is not None:
            return b
        if ti >= len(self.table):
            return None
        entry = self.table[ti]
        off = entry & REFT_OFFSET_MASK
        if not off:
            return None
        if off % self.cs or off + self.cs > self.backend.size:
            raise FormatError(f"refcount block {ti} at {off:#x} is unaligned or past the end"
                              " of the file", self.path, structure="refcount table",
                              field=f"entry {ti}")
        if off < self.cs:
            raise FormatError(f"refcount block {ti} points into the header", self.path,
                              structure="refcount table", field=f"entry {ti}")
        b = bytearray(self.backend.read_exact(off, self.cs, "refcount block"))
        self.blocks[ti] = b
        return b

    def get(self, cluster: int) -> int:
        b = self._block(cluster // self.epb)
        return 0 if b is None else get_entry(b, self.order, cluster % self.epb)

    def set(self, cluster: int, value: int) -> None:
        """Store a count as it is (no range or free-list bookkeeping): for ``add`` and
        for check's in-place repairs, which know the count to write."""
        ti = cluster // self.epb
        b = self._block(ti)
        if b is None:
            raise FormatError(f"cluster {cluster} has no refcount block", self.path,
                              structure="refcount table")
        set_entry(b, self.order, cluster % self.epb, value)
        self.dirty.add(ti)

    # -- changes -----------------------------------------------------------------------
    def add(self, cluster: int, delta: int) -> int:
        """Change one cluster's count now (increments; decrements of clusters that
        stay in use). Returns the new count."""
        value = self.get(cluster) + delta
        if value < 0:
            raise FormatError(f"refcount of cluster {cluster} would drop below zero; run"
                              " 'diskforge check -r all'", self.path,
                              structure="refcount block")
        if value > self.max:
            raise UnsupportedError(f"refcount of cluster {cluster} would exceed"
                                   f" {self.max} (refcount_bits={self.geo.refcount_bits})",
                                   self.path)
        self.set(cluster, value)
        if value == 0:
            self.free_hint = min(self.free_hint, cluster)
        return value

    def free(self, cluster: int, count: int = 1) -> None:
        """Queue ``count`` clusters from ``cluster`` to lose one reference each, once
        the tables no longer point at them (``apply_frees``)."""
        self.pending.append((cluster, count))

    def apply_frees(self) -> None:
        pending, self.pending = self.pending, []
        for cluster, count in pending:
            for c in range(cluster, cluster + count):
                self.add(c, -1)

    def alloc(self, n: int = 1) -> int:
        """``n`` contiguous free clusters, counted 1 each; returns the first's index."""
        while True:
            start = self._find_free(n)
            first, last = start // self.epb, (start + n - 1) // self.epb
            missing = next((ti for ti in range(first, last + 1)
                            if self._block(ti) is None), None)
            if missing is None:
                for c in range(start, start + n):
                    self.set(c, 1)
                if start == self.free_hint:
                    self.free_hint = start + n
                self.end = max(self.end, start + n)
                return start
            self._new_block(missing)

    def _find_free(self, n: int) -> int:
        c = self.free_hint
        run_start, run = c, 0
        while run < n:
            ti = c // self.epb
            b = self._block(ti)
            if b is None:
                # the whole block's range is free: take as much as needed of it
                take = min(n - run, (ti + 1) * self.epb - c)
                if run == 0:
                    run_start = c
                run += take
                c += take
                continue
            if get_entry(b, self.order, c % self.epb) == 0:
                if run == 0:
                    run_start = c
                run += 1
            else:
                if run == 0 and c == self.free_hint:
                    self.free_hint = c + 1
                run = 0
            c += 1
        return run_start

    def _new_block(self, ti: int) -> None:
        """Create refcount block ``ti``, placed in the first free cluster."""
        if ti >= len(self.table):
            self._grow_table(ti + 1)
            return
        b = self._find_free(1)
        tb = b // self.epb
        if tb != ti and self._block(tb) is None:
            self._new_block(tb)  # that block must exist first to count this one
            return
        self.blocks[ti] = bytearray(self.cs)
        self.table[ti] = b * self.cs
        self.dirty.add(ti)
        self.table_dirty = True
        self.set(b, 1)
        self.end = max(self.end, b + 1)
        if b == self.free_hint:
            self.free_hint = b + 1

    def _grow_table(self, min_entries: int) -> None:
        """Move the table to a larger one past the end of the file, with the refcount
        blocks that count its clusters right after it (qemu's layout for this case)."""
        per_cluster = self.cs // 8
        entries = max(min_entries, len(self.table) * 3 // 2 + 1)
        start = max(self.end, self.last_used() + 1)
        while True:
            tc = -(-entries // per_cluster)
            nb = 0
            while True:  # blocks to cover [start, start + tc + nb)
                first, last = start // self.epb, (start + tc + nb - 1) // self.epb
                need = [ti for ti in range(first, last + 1) if self._block(ti) is None]
                if len(need) == nb:
                    break
                nb = len(need)
            top = max(need, default=0)
            if top < tc * per_cluster and min_entries <= tc * per_cluster:
                break
            entries = max(entries, top + 1) * 3 // 2 + 1
        if tc * self.cs > 8 << 20:
            raise UnsupportedError("the refcount table would exceed qemu's 8 MiB limit",
                                   self.path)
        new = array("Q", bytes(tc * self.cs))
        new[:len(self.table)] = self.table
        for k, ti in enumerate(need):
            self.blocks[ti] = bytearray(self.cs)
            new[ti] = (start + tc + k) * self.cs
            self.dirty.add(ti)
        self.table = new
        for c in range(start, start + tc + nb):
            self.set(c, 1)
        if self.table_offset:
            self.old_tables.append((self.table_offset // self.cs, self.table_clusters))
        self.table_offset = start * self.cs
        self.table_clusters = tc
        self.table_dirty = self.table_moved = True
        self.end = max(self.end, start + tc + nb)

    def last_used(self) -> int:
        """The highest cluster with a nonzero count (where new metadata may start)."""
        for ti in range(len(self.table) - 1, -1, -1):
            b = self._block(ti)
            if b is None or not any(b):
                continue
            for i in range(self.epb - 1, -1, -1):
                if get_entry(b, self.order, i):
                    return ti * self.epb + i
        return 0

    # -- writing -----------------------------------------------------------------------
    def write_blocks(self) -> None:
        """Write changed blocks, then the table (in place, or at its new home)."""
        for ti in sorted(self.dirty):
            self.backend.pwrite(self.table[ti] & REFT_OFFSET_MASK, self.blocks[ti])
        self.dirty.clear()
        if self.table_dirty:
            self.backend.pwrite(self.table_offset, be_bytes(self.table))
            self.table_dirty = False

    def release_old_tables(self) -> None:
        """After the header points at a moved table: free the old one's clusters."""
        for first, count in self.old_tables:
            for c in range(first, first + count):
                self.add(c, -1)
        self.old_tables.clear()
        self.table_moved = False
