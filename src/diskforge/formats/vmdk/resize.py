"""Resizing a VMDK in place (``diskforge resize``; qemu-img cannot resize a vmdk).

Supported: monolithicSparse and twoGbMaxExtentSparse (hosted ``KDMV`` extents of
version 1 or 2, uncompressed) and the flat kinds named by a descriptor file
(monolithicFlat, twoGbMaxExtentFlat, vmfs). A split disk grows its last extent up to
2 GiB, then adds extent files. Shrinking stays inside the last extent. Every other
kind answers "not supported yet".

Order of writes, chosen so that an interruption leaves the old disk readable:

- sparse: the new grain tables are appended (holes: the file is extended, not
  written), then the grain directories — in the padding of their last sector when
  the new entries fit there, otherwise as new copies at the end of the file — then
  the embedded descriptor (extent line sectors, ``ddb.geometry.cylinders``; qemu and
  diskforge size a sparse extent by its header, not by this line), and the header
  (``capacity``, ``gdOffset``, ``rgdOffset``) LAST, in one sector write. Until that
  write every reader still sees the old header, directory and capacity.
- flat: the flat file is extended (a hole), then the descriptor is rewritten in one
  write; until then the descriptor still names the old size.
"""

from __future__ import annotations

import os
import re
from array import array

from ...atomic import AtomicFile
from ...blockdev import FileBackend
from ...byteorder import le_bytes
from ...errors import SafetyError, UnsupportedError, UsageError
from ...limits import check_alloc
from .extents import FlatExtent
from .layout import (MAX_SPARSE_BYTES, SPLIT_SECTORS, SparseLayout, extent_names,
                     sparse_header, split_extents)
from .sparse import MAX_CAPACITY, SparseExtent, open_hosted
from .structs import FLAG_REDUNDANT_GT, SECTOR, SparseExtentHeader

EXTENT_LINE = re.compile(r"(?m)^([ \t]*(?:RW|RDONLY|NOACCESS)[ \t]+)(\d+)")
CYLINDERS = re.compile(r'(?m)^([ \t]*ddb\.geometry\.cylinders[ \t]*=[ \t]*"?)(\d+)')


