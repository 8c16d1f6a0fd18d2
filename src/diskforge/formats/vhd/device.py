"""Reading, checking and writing in place an existing VHD (fixed, dynamic, differencing).

Opening validates every structure before any size or offset in it is used. A
checksum that does not match is not fatal at open time: the device opens, ``check``
and ``verify`` report the mismatch, and every read, write or ``info`` raises a
one-line CorruptImage. That is how ``diskforge check`` can report a bad footer while
everything else refuses the image (qemu refuses to open it at all).

Layout decisions that follow qemu, so both read every file the same way:
- A file starting with "conectix" is dynamic or differencing and its footer copy at
  offset 0 is authoritative (qemu reads only that copy); the footer at the end is the
  fallback when the copy's checksum is wrong. Otherwise the footer is the last 512
  bytes (or 511, as Virtual PC before 2004 wrote them) of a fixed disk.
- The disk size follows the creator application (geometry.py).
- In a dynamic disk an allocated block is read whole, as qemu does; the sector
  bitmap matters only in differencing disks, where a clear bit means "read the
  parent".

Writing in place (dynamic and differencing): a new block goes after the last one,
its region is zeroed, the footer is rewritten past it, and only then is its BAT entry
written, so a crash leaves at worst an unreferenced block. Dynamic blocks get an
all-ones bitmap (qemu does the same); differencing blocks get bits for the sectors
written, and a partly written sector is first filled from the parent.
"""

from __future__ import annotations

import errno
import heapq
import os

from ...blockdev import (ZEROES, Extent, ExtentKind, FileDevice, ImageInfo, coalesce,
                         fill_zero, pieces, plain_host, skip_filled)
from ...byteorder import be_array
from ...checks import CheckResult, Problem, ProblemKind, Repair
from ...errors import (CorruptImage, FormatError, ImageIOError, SafetyError,
                       UnsupportedError)
from ...limits import check_alloc
from ...policy import OpenPolicy, beside
from ...registry import open_image
from . import geometry as geo
from . import locators as loc
from .structs import (DATA_ALIGN, DIFFERENCING, DISK_TYPES, DYNAMIC, EMPTY_LOCATOR, FIXED,
                      FOOTER_CHECKSUM_AT, FOOTER_COOKIE, FOOTER_SIZE, FORMAT_VERSION,
                      HEADER_CHECKSUM_AT, HEADER_COOKIE, HEADER_SIZE, MAX_BLOCK, MIN_BLOCK,
                      SECTOR, UNUSED, BatEntry, VhdDynamicDiskHeader, VhdFooter, align_up,
                      bitmap_runs, bitmap_size, build_header, checksum, footer_problem,
                      rebuilt, set_bits, vhd_time)

_BITMAP_CACHE = 4096        # sector bitmaps kept in memory per device


