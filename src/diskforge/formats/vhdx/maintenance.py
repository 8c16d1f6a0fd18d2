"""Changing an existing VHDX in place: resize (grow, and shrink with ``--shrink``),
giving, changing or removing a parent (rebase), emptying a differencing disk and
re-linking it to a parent that ``commit`` wrote into.

qemu-img refuses ``resize`` of vhdx images (and cannot open differencing ones).
Every change that a reader could see goes through the log (MS-VHDX 2.3), as the
device's writes already do, so an interruption leaves the old or the new state:

- the metadata region (2.6) is rebuilt from the parsed items and only the 4 KiB
  sectors that differ are logged, in one entry: the virtual disk size, or HasParent
  with the parent locator, change atomically;
- a BAT that outgrows its region is copied to new space past every structure first;
  the region tables then point at it in one logged entry (the tables are rewritten
  whole, their checksums included), before the size changes;
- growing: the bytes the larger disk uncovers (the rest of a stored last block, a
  larger parent's data) are zeroed while the metadata still says the old size;
- shrinking: the size first, then the BAT entries past the new end are cleared and
  their space freed, and the file is cut after the last structure in use.

The new size must be a multiple of the logical sector size and at most 64 TiB.
"""

from __future__ import annotations

import dataclasses
import os

from ...byteorder import le_bytes
from ...errors import UnsupportedError, UsageError
from ...policy import OpenPolicy, beside
from ...registry import open_image
from .structs import (ALIGNMENT, BAT_GUID, BAT_OFFSET_SHIFT, BAT_STATE_MASK, LOG_SECTOR,
                      MAX_DISK_SIZE, METADATA_GUID, PAYLOAD_BLOCK_FULLY_PRESENT,
                      PAYLOAD_BLOCK_PARTIALLY_PRESENT, REGION_TABLE_OFFSETS,
                      REGION_TABLE_SIZE, SB_BLOCK_PRESENT, SECTOR_BITMAP_BLOCK,
                      ZERO_GUID, MetadataTableHeader, align_up, bat_entries, guid_text,
                      payload_index)
from .bat import BatTable
from .tables import Region, build_metadata_region, build_region_table

_STORED = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)


def check_size(dev, size: int) -> None:
    """Refuse a size no VHDX can have, before anything is written."""
    if size % dev.lss:
        raise UsageError(f"The new size must be a multiple of {dev.lss} (the"
                         f" LogicalSectorSize; {size} is not)", dev.path)
    if size > MAX_DISK_SIZE:
        raise UsageError(f"VirtualDiskSize: {size} bytes is more than 64 TiB, the most a"
                         " VHDX holds", dev.path)


# -- logged rewrites -------------------------------------------------------------------------

def _changed_sectors(dev, offset: int, new: bytes) -> dict[int, bytes]:
    old = dev._read(offset, len(new), "metadata")
    return {offset + i: new[i:i + LOG_SECTOR] for i in range(0, len(new), LOG_SECTOR)
            if old[i:i + LOG_SECTOR] != new[i:i + LOG_SECTOR]}


def _commit_metadata(dev, md) -> None:
    """Rebuild the metadata region from ``md`` and log the sectors that change, as one
    entry."""
    region = dev.regions[METADATA_GUID]
    head = MetadataTableHeader.parse(dev._read(region.offset, 32, "metadata table"))
    if head.EntryCount != len(md.items) or md.virtual_disk_id is None:
        raise UnsupportedError("not supported yet: changing a VHDX whose metadata region"
                               " holds items diskforge does not rebuild (user items, or"
                               " no VirtualDiskId)", dev.path)
    new = build_metadata_region(md, min(region.length, ALIGNMENT))
    changed = _changed_sectors(dev, region.offset, new)
    if changed:
        dev._log_commit(changed)
    items = ["FileParameters", "VirtualDiskSize", "LogicalSectorSize",
             "PhysicalSectorSize", "VirtualDiskId"] + (["ParentLocator"]
                                                       if md.has_parent else [])
    dev.md = dataclasses.replace(md, items=items)


