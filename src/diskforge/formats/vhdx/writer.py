"""Writing a new VHDX (convert, create): fixed, dynamic and differencing disks.

Layout, as Hyper-V and qemu lay it out: the 1 MiB header section (file identifier,
two headers, two region tables), the log at 1 MiB (empty, LogGuid zero), the 1 MiB
metadata region, the BAT, then payload blocks. Fixed disks have every block
FULLY_PRESENT, contiguous (the file stays sparse where the disk is zero, as qemu's
are); dynamic disks allocate a block when the first data for it arrives, so blocks
appear in disk order and zero blocks stay NOT_PRESENT; differencing disks keep what the
convert pipeline hands them (data or zeros) and leave the rest to the parent: a block
covered completely becomes FULLY_PRESENT (left sparse where it received zeros), one
covered in part PARTIALLY_PRESENT with its sector bitmap, one not touched NOT_PRESENT.

Everything is written into an AtomicFile; the header section, metadata and BAT are
written at ``finish()``, then the file is renamed into place.
"""

from __future__ import annotations

import os
from array import array

from construct import Container

from ...atomic import AtomicFile
from ...blockdev import Backing, ImageWriter, pieces
from ...byteorder import le_bytes
from ...errors import UnsupportedError, UsageError
from ...policy import beside
from .structs import (ALIGNMENT, BAT_GUID, BAT_OFFSET_SHIFT, FILE_SIGNATURE, HEADER_OFFSETS,
                      HEADER_SECTION_SIZE, MAX_DISK_SIZE, METADATA_GUID,
                      PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                      REGION_TABLE_OFFSETS, SB_BLOCK_PRESENT,
                      SECTOR_BITMAP_BLOCK, ZERO_GUID, align_up, bat_entries, bitmap_index,
                      chunk_ratio, guid_text, new_guid, payload_index, set_bits)
from .tables import Metadata, Region, build_header, build_metadata_region, build_region_table


def creator() -> str:
    return "diskforge"


def default_block_size(size: int, differencing: bool) -> int:
    """``block_size=0``: qemu-img's choice by disk size (vhdx_create: 8 MiB up to 1 GiB,
    16 MiB up to 100 GiB, 32 MiB up to 32 TiB, then 64 MiB), so a script that swaps
    qemu-img for diskforge gets the same file; a differencing disk (which qemu-img
    cannot make) gets Hyper-V's 2 MiB. Hyper-V's own 32 MiB is ``block_size=32M``
    (what ``export --to hyperv`` asks for)."""
    if differencing:
        return 2 << 20
    if size > 32 << 40:
        return 64 << 20
    if size > 100 << 30:
        return 32 << 20
    if size > 1 << 30:
        return 16 << 20
    return 8 << 20


