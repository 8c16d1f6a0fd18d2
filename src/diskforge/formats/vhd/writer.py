"""Writing a new VHD: fixed, dynamic, or differencing (with ``-B``/``-b``).

Layout of a dynamic or differencing disk, in file order:

    0       footer copy (512 bytes)
    512     dynamic disk header (1024 bytes)
    1536    BAT, one big-endian 32-bit sector number per block, padded to a sector
            parent locator data (differencing disks: W2ku, then W2ru)
            blocks, each a sector bitmap then the block's data; the data starts on a
            4 KiB boundary as in Windows-made files
    end     footer (512 bytes)

Blocks are allocated in the order data arrives (increasing offsets), so the file is
in disk order. Data and header positions are decided as data comes, everything else
(BAT, header, both footers) is written by ``finish``, then the file is renamed into
place. A dynamic disk gets an all-ones bitmap per block, as qemu writes it; a
differencing disk sets the bits of exactly the sectors written or zeroed, so every
other sector reads from the parent.

A fixed disk is the disk bytes followed by the footer; zeros stay holes.
"""

from __future__ import annotations

import os
from array import array

from ...atomic import AtomicFile
from ...blockdev import ImageWriter, pieces
from ...byteorder import be_bytes
from ...errors import DiskforgeError, UnsupportedError, UsageError
from ...policy import beside
from . import geometry as geo
from . import locators as loc
from .device import VhdDevice
from .structs import (DATA_ALIGN, DIFFERENCING, DYNAMIC, FIXED, FOOTER_SIZE, HEADER_SIZE,
                      NO_OFFSET, SECTOR, UNUSED, align_up, bitmap_size, build_footer,
                      build_header, set_bits, vhd_time)

CREATOR = b"dskf"            # diskforge
CREATOR_VERSION = 0x00010000


