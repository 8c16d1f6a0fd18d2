"""Changing an existing VHD in place: resize (grow, and shrink with ``--shrink``),
giving a dynamic disk a parent, emptying a differencing disk after ``commit``.

qemu-img refuses ``resize`` of vpc images; diskforge does it, ordered so that a crash
between any two writes leaves a file qemu-img and diskforge open (the footer copy at
offset 0 is what both read first):

- growing a dynamic or differencing disk: room for the larger BAT first (extended in
  place when nothing follows it closely, else a new BAT written past everything, with
  a footer after it, before the header points at it), then the bytes the larger disk
  uncovers are zeroed (they lie past the old end, invisible until the footers say
  otherwise), and last the footer at the end of the file, then its copy at offset 0;
- shrinking one: the footers first (the blocks past the new end become invisible),
  then their BAT entries are cleared, their space freed, and the file cut after the
  last structure still in use;
- a fixed disk: the new footer is written before the old one is zeroed (growing) or
  cut off (shrinking).

The new size must be a multiple of 512 (qemu-img says the same for the formats it
resizes) and at most 2040 GiB. The footer records it as the current size and as the
CHS geometry when that represents it exactly, else 65535/16/255, so every reader
(qemu's creator table included, ``geometry.py``) sees exactly the new size.
"""

from __future__ import annotations

import os
from array import array

from ...byteorder import be_bytes
from ...errors import UnsupportedError, UsageError
from ...limits import check_alloc
from . import geometry as geo
from .structs import (DATA_ALIGN, DIFFERENCING, FIXED, FOOTER_CHECKSUM_AT, FOOTER_SIZE,
                      HEADER_CHECKSUM_AT, SECTOR, UNUSED, VhdDynamicDiskHeader, VhdFooter,
                      align_up, rebuilt, vhd_time)


def check_size(dev, size: int) -> None:
    """Refuse a size no VHD can have (before anything is written)."""
    if size % SECTOR:
        raise UsageError(f"The new size must be a multiple of {SECTOR} (VhdFooter"
                         f".current_size counts whole sectors; {size} is not)", dev.path)
    if size > geo.MAX_SIZE:
        raise UsageError(f"VhdFooter.current_size: {size} bytes is more than 2040 GiB,"
                         " the most a VHD can address", dev.path)


