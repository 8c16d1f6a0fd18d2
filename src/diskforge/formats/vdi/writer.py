"""Writing a new VDI 1.1: dynamic, static (``-o static=on``) or differencing (``-B``).

Layout, as VirtualBox's vdiCreate makes it (``VDIHEADER1PLUS``, 400 bytes):

    0         VDIPREHEADER (72 bytes), then VDIHEADER1PLUS
    1 MiB     the block map (offBlocks; VirtualBox aligns it to VDI_DATA_ALIGN)
    offData   the blocks, each ``cbBlock`` bytes (no per-block extra data); offData
              is the end of the map rounded up to 1 MiB

A dynamic or differencing image stores its blocks in the order data arrives
(increasing offsets), so the file is in disk order; all-zero stretches inside a block
stay holes of the file. A static image maps block i to index i and its file is sized
up front (zeros stay holes). The map and the header are written by ``finish``.

Header fields as VirtualBox writes them: both geometries zero with 512-byte sectors,
no flags, new random ``uuidCreate`` and ``uuidModify``; a differencing image records
its parent's ``uuidCreate`` (``uuidLinkage``) and ``uuidModify``
(``uuidParentModify``). The disk size is rounded up to whole sectors, as qemu-img
does (and VirtualBox requires it of a disk).

A differencing image stores whole blocks, as VirtualBox does: the part of a block
that convert did not write is filled from the parent before the writer moves on, so
only blocks never touched read through to the parent, and a block zeroed whole gets a
``VDI_IMAGE_BLOCK_ZERO`` entry.
"""

from __future__ import annotations

import os
from array import array

from ...atomic import AtomicFile
from ...blockdev import ImageWriter, pieces, zero_runs
from ...byteorder import le_bytes
from ...errors import DiskforgeError, UnsupportedError, UsageError
from ...limits import check_alloc
from ...policy import beside
from .device import VdiDevice
from .parent import search_dirs
from .structs import (SECTOR, VDI_IMAGE_BLOCK_FREE, VDI_IMAGE_BLOCK_ZERO,
                      VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_FIXED, VDI_IMAGE_TYPE_NORMAL,
                      build_header, layout, new_uuid)

_HOLE_GRANULE = 4096   # zero runs of this size inside a block are left as holes