class VhdWriter(ImageWriter):
    granularity = 4096

    def __init__(self, path: str, size: int, options, backing=None):
        self.path = path
        self.subformat = options.subformat
        self.block_size = options.block_size
        parent = None
        if backing is not None:
            parent = self._parent(path, backing)
            if self.subformat == "fixed":
                raise UsageError("a fixed VHD cannot have a parent: use"
                                 " subformat=dynamic for a differencing disk", path)
        pft = parent and parent["footer"]
        if pft is not None and size == parent["size"]:
            # same disk as the parent: take its size fields as they are
            self.current_size = pft.current_size
            g = pft.disk_geometry
            self.geometry = (g.cylinders, g.heads, g.sectors_per_track)
            self.original_size = pft.original_size
        else:
            self.current_size, self.geometry = geo.plan_size(size, options.force_size)
            self.original_size = self.current_size
        self.disk_type = FIXED if self.subformat == "fixed" else \
            DIFFERENCING if parent else DYNAMIC
        self.parent = parent
        self.out = AtomicFile(path, trailer="VHD footer",
                              stream=self.disk_type == FIXED)  # fixed: appends only
        try:
            self._layout()
        except BaseException:
            self.out.discard()
            raise

    @staticmethod
    def _parent(path: str, backing) -> dict:
        """What the child records of its parent: unique id, time stamp, path."""
        if backing.format not in ("vpc", "vhd"):
            raise UnsupportedError(f"a VHD differencing disk's parent must be a VHD, not"
                                   f" {backing.format} (convert the parent to vpc first)",
                                   path)
        parent_path = beside(path, backing.name)
        dev = backing.device
        opened = None
        if not isinstance(dev, VhdDevice):
            # create -u: the parent's footer is still needed for its unique id (its own
            # parent is not looked for)
            try:
                dev = opened = VhdDevice(parent_path, open_parent=False)
            except DiskforgeError as e:
                raise UsageError(f"a VHD differencing disk records its parent's unique id,"
                                 f" so the parent must be readable: {e}", path) from None
        try:
            return {"path": os.path.abspath(parent_path), "unique_id": bytes(dev.unique_id),
                    "footer": dev.footer, "size": dev.size,
                    "time_stamp": vhd_time(os.stat(parent_path).st_mtime)}
        finally:
            if opened is not None:
                opened.close()

    def _layout(self) -> None:
        uid = bytearray(os.urandom(16))  # a random (version 4) UUID, as qemu makes one
        uid[6] = uid[6] & 0x0F | 0x40
        uid[8] = uid[8] & 0x3F | 0x80
        self.uuid = bytes(uid)
        self.stamp = vhd_time()
        if self.disk_type == FIXED:
            self.out.truncate(self.current_size)
            return
        bs = self.block_size
        self.nblocks = -(-self.current_size // bs)
        self.bitmap_size = bitmap_size(bs)
        self.bat = array("I", [UNUSED]) * self.nblocks
        self.bat_at = FOOTER_SIZE + HEADER_SIZE
        end = self.bat_at + align_up(self.nblocks * 4, SECTOR)
        self.locators, self.locator_blobs = [], []
        if self.parent is not None:
            self.locators, self.locator_blobs, end = loc.locator_entries(
                self.parent["path"], os.path.dirname(os.path.abspath(self.path)), end)
        self.data_end = end
        self.align = min(DATA_ALIGN, bs)
        self.ones = b"\xff" * self.bitmap_size
        self.cur_blk = -1
        self.cur_bitmap: bytearray | None = None

    # -- blocks --------------------------------------------------------------------------
    def _block(self, blk: int) -> int:
        """The file offset of block ``blk``'s data, allocating it when new."""
        entry = self.bat[blk]
        if entry != UNUSED:
            return entry * SECTOR + self.bitmap_size
        data_at = align_up(self.data_end + self.bitmap_size, self.align)
        at = data_at - self.bitmap_size
        self.data_end = data_at + self.block_size
        if self.disk_type == DYNAMIC:
            self.out.pwrite(at, self.ones)
        self.bat[blk] = at // SECTOR
        return data_at

    def _mark(self, blk: int, first: int, end: int) -> None:
        """Differencing: these bytes of block ``blk`` are now this disk's."""
        if blk != self.cur_blk:
            self._flush_bitmap()
            self.cur_blk, self.cur_bitmap = blk, bytearray(self.bitmap_size)
        set_bits(self.cur_bitmap, first // SECTOR, -(-end // SECTOR))

    def _flush_bitmap(self) -> None:
        if self.cur_bitmap is not None:
            self.out.pwrite(self.bat[self.cur_blk] * SECTOR, self.cur_bitmap)
            self.cur_bitmap = None
            self.cur_blk = -1

    # -- the ImageWriter contract ----------------------------------------------------------
    def write_prepared(self, offset: int, data) -> None:
        if self.disk_type == FIXED:
            self.out.pwrite(offset, data)
            return
        mv = memoryview(data)
        bs = self.block_size
        for pos, k in pieces(offset, len(mv), bs):
            blk, inb = divmod(pos, bs)
            done = pos - offset
            self.out.pwrite(self._block(blk) + inb, mv[done:done + k])
            if self.disk_type == DIFFERENCING:
                self._mark(blk, inb, inb + k)

    def zero(self, offset: int, length: int) -> None:
        if self.disk_type != DIFFERENCING:
            return  # a new disk reads zeros wherever nothing was written
        bs = self.block_size
        for pos, k in pieces(offset, min(length, self.current_size - offset), bs):
            blk, inb = divmod(pos, bs)
            self._block(blk)  # allocated, its data a hole: zeros over the parent
            self._mark(blk, inb, inb + k)

    def _finish(self) -> None:
        """The closing structures (BAT, header, locators, both footers); ``finish``
        then commits the file, or discards it on failure."""
        fixed = self.disk_type == FIXED
        footer = build_footer(
            disk_type=self.disk_type, current_size=self.current_size,
            original_size=self.original_size, geometry=self.geometry,
            unique_id=self.uuid, creator=CREATOR, creator_version=CREATOR_VERSION,
            data_offset=NO_OFFSET if fixed else FOOTER_SIZE, time_stamp=self.stamp)
        if fixed:
            self.out.pwrite(self.current_size, footer)
            return
        self._flush_bitmap()
        self.out.pwrite(self.bat_at, be_bytes(self.bat).ljust(
            align_up(self.nblocks * 4, SECTOR), b"\xff"))
        p = self.parent or {}
        header = build_header(
            table_offset=self.bat_at, max_table_entries=self.nblocks,
            block_size=self.block_size, parent_unique_id=p.get("unique_id", bytes(16)),
            parent_time_stamp=p.get("time_stamp", 0),
            parent_unicode_name=loc.parent_name(p["path"]) if p else "",
            locators=self.locators)
        for at, blob in self.locator_blobs:
            self.out.pwrite(at, blob)
        self.out.pwrite(FOOTER_SIZE, header)
        self.out.pwrite(0, footer)
        self.out.pwrite(self.data_end, footer)

    def abort(self) -> None:
        self.out.discard()