def size_fields(size: int) -> dict:
    """The footer fields that state ``size``: current size and a geometry every reader
    turns into exactly that size (the spec's CHS when exact, else the maximum), and
    the original size too: libvhdi takes the disk's size from that field."""
    chs = geo.chs_geometry(size // SECTOR)
    if geo.geometry_sectors(chs) != size // SECTOR:
        chs = geo.MAX_GEOMETRY
    c, h, s = chs
    return dict(current_size=size, original_size=size,
                disk_geometry=dict(cylinders=c, heads=h, sectors_per_track=s))


def resize(dev, size: int, shrink: bool) -> None:
    """Change the disk's size in the order the module docstring gives, so that an
    interruption leaves a disk every reader opens."""
    check_size(dev, size)
    if size < dev.size and not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation", dev.path)
    if size == dev.size:
        return
    if dev.disk_type == FIXED:
        _resize_fixed(dev, size)
    elif size > dev.size:
        _grow(dev, size)
    else:
        _shrink(dev, size)
    dev.backend.flush()


# -- footers -------------------------------------------------------------------------------

def _set_footer(dev, raw: bytes) -> None:
    dev.footer_raw = raw
    ft = dev.footer = VhdFooter.parse(raw)
    g = ft.disk_geometry
    dev.geometry = (g.cylinders, g.heads, g.sectors_per_track)
    dev.size, dev.size_rule = geo.disk_size(ft.current_size, dev.geometry,
                                            ft.creator_application, dev.path)


def _write_footers(dev, size: int) -> None:
    """The footer at the end first, then its copy at 0 (what qemu reads): a crash in
    between leaves the copy saying the old size, and ``check -r`` makes them agree."""
    raw = rebuilt(VhdFooter, dev.footer_raw, FOOTER_CHECKSUM_AT, **size_fields(size))
    dev.backend.pwrite(dev.footer_at, raw)
    dev.backend.flush()
    if dev.footer_copy_at is not None:
        dev.backend.pwrite(dev.footer_copy_at, raw)
        dev.backend.flush()
    _set_footer(dev, raw)


def _resize_fixed(dev, size: int) -> None:
    old, at = dev.size, dev.footer_at
    raw = rebuilt(VhdFooter, dev.footer_raw, FOOTER_CHECKSUM_AT, **size_fields(size))
    if size > old and min(size, at) > old:
        dev._zero_host(old, min(size, at) - old)   # past the old end: invisible
    dev.backend.pwrite(size, raw)   # the new footer, before the old one goes
    dev.backend.flush()
    if size > at:
        dev._zero_host(at, min(size, at + FOOTER_SIZE) - at)   # the old footer
    dev.backend.truncate(size + FOOTER_SIZE)
    dev.footer_at = size
    dev.file_size = size + FOOTER_SIZE
    _set_footer(dev, raw)


# -- the BAT -------------------------------------------------------------------------------

def _write_header(dev, **fields) -> None:
    raw = rebuilt(VhdDynamicDiskHeader, dev.header_raw, HEADER_CHECKSUM_AT, **fields)
    dev.backend.pwrite(dev.header_at, raw)
    dev.backend.flush()
    dev.header_raw = raw
    dev.header = VhdDynamicDiskHeader.parse(raw)


def _next_structure(dev) -> int:
    """Where the first structure after the BAT starts (a block, locator data, the
    header or the footer): how far the BAT may grow in place."""
    bat_at = dev.bat_at
    starts = [dev.footer_at] + ([dev.header_at] if dev.header_at > bat_at else [])
    starts += [off for _, _, off, _, _ in dev.locator_entries if off >= bat_at]
    starts += [dev.bat[i] * SECTOR for i in dev._used_blocks()
               if dev.bat[i] * SECTOR >= bat_at]
    return min(starts)


def _ensure_bat(dev, n: int) -> None:
    """Room for ``n`` BAT entries, the new ones unused, before the disk grows: in place
    when the next structure is far enough, else a new BAT past everything (the footer
    moved after it first, the header pointed at it last)."""
    old_n = dev.nblocks
    check_alloc(n * 4, dev.path, "VhdDynamicDiskHeader", "max_table_entries")
    need = align_up(n * 4, SECTOR)
    fill = b"\xff" * (need - old_n * 4)
    if dev.bat_at + need <= _next_structure(dev):
        dev.backend.pwrite(dev.bat_at + old_n * 4, fill)
        dev.backend.flush()
        if n > dev.max_table_entries:
            _write_header(dev, max_table_entries=n)
            dev.max_table_entries = n
            dev.bat_bytes = n * 4
        return
    new_at = align_up(dev.data_end, DATA_ALIGN)
    end = new_at + need
    dev.backend.pwrite(end, dev.footer_raw)   # a valid footer stays last in the file
    dev.backend.pwrite(new_at, be_bytes(dev.bat) + fill)
    dev.backend.flush()
    dev.footer_at, dev.file_size = end, max(dev.file_size, end + FOOTER_SIZE)
    _write_header(dev, table_offset=new_at, max_table_entries=n)
    dev.bat_at, dev.max_table_entries, dev.bat_bytes = new_at, n, n * 4
    dev.data_end = max(dev.data_end, end)


# -- dynamic and differencing disks ------------------------------------------------------

def _grow(dev, size: int) -> None:
    bs, old = dev.block_size, dev.size
    n = -(-size // bs)
    if n > dev.nblocks:
        _ensure_bat(dev, n)
        dev.bat.extend(array(dev.bat.typecode, [UNUSED]) * (n - dev.nblocks))
    # what the larger disk uncovers must read as zeros: the rest of a stored last block,
    # and a larger parent (qemu zeroes it too); done while the footers still say the old
    # size, so these writes are invisible until the footers change
    zero_to = old
    if old % bs and dev.bat[(old - 1) // bs] != UNUSED:
        zero_to = min(size, align_up(old, bs))
    parent = dev.backing
    if dev.disk_type == DIFFERENCING and parent is not None and parent.size > old:
        zero_to = max(zero_to, min(size, parent.size))
    dev.size, dev.nblocks = size, n
    if zero_to > old:
        dev._write_zeroes(old, zero_to - old)
        dev.backend.flush()
    _write_footers(dev, size)


def _shrink(dev, size: int) -> None:
    bs = dev.block_size
    n = -(-size // bs)
    _write_footers(dev, size)
    dev.nblocks = n
    span = dev.bitmap_size + bs
    freed = [dev.bat[i] * SECTOR for i in range(n, len(dev.bat)) if dev.bat[i] != UNUSED]
    if freed:
        dev.backend.pwrite(dev.bat_at + n * 4, b"\xff" * ((len(dev.bat) - n) * 4))
        dev.backend.flush()
    del dev.bat[n:]
    dev._bitmaps.clear()
    for at in freed:
        dev.backend.punch_hole(at, span)
    _trim(dev)


def _trim(dev) -> None:
    """Cut the file after the last structure in use: the footer written there first."""
    ends = [end for _, _, end, _, _ in dev._metadata()]
    ends += [off + reserved for _, _, off, _, reserved in dev.locator_entries]
    ends += [dev.bat[i] * SECTOR + dev.bitmap_size + dev.block_size
             for i in dev._used_blocks()]
    end = max(ends)
    if end < dev.footer_at:
        dev.backend.pwrite(end, dev.footer_raw)
        dev.backend.flush()
        dev.backend.truncate(end + FOOTER_SIZE)
        dev.footer_at, dev.file_size = end, end + FOOTER_SIZE
    dev.data_end = end


def make_empty(dev) -> None:
    """Drop every block of a differencing disk (after ``commit``): the BAT first, so a
    crash leaves at worst unreferenced blocks, then the file is cut."""
    if dev.disk_type != DIFFERENCING:
        raise UnsupportedError("not supported yet: emptying a VHD that is not a"
                               " differencing disk", dev.path)
    dev.backend.pwrite(dev.bat_at, b"\xff" * (len(dev.bat) * 4))
    dev.backend.flush()
    dev.bat = array(dev.bat.typecode, [UNUSED]) * len(dev.bat)
    dev._bitmaps.clear()
    _trim(dev)
    dev.backend.flush()


def fill_bitmaps(dev) -> None:
    """Set every bit of every stored block (before a dynamic disk gets a parent): a
    dynamic disk's block is read whole, so it must stay so in a differencing disk."""
    ones = b"\xff" * dev.bitmap_size
    for i in dev._used_blocks():
        at = dev.bat[i] * SECTOR
        if dev.backend.pread(at, dev.bitmap_size) != ones:
            dev.backend.pwrite(at, ones)
    dev.backend.flush()
    dev._bitmaps.clear()


def relink(dev) -> None:
    """After ``commit`` wrote into the parent: record its new modification time (its
    unique id does not change), so ``check`` has nothing to warn about."""
    if dev.disk_type != DIFFERENCING or dev.backing is None:
        return
    _write_header(dev, parent_time_stamp=vhd_time(os.stat(dev.backing.path).st_mtime))