class Geometry:
    """Sizes and offsets of a new VHDX, shared by the writer and ``measure``."""

    def __init__(self, size: int, options, differencing: bool, parent_lss: int | None):
        lss = options.logical_sector_size or parent_lss or 512
        if parent_lss and lss != parent_lss:
            raise UsageError(f"logical_sector_size={lss}: a differencing disk must have its"
                             f" parent's logical sector size ({parent_lss})")
        self.lss = lss
        # the disk size must be a multiple of the logical sector size (2.6.2.2): round up,
        # as qemu-img does
        self.size = align_up(size, lss)
        if self.size > MAX_DISK_SIZE:
            raise UsageError(f"{size} bytes is more than the 64 TiB VHDX maximum")
        self.block_size = options.block_size or default_block_size(self.size, differencing)
        self.differencing = differencing
        self.fixed = options.subformat == "fixed"
        if self.fixed and differencing:
            raise UsageError("a differencing VHDX cannot be fixed (subformat=fixed with -B)")
        self.ratio = chunk_ratio(self.block_size, lss)
        self.nblocks = -(-self.size // self.block_size)
        self.entries = bat_entries(self.size, self.block_size, lss, differencing)
        self.log_offset = HEADER_SECTION_SIZE
        self.log_size = options.log_size
        self.metadata_offset = self.log_offset + self.log_size
        self.bat_offset = self.metadata_offset + ALIGNMENT
        self.bat_length = align_up(max(1, self.entries * 8))
        self.data_offset = self.bat_offset + self.bat_length


class VhdxWriter(ImageWriter):
    granularity = 4096

    def __init__(self, path: str, size: int, options, backing: Backing | None = None):
        parent = None
        if backing is not None:
            parent = backing.device
            if backing.format != "vhdx":
                raise UnsupportedError(f"a VHDX differencing disk needs a VHDX parent"
                                       f" ({backing.name} is {backing.format})", path)
            if parent is None or not hasattr(parent, "header"):
                raise UnsupportedError("a VHDX differencing disk records its parent's"
                                       " DataWriteGuid, so the parent must be opened"
                                       " (not -u)", path)
        self.path = path
        self.g = g = Geometry(size, options, parent is not None,
                              parent.lss if parent is not None else None)
        self.options = options
        self.physical_sector_size = options.physical_sector_size
        self.locator = None
        if parent is not None:
            self.locator = {
                "parent_linkage": "{" + guid_text(parent.header.DataWriteGuid) + "}",
                "relative_path": _relative_path(backing.name, path),
            }
        self.bat = array("Q", [0]) * (g.bat_length // 8)
        self.next_free = g.data_offset
        self.out = AtomicFile(path)
        try:
            if g.fixed:
                for b in range(g.nblocks):
                    self._set(payload_index(b, g.ratio), PAYLOAD_BLOCK_FULLY_PRESENT,
                              g.data_offset + b * g.block_size)
                self.next_free = g.data_offset + g.nblocks * g.block_size
            self.out.truncate(self.next_free)
        except BaseException:
            self.out.discard()
            raise
        self.host: dict[int, int] = {}      # dynamic/differencing: block -> file offset
        # differencing: the block being filled, its sector bits, and the bitmap blocks
        # of chunks not finished yet
        self.cur_block = -1
        self.cur_bits = bytearray()
        self.sb: dict[int, bytearray] = {}

    def _set(self, idx: int, state: int, off: int) -> None:
        self.bat[idx] = (off >> 20) << BAT_OFFSET_SHIFT | state

    def _alloc(self, length: int) -> int:
        off = self.next_free
        self.next_free += align_up(length)
        return off

    def _block_host(self, block: int) -> int:
        g = self.g
        if g.fixed:
            return g.data_offset + block * g.block_size
        host = self.host.get(block)
        if host is None:
            host = self.host[block] = self._alloc(g.block_size)
            if not g.differencing:
                self._set(payload_index(block, g.ratio), PAYLOAD_BLOCK_FULLY_PRESENT, host)
        return host

    def _pieces(self, offset: int, length: int):
        """(block, offset in block, length) per block touched: the shared splitter's
        pieces, by block."""
        bs = self.g.block_size
        for pos, n in pieces(offset, length, bs):
            yield *divmod(pos, bs), n

    def write_prepared(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        pos = 0
        for block, within, n in self._pieces(offset, len(mv)):
            self.out.pwrite(self._block_host(block) + within, mv[pos:pos + n])
            if self.g.differencing:
                self._cover(block, within, n)
            pos += n

    def zero(self, offset: int, length: int) -> None:
        if not self.g.differencing:
            return  # unwritten space in a new file reads as zeros
        g = self.g
        for block, within, n in self._pieces(offset, length):
            last = min(g.block_size, g.size - block * g.block_size)
            if within == 0 and n >= last and block not in self.host:
                # a whole block of zeros over the parent: a FULLY_PRESENT block left
                # sparse (libvhdi reads ZERO blocks of differencing disks as file data)
                self._next_block(block)
                self._set(payload_index(block, g.ratio), PAYLOAD_BLOCK_FULLY_PRESENT,
                          self._block_host(block))
            else:
                self._cover(block, within, n)

    # -- differencing: which sectors this file holds ------------------------------------------
    def _next_block(self, block: int) -> None:
        if self.cur_block >= 0 and block != self.cur_block:
            self._finish_block()
        chunk = block // self.g.ratio
        for c in [c for c in self.sb if c < chunk]:
            self._write_bitmap(c)

    def _cover(self, block: int, within: int, n: int) -> None:
        if block != self.cur_block:
            self._next_block(block)
            self.cur_block = block
            self.cur_bits = bytearray(self.g.block_size // self.g.lss // 8)
        lss = self.g.lss
        first = within // lss
        set_bits(self.cur_bits, first, -(-(within + n) // lss) - first)

    def _finish_block(self) -> None:
        g = self.g
        block, bits = self.cur_block, self.cur_bits
        self.cur_block = -1
        nbits = -(-min(g.block_size, g.size - block * g.block_size) // g.lss)
        full = bits[:nbits // 8] == b"\xff" * (nbits // 8) and (
            nbits % 8 == 0 or bits[nbits // 8] & ((1 << nbits % 8) - 1) == (1 << nbits % 8) - 1)
        idx = payload_index(block, g.ratio)
        if full:   # zeros where nothing was written: sparse, not ZERO (see zero())
            self._set(idx, PAYLOAD_BLOCK_FULLY_PRESENT, self._block_host(block))
            return
        self._set(idx, PAYLOAD_BLOCK_PARTIALLY_PRESENT, self._block_host(block))
        chunk = block // g.ratio
        sb = self.sb.get(chunk)
        if sb is None:
            sb = self.sb[chunk] = bytearray(SECTOR_BITMAP_BLOCK)
        per = len(bits)
        at = (block % g.ratio) * per
        sb[at:at + per] = bits

    def _write_bitmap(self, chunk: int) -> None:
        off = self._alloc(SECTOR_BITMAP_BLOCK)
        self.out.pwrite(off, self.sb.pop(chunk))
        self._set(bitmap_index(chunk, self.g.ratio), SB_BLOCK_PRESENT, off)

    # -- the end ------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The last block's bitmap, then every structure; ``finish`` then commits the
        file, or discards it on failure."""
        if self.cur_block >= 0:
            self._finish_block()
        for c in sorted(self.sb):
            self._write_bitmap(c)
        self.out.truncate(self.next_free)
        self._write_structures()

    def _write_structures(self) -> None:
        g = self.g
        ident = bytearray(HEADER_OFFSETS[0])
        ident[:8] = FILE_SIGNATURE
        name = creator().encode("utf-16-le")[:510]
        ident[8:8 + len(name)] = name
        self.out.pwrite(0, ident)
        file_guid, data_guid = new_guid(), new_guid()
        for i, off in enumerate(HEADER_OFFSETS):
            self.out.pwrite(off, build_header(Container(
                SequenceNumber=i + 1, FileWriteGuid=file_guid, DataWriteGuid=data_guid,
                LogGuid=ZERO_GUID, LogVersion=0, Version=1, LogLength=g.log_size,
                LogOffset=g.log_offset)))
        table = build_region_table([Region(BAT_GUID, g.bat_offset, g.bat_length, True),
                                    Region(METADATA_GUID, g.metadata_offset, ALIGNMENT,
                                           True)])
        for off in REGION_TABLE_OFFSETS:
            self.out.pwrite(off, table)
        md = Metadata(block_size=g.block_size, leave_blocks_allocated=g.fixed,
                      has_parent=g.differencing, virtual_size=g.size,
                      logical_sector_size=g.lss,
                      physical_sector_size=self.physical_sector_size,
                      virtual_disk_id=new_guid(), parent_locator=self.locator)
        self.out.pwrite(g.metadata_offset, build_metadata_region(md))
        self.out.pwrite(g.bat_offset, le_bytes(self.bat))

    def abort(self) -> None:
        self.out.discard()


def _relative_path(name: str, target: str) -> str:
    """The parent as MS-VHDX's relative_path: relative to the new file's directory,
    with backslashes, ``.\\name`` for a file beside it (as Hyper-V writes it)."""
    directory = os.path.dirname(os.path.abspath(target))
    rel = os.path.relpath(beside(target, name), directory).replace(os.sep, "\\")
    return rel if rel.startswith("..") else ".\\" + rel