class VdiWriter(ImageWriter):
    def __init__(self, path: str, size: int, options, backing=None):
        self.path = path
        self.static = options.static
        self.block_size = bs = options.block_size
        self.granularity = bs
        if size <= 0:
            raise UsageError("a VDI cannot be empty (VirtualBox refuses a disk size of 0)",
                             path)
        self.size = -(-size // SECTOR) * SECTOR
        self.nblocks, self.off_blocks, self.off_data = layout(self.size, bs)
        if self.nblocks >= VDI_IMAGE_BLOCK_ZERO or self.off_data > 0xFFFFFFFF:
            raise UsageError(f"a {self.size}-byte disk needs {self.nblocks} blocks of {bs}"
                             " bytes, more than a VDI's block map holds: use a larger"
                             " block_size", path)
        check_alloc(4 * self.nblocks, path, "VDIHEADER1PLUS", "cBlocks")
        self.parent = None
        if backing is not None:
            if self.static:
                raise UsageError("a static VDI cannot have a parent: VirtualBox's"
                                 " differencing images are dynamic", path)
            self.parent = self._parent(path, backing)
        self.type = VDI_IMAGE_TYPE_FIXED if self.static else \
            VDI_IMAGE_TYPE_DIFF if self.parent else VDI_IMAGE_TYPE_NORMAL
        self.out = AtomicFile(path)
        try:
            if self.static:
                self.map = array("I", range(self.nblocks))
                self.allocated = self.nblocks
                self.out.truncate(self.off_data + self.nblocks * bs)
            else:
                self.map = array("I", [VDI_IMAGE_BLOCK_FREE]) * self.nblocks
                self.allocated = 0
        except BaseException:
            self.out.discard()
            raise
        self.cur_blk = -1            # differencing: the block being written, and the
        self.cur_done: list[tuple[int, int]] = []   # parts of it written so far

    def _parent(self, path: str, backing) -> dict:
        """The parent's UUIDs and the device that fills partly written blocks."""
        if backing.format != "vdi":
            raise UnsupportedError(f"a VDI differencing image's parent must be a VDI, not"
                                   f" {backing.format} (convert the parent to vdi first)",
                                   path)
        parent_path = beside(path, backing.name)
        dirs = {os.path.realpath(d) for d in search_dirs(path)}
        if os.path.dirname(os.path.realpath(parent_path)) not in dirs:
            raise UsageError(f"a VDI records no parent file name, only its UUID, so the"
                             f" parent '{backing.name}' must be in the new image's"
                             " directory or the one above it to be found again", path)
        dev = backing.device
        opened = None
        if not isinstance(dev, VdiDevice):
            # create -u: only the parent's header is needed (its own parent is not
            # looked for), and nothing is written that needs its bytes
            try:
                dev = opened = VdiDevice(parent_path, open_parent=False)
            except DiskforgeError as e:
                raise UsageError(f"a VDI differencing image records its parent's UUID, so"
                                 f" the parent must be readable: {e}", path) from None
        return {"create": dev.uuid_create, "modify": dev.uuid_modify,
                "device": dev if opened is None else None, "opened": opened}

    # -- blocks --------------------------------------------------------------------------
    def _host(self, blk: int) -> int:
        """The file offset of block ``blk``, storing it when new."""
        entry = self.map[blk]
        if entry >= VDI_IMAGE_BLOCK_ZERO:
            entry = self.map[blk] = self.allocated
            self.allocated += 1
        return self.off_data + entry * self.block_size

    def _block_end(self, blk: int) -> int:
        return min(self.block_size, self.size - blk * self.block_size)

    def _mark(self, blk: int, a: int, b: int) -> None:
        """Differencing: bytes ``a..b`` of block ``blk`` were written."""
        if blk != self.cur_blk:
            self._fill_from_parent()
            self.cur_blk = blk
        self.cur_done.append((a, b))

    def _fill_from_parent(self) -> None:
        """The parts of the current block nothing wrote: the parent's bytes."""
        blk = self.cur_blk
        if blk < 0:
            return
        parent = self.parent["device"]
        if parent is None:
            raise UnsupportedError("not supported yet: writing data into a VDI"
                                   " differencing image made without opening its parent"
                                   " (-u)", self.path)
        base, pos = blk * self.block_size, 0
        host = self._host(blk)
        for a, b in sorted(self.cur_done) + [(self._block_end(blk),) * 2]:
            if a > pos:
                n = max(0, min(a, parent.size - base) - pos)
                if n:
                    data = parent.read(base + pos, n)
                    self._put(host + pos, base + pos, data)
            pos = max(pos, b)
        self.cur_blk, self.cur_done = -1, []

    def _put(self, host: int, offset: int, data) -> None:
        """Write ``data`` at ``host``, leaving its all-zero 4 KiB runs as holes (the
        file is new: a hole reads as zeros)."""
        mv = memoryview(data)
        for o, n, zero in zero_runs(data, offset, _HOLE_GRANULE):
            if not zero:
                self.out.pwrite(host + o - offset, mv[o - offset:o - offset + n])

    # -- the ImageWriter contract ----------------------------------------------------------
    def write_prepared(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        bs = self.block_size
        for pos, k in pieces(offset, len(mv), bs):
            blk, inb = divmod(pos, bs)
            done = pos - offset
            chunk = mv[done:done + k]
            if self.static:
                self._put(self.off_data + pos, pos, chunk)
                continue
            if self.type == VDI_IMAGE_TYPE_DIFF:
                self._mark(blk, inb, inb + k)
            self._put(self._host(blk) + inb, pos, chunk)

    def zero(self, offset: int, length: int) -> None:
        if self.type != VDI_IMAGE_TYPE_DIFF:
            return  # a new image reads zeros wherever nothing was written
        bs = self.block_size
        for pos, k in pieces(offset, min(length, self.size - offset), bs):
            blk, inb = divmod(pos, bs)
            if inb == 0 and k == self._block_end(blk) and \
                    self.map[blk] == VDI_IMAGE_BLOCK_FREE:
                self._fill_from_parent()
                self.map[blk] = VDI_IMAGE_BLOCK_ZERO
                continue
            self._host(blk)            # stored; its bytes a hole: zeros over the parent
            self._mark(blk, inb, inb + k)

    def _finish(self) -> None:
        if self.type == VDI_IMAGE_TYPE_DIFF:
            self._fill_from_parent()
        p = self.parent or {}
        header = build_header(
            image_type=self.type, cb_disk=self.size, cb_block=self.block_size,
            c_blocks=self.nblocks, c_blocks_allocated=self.allocated,
            off_blocks=self.off_blocks, off_data=self.off_data, uuid_create=new_uuid(),
            uuid_modify=new_uuid(), uuid_linkage=p.get("create", bytes(16)),
            uuid_parent_modify=p.get("modify", bytes(16)))
        self.out.pwrite(0, header)
        self.out.pwrite(self.off_blocks, le_bytes(self.map))
        end = self.off_data + self.allocated * self.block_size
        if self.out.size < end:
            self.out.truncate(end)
        self._close_parent()

    def _close_parent(self) -> None:
        if self.parent and self.parent["opened"] is not None:
            self.parent["opened"].close()
            self.parent["opened"] = None

    def abort(self) -> None:
        self._close_parent()
        self.out.discard()

