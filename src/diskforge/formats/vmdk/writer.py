"""Writing new VMDKs of the hosted kinds: monolithicSparse, twoGbMaxExtentSparse,
monolithicFlat and twoGbMaxExtentFlat, optionally as a delta disk over a VMDK parent.
(streamOptimized, the sequential compressed kind, is ``stream.py``.)

Layout as qemu-img writes it (``layout.py`` has the positions): a sparse extent's
header, directories and tables come first, grains follow from ``overHead`` in the order
data arrives (increasing offsets, so the file is in disk order); the tables and the
header are written by ``finish``. Flat extents are the disk bytes, zeros left as holes.
Multi-file kinds write the descriptor file and every extent through their own
AtomicFile: nothing appears under a final name until every file is complete, and an
abort removes them all.

A delta disk (``-B``/``-b``) records ``parentCID`` (the parent's ``CID``) and
``parentFileNameHint`` (the name as given, as qemu writes it). Grains left unwritten
read through to the parent; zeros over the parent are a grain of zeros, or with
``zeroed_grain`` a grain table entry of 1 (version-2 header, as qemu). A grain written
only in part takes its other bytes from the parent (copy-on-write), as qemu does.
"""

from __future__ import annotations

import os
import random
from array import array

from ...atomic import AtomicFile, final_path
from ...blockdev import ImageWriter, is_zero
from ...byteorder import le_bytes
from ...devices import is_block_device
from ...errors import DiskforgeError, UnsupportedError, UsageError
from ...policy import beside
from .descriptor import Descriptor, ExtentLine
from .layout import (MAX_SPARSE_BYTES, SparseLayout, build_descriptor, capacity_sectors,
                     extent_names, new_cid, sparse_header, split_extents)
from .structs import (DEFAULT_GRAIN_SECTORS, FLAG_REDUNDANT_GT, FLAG_VALID_NEWLINE_TEST,
                      FLAG_ZEROED_GRAIN_GTE, GTE_ZEROED, SECTOR)

FLAT_KINDS = ("monolithicFlat", "twoGbMaxExtentFlat")
GRAIN_BYTES = DEFAULT_GRAIN_SECTORS * SECTOR


def check_request(path: str, size: int, options, backing) -> None:
    """The combinations qemu-img refuses, refused with its reasons, before any file is
    made (shared with the stream writer)."""
    sub = options.subformat
    if sub in FLAT_KINDS and backing is not None:
        raise UsageError("Flat image can't have backing file", path)
    if sub in FLAT_KINDS and options.zeroed_grain:
        raise UsageError("Flat image can't enable zeroed grain", path)
    if sub not in FLAT_KINDS and size > MAX_SPARSE_BYTES:
        raise UsageError(f"a sparse VMDK holds at most {MAX_SPARSE_BYTES >> 40} TiB"
                         " (32-bit grain offsets); use subformat=twoGbMaxExtentSparse or a"
                         " flat subformat", path)
    if backing is not None and backing.format != "vmdk":
        raise UsageError(f"Invalid backing file format: {backing.format}. Must be vmdk.",
                         path)
    if sub not in ("monolithicSparse", "streamOptimized") and is_block_device(
            final_path(path)):
        raise UnsupportedError(f"not supported yet: writing {sub} VMDKs onto a block"
                               " device (the descriptor and its extents are separate"
                               " files)", path)


def parent_fields(path: str, backing) -> tuple[int, str]:
    """``(parentCID, parentFileNameHint)`` for a delta disk over ``backing``."""
    from .parent import parent_descriptor
    if any(c in backing.name for c in '"\n\r\0'):
        raise UsageError("a parent name with quotes, line breaks or NUL cannot be written"
                         " into a VMDK descriptor (parentFileNameHint)", path)
    try:
        desc = parent_descriptor(beside(path, backing.name), backing.device)
    except DiskforgeError as e:
        raise UsageError(f"a VMDK delta disk records its parent's CID, so the parent must"
                         f" be a readable VMDK: {e}", path) from None
    return desc.cid, backing.name