def resize(dev, size: int, shrink: bool) -> None:
    """Resize ``dev`` (a writable VmdkDevice) to ``size`` bytes (module docstring)."""
    if not dev.writable:
        raise UnsupportedError("vmdk image is open read-only", dev.path)
    if size % SECTOR:
        raise UsageError("The new size must be a multiple of 512", dev.path)
    kind = dev.create_type
    if size == dev.size:
        return
    if size // SECTOR > MAX_CAPACITY:
        raise UsageError(f"{size} bytes is beyond any VMDK", dev.path)
    last = dev.extents_[-1]
    sectors = last.size // SECTOR + (size - dev.size) // SECTOR   # of the last extent
    if size < dev.size:
        _shrink(dev, last, sectors, size, shrink)
        return
    split = kind in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
    more: list[int] = []                    # sectors of the extent files to add
    if split and sectors > SPLIT_SECTORS:
        more = split_extents(sectors - SPLIT_SECTORS, True)
        sectors = SPLIT_SECTORS
    sparse = isinstance(last, SparseExtent) and last.structure == "SparseExtentHeader" \
        and last.writable
    if sparse and (dev.monolithic and kind == "monolithicSparse"
                   or not dev.monolithic and kind == "twoGbMaxExtentSparse"):
        added = _add_extents(dev, last, more) if more else []
        if sectors * SECTOR > last.size:
            _grow_sparse(dev, last, sectors, size // SECTOR, added)
        else:
            _store_descriptor(dev, _new_descriptor(dev, sectors, size // SECTOR, added))
    elif not dev.monolithic and kind in ("monolithicFlat", "vmfs", "twoGbMaxExtentFlat") \
            and isinstance(last, FlatExtent) and dev.descriptor_room == 0:
        added = _add_extents(dev, last, more) if more else []
        _grow_flat(dev, last, sectors, size // SECTOR, added)
    else:
        raise UnsupportedError(f"not supported yet: resizing {kind} vmdk images",
                               dev.path)
    _open_added(dev, len(added))
    dev.size = size


def _shrink(dev, last, sectors: int, size: int, shrink: bool) -> None:
    """Shrink within the last extent (sparse: a smaller capacity, then the grain table
    entries past it cleared; flat: a shorter extent line, then the file cut when it
    ended with the extent). Dropping whole extents is not supported yet."""
    kind = dev.create_type
    if not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation",
                         dev.path)
    sparse = isinstance(last, SparseExtent) and last.structure == "SparseExtentHeader" \
        and last.writable and kind in ("monolithicSparse", "twoGbMaxExtentSparse")
    flat = isinstance(last, FlatExtent) and not dev.monolithic \
        and kind in ("monolithicFlat", "vmfs", "twoGbMaxExtentFlat")
    if sectors <= 0 or not (sparse or flat):
        what = "past the last extent (dropping extent files)" if sectors <= 0 and \
            (sparse or flat) else "images"
        raise UnsupportedError(f"not supported yet: shrinking {kind} vmdk {what}",
                               dev.path)
    raw = _new_descriptor(dev, sectors, size // SECTOR) if dev.descriptor else None
    if raw is not None and dev.descriptor_room and len(raw) > dev.descriptor_room:
        raise UnsupportedError("not supported yet: a vmdk whose embedded descriptor"
                               " would no longer fit", dev.path)
    if flat:
        old_end = last.start + last.size
        _store_descriptor(dev, raw)
        last.size = sectors * SECTOR
        if last.backend.size == old_end:
            last.backend.truncate(last.start + last.size)
    else:
        if raw is not None and dev.descriptor_room:
            _store_descriptor(dev, raw)
        h = dict(last.header)
        h.pop("_io", None)
        h["capacity"] = sectors
        header = SparseExtentHeader.build(h)
        last.backend.pwrite(0, header)      # the switch; then what is past the end
        last.header = SparseExtentHeader.parse(header)
        last.size = sectors * SECTOR
        last.ngt = -(-sectors // (last.grain_sectors * last.gtes))
        last.gd = last.gd[:last.ngt]
        if last.rgd is not None:
            last.rgd = last.rgd[:last.ngt]
        _clear_past_end(last)
        if raw is not None and not dev.descriptor_room:
            _store_descriptor(dev, raw)
    dev.size = size


def _add_extents(dev, last, more: list[int]) -> list[str]:
    """Create the extent files a split disk grows into, named as the writer names
    them (``-s002.vmdk``, ``-f002.vmdk`` ...), before the descriptor names them: an
    interruption leaves unused files beside the old disk. Returns the extent lines."""
    kind = dev.create_type
    have = len(dev.extents_)
    names = extent_names(dev.path, kind, have + len(more))[have:]
    folder = os.path.dirname(os.path.abspath(dev.path))
    for name in names:
        if os.path.lexists(os.path.join(folder, name)):
            raise SafetyError(f"the extent file '{name}' a grown disk needs already"
                              " exists; refused", dev.path)
    lines = []
    for name, n in zip(names, more):
        with AtomicFile(os.path.join(folder, name)) as out:
            if isinstance(last, SparseExtent):
                _write_empty_sparse(out, last, n)
                lines.append(f'RW {n} SPARSE "{name}"')
            else:
                out.truncate(n * SECTOR)
                lines.append(f'RW {n} FLAT "{name}" 0')
            out.commit()
    return lines


def _write_empty_sparse(out, like: SparseExtent, capacity: int) -> None:
    """An empty hosted sparse extent laid out as the writer (and qemu) lay out split
    extents, with ``like``'s version, flags, grain and table size."""
    h = like.header
    layout = SparseLayout(capacity, embedded_descriptor=False, grain=like.grain_sectors,
                          gtes_per_gt=like.gtes)
    redundant = bool(h.flags & FLAG_REDUNDANT_GT)
    out.truncate(layout.overhead * SECTOR)          # the grain tables: holes
    for at in ([layout.rgd_offset] if redundant else []) + [layout.gd_offset]:
        gd = array("I", (layout.gt_at(at, i) for i in range(layout.gt_count)))
        out.pwrite(at * SECTOR, le_bytes(gd))
    out.pwrite(0, sparse_header(layout, version=h.version, flags=h.flags,
                                gd_offset=layout.gd_offset,
                                rgd_offset=layout.rgd_offset if redundant else 0,
                                overhead=layout.overhead))


def _open_added(dev, count: int) -> None:
    """Open the extents the descriptor now names past the ones already open."""
    for line in dev.descriptor.extents[len(dev.descriptor.extents) - count:]:
        full = os.path.join(os.path.dirname(os.path.abspath(dev.path)), line.filename)
        backend = dev._backends[os.path.realpath(full)] = FileBackend(full, writable=True,
                                                                       referenced=True)
        if line.type == "SPARSE":
            ext = open_hosted(backend, "RW", "SPARSE")
        else:
            ext = FlatExtent(backend, line.sectors, line.offset * SECTOR, line.type)
        dev._add(ext, line)


def _new_descriptor(dev, sectors: int, total_sectors: int,
                    added: list[str] = ()) -> bytes:
    """The descriptor text with the last extent line's sector count set to
    ``sectors`` and the cylinders recomputed for the whole disk (as qemu computes
    them: sectors / (heads * sectors per track), keeping the heads and sectors)."""
    text = dev.descriptor_raw.decode("latin-1")
    lines = list(EXTENT_LINE.finditer(text))
    if not lines:
        raise UnsupportedError("not supported yet: resizing a vmdk whose descriptor has"
                               " no extent line", dev.path)
    m = lines[-1]
    eol = text.find("\n", m.end(2))
    eol = len(text) if eol < 0 else eol + 1
    new = "".join(line + "\n" for line in added)
    if added and not text[:eol].endswith("\n"):
        new = "\n" + new
    text = text[:m.start(2)] + str(sectors) + text[m.end(2):eol] + new + text[eol:]
    ddb = dev.descriptor.ddb
    try:
        heads = int(ddb.get("ddb.geometry.heads", "0"))
        secs = int(ddb.get("ddb.geometry.sectors", "0"))
    except ValueError:
        heads = secs = 0
    c = CYLINDERS.search(text)
    if c and heads > 0 and secs > 0:
        text = text[:c.start(2)] + str(total_sectors // (heads * secs)) + text[c.end(2):]
    return text.encode("latin-1")


def _store_descriptor(dev, raw: bytes) -> None:
    from . import descriptor as dsc
    if dev.descriptor_room:
        if len(raw) > dev.descriptor_room:
            raise UnsupportedError("not supported yet: growing a vmdk whose embedded"
                                   f" descriptor would no longer fit its"
                                   f" {dev.descriptor_room} bytes", dev.path)
        dev.backend.pwrite(dev.descriptor_at, raw.ljust(dev.descriptor_room, b"\0"))
    else:
        # one write, never shorter than the old text (blank lines pad a shrunk one)
        raw = raw + b"\n" * (dev.backend.size - len(raw))
        dev.backend.pwrite(0, raw)
    dev.descriptor = dsc.parse(raw, dev.path)
    dev.descriptor_raw = raw


def _clear_past_end(ext: SparseExtent) -> None:
    """What lies past the old end in the last grain and the last grain table (another
    tool may have left bytes or entries there) is cleared before the disk grows over
    it, so the new part reads as zeros. Harmless to the old disk: none of it is
    inside."""
    gs = ext.grain_sectors
    cap = ext.size // SECTOR
    g, tail = divmod(cap, gs)
    if tail:
        e = ext.entry(g)
        if e and not ext._zeroed(e):
            ext.backend.pwrite((e + tail) * SECTOR, bytes((gs - tail) * SECTOR))
        g += 1
    i, j = divmod(g, ext.gtes)
    gt = ext._gt(i) if i < ext.ngt else None
    if gt is not None:
        for k in range(j, ext.gtes):
            if gt[k]:
                ext._set(i * ext.gtes + k, 0)


def _grow_flat(dev, ext: FlatExtent, sectors: int, total: int,
               added: list[str]) -> None:
    raw = _new_descriptor(dev, sectors, total, added)
    end = ext.start + sectors * SECTOR
    old_end = ext.start + ext.size
    stale = min(ext.backend.size, end) - old_end
    if stale > 0 and not ext.backend.punch_hole(old_end, stale):
        ext.backend.write_zeroes(old_end, stale)   # bytes past the old end read as zeros
    if ext.backend.size < end:
        ext.backend.truncate(end)          # a hole: reads as zeros
    _store_descriptor(dev, raw)
    ext.size = sectors * SECTOR


def _sector_up(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


def _grow_sparse(dev, ext: SparseExtent, capacity: int, total: int,
                 added: list[str] = ()) -> None:
    if capacity * SECTOR > MAX_SPARSE_BYTES:
        raise UsageError(f"a sparse VMDK extent holds at most {MAX_SPARSE_BYTES >> 40}"
                         " TiB (32-bit grain offsets)", dev.path)
    per_gt = ext.grain_sectors * ext.gtes
    old_n, new_n = ext.ngt, -(-capacity // per_gt)
    check_alloc(4 * new_n, dev.path, "SparseExtentHeader", "capacity")
    raw = None
    if dev.descriptor is not None:
        raw = _new_descriptor(dev, capacity, total, added)
        if dev.descriptor_room and len(raw) > dev.descriptor_room:
            raise UnsupportedError("not supported yet: growing a vmdk whose embedded"
                                   " descriptor would no longer fit its"
                                   f" {dev.descriptor_room} bytes", dev.path)
    backend = ext.backend
    count = new_n - old_n                   # grain tables added
    fits = _sector_up(4 * new_n) == _sector_up(4 * old_n)
    gds = [ext.gd, ext.rgd] if ext.rgd is not None else [ext.gd]
    new_at = []
    end = _sector_up(max(ext.file_size, backend.size))
    gt_room = _sector_up(ext.gt_bytes)
    tables = []                             # per directory: the new tables' sectors
    if (end + len(gds) * (count * gt_room + _sector_up(4 * new_n))) // SECTOR > 0xFFFFFFFF:
        raise UnsupportedError("not supported yet: growing a sparse VMDK extent whose"
                               " new grain tables would lie past 2 TiB in the file",
                               dev.path)
    _clear_past_end(ext)                    # the first write
    end = _sector_up(max(ext.file_size, backend.size))
    for _ in gds:
        tables.append([(end + k * gt_room) // SECTOR for k in range(count)])
        end += count * gt_room
    if end > backend.size and count:
        backend.truncate(end)               # new tables: holes, read as zeros
    for gd, at, new in zip(gds, (ext.gd_at, ext.rgd_at), tables):
        entries = array("I", gd)
        entries.extend(new)
        if fits:
            if count:
                backend.pwrite(at + 4 * old_n, le_bytes(array("I", new)))
            new_at.append(at)
        else:
            room = _sector_up(4 * new_n)
            backend.pwrite(end, le_bytes(entries).ljust(room, b"\0"))
            new_at.append(end)
            end += room
    ext.file_size = max(ext.file_size, end, backend.size)
    if raw is not None and dev.descriptor_room:
        _store_descriptor(dev, raw)
    h = dict(ext.header)
    h.pop("_io", None)
    h["capacity"] = capacity
    h["gdOffset"] = new_at[0] // SECTOR
    if ext.rgd is not None:
        h["rgdOffset"] = new_at[1] // SECTOR
    header = SparseExtentHeader.build(h)
    backend.pwrite(0, header)               # last: the switch to the new size
    ext.header = SparseExtentHeader.parse(header)
    ext.size = capacity * SECTOR
    ext.ngt = new_n
    ext.gd = array("I", ext.gd)
    ext.gd.extend(tables[0])
    ext.gd_at = new_at[0]
    if ext.rgd is not None:
        ext.rgd = array("I", ext.rgd)
        ext.rgd.extend(tables[1])
        ext.rgd_at = new_at[1]
    ext._hole = (0, 0)
    if raw is not None and not dev.descriptor_room:
        _store_descriptor(dev, raw)         # a descriptor file: after the header
