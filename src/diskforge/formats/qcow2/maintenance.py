"""qcow2 maintenance on an image open for writing: resize, a new backing file name,
emptying (for commit), amend; and ``measure`` (qemu's formula, so the numbers agree
with ``qemu-img measure``).
"""

from __future__ import annotations

from array import array

from ...byteorder import be_bytes
from ...errors import DiskforgeError, UnsupportedError, UsageError
from ...registry import Measurement
from . import bitmaps
from .refcount import Refcounts, encode, refcount_layout, refcount_metadata_size
from .snapshot import read_l1, update_refcounts
from .structs import (L1E_OFFSET_MASK, QCOW2_AUTOCLEAR_DATA_FILE_RAW,
                      QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT_COMPRESSION,
                      QCOW2_INCOMPAT_EXTL2, QCOW2_SUBCLUSTER_COMPRESSED,
                      QCOW2_SUBCLUSTER_NORMAL, QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN,
                      QCOW2_SUBCLUSTER_ZERO_PLAIN, QCOW_MAX_L1_SIZE,
                      QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                      REFT_OFFSET_MASK,
                      Geometry)


# -- measure ---------------------------------------------------------------------------------

def measure(size: int, options, allocated) -> Measurement:
    """``qemu-img measure``: qcow2_calc_prealloc_size for the fully allocated size;
    the data clusters the contents touch for the required size."""
    cs = options.cluster_size
    order = options.refcount_bits.bit_length() - 1
    virtual = -(-size // cs) * cs
    l2e_size = 16 if options.extended_l2 else 8
    meta = cs                                           # header
    nl2e = virtual // cs
    nl2e = -(-nl2e // (cs // l2e_size)) * (cs // l2e_size)
    meta += nl2e * l2e_size                             # L2 tables
    nl1e = nl2e * l2e_size // cs
    nl1e = -(-nl1e // (cs // 8)) * (cs // 8)
    meta += nl1e * 8                                    # L1 table
    meta += refcount_metadata_size((meta + virtual) // cs, cs, order)
    fully = meta + virtual
    if options.preallocation in ("falloc", "full") or options.backing_file:
        data = virtual
    elif allocated is None:
        data = 0
    else:
        data = 0
        covered = 0  # end of the clusters counted so far
        for e in allocated:
            start = max(e.offset - e.offset % cs, covered)
            end = -(-(e.offset + e.length) // cs) * cs
            if end > start:
                data += end - start
                covered = end
    return Measurement(required=fully - virtual + data, fully_allocated=fully)


# -- resize ----------------------------------------------------------------------------------

def resize(dev, size: int, *, shrink: bool = False) -> None:
    """Grow, or with ``shrink`` cut, the virtual disk. Persistent bitmaps follow the
    new size as qemu-img resize makes them (new area clean, bits past a new end
    dropped); an inconsistent (in-use) bitmap refuses the resize, as in qemu."""
    if size == dev.size:
        return
    if dev.header.bitmaps is None:
        _resize(dev, size, shrink)
        return
    kept = bitmaps.load(dev)
    for bm in kept:
        if not bm.consistent:
            raise UsageError(f"Bitmap '{bm.name}' is inconsistent and cannot be used (try"
                             " 'bitmap --remove' to delete this bitmap from disk)",
                             dev.path)
    tracker, dev.bitmaps = dev.bitmaps, None   # resizing is not a guest write
    try:
        _resize(dev, size, shrink)
    except BaseException:
        dev.bitmaps = tracker
        raise
    for bm in kept:
        bm.resize(size)
    bitmaps.store(dev, kept)


def _resize(dev, size: int, shrink: bool) -> None:
    old = dev.size
    dev.flush()
    cs = dev.cs
    if size < old:
        if not shrink:
            raise UsageError("Use the --shrink option to perform a shrink operation",
                             dev.path)
        if dev.snapshots:
            raise UnsupportedError("cannot shrink an image that has internal snapshots",
                                   dev.path)
        # as qemu-img: the whole clusters past the new end are discarded (the one the
        # new end falls in is kept); ``resize --safe-shrink`` refuses instead
        cut = -(-size // cs) * cs
        if cut < old:
            dev.write_zeroes(cut, old - cut)
            dev.flush()
        for g, n, kind, _ in dev.runs(cut, old - cut) if cut < old else ():
            if kind not in (QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN,
                            QCOW2_SUBCLUSTER_ZERO_PLAIN):
                raise UsageError(f"shrinking to {size} bytes would cut allocated data at"
                                 f" offset {g} (+{n}); nothing allocated may be cut",
                                 dev.path)
        new_l1 = dev.geo.l1_entries_for(size)
        first_gone = -(-size // cs)
        for l1i in range(new_l1, dev.l1_size):
            off = dev.l1[l1i] & L1E_OFFSET_MASK
            if off:
                dev.refs.free(off // cs)
                dev.l1[l1i] = 0
                dev.l1_dirty = True
        if new_l1 and dev.l1[new_l1 - 1] & L1E_OFFSET_MASK:
            l2off, l2 = dev.l2_for_write(new_l1 - 1)
            step = 2 if dev.extended else 1
            base = (new_l1 - 1) << dev.l2_bits
            for ci in range(max(first_gone, base), base + dev.l2_entries):
                i = (ci - base) * step
                if l2[i] or (step == 2 and l2[i + 1]):
                    l2[i] = 0
                    if step == 2:
                        l2[i + 1] = 0
                    dev.l2_dirty.add(l2off)
        dev.size = dev.header.size = size
        dev.header_dirty = True
        if dev.has_data_file:
            dev.data.truncate(size)
        dev.flush()
        return
    new_l1 = dev.geo.l1_entries_for(size)
    if new_l1 > dev.l1_size:
        if new_l1 * 8 > QCOW_MAX_L1_SIZE:
            raise UsageError(f"{size} bytes needs an L1 table beyond qemu's limit with"
                             f" {cs}-byte clusters", dev.path)
        old_off, old_n = dev.l1_offset, -(-dev.l1_size * 8 // cs)
        table = array("Q", bytes(8 * new_l1))
        table[:dev.l1_size] = dev.l1
        dev.l1_offset = dev.refs.alloc(-(-new_l1 * 8 // cs)) * cs
        dev.l1, dev.l1_size = table, new_l1
        dev.l1_dirty = dev.header_dirty = True
        if old_n:
            dev.refs.free(old_off // cs, old_n)
    tail_end = min(size, -(-old // cs) * cs)
    dev.size = dev.header.size = size
    dev.header_dirty = True
    if dev.has_data_file:
        dev.data.truncate(size)
    # what lay past the old end inside its last cluster must read as zeros now
    if tail_end > old:
        for g, n, kind, _ in list(dev.runs(old, tail_end - old)):
            if kind in (QCOW2_SUBCLUSTER_NORMAL, QCOW2_SUBCLUSTER_COMPRESSED):
                dev.write(g, bytes(n))
    # a larger backing file must not show through the new area (qemu does the same)
    b = dev.backing
    if b is not None and b.size > old:
        dev.write_zeroes(old, min(size, b.size) - old)
    dev.flush()


def preallocate(dev, offset: int, length: int, mode: str) -> None:
    """``resize --preallocation=metadata|falloc|full`` of the grown part, as qemu's
    qcow2_co_truncate does it: every unallocated cluster of the range gets a host
    cluster (one contiguous run, allocated before any table names it), and its L2
    entry becomes a normal allocated cluster. ``metadata`` leaves the host run a hole
    of the file (qemu-img map: present, zero and data), ``falloc`` reserves it with
    fallocate, ``full`` writes zeros; with an external data file the run is the same
    range of that file. Refcounts, then L2 tables, then L1 and header are written in
    that order (``flush``), so an interruption leaks clusters at worst."""
    if mode == "off":
        return
    if dev.extended:
        raise UnsupportedError(f"not supported yet: --preallocation={mode} on an image"
                               " with extended L2 entries", dev.path)
    if length <= 0:
        return
    from ..._fallocate import allocate
    dev.prepare_write()
    cs = dev.cs
    first, end = offset // cs, -(-(offset + length) // cs)
    clusters = []
    for g, n, kind, _ in dev.runs(first * cs, min(end * cs, dev.size) - first * cs):
        if kind in (QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN, QCOW2_SUBCLUSTER_ZERO_PLAIN):
            clusters.extend(range(g // cs, -(-(g + n) // cs)))
    if not clusters:
        return
    if dev.has_data_file:
        hosts = [ci * cs for ci in clusters]
        runs = [(hosts[0], hosts[-1] + cs - hosts[0])]
        target = dev.data
    else:
        start = dev.refs.alloc(len(clusters)) * cs
        hosts = [start + i * cs for i in range(len(clusters))]
        runs = [(start, len(clusters) * cs)]
        target = dev.backend
    for host, n in runs:
        if mode == "falloc":
            allocate(target.fd, host, n)
        elif mode == "full":
            target.write_zeroes(host, n)
        elif target.size < host + n:  # metadata: the run exists, as a hole
            target.truncate(host + n)
    head = offset - first * cs
    if head and mode == "metadata" and clusters[0] == first:
        # qemu allocates from the old end, copying the head of that cluster on write:
        # those bytes are written (as zeros) in the host file, and map shows them so
        target.write_zeroes(hosts[0], head)
    for ci, host in zip(clusters, hosts):  # (tables fetched one at a time: cached)
        l2off, l2 = dev.l2_for_write(ci >> dev.l2_bits)
        l2[ci & (dev.l2_entries - 1)] = host | QCOW_OFLAG_COPIED
        dev.l2_dirty.add(l2off)
    dev.flush()


# -- backing file ----------------------------------------------------------------------------

def set_backing(dev, name: str | None, fmt: str | None) -> None:
    h = dev.header
    if name and h.data_file_raw:
        raise UsageError("a raw external data file excludes a backing file", dev.path)
    dev.flush()
    h.backing_file = name or None
    h.backing_format = (fmt or None) if name else None
    h.build()  # raises before anything is written when it does not fit
    dev.write_header()
    dev.barrier()
    if dev.backing is not None:
        dev.backing.close()
        dev.backing = None
    if name:
        try:
            dev.open_backing(name, fmt)
        except DiskforgeError:
            dev.backing = None  # rebase -u to a file not there (yet): reopen to read


def make_empty(dev) -> None:
    """Drop every cluster of the active image (after ``commit``): the image then reads
    through to its backing file."""
    dev.flush()
    update_refcounts(dev, dev.l1, -1)
    dev.l1 = array("Q", bytes(8 * dev.l1_size))
    dev.l1_dirty = True
    # no bitmap changes: what the image reads is what it read before (the data went
    # into the backing file), and qemu-img commit leaves the bitmaps as they were
    dev.flush()
    dev.l2_cache.clear()


# -- refcount structure ----------------------------------------------------------------------

def rebuild_refcounts(dev, counts, top: int, order: int) -> None:
    """Write a new refcount table and blocks of width ``2**order`` past cluster ``top``
    holding ``counts(c)`` for every cluster below it plus their own, and point the
    header at them; the old structure becomes free space."""
    cs = dev.cs
    geo = Geometry(dev.cluster_bits, order, dev.extended)
    epb = geo.refblock_entries
    tc, nb = refcount_layout(top, cs, order)
    total = top + tc + nb
    table = array("Q", bytes(tc * cs))
    limit = geo.refcount_max
    for i in range(nb):
        vals = array("Q", (min(counts(c), limit) if c < top else (1 if c < total else 0)
                           for c in range(i * epb, (i + 1) * epb)))
        off = (top + tc + i) * cs
        table[i] = off
        dev.backend.pwrite(off, encode(vals, order))
    dev.backend.pwrite(top * cs, be_bytes(table))
    dev.barrier()
    dev.header.refcount_order = order
    dev.geo = geo
    dev.refs = Refcounts(dev.backend, geo, top * cs, tc, dev.path)
    dev.write_header()
    dev.barrier()


# -- amend -----------------------------------------------------------------------------------

_FIXED = {"cluster_size": "the cluster size", "extended_l2": "extended L2 entries",
          "compression_type": "the compression type", "preallocation": "preallocation",
          "compress": "compression"}


def amend(dev, opts, given: set[str]) -> None:
    """Change in place what qcow2 lets change: compat, lazy_refcounts, refcount_bits,
    data_file, data_file_raw, backing_file/backing_fmt."""
    h = dev.header
    current = {"cluster_size": dev.cs, "extended_l2": h.extended_l2,
               "compression_type": h.compression_name, "preallocation": "off",
               "compress": False}
    for key, what in _FIXED.items():
        if key in given and getattr(opts, key) != current[key]:
            raise UnsupportedError(f"changing {what} of an existing qcow2 image is not"
                                   " possible (convert it instead)", dev.path)
    dev.flush()
    version = opts.version if "compat" in given else h.version
    if "refcount_bits" in given:
        order = opts.refcount_bits.bit_length() - 1
        if version < 3 and order != 4:
            raise UsageError("refcount widths other than 16 bits need compat=1.1",
                             dev.path)
        if order != h.refcount_order:
            _change_refcount_order(dev, order)
    if version < h.version:
        _downgrade(dev)
    elif version > h.version:
        h.version = 3
        h.header_length = 112
    if "lazy_refcounts" in given:
        if opts.lazy_refcounts and h.version < 3:
            raise UsageError("lazy refcounts need compat=1.1", dev.path)
        if opts.lazy_refcounts:
            h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS
        else:
            h.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS
    if "data_file" in given and opts.data_file != (h.data_file or ""):
        if not h.has_data_file:
            raise UsageError("data_file can only be set for an image that already uses"
                             " an external data file", dev.path)
        if not opts.data_file:
            raise UsageError("an image with an external data file must name it", dev.path)
        h.data_file = opts.data_file
    if "data_file_raw" in given:
        if opts.data_file_raw and not h.has_data_file:
            raise UsageError("data_file_raw needs an external data file", dev.path)
        if opts.data_file_raw and h.backing_file:
            raise UsageError("a raw external data file excludes a backing file", dev.path)
        if opts.data_file_raw:
            h.autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW
        else:
            h.autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW
    h.build()
    dev.write_header()
    dev.barrier()
    if "backing_file" in given or "backing_fmt" in given:
        name = opts.backing_file if "backing_file" in given else h.backing_file
        fmt = opts.backing_fmt if "backing_fmt" in given else h.backing_format
        set_backing(dev, name or None, fmt or None)


def _change_refcount_order(dev, order: int) -> None:
    refs = dev.refs
    top = max(refs.end, refs.last_used() + 1)
    limit = (1 << (1 << order)) - 1
    for c in range(top):
        n = refs.get(c)
        if n > limit:
            raise UsageError(f"cannot decrease the refcount width to {1 << order} bits:"
                             f" cluster at offset {c * dev.cs:#x} has a refcount of {n}",
                             dev.path)
    counts = [refs.get(c) for c in range(top)]
    # the old table and blocks are not referenced once the header names the new ones
    cs = dev.cs
    first = refs.table_offset // cs
    old = list(range(first, first + refs.table_clusters))
    old += [(e & REFT_OFFSET_MASK) // cs for e in refs.table if e & REFT_OFFSET_MASK]
    for c in old:
        if c < top:
            counts[c] = 0
    rebuild_refcounts(dev, counts.__getitem__, top, order)


def _downgrade(dev) -> None:
    """compat=0.10: no zero flags, no v3-only features."""
    h = dev.header
    if h.extended_l2 or h.incompatible_features & QCOW2_INCOMPAT_EXTL2:
        raise UnsupportedError("cannot downgrade an image with extended L2 entries to"
                               " compat=0.10", dev.path)
    if h.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
        raise UnsupportedError("cannot downgrade an image with zstd compression to"
                               " compat=0.10", dev.path)
    if h.has_data_file:
        raise UnsupportedError("cannot downgrade an image with an external data file to"
                               " compat=0.10", dev.path)
    if h.bitmaps is not None:
        raise UnsupportedError("cannot downgrade an image with persistent bitmaps to"
                               " compat=0.10", dev.path)
    if h.refcount_order != 4:
        raise UsageError("compat=0.10 needs refcount_bits=16 (amend it too)", dev.path)
    for s in dev.snapshots:
        for e in read_l1(dev, s):
            off = e & L1E_OFFSET_MASK
            if off and _has_zero(dev, dev.l2_table(off)):
                raise UnsupportedError("not supported yet: downgrading an image whose"
                                       " snapshots hold zero clusters", dev.path)
    # expand the active image's zero clusters: a hole without a backing file, else
    # real zeros
    cs = dev.cs
    for l1i, e in enumerate(dev.l1):
        off = e & L1E_OFFSET_MASK
        if not off or not _has_zero(dev, dev.l2_table(off)):
            continue
        l2off, l2 = dev.l2_for_write(l1i)
        for i, x in enumerate(l2):
            if x & QCOW_OFLAG_COMPRESSED or not x & QCOW_OFLAG_ZERO:
                continue
            guest = ((l1i << dev.l2_bits) + i) * cs
            if guest >= dev.size:
                l2[i] = 0
            elif h.backing_file:
                dev.write(guest, bytes(min(cs, dev.size - guest)))
            else:
                dev.release_entry(x)
                l2[i] = 0
            dev.l2_dirty.add(l2off)
    dev.flush()
    h.version = 2
    h.header_length = 72
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    h.compression_type = 0
    h.extra_header = b""


def _has_zero(dev, l2) -> bool:
    return any(x & QCOW_OFLAG_ZERO and not x & QCOW_OFLAG_COMPRESSED for x in l2)
