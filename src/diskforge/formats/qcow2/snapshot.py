"""Internal snapshots (qcow2.txt "Snapshots"): the snapshot table, and creating,
applying and deleting snapshots on an image open for writing.

A snapshot is a copy of the active L1 table plus one more reference on every L2
table and data cluster it reaches; writes then copy-on-write whatever is shared. The
refcount model is qemu's: a data cluster's count is the number of L1 tables
(active and snapshots) that reach it through some L2 table, so a shared L2 table's
clusters are counted once per L1 that reaches them.
"""

from __future__ import annotations

import time
from array import array

from ...byteorder import be_array, be_bytes
from ...errors import FormatError, UnsupportedError, UsageError
from ...records import Record
from .structs import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_MAX_L1_SIZE,
                      QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE,
                      QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_OFLAG_COMPRESSED,
                      QCOW_OFLAG_COPIED, QCOW_SNAPSHOT_HEADER_FAST, SNAPSHOT_EXTRA_SIZE,
                      SNAPSHOT_HEADER_SIZE, QCowSnapshotExtraData, QCowSnapshotHeader)


_READ_STEP = 1 << 20


class Snapshot(Record):
    """An internal snapshot's table entry (``extra_unknown``: extra data beyond what
    we know, kept on rewrite)."""
    __slots__ = ("l1_table_offset", "l1_size", "id", "name", "date_sec", "date_nsec",
                 "vm_clock_nsec", "vm_state_size", "disk_size", "icount", "extra_unknown")

    def __init__(self, l1_table_offset: int, l1_size: int, id: str, name: str,
                 date_sec: int = 0, date_nsec: int = 0, vm_clock_nsec: int = 0,
                 vm_state_size: int = 0, disk_size: int | None = None,
                 icount: int | None = None, extra_unknown: bytes = b""):
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id = id
        self.name = name
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size
        self.icount = icount
        self.extra_unknown = extra_unknown

    def to_json(self) -> dict:
        """qemu-img info's keys for one snapshot."""
        d = {"id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
             "date-sec": self.date_sec, "date-nsec": self.date_nsec,
             "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
             "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000}
        if self.icount is not None and self.icount != (1 << 64) - 1:
            d["icount"] = self.icount
        return d


def read_table(backend, offset: int, count: int, cluster_size: int, file_size: int,
               path: str | None) -> tuple[list[Snapshot], int]:
    """Parse ``count`` entries at ``offset``, validating each before use; returns them
    and the table's size in bytes."""
    snaps: list[Snapshot] = []
    pos = offset
    buf, buf_at = b"", offset   # the table is read a MiB at a time, not per entry

    def window(at: int, n: int, what: str) -> bytes:
        nonlocal buf, buf_at
        if at + n > buf_at + len(buf):
            buf_at = at
            buf = backend.read_exact(at, max(n, min(_READ_STEP, file_size - at)), what)
        return buf[at - buf_at:at - buf_at + n]

    for i in range(count):
        if pos - offset + SNAPSHOT_HEADER_SIZE > QCOW_MAX_SNAPSHOTS_SIZE:
            raise FormatError("snapshot table is larger than qemu's 64 MiB limit", path,
                              structure="QCowSnapshotHeader")
        (l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
         vm_clock_nsec, vm_state_size, extra_data_size) = QCOW_SNAPSHOT_HEADER_FAST.unpack(
            window(pos, SNAPSHOT_HEADER_SIZE, f"snapshot {i}"))
        if extra_data_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(f"snapshot {i}: {extra_data_size} bytes of extra data is"
                              " too much", path, structure="QCowSnapshotHeader",
                              field="extra_data_size")
        var = extra_data_size + id_str_size + name_size
        rest = window(pos + SNAPSHOT_HEADER_SIZE, var, f"snapshot {i}")
        extra = rest[:extra_data_size]
        try:
            sid = rest[extra_data_size:extra_data_size + id_str_size].decode()
            name = rest[extra_data_size + id_str_size:].decode()
        except UnicodeDecodeError:
            raise FormatError(f"snapshot {i}: id or name is not UTF-8", path,
                              structure="QCowSnapshotHeader") from None
        if l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise FormatError(f"snapshot {i}: L1 table of {l1_size} entries is too large",
                              path, structure="QCowSnapshotHeader", field="l1_size")
        if l1_size and (l1_table_offset % cluster_size or l1_table_offset < cluster_size
                        or l1_table_offset + l1_size * 8 > file_size):
            raise FormatError(f"snapshot {i}: L1 table at {l1_table_offset:#x} is"
                              " unaligned, in the header or past the end of the file", path,
                              structure="QCowSnapshotHeader", field="l1_table_offset")
        s = Snapshot(l1_table_offset, l1_size, sid, name, date_sec, date_nsec,
                     vm_clock_nsec, vm_state_size)
        if len(extra) >= 8:
            s.vm_state_size = int.from_bytes(extra[0:8], "big")
        if len(extra) >= 16:
            s.disk_size = int.from_bytes(extra[8:16], "big")
        if len(extra) >= 24:
            s.icount = int.from_bytes(extra[16:24], "big")
        s.extra_unknown = bytes(extra[SNAPSHOT_EXTRA_SIZE:])
        snaps.append(s)
        pos += SNAPSHOT_HEADER_SIZE + var
        pos += -pos % 8
    return snaps, pos - offset


def build_table(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        sid, name = s.id.encode(), s.name.encode()
        extra = QCowSnapshotExtraData.build(dict(
            vm_state_size_large=s.vm_state_size,
            disk_size=s.disk_size or 0,
            icount=(1 << 64) - 1 if s.icount is None else s.icount)) + s.extra_unknown
        out += QCowSnapshotHeader.build(dict(
            l1_table_offset=s.l1_table_offset, l1_size=s.l1_size,
            id_str_size=len(sid), name_size=len(name), date_sec=s.date_sec,
            date_nsec=s.date_nsec, vm_clock_nsec=s.vm_clock_nsec,
            vm_state_size=min(s.vm_state_size, 0xFFFFFFFF),
            extra_data_size=len(extra)))
        out += extra + sid + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def find(snaps: list[Snapshot], key: str, path: str | None = None) -> Snapshot:
    """A snapshot by ID, or else by name (as qemu-img looks them up)."""
    for s in snaps:
        if s.id == key:
            return s
    named = [s for s in snaps if s.name == key]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise UsageError(f"several snapshots are named '{key}'; give its ID", path)
    known = ", ".join(f"{s.id} ({s.name})" for s in snaps) or "none"
    raise UsageError(f"no snapshot '{key}' (snapshots: {known})", path)


def new_snapshot(snaps: list[Snapshot], name: str, l1_offset: int, l1_size: int,
                 disk_size: int) -> Snapshot:
    """The entry for a new snapshot: the next free numeric ID, now as its date. A name
    already taken makes a second snapshot of that name, as qemu-img does (it is then
    named by its ID)."""
    ids = [int(s.id) for s in snaps if s.id.isdigit()]
    now = time.time_ns()
    return Snapshot(l1_offset, l1_size, str(max(ids, default=0) + 1), name,
                    date_sec=now // 1_000_000_000, date_nsec=now % 1_000_000_000,
                    disk_size=disk_size, icount=0)


# -- operations on an image open for writing ------------------------------------------------

def update_refcounts(dev, l1, addend: int) -> None:
    """One reference more (+1, now) or less (-1, once the tables are written) for every
    L2 table and cluster reached from ``l1`` (qemu's qcow2_update_snapshot_refcount).
    Increments are checked against the refcount width first, so a refusal changes
    nothing."""
    refs, cs = dev.refs, dev.cs
    step = 2 if dev.extended else 1
    if addend > 0:
        counts: dict[int, int] = {}

        def change(cluster: int, count: int = 1) -> None:
            for c in range(cluster, cluster + count):
                counts[c] = counts.get(c, 0) + 1
    else:
        def change(cluster: int, count: int = 1) -> None:
            refs.free(cluster, count)

    for e in l1:
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        l2 = dev.l2_table(off)
        for i in range(0, len(l2), step):
            x = l2[i]
            if x & QCOW_OFLAG_COMPRESSED:
                coff, n = dev.geo.compressed_range(x)
                change(coff // cs, (coff + n - 1) // cs - coff // cs + 1)
            elif x & L2E_OFFSET_MASK and not dev.has_data_file:
                change((x & L2E_OFFSET_MASK) // cs)
        change(off // cs)
    if addend > 0:
        for c, n in counts.items():
            if refs.get(c) + n > refs.max:
                raise UnsupportedError(f"a snapshot needs refcounts above {refs.max}"
                                       f" (refcount_bits={dev.geo.refcount_bits}); amend"
                                       " refcount_bits first", dev.path)
        for c, n in counts.items():
            refs.add(c, n)


def fix_copied(dev) -> None:
    """Make bit 63 of the active L1 and L2 entries say exactly "refcount is 1"."""
    for i, e in enumerate(dev.l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        want = off | (QCOW_OFLAG_COPIED if dev.refs.get(off // dev.cs) == 1 else 0)
        if want != e:
            dev.l1[i] = want
            dev.l1_dirty = True
        if dev.fix_copied(dev.l2_table(off)):
            dev.l2_dirty.add(off)


def _write_table(dev, snaps: list[Snapshot]) -> None:
    """Store a new snapshot table and point the header at it; the old one is freed
    after the header is written."""
    h, cs = dev.header, dev.cs
    old_off, old_size = h.snapshots_offset, dev.snapshot_table_size
    raw = build_table(snaps)
    if snaps:
        n = -(-len(raw) // cs)
        off = dev.refs.alloc(n) * cs
        dev.backend.pwrite(off, raw)
    else:
        off = 0
    h.snapshots_offset, h.nb_snapshots = off, len(snaps)
    dev.snapshot_table_size = len(raw)
    dev.snapshots = snaps
    dev.header_dirty = True
    if old_off and old_size:
        dev.refs.free(old_off // cs, -(-old_size // cs))


def read_l1(dev, s: Snapshot) -> array:
    """A snapshot's L1 table (host order), for walks over everything it references."""
    return be_array(dev.backend.read_exact(s.l1_table_offset, s.l1_size * 8,
                                           "snapshot L1 table"))


def _no_data_file(dev) -> None:
    if dev.has_data_file:
            raise UnsupportedError("internal snapshots are not possible in an image with an"
                               " external data file (qcow2.txt)", dev.path)


def create(dev, name: str) -> Snapshot:
    _no_data_file(dev)
    if len(dev.snapshots) >= QCOW_MAX_SNAPSHOTS:
        raise UsageError(f"the image already has {QCOW_MAX_SNAPSHOTS} snapshots", dev.path)
    if not name:
        raise UsageError("a snapshot needs a name", dev.path)
    dev.flush()
    cs = dev.cs
    snap = new_snapshot(dev.snapshots, name, 0, dev.l1_size, dev.size)
    copy = array("Q", dev.l1)
    update_refcounts(dev, dev.l1, +1)  # first: it may refuse, and then nothing changed
    if dev.l1_size:
        snap.l1_table_offset = dev.refs.alloc(-(-dev.l1_size * 8 // cs)) * cs
        dev.backend.pwrite(snap.l1_table_offset, be_bytes(copy))
    fix_copied(dev)
    _write_table(dev, dev.snapshots + [snap])
    dev.flush()
    return snap


def apply(dev, key: str) -> None:
    _no_data_file(dev)
    snap = find(dev.snapshots, key, dev.path)
    if dev.header.bitmaps is not None:
        # as qemu-img: going back in time would make every bitmap wrong
        raise UsageError(f"Could not apply snapshot '{key}': Device has active dirty"
                         " bitmaps", dev.path)
    dev.flush()
    cs = dev.cs
    sl1 = read_l1(dev, snap)
    update_refcounts(dev, sl1, +1)
    update_refcounts(dev, dev.l1, -1)
    if snap.l1_size > dev.l1_size:
        old_off, old_n = dev.l1_offset, -(-dev.l1_size * 8 // cs)
        dev.l1_offset = dev.refs.alloc(-(-snap.l1_size * 8 // cs)) * cs
        dev.l1_size = snap.l1_size
        if old_n:
            dev.refs.free(old_off // cs, old_n)
        dev.header_dirty = True
    new = array("Q", bytes(8 * dev.l1_size))
    new[:len(sl1)] = sl1
    dev.l1 = new
    dev.l1_dirty = True
    if snap.disk_size is not None and snap.disk_size != dev.size:
        dev.size = dev.header.size = snap.disk_size
        dev.header_dirty = True
    dev.flush()
    fix_copied(dev)
    dev.flush()


def delete(dev, key: str) -> None:
    _no_data_file(dev)
    snap = find(dev.snapshots, key, dev.path)
    dev.flush()
    sl1 = read_l1(dev, snap)
    _write_table(dev, [s for s in dev.snapshots if s is not snap])
    update_refcounts(dev, sl1, -1)
    if snap.l1_size:
        dev.refs.free(snap.l1_table_offset // dev.cs, -(-snap.l1_size * 8 // dev.cs))
    dev.flush()
    fix_copied(dev)
    dev.flush()