class _SparseExtent:
    """One hosted sparse extent file being written: grains go at the end of what is
    used, grain tables are kept (only those with entries) until ``close``."""

    def __init__(self, out: AtomicFile, layout: SparseLayout, first_grain: int):
        self.out = out
        self.layout = layout
        self.first_grain = first_grain
        self.next = layout.overhead
        self.tables: dict[int, array] = {}

    def set(self, grain: int, value: int) -> None:
        gt, i = divmod(grain - self.first_grain, self.layout.gtes_per_gt)
        table = self.tables.get(gt)
        if table is None:
            table = self.tables[gt] = array("I", bytes(4 * self.layout.gtes_per_gt))
        table[i] = value

    def put(self, grain: int, data) -> None:
        """Store whole grains starting at disk grain ``grain`` (one write)."""
        count = len(data) // GRAIN_BYTES
        at = self.next
        if at + count * self.layout.grain > 0xFFFFFFFF:
            raise UsageError("the extent file would pass 2 TiB, beyond 32-bit grain"
                             " offsets", self.out.target)
        self.out.pwrite(at * SECTOR, data)
        for k in range(count):
            self.set(grain + k, at + k * self.layout.grain)
        self.next = at + count * self.layout.grain

    def close(self, version: int, flags: int, descriptor: bytes | None) -> None:
        lay = self.layout
        for gt, table in sorted(self.tables.items()):
            blob = le_bytes(table)
            self.out.pwrite(lay.gt_at(lay.rgd_offset, gt) * SECTOR, blob)
            self.out.pwrite(lay.gt_at(lay.gd_offset, gt) * SECTOR, blob)
        for base in (lay.rgd_offset, lay.gd_offset):
            gd = array("I", (lay.gt_at(base, i) for i in range(lay.gt_count)))
            self.out.pwrite(base * SECTOR, le_bytes(gd))
        if descriptor is not None:
            self.out.pwrite(lay.descriptor_offset * SECTOR, descriptor)
        self.out.pwrite(0, sparse_header(lay, version=version, flags=flags,
                                         gd_offset=lay.gd_offset,
                                         rgd_offset=lay.rgd_offset,
                                         overhead=lay.overhead))
        self.out.truncate(self.next * SECTOR)


