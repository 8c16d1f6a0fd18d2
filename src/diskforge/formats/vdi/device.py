"""Reading, checking and writing in place an existing VDI (dynamic, static, differencing).

Opening validates the pre-header and header the way VirtualBox's ``vdiValidateHeader``
does (signature, version, header size, image type, flags, offsets in order, block size
a power of two, ``cBlocks * cbBlock >= cbDisk``, allocated count) before any size or
offset in them is used, then reads the block map whole (after ``limits.check_alloc``).
Null creation or modification UUIDs, which VirtualBox refuses, are read anyway (qemu
does) and reported by ``check``.

A block map entry that points past the end of the file does not stop the open (so
``check`` can report it, as ``qemu-img check`` does); reading that block raises a
one-line CorruptImage naming the entry.

Reading: an entry below ``VDI_IMAGE_BLOCK_ZERO`` is the index of a stored block (at
``offData + entry * (cbBlockExtra + cbBlock) + cbBlockExtra``); ``VDI_IMAGE_BLOCK_ZERO``
reads as zeros; ``VDI_IMAGE_BLOCK_FREE`` reads as zeros, or from the parent in a
differencing image. How the parent of a differencing image is found (VDI stores no
file name, only the parent's creation UUID) is ``parent.py``'s business.

Writing in place (VDI 1.1 only): a new block goes after the last stored one and is
written whole (the rest of it from the parent in a differencing image, zeros
otherwise), then the header's ``cBlocksAllocated``, then the map entry, so a crash
leaves at worst an unreferenced block. The first change gives the image a new
``uuidModify``, as VirtualBox does.
"""

from __future__ import annotations

import os

from ...blockdev import (ZEROES, Extent, ExtentKind, FileDevice, ImageInfo, coalesce,
                         fill_zero, pieces, skip_filled)
from ...byteorder import le_array, le_bytes
from ...checks import CheckResult, Problem, ProblemKind, Repair
from ...errors import CorruptImage, UnsupportedError, UsageError
from ...limits import check_alloc
from .structs import (HEADER0_SIZE, HEADER1_SIZE, HEADER1PLUS_SIZE, IMAGE_TYPES,
                      NULL_UUID, PREHEADER_SIZE, SECTOR, VDI_IMAGE_BLOCK_FREE,
                      VDI_IMAGE_BLOCK_ZERO, VDI_IMAGE_FLAGS_ZERO_EXPAND,
                      VDI_IMAGE_SIGNATURE, VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_FIXED,
                      VDI_IMAGE_TYPE_NORMAL, VDI_IMAGE_TYPE_UNDO, VDI_IMAGE_VERSION,
                      VDI_IMAGE_VERSION_OLD, VDIHEADER0, VDIHEADER1, VDIHEADER1PLUS,
                      VDIPREHEADER, new_uuid, uuid_text, version_text)

MAP = "VDIIMAGEBLOCKPOINTER"      # the block map's entries, as VDICore.h types them
_ALLOCATED_BELOW = VDI_IMAGE_BLOCK_ZERO
# qemu's VDI_BLOCKS_IN_IMAGE_MAX: it refuses images with more blocks
QEMU_MAX_BLOCKS = 0xFFFFFFFF // 4