def _bat_table(dev, need: int) -> None:
    region = dev.regions[BAT_GUID]
    dev.bat_offset = region.offset
    dev.bat = BatTable(dev._read, region.offset,
                       min(region.length, align_up(need * 8, LOG_SECTOR)) // 8)


def _ensure_bat(dev, need: int) -> None:
    """Room for ``need`` BAT entries, the new ones zero, before anything uses them."""
    region = dev.regions[BAT_GUID]
    old_count = len(dev.bat)
    if need <= old_count:
        return
    old_need = bat_entries(dev.size, dev.block_size, dev.lss, dev.differencing)
    if need * 8 <= region.length:
        # in place: sectors past the old table are read by nobody yet, written
        # directly; stale entries in its last sector go through the log
        start = region.offset + old_count * 8
        dev.backend.write_zeroes(start, align_up(need * 8, LOG_SECTOR) - old_count * 8)
        dev.backend.flush()
        # stale entries in its last sector: logged now (past the old end: invisible)
        extra: dict[int, bytes] = {}
        for idx in range(old_need, old_count):
            if dev.bat[idx]:
                dev.bat[idx] = 0
                so, raw = dev._bat_sector(idx)
                extra[so] = raw
        if extra:
            dev._log_commit(extra)
        _bat_table(dev, need)
        return
    length = align_up(need * 8)
    off = dev._allocate(length)          # zero-filled, past every structure
    step = 1 << 16
    for i in range(0, old_need, step):
        dev.backend.pwrite(off + i * 8, le_bytes(dev.bat[i:min(old_need, i + step)]))
    dev.backend.flush()
    regions = [Region(r.guid, off, length, r.required) if r.guid == BAT_GUID else r
               for r in dev.regions.values()]
    table = build_region_table(regions)
    changed: dict[int, bytes] = {}
    for at in REGION_TABLE_OFFSETS:
        changed.update(_changed_sectors(dev, at, table[:REGION_TABLE_SIZE]))
    dev._log_commit(changed)
    dev.regions = {r.guid: r for r in regions}
    _bat_table(dev, need)


# -- resize ---------------------------------------------------------------------------------

def resize(dev, size: int, shrink: bool) -> None:
    """Change the disk's size, every visible step through the log (module docstring),
    under a new DataWriteGuid: children made from the old disk no longer match it."""
    check_size(dev, size)
    if size < dev.size and not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation", dev.path)
    if size == dev.size:
        return
    dev._begin_write()
    if size > dev.size:
        _grow(dev, size)
    else:
        _shrink(dev, size)
    dev.backend.flush()


def _set_size(dev, size: int) -> None:
    dev.size = size
    dev.nblocks = -(-size // dev.block_size)


def _grow(dev, size: int) -> None:
    old, bs = dev.size, dev.block_size
    _ensure_bat(dev, bat_entries(size, bs, dev.lss, dev.differencing))
    zero_to = old
    if old % bs and dev._entry((old - 1) // bs)[0] in _STORED:
        zero_to = min(size, align_up(old, bs))
    parent = dev.parent
    if dev.differencing and parent is not None and parent.size > old:
        zero_to = max(zero_to, min(size, parent.size))
    first_new = dev.nblocks
    _set_size(dev, size)       # in memory only: the metadata still says ``old``
    try:
        if zero_to > old:
            dev._write_zeroes(old, zero_to - old)
            dev.backend.flush()
        if dev.md.leave_blocks_allocated:
            _allocate_blocks(dev, first_new)
        _commit_metadata(dev, dataclasses.replace(dev.md, virtual_size=size))
    except BaseException:
        _set_size(dev, old)
        raise


def _allocate_blocks(dev, first: int) -> None:
    """A fixed disk (LeaveBlocksAllocated) keeps every block FULLY_PRESENT: the new
    ones get zero-filled (sparse) space, as the writer gives them."""
    changed: dict[int, bytes] = {}
    for block in range(first, dev.nblocks):
        if dev._entry(block)[0] != PAYLOAD_BLOCK_FULLY_PRESENT:
            dev._set_entry(payload_index(block, dev.ratio), PAYLOAD_BLOCK_FULLY_PRESENT,
                           dev._allocate(dev.block_size), changed)
    if changed:
        dev._log_commit(changed)


def _entry_span(dev, idx: int) -> tuple[int, int] | None:
    """(file offset, length) an entry maps, or None."""
    e = dev.bat[idx]
    is_bitmap = (idx + 1) % (dev.ratio + 1) == 0
    state = e & BAT_STATE_MASK
    if (is_bitmap and state == SB_BLOCK_PRESENT) or (not is_bitmap and state in _STORED):
        return (e >> BAT_OFFSET_SHIFT) << 20, SECTOR_BITMAP_BLOCK if is_bitmap \
            else dev.block_size
    return None


def _clear(dev, indices) -> list[tuple[int, int]]:
    """Set BAT entries to zero through the log; the file spans they mapped."""
    changed: dict[int, bytes] = {}
    freed = []
    for idx in indices:
        span = _entry_span(dev, idx)
        if span is not None:
            freed.append(span)
        dev.bat[idx] = 0
        so, raw = dev._bat_sector(idx)
        changed[so] = raw
    if changed:
        dev._log_commit(changed)
    return freed


def _free(dev, freed: list[tuple[int, int]]) -> None:
    """Give freed spans back: holes, and the file cut after what is still in use."""
    for off, n in freed:
        dev.backend.punch_hole(off, n)
    h = dev.header
    end = max([h.LogOffset + h.LogLength] + [r.offset + r.length
                                             for r in dev.regions.values()])
    for idx in dev._plain_entries():
        span = _entry_span(dev, idx)
        if span is not None:
            end = max(end, span[0] + span[1])
    end = align_up(end)
    if end < dev.backend.size:
        # a log entry records the file size it saw (FlushedFileOffset): every entry is
        # applied, so the log is emptied before the file gets shorter than that
        dev.backend.flush()
        if dev.header.LogGuid != ZERO_GUID:
            dev._update_header(LogGuid=ZERO_GUID)
        dev.backend.truncate(end)
    dev.file_size = dev.backend.size
    dev._alloc_end = None
    dev._bitmaps.clear()


def _shrink(dev, size: int) -> None:
    new_need = bat_entries(size, dev.block_size, dev.lss, dev.differencing)
    _commit_metadata(dev, dataclasses.replace(dev.md, virtual_size=size))
    _set_size(dev, size)
    freed = _clear(dev, [i for i in dev._plain_entries() if i >= new_need])
    _free(dev, freed)
    _bat_table(dev, new_need)


def make_empty(dev) -> None:
    """Drop every block of a differencing disk (after ``commit``): it reads through to
    its parent."""
    if not dev.differencing:
        raise UnsupportedError("not supported yet: emptying a VHDX that is not a"
                               " differencing disk", dev.path)
    dev._begin_write()
    _free(dev, _clear(dev, list(dev._plain_entries())))


# -- parents ---------------------------------------------------------------------------------

def _relative_path(target: str, parent: str) -> str:
    """MS-VHDX's relative_path as Hyper-V writes it: ``.\\name`` or ``..\\dir\\name``."""
    rel = os.path.relpath(parent, os.path.dirname(os.path.abspath(target)))
    rel = rel.replace(os.sep, "\\")
    return rel if rel.startswith("..") else ".\\" + rel


def _open_parent(dev, path: str):
    parent = open_image(path, "vhdx", policy=dev.policy or OpenPolicy().descend(dev.path))
    if not hasattr(parent, "header") or getattr(parent, "lss", None) != dev.lss:
        parent.close()
        raise UnsupportedError(f"a VHDX differencing disk's parent must be a VHDX with"
                               f" {dev.lss}-byte logical sectors", dev.path)
    return parent


def _locator(dev, parent, name: str) -> dict[str, str]:
    return {"parent_linkage": "{" + guid_text(parent.header.DataWriteGuid) + "}",
            "relative_path": _relative_path(dev.path, beside(dev.path, name))}


def set_backing(dev, name: str | None, fmt: str | None) -> None:
    """Record ``name`` (a VHDX beside or relative to this file) as the parent, or drop
    the parent: the metadata changes in one logged entry, after the BAT has room for a
    differencing disk's sector bitmap entries."""
    if fmt not in (None, "vhdx"):
        raise UnsupportedError(f"a VHDX differencing disk's parent must be a VHDX, not"
                               f" {fmt}", dev.path)
    if name is None:
        if dev.differencing:
            _drop_parent(dev)
        return
    path = beside(dev.path, name)
    if os.path.realpath(path) == os.path.realpath(dev.path):
        raise UsageError("an image cannot be its own backing file", dev.path)
    parent = _open_parent(dev, path)
    try:
        dev._begin_write()
        _ensure_bat(dev, bat_entries(dev.size, dev.block_size, dev.lss, True))
        md = dataclasses.replace(dev.md, has_parent=True,
                                 parent_locator=_locator(dev, parent, name))
        _commit_metadata(dev, md)
    except BaseException:
        parent.close()
        raise
    if dev.parent is not None:
        dev.parent.close()
    dev.parent = dev.backing = parent
    dev.parent_name = dev.md.parent_locator["relative_path"]
    dev.parent_path = parent.path
    dev.differencing = True
    dev._bitmaps.clear()


def _drop_parent(dev) -> None:
    """A differencing disk becomes a dynamic one holding only its own sectors: a
    PARTIALLY_PRESENT block's sectors that read from the parent are zeroed in the file
    and the block becomes FULLY_PRESENT (that state does not exist without a parent);
    the sector bitmap blocks are dropped; HasParent goes last, with the locator."""
    dev._begin_write()
    changed: dict[int, bytes] = {}
    r1 = dev.ratio + 1
    bitmaps = []
    for idx in list(dev._plain_entries()):
        if (idx + 1) % r1 == 0:
            bitmaps.append(idx)
            continue
        e = dev.bat[idx]
        if e & BAT_STATE_MASK != PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            continue
        block = idx - idx // r1
        host = (e >> BAT_OFFSET_SHIFT) << 20
        n = min(dev.block_size, dev.size - block * dev.block_size)
        for a, k, present in dev._sector_runs(block, 0, n):
            if not present:
                dev._zero_file(host + a, k)
        dev._set_entry(idx, PAYLOAD_BLOCK_FULLY_PRESENT, host, changed)
    dev.backend.flush()
    if changed:
        dev._log_commit(changed)
    md = dataclasses.replace(dev.md, has_parent=False, parent_locator=None,
                             locator_type=None)
    _commit_metadata(dev, md)
    dev.differencing = False
    _free(dev, _clear(dev, bitmaps))
    if dev.parent is not None:
        dev.parent.close()
    dev.parent = dev.backing = None
    dev.parent_name = dev.parent_path = None


def relink(dev) -> None:
    """After ``commit`` wrote into the parent its DataWriteGuid changed: record the new
    one, so this disk still opens on it."""
    if not dev.differencing or dev.parent is None:
        return
    path = dev.parent.path
    dev.parent.close()
    dev.parent = dev.backing = None
    parent = _open_parent(dev, path)
    dev.parent = dev.backing = parent
    loc = dict(dev.md.parent_locator or {})
    loc["parent_linkage"] = "{" + guid_text(parent.header.DataWriteGuid) + "}"
    loc.pop("parent_linkage2", None)
    _commit_metadata(dev, dataclasses.replace(dev.md, parent_locator=loc))