class VmdkWriter(ImageWriter):
    """The hosted kinds (see the module docstring). ``seed`` fixes the random CID (for
    reproducible output); None draws it from the system's randomness."""

    def __init__(self, path: str, size: int, options, backing=None, *,
                 seed: int | None = None):
        check_request(path, size, options, backing)
        self.path = path
        self.size = size
        self.options = options
        self.sub = options.subformat
        self.flat = self.sub in FLAT_KINDS
        self.granularity = 4096 if self.flat else GRAIN_BYTES
        self.backing = backing
        self.rng = random.Random(seed if seed is not None else os.urandom(16))
        self.parent_cid, self.parent_hint = 0xFFFFFFFF, None
        if backing is not None:
            self.parent_cid, self.parent_hint = parent_fields(path, backing)
        self.cap = capacity_sectors(size)
        self.files: list[AtomicFile] = []
        self.committed: list[str] = []
        self.pending = None   # (grain, bytearray, covered ranges, has data)
        try:
            self._layout()
        except BaseException:
            self.abort()
            raise

    def _open(self, target: str) -> AtomicFile:
        f = AtomicFile(target)
        self.files.append(f)
        return f

    def _layout(self) -> None:
        split = self.sub.startswith("twoGbMaxExtent")
        caps = split_extents(self.cap, split)
        self.extent_caps = caps
        if self.sub == "monolithicSparse":
            self.names = [os.path.basename(self.path)]
            self.descriptor_file = None
            outs = [self._open(self.path)]
        else:
            self.names = extent_names(self.path, self.sub, len(caps))
            directory = os.path.dirname(os.path.abspath(final_path(self.path)))
            outs = [self._open(os.path.join(directory, n)) for n in self.names]
            self.descriptor_file = self._open(self.path)
        self.flat_files: list[tuple[int, int, AtomicFile]] = []   # (start, end) bytes
        self.sparse: list[_SparseExtent] = []
        start = 0
        for cap, out in zip(caps, outs):
            if self.flat:
                out.truncate(cap * SECTOR)
                self.flat_files.append((start * SECTOR, (start + cap) * SECTOR, out))
            else:
                lay = SparseLayout(cap, embedded_descriptor=self.sub == "monolithicSparse")
                out.truncate(lay.overhead * SECTOR)
                self.sparse.append(_SparseExtent(out, lay, start // DEFAULT_GRAIN_SECTORS))
            start += cap

    # -- flat ----------------------------------------------------------------------------
    def _flat_write(self, offset: int, mv: memoryview) -> None:
        end = offset + len(mv)
        for lo, hi, out in self.flat_files:
            a, b = max(lo, offset), min(hi, end)
            if a < b:
                out.pwrite(a - lo, mv[a - offset:b - offset])

    # -- sparse ----------------------------------------------------------------------------
    def _extent_of(self, grain: int) -> _SparseExtent:
        return self.sparse[grain * DEFAULT_GRAIN_SECTORS // (self.extent_caps[0] or 1)] \
            if len(self.sparse) > 1 else self.sparse[0]

    def _put(self, grain: int, data) -> None:
        """Whole grains from ``grain`` on, split where an extent ends."""
        mv = memoryview(data)
        while len(mv):
            ext = self._extent_of(grain)
            room = ext.first_grain + ext.layout.grains - grain
            n = min(room, len(mv) // GRAIN_BYTES) or 1
            ext.put(grain, mv[:n * GRAIN_BYTES])
            mv = mv[n * GRAIN_BYTES:]
            grain += n

    def _grain_end(self, grain: int) -> int:
        return min(GRAIN_BYTES, self.size - grain * GRAIN_BYTES)

    def _partial(self, grain: int, start: int, data, length: int) -> None:
        """Part of a grain: gathered until the writer moves past it."""
        if self.pending is None or self.pending[0] != grain:
            self._flush_pending()
            self.pending = (grain, bytearray(GRAIN_BYTES), [], [False])
        _, buf, covered, has_data = self.pending
        if data is not None:
            buf[start:start + length] = data
            has_data[0] = True
        covered.append((start, start + length))

    def _flush_pending(self) -> None:
        if self.pending is None:
            return
        grain, buf, covered, has_data = self.pending
        self.pending = None
        if self.backing is None:
            if has_data[0] and not is_zero(buf):
                self._put(grain, buf)
            return
        self._fill_from_parent(grain, buf, covered)
        if is_zero(buf) and self.options.zeroed_grain:
            self._extent_of(grain).set(grain, GTE_ZEROED)
        else:
            self._put(grain, buf)

    def _fill_from_parent(self, grain: int, buf: bytearray, covered) -> None:
        """Copy-on-write: the bytes of a partly written grain that were not given."""
        pos, gaps = 0, []
        for a, b in sorted(covered):
            if a > pos:
                gaps.append((pos, a))
            pos = max(pos, b)
        end = self._grain_end(grain)
        if pos < end:
            gaps.append((pos, end))
        if not gaps:
            return
        parent = self.backing.device
        if parent is None:
            raise UsageError("writing part of a grain of a delta disk needs its parent"
                             " open (the rest of the grain is copied from it)", self.path)
        base = grain * GRAIN_BYTES
        for a, b in gaps:
            inside = max(0, min(b, parent.size - base) - a)
            if inside:
                parent.readinto(base + a, memoryview(buf)[a:a + inside])

    def _zero_grains(self, grain: int, count: int) -> None:
        """Whole grains that must read as zeros over the parent."""
        if self.options.zeroed_grain:
            for g in range(grain, grain + count):
                self._extent_of(g).set(g, GTE_ZEROED)
            return
        zeros = bytes(GRAIN_BYTES * min(count, 16))
        while count:
            n = min(count, 16)
            self._put(grain, zeros[:n * GRAIN_BYTES])
            grain += n
            count -= n

    # -- the ImageWriter contract ------------------------------------------------------------
    def write_prepared(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        if self.flat:
            self._flat_write(offset, mv)
            return
        self._walk(offset, len(mv), mv)

    def zero(self, offset: int, length: int) -> None:
        if self.flat or self.backing is None:
            if self.pending is not None and offset < (self.pending[0] + 1) * GRAIN_BYTES:
                self._walk(offset, length, None)  # complete the pending grain's cover
            return
        self._walk(offset, length, None)

    def _walk(self, offset: int, length: int, mv) -> None:
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            grain, inside = divmod(pos, GRAIN_BYTES)
            whole = (end - pos) // GRAIN_BYTES if inside == 0 else 0
            if whole:
                self._flush_pending()
                if mv is not None:
                    self._put(grain, mv[pos - offset:pos - offset + whole * GRAIN_BYTES])
                elif self.backing is not None:
                    self._zero_grains(grain, whole)
                else:
                    return  # a new disk reads zeros wherever nothing was written
                pos += whole * GRAIN_BYTES
                continue
            k = min(end, (grain + 1) * GRAIN_BYTES) - pos
            self._partial(grain, inside, None if mv is None else
                          mv[pos - offset:pos - offset + k], k)
            pos += k

    def _descriptor(self) -> Descriptor:
        if self.flat:
            kind, extra = "FLAT", {"offset": 0}
        else:
            kind, extra = "SPARSE", {}
        lines = [ExtentLine("RW", cap, kind, name, **extra)
                 for cap, name in zip(self.extent_caps, self.names)]
        return build_descriptor(subformat=self.sub, capacity=self.cap, extents=lines,
                                options=self.options, cid=new_cid(self.rng),
                                parent_cid=self.parent_cid, parent_hint=self.parent_hint)

    def _finish(self) -> None:
        self._flush_pending()
        text = self._descriptor().render().encode("utf-8")
        if self.descriptor_file is not None:
            self.descriptor_file.pwrite(0, text)
        zg = self.options.zeroed_grain
        flags = FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GT | (FLAG_ZEROED_GRAIN_GTE if zg
                                                              else 0)
        for ext in self.sparse:
            embedded = None
            if self.descriptor_file is None:
                room = ext.layout.descriptor_sectors * SECTOR
                if len(text) > room:
                    raise UsageError(f"the descriptor ({len(text)} bytes) does not fit the"
                                     f" {room} bytes a monolithicSparse file keeps for it"
                                     " (a shorter backing file name?)", self.path)
                embedded = text
            ext.close(2 if zg else 1, flags, embedded)

    def _commit(self) -> None:
        # the extents first, the descriptor (which names them) last
        for f in self.files[::-1] if self.descriptor_file is None else \
                [f for f in self.files if f is not self.descriptor_file] + \
                [self.descriptor_file]:
            f.commit()
            self.committed.append(f.target)

    def abort(self) -> None:
        """Remove every file of this output: the temporary ones, and any this run
        already put in place when a later commit failed."""
        for f in self.files:
            if not f.committed:
                f.discard()
        for target in self.committed:
            try:
                os.unlink(target)
            except OSError:
                pass
        self.committed = []