class VdiDevice(FileDevice):
    """A VDI opened as a block device (``VdiDevice(path, writable=, policy=,
    open_parent=)``; ``open_parent=False`` reads only this file's structures, for a
    writer that needs a parent's UUIDs)."""

    format = "vdi"

    def _open(self, open_parent: bool = True) -> None:
        self.notes: list[str] = []
        self.modified = False
        self.parent_path: str | None = None  # opened or, under open_backing=False, found
        self._load()
        if self.image_type == VDI_IMAGE_TYPE_DIFF and open_parent:
            from .parent import open_parent as find_parent
            self.backing = find_parent(self)

    # -- opening ------------------------------------------------------------------------
    def _load(self) -> None:
        f = self.backend
        self.file_size = size = f.size
        if size < PREHEADER_SIZE:
            raise self._err(f"the file is {size} bytes, too small for a VDI pre-header",
                            "VDIPREHEADER")
        pre = self.preheader = VDIPREHEADER.parse(f.read_exact(0, PREHEADER_SIZE,
                                                               "VDIPREHEADER"))
        if pre.u32Signature != VDI_IMAGE_SIGNATURE:
            raise self._err(f"signature {pre.u32Signature:#010x} is not"
                            f" {VDI_IMAGE_SIGNATURE:#010x}: not a VDI image", "VDIPREHEADER",
                            "u32Signature")
        self.version = pre.u32Version
        if self.version == VDI_IMAGE_VERSION:
            self._load_v1()
        elif self.version == VDI_IMAGE_VERSION_OLD:
            self._load_v0()
        else:
            raise UnsupportedError(f"not supported yet: VDI version"
                                   f" {version_text(self.version)} (VDIPREHEADER.u32Version;"
                                   " VirtualBox reads 1.1 and 0.2)", self.path)
        self._validate()
        self._load_map()

    def _load_v1(self) -> None:
        f = self.backend
        if self.file_size < PREHEADER_SIZE + HEADER1_SIZE:
            raise self._err(f"the file is {self.file_size} bytes, too small for a VDI 1.1"
                            " header", "VDIHEADER1")
        cb = int.from_bytes(f.read_exact(PREHEADER_SIZE, 4, "VDIHEADER1"), "little")
        if cb < HEADER1_SIZE:
            raise self._err(f"header size {cb} is smaller than VDIHEADER1 ({HEADER1_SIZE})",
                            "VDIHEADER1", "cbHeader")
        self.header_struct = VDIHEADER1PLUS if cb >= HEADER1PLUS_SIZE and \
            self.file_size >= PREHEADER_SIZE + HEADER1PLUS_SIZE else VDIHEADER1
        self.header_name = "VDIHEADER1PLUS" if self.header_struct is VDIHEADER1PLUS \
            else "VDIHEADER1"
        n = HEADER1PLUS_SIZE if self.header_struct is VDIHEADER1PLUS else HEADER1_SIZE
        h = self.header = self.header_struct.parse(f.read_exact(PREHEADER_SIZE, n,
                                                                self.header_name))
        self.off_blocks, self.off_data = h.offBlocks, h.offData
        self.block_extra = h.cbBlockExtra
        self.uuid_parent_modify = h.uuidParentModify
        if h.offBlocks < PREHEADER_SIZE + HEADER1_SIZE:
            raise self._err(f"block map offset {h.offBlocks} is inside the header (it must"
                            f" be at least {PREHEADER_SIZE + HEADER1_SIZE})",
                            self.header_name, "offBlocks")
        if h.offData < h.offBlocks + 4 * h.cBlocks:
            raise self._err(f"data offset {h.offData} is inside the block map ({h.cBlocks}"
                            f" entries at {h.offBlocks})", self.header_name, "offData")
        if h.cbBlockExtra and h.cbBlockExtra & (h.cbBlockExtra - 1):
            raise self._err(f"per-block extra data size {h.cbBlockExtra} is not a power"
                            " of two", self.header_name, "cbBlockExtra")
        if self.header_struct is VDIHEADER1PLUS and h.LCHSGeometry.cbSector != SECTOR:
            self.notes.append(f"{self.header_name}.LCHSGeometry.cbSector is"
                              f" {h.LCHSGeometry.cbSector}, not 512 (VirtualBox refuses"
                              " the image)")

    def _load_v0(self) -> None:
        f = self.backend
        if self.file_size < PREHEADER_SIZE + HEADER0_SIZE:
            raise self._err(f"the file is {self.file_size} bytes, too small for a VDI 0.x"
                            " header", "VDIHEADER0")
        self.header_struct, self.header_name = VDIHEADER0, "VDIHEADER0"
        h = self.header = VDIHEADER0.parse(f.read_exact(PREHEADER_SIZE, HEADER0_SIZE,
                                                        "VDIHEADER0"))
        # version 0 implies where the map and the data are (VDICore.h)
        self.off_blocks = PREHEADER_SIZE + HEADER0_SIZE
        self.off_data = self.off_blocks + 4 * h.cBlocks
        self.block_extra = 0
        self.uuid_parent_modify = NULL_UUID

    def _validate(self) -> None:
        """The common checks of VirtualBox's vdiValidateHeader, each naming its field."""
        h, name = self.header, self.header_name
        if h.u32Type not in IMAGE_TYPES:
            raise self._err(f"image type {h.u32Type} is not 1 (normal), 2 (fixed), 3 (undo)"
                            " or 4 (differencing)", name, "u32Type")
        if h.u32Type == VDI_IMAGE_TYPE_UNDO:
            raise UnsupportedError("not supported yet: VDI undo images (u32Type 3)",
                                   self.path)
        if h.fFlags & ~VDI_IMAGE_FLAGS_ZERO_EXPAND:
            raise self._err(f"flags {h.fFlags:#x} has bits VirtualBox does not know",
                            name, "fFlags")
        if h.cbDisk == 0:
            raise self._err("disk size is 0", name, "cbDisk")
        bs = h.cbBlock
        if bs < 2 or bs & (bs - 1):
            raise self._err(f"block size {bs} is not a power of two", name, "cbBlock")
        if h.cBlocks == 0:
            raise self._err("the image has no blocks", name, "cBlocks")
        if h.cBlocks * bs < h.cbDisk:
            raise self._err(f"{h.cBlocks} blocks of {bs} bytes cannot hold a"
                            f" {h.cbDisk}-byte disk", name, "cBlocks")
        if h.cBlocksAllocated > h.cBlocks:
            raise self._err(f"{h.cBlocksAllocated} blocks allocated, more than the"
                            f" {h.cBlocks} the image has", name, "cBlocksAllocated")
        if h.LegacyGeometry.cbSector not in (0, SECTOR):
            self.notes.append(f"{name}.LegacyGeometry.cbSector is"
                              f" {h.LegacyGeometry.cbSector}, not 512")
        if bytes(h.uuidCreate) == NULL_UUID:
            self.notes.append(f"{name}.uuidCreate is null (VirtualBox refuses the image)")
        if bytes(h.uuidModify) == NULL_UUID:
            self.notes.append(f"{name}.uuidModify is null (VirtualBox refuses the image)")
        if h.u32Type == VDI_IMAGE_TYPE_DIFF and bytes(h.uuidLinkage) == NULL_UUID:
            raise self._err("a differencing image must name its parent's uuidCreate", name,
                            "uuidLinkage")
        self.image_type = h.u32Type
        self.size = h.cbDisk
        self.block_size = bs
        self.span = self.block_extra + bs
        self.uuid_create = bytes(h.uuidCreate)
        self.uuid_modify = bytes(h.uuidModify)
        self.uuid_linkage = bytes(h.uuidLinkage)

    def _load_map(self) -> None:
        h = self.header
        n = h.cBlocks
        check_alloc(4 * n, self.path, self.header_name, "cBlocks")
        if self.off_blocks + 4 * n > self.file_size:
            raise self._err(f"the block map ({n} entries at offset {self.off_blocks}) runs"
                            f" past the end of the file ({self.file_size} bytes)",
                            self.header_name, "offBlocks")
        self.map = le_array(self.backend.read_exact(self.off_blocks, 4 * n, "block map"), "I")
        # (filter and max run in C: no Python step per entry of a large map)
        self.top = max(filter(_ALLOCATED_BELOW.__gt__, self.map), default=-1)
        # the highest stored-block index whose bytes lie inside the file
        self.last_inside = (self.file_size - self.off_data - self.span) // self.span

    # -- helpers ---------------------------------------------------------------------------
    def _host(self, blk: int, entry: int) -> int:
        """Where block ``blk``'s disk bytes start in the file (entry checked first)."""
        if entry > self.last_inside:
            raise CorruptImage(f"block {blk} is stored at index {entry}, past the end of"
                               f" the file ({self.file_size} bytes): truncated or corrupt"
                               " ('diskforge check' lists every problem)", self.path,
                               structure=f"{MAP}[{blk}]")
        return self.off_data + entry * self.span + self.block_extra

    def _read_parent(self, offset: int, mv, start: int, end: int) -> None:
        parent = self.backing
        inside = 0 if parent is None else max(0, min(end - start, parent.size - offset))
        if inside:
            parent.readinto(offset, mv[start:start + inside])
        fill_zero(mv, start + inside, end)

    @property
    def is_diff(self) -> bool:
        return self.image_type == VDI_IMAGE_TYPE_DIFF

    # -- reading ---------------------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        bs, vmap = self.block_size, self.map
        for pos, cnt in pieces(offset, n, bs):
            blk, inb = divmod(pos, bs)
            at = pos - offset
            entry = vmap[blk]
            if entry < _ALLOCATED_BELOW:
                host = self._host(blk, entry) + inb
                got = self.backend.readinto(host, mv[at:at + cnt])
                if got < cnt:   # the file shrank under us: what is gone reads as zeros
                    fill_zero(mv, at + got, at + cnt)
            elif entry == VDI_IMAGE_BLOCK_FREE and self.is_diff:
                self._read_parent(pos, mv, at, at + cnt)
            else:
                fill_zero(mv, at, at + cnt)
        return n

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(self._extents(offset, length))

    def _extents(self, offset: int, length: int):
        bs, vmap, end, pos = self.block_size, self.map, offset + length, offset
        last_blk = (end - 1) // bs + 1 if length else 0
        while pos < end:
            blk, inb = divmod(pos, bs)
            entry = vmap[blk]
            if entry == VDI_IMAGE_BLOCK_FREE:
                # the free entries that follow too, at memory speed: the walk is
                # bounded by the blocks stored, not by the virtual size
                nxt = skip_filled(vmap, blk + 1, last_blk, 0xFF)
                run_end = min(end, nxt * bs)
                # qemu calls a free block of an image without parent "present", zero
                yield (Extent(pos, run_end - pos, ExtentKind.BACKING, False) if self.is_diff
                       else Extent(pos, run_end - pos, ExtentKind.ZERO, True))
                pos = run_end
                continue
            cnt = min(bs - inb, end - pos)
            if entry == VDI_IMAGE_BLOCK_ZERO:
                yield Extent(pos, cnt, ExtentKind.ZERO, True)
            else:
                host = self._host(blk, entry) + inb
                # holes of the host file inside a stored block read as zeros
                for o, k, data in self.backend.data_ranges(host, host + cnt):
                    yield Extent(pos + o - host, k,
                                 ExtentKind.DATA if data else ExtentKind.ZERO, True, o)
            pos += cnt

    # -- writing (BlockDevice.write/write_zeroes checked writability and the range) ------
    def _writable_check(self) -> None:
        if self.version != VDI_IMAGE_VERSION:
            raise UnsupportedError("not supported yet: writing VDI 0.x images (convert"
                                   " to a new VDI instead)", self.path)
        if not self.modified:
            # the first change: a new modification UUID, as VirtualBox gives one
            self.uuid_modify = new_uuid()
            self._write_header(uuidModify=self.uuid_modify)
            self.modified = True

    def _write_header(self, **changes) -> None:
        h = self.header
        h.update(changes)
        self.backend.pwrite(PREHEADER_SIZE, self.header_struct.build(h))

    def _set_entry(self, blk: int, entry: int) -> None:
        self.map[blk] = entry
        self.backend.pwrite(self.off_blocks + 4 * blk, entry.to_bytes(4, "little"))

    def _write(self, offset: int, mv: memoryview) -> None:
        self._writable_check()
        bs = self.block_size
        for pos, cnt in pieces(offset, len(mv), bs):
            blk, inb = divmod(pos, bs)
            at = pos - offset
            entry = self.map[blk]
            if entry < _ALLOCATED_BELOW:
                self.backend.pwrite(self._host(blk, entry) + inb, mv[at:at + cnt])
            else:
                self._allocate(blk, inb, mv[at:at + cnt])

    def _allocate(self, blk: int, inb: int, data) -> None:
        """Store block ``blk`` anew: ``data`` at ``inb``, the rest as the block read
        before (the parent's bytes, or zeros)."""
        bs = self.block_size
        index = max(self.top + 1, self.header.cBlocksAllocated)
        if index >= _ALLOCATED_BELOW:
            raise UnsupportedError("the VDI block map is full", self.path)
        start = self.off_data + index * self.span
        end = start + self.span
        if start < self.file_size:   # slack after the last block: overwrite it
            self.backend.write_zeroes(start, min(end, self.file_size) - start)
        if self.file_size < end:
            self.backend.truncate(end)
            self.file_size = end
        host = start + self.block_extra
        if self.is_diff and self.map[blk] == VDI_IMAGE_BLOCK_FREE:
            check_alloc(bs, self.path, self.header_name, "cbBlock")
            buf = bytearray(bs)
            base = blk * bs
            self._read_parent(base, memoryview(buf), 0, min(bs, self.size - base))
            buf[inb:inb + len(data)] = data
            self.backend.pwrite(host, buf)
        else:
            self.backend.pwrite(host + inb, data)
        self.top = index
        self.last_inside = max(self.last_inside, index)
        self._write_header(cBlocksAllocated=self.header.cBlocksAllocated + 1)
        self._set_entry(blk, index)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._writable_check()
        bs = self.block_size
        for pos, cnt in pieces(offset, length, bs):
            blk, inb = divmod(pos, bs)
            entry = self.map[blk]
            whole = inb == 0 and cnt == min(bs, self.size - pos)
            if entry < _ALLOCATED_BELOW:
                self._zero_host(self._host(blk, entry) + inb, cnt)
            elif entry == VDI_IMAGE_BLOCK_ZERO or not self.is_diff:
                continue      # reads as zeros already
            elif whole:
                self._set_entry(blk, VDI_IMAGE_BLOCK_ZERO)
            else:
                self._allocate(blk, inb, ZEROES[:cnt])

    def _zero_host(self, host: int, length: int) -> None:
        """Zero file bytes: a hole over whole 4 KiB pages, zeros written around."""
        end = host + length
        a, b = -(-host // 4096) * 4096, end // 4096 * 4096
        if b > a and self.backend.punch_hole(a, b - a):
            self.backend.write_zeroes(host, a - host)
            self.backend.write_zeroes(b, end - b)
        else:
            self.backend.write_zeroes(host, length)

    def flush(self) -> None:
        if self.writable:
            self.backend.flush()

    def make_empty(self) -> None:
        """Drop every block of a differencing image, so it reads through to its parent
        (what ``commit`` does to the image it committed)."""
        if not self.writable:
            raise UnsupportedError("vdi image is open read-only", self.path)
        if not self.is_diff:
            raise UnsupportedError("not supported yet: emptying a VDI that is not a"
                                   " differencing image", self.path)
        self._writable_check()
        n = len(self.map)
        for i in range(0, n, 1 << 18):
            k = min(1 << 18, n - i)
            self.backend.pwrite(self.off_blocks + 4 * i, b"\xff" * (4 * k))
        self.map = le_array(b"\xff" * (4 * n), "I")
        self._write_header(cBlocksAllocated=0)
        self.backend.truncate(self.off_data)
        self.file_size = self.off_data
        self.top = -1

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow the disk: new blocks free (stored, for a static image). When the larger
        block map would run into the data, the first stored blocks move to the end
        first (``_make_room``). Shrinking is not supported yet."""
        if not self.writable:
            raise UnsupportedError("vdi image is open read-only", self.path)
        if size < self.size:
            raise UnsupportedError("not supported yet: shrinking vdi images", self.path)
        if size % SECTOR:
            raise UsageError(f"a VDI's size must be a multiple of {SECTOR} bytes", self.path)
        if size == self.size:
            return
        bs = self.block_size
        old_n, new_n = len(self.map), -(-size // bs)
        if new_n >= _ALLOCATED_BELOW:
            raise UnsupportedError(f"a VDI of {size} bytes would need {new_n} blocks of"
                                   f" {bs} bytes, more than its block map holds", self.path)
        self._writable_check()
        added = max(0, new_n - old_n)
        check_alloc(4 * new_n, self.path, self.header_name, "cBlocks")
        if self.off_blocks + 4 * new_n > self.off_data:
            self._make_room(new_n)
        fixed = self.image_type == VDI_IMAGE_TYPE_FIXED
        if added:
            first = self.top + 1
            from array import array
            if fixed:
                ext = array("I", range(first, first + added))
                start = self.off_data + first * self.span
                end = start + added * self.span
                if start < self.file_size:   # slack after the last block: zeros
                    self._zero_host(start, min(end, self.file_size) - start)
                if end > self.file_size:
                    self.backend.truncate(end)
                    self.file_size = end
                self.top = first + added - 1
                self.last_inside = max(self.last_inside, self.top)
            else:
                ext = array("I", [VDI_IMAGE_BLOCK_FREE]) * added
            self.backend.pwrite(self.off_blocks + 4 * old_n, le_bytes(ext))
            self.map.extend(ext)
        changes = dict(cbDisk=size, cBlocks=max(old_n, new_n))
        if fixed and added:
            changes["cBlocksAllocated"] = self.header.cBlocksAllocated + added
        self._write_header(**changes)
        self.size = size

    def _make_room(self, new_n: int) -> None:
        """Move ``offData`` forward by whole blocks so that ``new_n`` map entries fit
        before it, as VirtualBox's vdiResize does: blocks stored in the first ``k``
        positions are copied after the last one, every other block keeps its place in
        the file (its index drops by ``k``). The copies are made first; the map and the
        header are then rewritten in place (an interruption between those two writes
        leaves a damaged image, as in VirtualBox)."""
        span = self.span
        k = -(-(self.off_blocks + 4 * new_n - self.off_data) // span)
        new_off = self.off_data + k * span
        if new_off > 0xFFFFFFFF:
            raise UnsupportedError(f"not supported yet: growing this VDI to {new_n} blocks"
                                   " (its data offset would pass 4 GiB)", self.path)
        self._ensure_all_inside()
        vmap = self.map
        movers = sorted((e, blk) for blk, e in enumerate(vmap) if e < k) if k else []
        dest = max(self.top + 1, k)
        check_alloc(span, self.path, self.header_name, "cbBlock")
        for j, (e, _) in enumerate(movers):
            data = self.backend.read_exact(self.off_data + e * span, span, f"block {e}")
            self.backend.pwrite(self.off_data + (dest + j) * span, data)
        self.backend.flush()
        moved = {blk: dest + j - k for j, (_, blk) in enumerate(movers)}
        for blk, e in enumerate(vmap):
            if e < _ALLOCATED_BELOW:
                vmap[blk] = moved.get(blk, e - k)
        self.backend.pwrite(self.off_blocks, le_bytes(vmap))
        self.top = max(filter(_ALLOCATED_BELOW.__gt__, vmap), default=-1)
        self.off_data = new_off
        self.file_size = self.backend.size
        self.last_inside = (self.file_size - self.off_data - span) // span
        self._write_header(offData=new_off, cBlocksAllocated=self.top + 1)
        self.backend.flush()

    def _ensure_all_inside(self) -> None:
        if self.top > self.last_inside:
            raise CorruptImage("a block map entry points past the end of the file; run"
                               " 'diskforge check -r all' before resizing", self.path,
                               structure=MAP)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point a differencing image at another parent (rebase -u): its uuidLinkage and
        uuidParentModify become the new parent's. With no name, the image becomes a
        normal (dynamic) one."""
        from .parent import reparent
        if not self.writable:
            raise UnsupportedError("vdi image is open read-only", self.path)
        if not self.is_diff:
            raise UnsupportedError("not supported yet: giving a parent to a VDI that is not"
                                   " a differencing image", self.path)
        if fmt not in (None, "vdi"):
            raise UnsupportedError(f"a VDI differencing image's parent must be a VDI, not"
                                   f" {fmt}", self.path)
        self._writable_check()
        new_parent = None if name is None else reparent(self, name)
        if new_parent is None:
            self._write_header(u32Type=VDI_IMAGE_TYPE_NORMAL, uuidLinkage=NULL_UUID,
                               **({"uuidParentModify": NULL_UUID}
                                  if self.header_struct is not VDIHEADER0 else {}))
            self.image_type = VDI_IMAGE_TYPE_NORMAL
        else:
            self._write_header(uuidLinkage=new_parent.uuid_create,
                               uuidParentModify=new_parent.uuid_modify)
            self.uuid_parent_modify = new_parent.uuid_modify
        self.uuid_linkage = new_parent.uuid_create if new_parent else NULL_UUID
        if self.backing is not None:
            self.backing.close()
        self.backing = new_parent
        self.parent_path = None if new_parent is None else new_parent.path

    # -- checking --------------------------------------------------------------------------
    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        """As ``qemu-img check`` checks a VDI (map entries past the map's size or used
        twice, the allocated count), plus entries pointing past the end of the file.
        ``-r all`` frees entries whose block is not in the file (they cannot be read),
        and ``-r leaks`` corrects ``cBlocksAllocated`` when it is the only problem."""
        res = CheckResult(filename=self.path, format="vdi")
        vmap = self.map
        n = len(vmap)
        # per possible block index, the first map entry that uses it
        check_alloc(n * 4, self.path, MAP, "duplicate check")
        from array import array
        owner = array("I", [VDI_IMAGE_BLOCK_FREE]) * n
        allocated = 0
        past: list[int] = []
        i = 0
        while i < n:
            i = skip_filled(vmap, i, n, 0xFF)
            if i >= n:
                break
            e = vmap[i]
            if e < _ALLOCATED_BELOW:
                # one finding per entry: qemu's, or the end of the file
                outside = e > self.last_inside
                if outside:
                    past.append(i)
                where = " (past the end of the file)" if outside else ""
                if e >= n:
                    res.add(ProblemKind.CORRUPTION, f"ERROR: block index {i} too large, is"
                            f" {e}{where}", MAP, str(i), repairable=outside)
                elif owner[e] != VDI_IMAGE_BLOCK_FREE:
                    res.add(ProblemKind.CORRUPTION, f"ERROR: block index {owner[e]} also"
                            f" used by {i}{where}", MAP, str(i), repairable=outside)
                else:
                    owner[e] = i
                    allocated += 1
                    if outside:
                        res.add(ProblemKind.CORRUPTION, f"ERROR: block {i} is stored at"
                                f" index {e}, past the end of the file", MAP, str(i),
                                repairable=True)
            i += 1
        h = self.header
        count_only = not res.problems
        if allocated != h.cBlocksAllocated:
            res.add(ProblemKind.CORRUPTION, f"ERROR: allocated blocks mismatch, is"
                    f" {allocated}, should be {h.cBlocksAllocated}", self.header_name,
                    "cBlocksAllocated", repairable=count_only)
        # like qemu's vdi_co_check: no cluster counts or end offset (qemu-img's output)
        if repair and self.writable:
            if repair.errors and past:
                # blocks not in the file cannot be read: free their entries, then look
                # again (the count may now be all that is wrong)
                for blk in past:
                    self._set_entry(blk, VDI_IMAGE_BLOCK_FREE)
                self.top = max(filter(_ALLOCATED_BELOW.__gt__, self.map), default=-1)
                self.backend.flush()
                again = self.check(repair)
                again.corruptions_fixed += len(past)
                again.problems.insert(0, Problem(ProblemKind.NOTE, f"Repaired {len(past)}"
                                                 " block map entries past the end of the"
                                                 " file (freed)"))
                return again
            if count_only and allocated != h.cBlocksAllocated and self.top + 1 == allocated:
                # entries unique, inside the file and numbered densely: the count is wrong
                self._write_header(cBlocksAllocated=allocated)
                self.backend.flush()
                res.corruptions_fixed += 1
                res.corruptions -= 1
                res.note("Repaired the allocated block count")
        for note in self.notes:
            res.note(f"Warning: {note}")
        return res

    # -- facts -----------------------------------------------------------------------------
    def allocated_blocks(self) -> int:
        return len(self.map) - self.map.count(VDI_IMAGE_BLOCK_FREE) \
            - self.map.count(VDI_IMAGE_BLOCK_ZERO)

    def info(self) -> ImageInfo:
        h = self.header
        details: dict[str, object] = {
            "version": version_text(self.version),
            "image-type": IMAGE_TYPES[self.image_type],
            "header": self.header_name,
            "block-size": self.block_size,
            "block-extra": self.block_extra,
            "blocks": len(self.map),
            "allocated-blocks": self.allocated_blocks(),
            "blocks-offset": self.off_blocks,
            "data-offset": self.off_data,
            "uuid-create": uuid_text(self.uuid_create),
            "uuid-modify": uuid_text(self.uuid_modify),
            "comment": bytes(h.szComment).split(b"\0", 1)[0].decode("utf-8", "replace"),
        }
        if self.is_diff:
            details["uuid-linkage"] = uuid_text(self.uuid_linkage)
            details["uuid-parent-modify"] = uuid_text(self.uuid_parent_modify)
        info = ImageInfo(filename=self.path, format="vdi", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(),
                         cluster_size=self.block_size, details=details)
        parent = self.backing.path if self.backing is not None else self.parent_path
        if parent is not None:
            info.backing_filename = os.path.relpath(
                parent, os.path.dirname(os.path.abspath(self.path)))
            info.full_backing_filename = os.path.abspath(parent)
            info.backing_format = "vdi"
        if self.notes:
            details["warnings"] = list(self.notes)
        return info

    def qemu_reads_alike(self) -> bool:
        """Whether QEMU's vdi driver reads this file as diskforge does: it opens only
        1.1 headers with 1 MiB blocks, sector-aligned offsets, 512-byte sectors and no
        parent, ignores ``cbBlockExtra`` and rounds an odd disk size up."""
        h = self.header
        return (self.version == VDI_IMAGE_VERSION and self.block_size == 1 << 20
                and self.block_extra == 0 and not self.is_diff
                and h.LegacyGeometry.cbSector == SECTOR
                and self.off_blocks % SECTOR == 0 and self.off_data % SECTOR == 0
                and self.size % SECTOR == 0 and len(self.map) <= QEMU_MAX_BLOCKS
                and bytes(h.uuidLinkage) == NULL_UUID
                and bytes(h.uuidParentModify) == NULL_UUID
                and self.top <= self.last_inside)