def _guid(raw: bytes) -> str:
    """A unique id as the specification stores it (big-endian, as libvhdi prints it);
    formatted by hand: importing uuid costs start-up time."""
    h = bytes(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _utf16be(raw: bytes) -> str:
    return raw.decode("utf-16-be", "replace").split("\0", 1)[0]


class VhdDevice(FileDevice):
    """A VHD opened as a block device (``VhdDevice(path, writable=, policy=,
    open_parent=)``; ``open_parent=False`` reads only this file's structures, for a
    writer that needs a parent's unique id).

    What the open found wrong is kept as structured rows (``checks.Problem``, the
    structure and field named as the specification names them): ``fatal`` (a checksum
    that makes every read refuse), ``problems`` (footer copies: counted by ``check``,
    fixed by ``check -r all``) and ``notes`` (printed, not counted). ``verify`` and
    repair pick their rows by structure, field and ``repairable``."""

    format = "vpc"

    def _open(self, open_parent: bool = True) -> None:
        self._open_parent_too = open_parent
        self.fatal: list[Problem] = []      # message without the structure.field prefix
        self.problems: list[Problem] = []   # for check, not fatal
        self.notes: list[str] = []          # for check, not counted
        self.parent_locator: loc.Locator | None = None
        self.parent_path: str | None = None  # the parent's file, opened or only named
        self._bitmaps: dict[int, bytes] = {}
        self._load()

    # -- opening ------------------------------------------------------------------------
    def _err(self, message: str, structure: str, field: str | None = None):
        if self.fatal:  # say so when a checksum already failed: the bytes are damaged
            first = self.fatal[0]
            message += (f" (and {first.structure}.{first.field} does not match: the file"
                        " is damaged)")
        return FormatError(message, self.path, structure=structure, field=field)

    def _fatal(self, structure: str, message: str) -> None:
        """A checksum mismatch: the device opens, but every read refuses it."""
        self.fatal.append(Problem(ProblemKind.CORRUPTION, message, structure, "checksum"))

    def _footer_problem(self, message: str, field: str | None = None) -> None:
        """A damaged or stale footer copy (the sound one is used): repairable."""
        self.problems.append(Problem(ProblemKind.CORRUPTION, message, "VhdFooter", field,
                                     repairable=True))

    def _load(self) -> None:
        f = self.backend
        self.file_size = size = f.size
        if size < FOOTER_SIZE - 1:
            raise self._err(f"the file is {size} bytes, too small for a VHD footer",
                            "VhdFooter")
        head = f.read_exact(0, FOOTER_SIZE, "footer copy") if size >= FOOTER_SIZE \
            else b""
        tail = f.read_exact(size - FOOTER_SIZE, FOOTER_SIZE, "footer") if head else b""
        self.footer_at = size - FOOTER_SIZE
        self.footer_copy_at: int | None = None
        if head[:8] == FOOTER_COOKIE and VhdFooter.parse(head).disk_type != FIXED:
            # dynamic or differencing: the copy at 0 first, as qemu reads it
            self.footer_copy_at = 0
            head_bad, tail_bad = footer_problem(head), footer_problem(tail)
            if head_bad is None:
                footer = head
                if tail_bad is not None:
                    self._footer_problem(f"VhdFooter at the end of the file: {tail_bad}"
                                         " (the copy at offset 0 is used)", "checksum")
                elif tail != head:
                    self._footer_problem("the footer at the end differs from its copy at"
                                         " offset 0 (the copy is used)")
            elif tail_bad is None and VhdFooter.parse(tail).disk_type == \
                    VhdFooter.parse(head).disk_type:
                footer = tail
                self._footer_problem(f"VhdFooter copy at offset 0: {head_bad} (the footer"
                                     " at the end is used)", "checksum")
            else:
                footer = head
                self._fatal("VhdFooter", head_bad)
        else:
            if tail[:8] != FOOTER_COOKIE:
                # Virtual PC before 2004 wrote 511-byte footers (the last reserved byte
                # missing); a zero byte appended sums the same
                short = f.read_exact(size - (FOOTER_SIZE - 1), FOOTER_SIZE - 1, "footer")
                if short[:8] == FOOTER_COOKIE:
                    tail = short + b"\0"
                    self.footer_at = size - (FOOTER_SIZE - 1)
            if tail[:8] != FOOTER_COOKIE:
                raise self._err("no 'conectix' footer at the start or the end of the file:"
                                " not a VHD image", "VhdFooter", "cookie")
            footer = tail
            bad = footer_problem(tail)
            if bad is not None:
                self._fatal("VhdFooter", bad)
        self.footer_raw = footer
        ft = self.footer = VhdFooter.parse(footer)
        self.disk_type = ft.disk_type
        if ft.disk_type not in DISK_TYPES:
            raise self._err(f"disk type {ft.disk_type} is not fixed (2), dynamic (3) or"
                            " differencing (4)", "VhdFooter", "disk_type")
        if self.footer_copy_at is None and ft.disk_type != FIXED:
            raise self._err(f"a {DISK_TYPES[ft.disk_type]} disk must start with a copy of"
                            " its footer", "VhdFooter", "disk_type")
        g = ft.disk_geometry
        self.geometry = (g.cylinders, g.heads, g.sectors_per_track)
        self.size, self.size_rule = geo.disk_size(ft.current_size, self.geometry,
                                                  ft.creator_application, self.path)
        self.unique_id = ft.unique_id
        if ft.file_format_version != FORMAT_VERSION:
            self.notes.append(f"file format version {ft.file_format_version:#010x}"
                              " (expected 0x00010000)")
        if ft.saved_state:
            self.notes.append("the disk is marked as in a saved state")
        if ft.disk_type == FIXED:
            self.block_size = 0
            if self.size > self.footer_at:
                raise self._err(f"the disk is {self.size} bytes but the file holds only"
                                f" {self.footer_at} bytes of data: truncated", "VhdFooter",
                                "current_size")
            return
        self._load_dynamic()

    def _load_dynamic(self) -> None:
        f, ft = self.backend, self.footer
        hoff = ft.data_offset
        if hoff < FOOTER_SIZE or hoff + HEADER_SIZE > self.file_size:
            raise self._err(f"dynamic disk header offset {hoff} is outside the file"
                            f" ({self.file_size} bytes)", "VhdFooter", "data_offset")
        raw = f.read_exact(hoff, HEADER_SIZE, "dynamic disk header")
        if raw[:8] != HEADER_COOKIE:
            raise self._err("no 'cxsparse' cookie at the offset the footer gives",
                            "VhdDynamicDiskHeader", "cookie")
        self.header_at = hoff
        self.header_raw = raw
        hd = self.header = VhdDynamicDiskHeader.parse(raw)
        stored = hd.checksum
        computed = checksum(raw, HEADER_CHECKSUM_AT)
        if stored != computed:
            self._fatal("VhdDynamicDiskHeader", f"checksum is {stored:#010x}, the header"
                        f" sums to {computed:#010x}")
        if hd.header_version != FORMAT_VERSION:
            self.notes.append(f"dynamic header version {hd.header_version:#010x}"
                              " (expected 0x00010000)")
        bs = hd.block_size
        if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
            raise self._err(f"block size {bs} is not a power of two between {MIN_BLOCK}"
                            f" and {MAX_BLOCK}", "VhdDynamicDiskHeader", "block_size")
        self.block_size = bs
        self.bitmap_size = bitmap_size(bs)
        self.nblocks = -(-self.size // bs)
        mte = hd.max_table_entries
        if mte < self.nblocks:
            raise self._err(f"{mte} BAT entries cannot map a {self.size}-byte disk in"
                            f" {bs}-byte blocks ({self.nblocks} needed)",
                            "VhdDynamicDiskHeader", "max_table_entries")
        self.bat_at = bat_at = hd.table_offset
        if bat_at + self.nblocks * 4 > self.file_size:
            raise self._err(f"the BAT ({self.nblocks} entries at offset {bat_at}) runs"
                            f" past the end of the file ({self.file_size} bytes)",
                            "VhdDynamicDiskHeader", "table_offset")
        self.max_table_entries = mte
        # the BAT's extent in the file: all its entries, unless the count is absurd (only
        # the entries the disk needs are ever read)
        self.bat_bytes = mte * 4 if bat_at + mte * 4 <= self.file_size else \
            self.nblocks * 4
        if mte * 4 != self.bat_bytes:
            self.notes.append(f"the dynamic header claims {mte} BAT entries, more than the"
                              f" file holds; the {self.nblocks} the disk needs are used")
        # the BAT was checked only against the file size, which a sparse file satisfies
        check_alloc(self.nblocks * 4, self.path, "VhdDynamicDiskHeader",
                    "max_table_entries")
        bat = self.bat = be_array(f.read_exact(bat_at, self.nblocks * 4, "BAT"), "I")
        if bat.itemsize != 4:  # pragma: no cover - every supported platform
            raise UnsupportedError("this platform has no 4-byte unsigned array type")
        # every block must lie inside the file (qemu: "the image has been truncated")
        span = self.bitmap_size + bs
        limit = (self.file_size - span) // SECTOR
        # (filter and max run in C: no Python step per entry of a large BAT)
        top = max(filter(UNUSED.__ne__, bat), default=None)
        if top is not None and top > limit:
            i = next(i for i, e in enumerate(bat) if e != UNUSED and e > limit)
            raise self._err(f"BAT entry {i} puts block {i} at offset {bat[i] * SECTOR},"
                            f" past the end of the file ({self.file_size} bytes)", "BAT",
                            f"entry[{i}]")
        self.locator_entries = self._read_locators(hd)
        self.data_end = max([end for _, _, end, _, _ in self._metadata()]
                            + [off + reserved for _, _, off, _, reserved in
                               self.locator_entries]
                            + ([top * SECTOR + span] if top is not None else []))
        if self.disk_type == DIFFERENCING and not self.fatal and self._open_parent_too:
            # (with a bad checksum nothing is read anyway: check needs no parent)
            self._open_parent()

    def _read_locators(self, hd) -> list[tuple[bytes, str, int, int, int]]:
        """``(platform code, text, offset, length, reserved)`` of each locator in use.
        The reserved space is the data space in bytes (Windows) or sectors (the
        specification): whichever covers the data, so a new block never lands in
        space a locator may grow into."""
        out = []
        for i, e in enumerate(hd.parent_locator_entries):
            code = e.platform_code
            if code == bytes(4):
                continue
            n, off = e.platform_data_length, e.platform_data_offset
            if n > loc.MAX_LOCATOR_BYTES or off + n > self.file_size:
                raise self._err(f"parent locator {i} ({code!r}) claims {n} bytes at offset"
                                f" {off}, outside the file or longer than any path",
                                "ParentLocatorEntry", "platform_data_length")
            text = loc.decode(code, self.backend.read_exact(off, n, "parent locator")) \
                if code in loc.PLATFORM_NAMES else ""
            space = e.platform_data_space
            if space < n:
                space *= SECTOR
            out.append((code, text, off, n, max(n, min(space, loc.MAX_LOCATOR_BYTES))))
        return out

    def _open_parent(self) -> None:
        """Find the parent by its locators and open it, then check its identity.

        Under ``open_backing=False`` (``info`` without ``--backing-chain``, ``rebase
        -u``) the parent is only named, never opened, as qemu opens a qcow2 overlay
        then: the locator whose file exists (else the first) is what ``info`` shows,
        and the unique id is checked only when the parent is opened. A parent that
        is nowhere fails in qemu-img's nested words ("Could not open 'child': Could
        not open backing file: Could not open 'parent': No such file or directory")."""
        policy = self.policy or OpenPolicy().descend(self.path)
        hd = self.header
        name = _utf16be(hd.parent_unicode_name)
        tried, refused, first = [], None, None
        for cand in loc.candidates([(c, t) for c, t, *_ in self.locator_entries], name):
            try:
                path = policy.resolve(self.path, cand.path,
                                      f"parent locator {cand.platform}")
            except SafetyError as e:
                refused = refused or e
                continue
            if "://" in path:  # an object beside a remote image (remote/refs.py)
                from ...remote.refs import exists
                found = exists(path)
            else:
                path = os.path.normpath(path)
                found = os.path.isfile(path)
            first = first or (cand, path)
            if found:
                self.parent_locator, self.parent_path = cand, path
                if not policy.open_backing:
                    return
                self.backing = open_image(path, "vpc", policy=policy)
                break
            tried.append(f"{cand.platform} '{cand.text}'")
        else:
            if refused is not None and first is None:
                raise refused
            if not policy.open_backing:  # named only: the first locator, as stored
                if first is not None:
                    self.parent_locator, self.parent_path = first
                return
            where = "; ".join(tried) or "no parent locator or parent name"
            hint = ", or allow its directory with --allow-root (untrusted mode)" \
                if policy.is_untrusted else ""
            missing = first[1] if first is not None else name
            err = ImageIOError(f"Could not open '{missing}': No such file or directory"
                               f" (differencing disk's parent not found; tried {where}:"
                               f" put the parent where a locator says{hint})", self.path)
            err.backing_missing, err.errno = True, errno.ENOENT  # nested by open_image
            raise err
        parent = self.backing
        want = bytes(hd.parent_unique_id)
        if want != bytes(16) and bytes(parent.unique_id) != want:
            raise SafetyError(f"parent {parent.path} has unique id"
                              f" {_guid(parent.unique_id)}, but this differencing disk was"
                              f" made from {_guid(want)}: wrong or replaced parent",
                              self.path)
        stamp = hd.parent_time_stamp
        if stamp and "://" not in parent.path:  # a remote parent has no mtime to compare
            mtime = vhd_time(os.stat(parent.path).st_mtime)
            if mtime != stamp:
                self.notes.append(f"parent time stamp {stamp} differs from the parent's"
                                  f" modification time {mtime}: the parent was changed or"
                                  " copied after this disk was made")

    # -- helpers ---------------------------------------------------------------------------
    def _ensure_sound(self) -> None:
        if self.fatal:
            first = self.fatal[0]
            raise CorruptImage(f"{first.message}: the image is corrupt ('diskforge check'"
                               " lists every problem)", self.path,
                               structure=first.structure, field=first.field)

    def _bitmap(self, blk: int) -> bytes:
        bm = self._bitmaps.get(blk)
        if bm is None:
            if len(self._bitmaps) >= _BITMAP_CACHE:
                self._bitmaps.clear()
            bm = self._bitmaps[blk] = self.backend.pread(self.bat[blk] * SECTOR,
                                                         self.bitmap_size) \
                .ljust(self.bitmap_size, b"\0")
        return bm

    def _data_at(self, blk: int) -> int:
        return self.bat[blk] * SECTOR + self.bitmap_size

    def _read_file(self, host: int, mv, start: int, end: int) -> None:
        got = self.backend.readinto(host, mv[start:end])
        if got < end - start:  # the file shrank under us: what is gone reads as zeros
            fill_zero(mv, start + got, end)

    def _read_parent(self, offset: int, mv, start: int, end: int) -> None:
        parent = self.backing  # None: named only (open_backing=False), reads as zeros
        inside = 0 if parent is None else max(0, min(end - start, parent.size - offset))
        if inside:
            parent.readinto(offset, mv[start:start + inside])
        fill_zero(mv, start + inside, end)

    def _pieces(self, offset: int, length: int):
        """``(block, offset in block, bytes, offset in request)`` for a range: the
        shared splitter's pieces, by block."""
        bs = self.block_size
        for pos, n in pieces(offset, length, bs):
            blk, inb = divmod(pos, bs)
            yield blk, inb, n, pos - offset

    # -- reading ---------------------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        self._ensure_sound()
        if self.disk_type == FIXED:
            self._read_file(offset, mv, 0, n)
            return n
        diff = self.disk_type == DIFFERENCING
        for blk, inb, cnt, at in self._pieces(offset, n):
            entry = self.bat[blk]
            if entry == UNUSED:
                if diff:
                    self._read_parent(offset + at, mv, at, at + cnt)
                else:
                    fill_zero(mv, at, at + cnt)
                continue
            host = entry * SECTOR + self.bitmap_size
            if not diff:
                self._read_file(host + inb, mv, at, at + cnt)
                continue
            s0 = inb // SECTOR
            s1 = -(-(inb + cnt) // SECTOR)
            bm = self._bitmap(blk)
            for sec, k, is_set in bitmap_runs(bm, s0, s1 - s0):
                a = max(sec * SECTOR, inb)
                b = min((sec + k) * SECTOR, inb + cnt)
                if is_set:
                    self._read_file(host + a, mv, at + a - inb, at + b - inb)
                else:
                    self._read_parent(offset + at + a - inb, mv, at + a - inb,
                                      at + b - inb)
        return n

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        self._ensure_sound()
        if self.disk_type == FIXED:
            return coalesce(
                Extent(o, n, ExtentKind.DATA if data else ExtentKind.ZERO, True, o)
                for o, n, data in self.backend.data_ranges(offset, offset + length))
        return coalesce(self._block_extents(offset, length))

    def map_extents(self, offset: int = 0, length: int | None = None):
        """As qemu's vpc driver reports block status: an allocated block of a dynamic
        disk is data as a whole, from its first byte's place in the file (holes of the
        host file inside it included), so ``map`` prints what qemu-img prints.
        ``extents`` keeps finding those holes, for convert and compare."""
        if self.disk_type != DYNAMIC:
            return self.extents(offset, length)
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        self._ensure_sound()
        return coalesce(self._whole_blocks(offset, length))

    def _whole_blocks(self, offset: int, length: int):
        bs, end, pos = self.block_size, offset + length, offset
        while pos < end:
            blk, inb = divmod(pos, bs)
            entry = self.bat[blk]
            if entry == UNUSED:
                nxt = skip_filled(self.bat, blk + 1, (end - 1) // bs + 1, 0xFF)
                run_end = min(end, nxt * bs)
                yield Extent(pos, run_end - pos, ExtentKind.ZERO, True)
                pos = run_end
                continue
            cnt = min(bs - inb, end - pos)
            yield Extent(pos, cnt, ExtentKind.DATA, True,
                         entry * SECTOR + self.bitmap_size + inb)
            pos += cnt

    def _used_blocks(self):
        """Indices of the BAT entries in use, unused stretches skipped at memory
        speed."""
        bat, i, n = self.bat, 0, len(self.bat)
        while i < n:
            i = skip_filled(bat, i, n, 0xFF)
            if i < n:
                yield i
            i += 1

    def _block_extents(self, offset: int, length: int):
        diff = self.disk_type == DIFFERENCING
        bs, end, pos = self.block_size, offset + length, offset
        while pos < end:
            blk, inb = divmod(pos, bs)
            cnt = min(bs - inb, end - pos)
            off = pos
            entry = self.bat[blk]
            if entry == UNUSED:
                # the unused entries that follow too, at memory speed: the walk is
                # bounded by the blocks allocated, not by the virtual size
                nxt = skip_filled(self.bat, blk + 1, (end - 1) // bs + 1, 0xFF)
                run_end = min(end, nxt * bs)
                # qemu calls an unallocated block of a dynamic disk "present", zero
                yield (Extent(off, run_end - off, ExtentKind.BACKING, False) if diff
                       else Extent(off, run_end - off, ExtentKind.ZERO, True))
                pos = run_end
                continue
            pos += cnt
            host = entry * SECTOR + self.bitmap_size
            base = off - inb
            if not diff:
                yield from self._stored(base, host, inb, inb + cnt)
                continue
            s0 = inb // SECTOR
            s1 = -(-(inb + cnt) // SECTOR)
            for sec, k, is_set in bitmap_runs(self._bitmap(blk), s0, s1 - s0):
                a = max(sec * SECTOR, inb)
                b = min((sec + k) * SECTOR, inb + cnt)
                if is_set:
                    yield from self._stored(base, host, a, b)
                else:
                    yield Extent(base + a, b - a, ExtentKind.BACKING, False)

    def host_backend(self, extent: Extent):
        """Data sectors are stored as they are, fixed or dynamic (``convert -C``)."""
        return plain_host(self.backend, extent)

    def _stored(self, base: int, host: int, a: int, b: int):
        """Extents of bytes ``a..b`` of a block stored at ``host``: where the host file
        has a hole they read as zeros, and are not read at all by convert or compare
        (qemu's map calls a whole allocated block data)."""
        for o, n, data in self.backend.data_ranges(host + a, host + b):
            yield Extent(base + o - host, n, ExtentKind.DATA if data else ExtentKind.ZERO,
                         True, o)

    # -- writing (BlockDevice.write/write_zeroes checked writability and the range) ------
    def _write(self, offset: int, mv: memoryview) -> None:
        self._ensure_sound()
        if self.disk_type == FIXED:
            self.backend.pwrite(offset, mv)
            return
        for blk, inb, cnt, at in self._pieces(offset, len(mv)):
            self._write_piece(offset + at - inb, blk, inb, cnt, mv[at:at + cnt])

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._ensure_sound()
        if self.disk_type == FIXED:
            self._zero_host(offset, length)
            return
        for blk, inb, cnt, at in self._pieces(offset, length):
            if self.bat[blk] == UNUSED and self.disk_type == DYNAMIC:
                continue  # already reads as zeros
            self._write_piece(offset + at - inb, blk, inb, cnt, None)

    def _write_piece(self, base: int, blk: int, inb: int, cnt: int, data) -> None:
        """Write ``data`` (None: zeros) at ``inb`` of block ``blk`` (disk offset ``base``)."""
        diff = self.disk_type == DIFFERENCING
        s0 = inb // SECTOR * SECTOR
        s1 = min(-(-(inb + cnt) // SECTOR) * SECTOR, self.block_size)
        if diff and (s0 != inb or s1 != inb + cnt):
            # a partly written sector keeps the rest of its current contents
            buf = bytearray(s1 - s0)
            self.readinto(base + s0, memoryview(buf)[:min(s1 - s0, self.size - base - s0)])
            buf[inb - s0:inb - s0 + cnt] = ZEROES[:cnt] if data is None else data
            data, inb, cnt = buf, s0, s1 - s0
        if self.bat[blk] == UNUSED:
            self._allocate(blk)
        host = self._data_at(blk) + inb
        if data is None:
            self._zero_host(host, cnt)
        else:
            self.backend.pwrite(host, data)
        if diff:
            bm = bytearray(self._bitmap(blk))
            first, end = inb // SECTOR, -(-(inb + cnt) // SECTOR)
            set_bits(bm, first, end)
            lo, hi = first >> 3, -(-end // 8)
            self.backend.pwrite(self.bat[blk] * SECTOR + lo, bm[lo:hi])
            self._bitmaps[blk] = bytes(bm)

    def _zero_host(self, host: int, length: int) -> None:
        """Zero file bytes: a hole over the whole 4 KiB pages, zeros written around."""
        end = host + length
        a, b = align_up(host, 4096), end // 4096 * 4096
        if b > a and self.backend.punch_hole(a, b - a):
            self.backend.write_zeroes(host, a - host)
            self.backend.write_zeroes(b, end - b)
        else:
            self.backend.write_zeroes(host, length)

    def _allocate(self, blk: int) -> None:
        """Give block ``blk`` storage after the last one (module docstring)."""
        bm_size, bs = self.bitmap_size, self.block_size
        data_at = align_up(self.data_end + bm_size, min(DATA_ALIGN, bs))
        at = data_at - bm_size
        end = data_at + bs
        if at < self.file_size:  # the old footer (and any slack) must not show through
            self._zero_host(at, min(end, self.file_size) - at)
        if self.disk_type == DYNAMIC:
            self.backend.pwrite(at, b"\xff" * bm_size)
        self.backend.pwrite(end, self.footer_raw)
        self.file_size = max(self.file_size, end + FOOTER_SIZE)
        self.footer_at = end
        self.backend.pwrite(self.bat_at + 4 * blk, BatEntry.build(at // SECTOR))
        self.bat[blk] = at // SECTOR
        self.data_end = end
        self._bitmaps.pop(blk, None)

    def flush(self) -> None:
        if self.writable:
            self.backend.flush()

    # -- maintenance (maintenance.py) -------------------------------------------------------
    def _maintainable(self) -> None:
        if not self.writable:
            raise UnsupportedError("vpc image is open read-only", self.path)
        self._ensure_sound()

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow, or shrink with ``shrink``, any VHD (qemu-img cannot): maintenance.py."""
        from . import maintenance
        self._maintainable()
        maintenance.resize(self, size, shrink)

    def make_empty(self) -> None:
        from . import maintenance
        self._maintainable()
        maintenance.make_empty(self)

    def relink_backing(self) -> None:
        from . import maintenance
        self._maintainable()
        maintenance.relink(self)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point a differencing disk at another parent without copying (rebase -u), or
        give a dynamic disk one (it becomes a differencing disk: its stored blocks keep
        reading whole, every other block reads from the parent). The new parent must be
        a VHD: its unique id is recorded. With no name, a differencing disk becomes a
        plain dynamic disk."""
        self._maintainable()
        if self.disk_type == FIXED:
            raise UnsupportedError("a fixed VHD cannot have a parent (convert it to a"
                                   " dynamic one first)", self.path)
        if self.disk_type == DYNAMIC and name is None:
            return
        if fmt not in (None, "vpc", "vhd"):
            raise UnsupportedError(f"a VHD differencing disk's parent must be a VHD, not"
                                   f" {fmt}", self.path)
        hd = self.header
        if name is None:
            new_parent = None
            raw = rebuilt(VhdDynamicDiskHeader, self.header_raw, HEADER_CHECKSUM_AT,
                          parent_unique_id=bytes(16), parent_time_stamp=0, reserved=0,
                          parent_unicode_name=bytes(512),
                          parent_locator_entries=[EMPTY_LOCATOR] * 8)
        else:
            path = beside(self.path, name)
            new_parent = open_image(path, "vpc", policy=OpenPolicy().descend(self.path))
            try:
                # new locator data goes after everything else; the old becomes slack
                start = -(-self.data_end // SECTOR) * SECTOR
                entries, blobs, end = loc.locator_entries(
                    os.path.abspath(path), os.path.dirname(os.path.abspath(self.path)),
                    start)
                for at, blob in blobs:
                    self.backend.pwrite(at, blob)
                if end > self.footer_at:
                    self.backend.pwrite(end, self.footer_raw)
                    self.footer_at = end
                    self.file_size = max(self.file_size, end + FOOTER_SIZE)
                self.data_end = max(self.data_end, end)
                raw = build_header(
                    table_offset=hd.table_offset, max_table_entries=hd.max_table_entries,
                    block_size=hd.block_size,
                    parent_unique_id=bytes(new_parent.unique_id),
                    parent_time_stamp=vhd_time(os.stat(path).st_mtime),
                    parent_unicode_name=loc.parent_name(os.path.abspath(path)),
                    locators=entries)
            except BaseException:
                new_parent.close()
                raise
        if self.disk_type == DYNAMIC:
            from .maintenance import fill_bitmaps
            fill_bitmaps(self)
        self.backend.pwrite(self.header_at, raw)
        self.backend.flush()
        self.header_raw = raw
        self.header = VhdDynamicDiskHeader.parse(raw)
        self.locator_entries = self._read_locators(self.header)
        # the footer's disk type last: until then readers see the old kind of disk
        if name is None:
            self._write_type(DYNAMIC)
        elif self.disk_type == DYNAMIC:
            self._write_type(DIFFERENCING)
        if self.backing is not None:
            self.backing.close()
        self.backing = new_parent
        self.parent_locator = None if name is None else loc.Locator("name", name, name)
        self.parent_path = None if new_parent is None else new_parent.path
        self._bitmaps.clear()

    def _write_type(self, disk_type: int) -> None:
        raw = rebuilt(VhdFooter, self.footer_raw, FOOTER_CHECKSUM_AT, disk_type=disk_type)
        self.backend.pwrite(self.footer_at, raw)
        if self.footer_copy_at is not None:
            self.backend.pwrite(self.footer_copy_at, raw)
        self.footer_raw = raw
        self.footer = VhdFooter.parse(raw)
        self.disk_type = disk_type

    # -- checking --------------------------------------------------------------------------
    @staticmethod
    def _fatal_text(p: Problem) -> str:
        return f"{p.structure}.{p.field}: {p.message}"

    def verify(self) -> list[str]:
        """Checksum problems (footer, its copy, the dynamic header): the rows whose
        field is a checksum."""
        out = [self._fatal_text(p) for p in self.fatal]
        out += [p.message for p in self.problems if p.field == "checksum"]
        return out

    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        res = CheckResult(filename=self.path, format="vpc")
        rows = [(self._fatal_text(p), p) for p in self.fatal]
        rows += [(p.message, p) for p in self.problems]
        if self.disk_type != FIXED:
            rows += [(p.message, p) for p in self._check_blocks()]
            res.total_clusters = self.nblocks
            res.allocated_clusters = self.allocated_blocks()
            res.image_end_offset = self.data_end + FOOTER_SIZE
        else:
            res.image_end_offset = self.footer_at + FOOTER_SIZE
        for text, p in rows:
            res.add(ProblemKind.CORRUPTION, f"ERROR {text}", p.structure, p.field,
                    repairable=p.repairable)
        if repair and rows:
            fixed = self._repair_footer_copies()
            res.corruptions_fixed = fixed
            res.corruptions -= fixed
            if fixed:
                res.note(f"Repaired {fixed} footer cop{'y' if fixed == 1 else 'ies'}")
        for n in self.notes:
            res.note(f"Warning: {n}")
        return res

    def _metadata(self) -> list[tuple[str, int, int, str, str | None]]:
        """``(name, start, end, structure, field)`` of every structure besides the
        blocks (structure and field: what places it)."""
        regions = [("the footer copy", 0, FOOTER_SIZE, "VhdFooter", None),
                   ("the dynamic disk header", self.header_at, self.header_at + HEADER_SIZE,
                    "VhdFooter", "data_offset"),
                   ("the BAT", self.bat_at, self.bat_at + align_up(self.bat_bytes, SECTOR),
                    "VhdDynamicDiskHeader", "table_offset")]
        for code, _, off, n, _ in self.locator_entries:
            regions.append((f"parent locator {code.decode('latin-1')}", off, off + n,
                            "ParentLocatorEntry", "platform_data_offset"))
        return regions

    def allocated_blocks(self) -> int:
        return len(self.bat) - self.bat.count(UNUSED)

    def _check_blocks(self) -> list[Problem]:
        """Blocks that overlap the metadata or each other: the regions in file order
        (blocks as indices sorted by offset, named only when a message needs them)."""
        span = self.bitmap_size + self.block_size
        bat = self.bat
        # a sorted list of block indices (about 40 bytes each): ask the budget first
        check_alloc(self.allocated_blocks() * 40, self.path, "BAT",
                    "allocated entries (sorted to check for overlaps)")
        blocks = sorted(self._used_blocks(), key=bat.__getitem__)
        where = {name: (structure, field)
                 for name, _, _, structure, field in self._metadata()}
        regions = heapq.merge(
            sorted(((start, end, name) for name, start, end, _, _ in self._metadata()),
                   key=lambda r: r[0]),
            ((bat[i] * SECTOR, bat[i] * SECTOR + span, i) for i in blocks),
            key=lambda r: r[0])
        out = []
        last, last_end = None, 0

        def named(who) -> str:
            return who if isinstance(who, str) else f"block {who}"
        for start, end, who in regions:
            if last is not None and start < last_end:
                structure, field = where[who] if isinstance(who, str) else \
                    ("BAT", f"entry[{who}]")
                out.append(Problem(ProblemKind.CORRUPTION, f"{named(who)} at offset"
                                   f" {start} overlaps {named(last)}", structure, field))
            if end > last_end:
                last, last_end = who, end
        return out

    def _repair_footer_copies(self) -> int:
        """Rewrite a footer copy that is damaged or stale from the sound one."""
        if not self.writable or self.fatal or self.footer_copy_at is None:
            return 0
        if not any(p.repairable for p in self.problems):
            return 0
        self.backend.pwrite(self.footer_copy_at, self.footer_raw)
        self.backend.pwrite(self.footer_at, self.footer_raw)
        self.backend.flush()
        before = len(self.problems)
        self.problems = [p for p in self.problems if not p.repairable]
        return before - len(self.problems)

    # -- facts -----------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        self._ensure_sound()
        ft = self.footer
        details: dict[str, object] = {
            "disk-type": DISK_TYPES[self.disk_type],
            "creator-application": ft.creator_application.decode("latin-1"),
            "creator-version": f"{ft.creator_version >> 16}.{ft.creator_version & 0xFFFF}",
            "creator-host-os": ft.creator_host_os.decode("latin-1"),
            "current-size": ft.current_size,
            "original-size": ft.original_size,
            "geometry": {"cylinders": self.geometry[0], "heads": self.geometry[1],
                         "sectors-per-track": self.geometry[2]},
            "size-from": self.size_rule,
            "unique-id": _guid(ft.unique_id),
            "time-stamp": ft.time_stamp,
        }
        info = ImageInfo(filename=self.path, format="vpc", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(), details=details)
        if self.disk_type != FIXED:
            info.cluster_size = self.block_size
            details["block-size"] = self.block_size
            details["bat-entries"] = self.max_table_entries
            details["allocated-blocks"] = self.allocated_blocks()
        if self.disk_type == DIFFERENCING:
            hd = self.header
            details["parent-unique-id"] = _guid(hd.parent_unique_id)
            details["parent-time-stamp"] = hd.parent_time_stamp
            details["parent-name"] = _utf16be(hd.parent_unicode_name)
            details["parent-locators"] = [
                {"platform": loc.PLATFORM_NAMES.get(c, c.decode("latin-1")), "path": t}
                for c, t, *_ in self.locator_entries]
            if self.parent_locator is not None:
                info.backing_filename = self.parent_locator.text
            if self.backing is not None:
                info.full_backing_filename = self.backing.path
            elif self.parent_path is not None:
                info.full_backing_filename = self.parent_path
            if self.parent_locator is not None:
                info.backing_format = "vpc"
        if self.notes:
            details["warnings"] = list(self.notes)
        return info

