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

import os
import re
import struct
from array import array

from ...blockdev import (ZERO_BUFFER_SIZE, ZEROES, BlockDevice, Extent, ExtentKind,
                         FileBackend, ImageInfo, coalesce, skip_filled)
from ...checks import CheckResult, ProblemKind, Repair
from ...errors import (CorruptImage, FormatError, ImageIOError, SafetyError,
                       UnsupportedError)
from ...limits import check_alloc
from . import geometry as geo
from . import locators as loc
from .structs import (DIFFERENCING, DISK_TYPES, DYNAMIC, FIXED, FOOTER_CHECKSUM_AT,
                      FOOTER_COOKIE, FOOTER_SIZE, FORMAT_VERSION, HEADER_CHECKSUM_AT,
                      HEADER_COOKIE, HEADER_SIZE, SECTOR, UNUSED, VhdDynamicDiskHeader,
                      VhdFooter, bitmap_size, checksum, vhd_time,
                      with_checksum)

MIN_BLOCK = SECTOR
MAX_BLOCK = 256 << 20       # a 64 KiB bitmap; Windows writes 2 MiB (and 512 KiB)
DATA_ALIGN = 4096           # where new block data starts, as Windows places it
_BITMAP_CACHE = 4096        # sector bitmaps kept in memory per device


def _guid(raw: bytes) -> str:
    """A unique id as the specification stores it (big-endian, as libvhdi prints it);
    formatted by hand: importing uuid costs start-up time."""
    h = bytes(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _utf16be(raw: bytes) -> str:
    return raw.decode("utf-16-be", "replace").split("\0", 1)[0]


def footer_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a valid footer, or None."""
    if raw[:8] != FOOTER_COOKIE:
        return "no 'conectix' cookie"
    stored = int.from_bytes(raw[FOOTER_CHECKSUM_AT:FOOTER_CHECKSUM_AT + 4], "big")
    computed = checksum(raw, FOOTER_CHECKSUM_AT)
    if stored != computed:
        return f"checksum is {stored:#010x}, the footer sums to {computed:#010x}"
    return None


def bitmap_runs(bitmap: bytes, first: int, count: int):
    """``(sector, n, is_set)`` runs of bits ``first..first+count`` of a sector bitmap
    (most significant bit first, as the specification orders them). Whole 0x00/0xFF
    bytes are skipped a run at a time; only mixed bytes are looked at bit by bit."""
    end = first + count
    run_start, run_set = first, None
    pos = first
    while pos < end:
        b = bitmap[pos >> 3]
        if pos & 7 == 0 and b in (0, 0xFF):
            is_set = b == 0xFF
            n = min((_ONE_RUN if is_set else _ZERO_RUN).match(bitmap, pos >> 3).end() * 8,
                    end) - pos
        else:
            is_set = bool((b >> (7 - (pos & 7))) & 1)
            n = 1
        if is_set is not run_set:
            if run_set is not None:
                yield run_start, pos - run_start, run_set
            run_start, run_set = pos, is_set
        pos += n
    if run_set is not None:
        yield run_start, end - run_start, run_set


_ZERO_RUN = re.compile(rb"\x00+")
_ONE_RUN = re.compile(rb"\xff+")


def set_bits(bitmap: bytearray, first: int, end: int) -> None:
    """Set bits ``first..end`` (most significant bit first)."""
    while first < end and first & 7:
        bitmap[first >> 3] |= 0x80 >> (first & 7)
        first += 1
    whole = (end - first) >> 3
    if whole > 0:
        bitmap[first >> 3:(first >> 3) + whole] = b"\xff" * whole
        first += whole * 8
    while first < end:
        bitmap[first >> 3] |= 0x80 >> (first & 7)
        first += 1


class VhdDevice(BlockDevice):
    format = "vpc"

    def __init__(self, path: str, *, writable: bool = False, policy=None,
                 open_parent: bool = True):
        self.path = path
        self._open_parent_too = open_parent
        self.writable = writable
        self.backend = FileBackend(path, writable=writable)
        self.backing = None
        self.fatal: list[tuple[str, str, str]] = []      # (structure, field, message)
        self.problems: list[str] = []                      # for check, not fatal
        self.notes: list[str] = []                         # for check, not counted
        self.parent_locator: loc.Locator | None = None
        self._bitmaps: dict[int, bytes] = {}
        try:
            self._load(policy)
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------
    def _err(self, message: str, structure: str, field: str | None = None):
        if self.fatal:  # say so when a checksum already failed: the bytes are damaged
            s, f, _ = self.fatal[0]
            message += f" (and {s}.{f} does not match: the file is damaged)"
        return FormatError(message, self.path, structure=structure, field=field)

    def _load(self, policy) -> None:
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
                    self.problems.append(f"VhdFooter at the end of the file: {tail_bad}"
                                         " (the copy at offset 0 is used)")
                elif tail != head:
                    self.problems.append("the footer at the end differs from its copy at"
                                         " offset 0 (the copy is used)")
            elif tail_bad is None and VhdFooter.parse(tail).disk_type == \
                    VhdFooter.parse(head).disk_type:
                footer = tail
                self.problems.append(f"VhdFooter copy at offset 0: {head_bad} (the footer"
                                     " at the end is used)")
            else:
                footer = head
                self.fatal.append(("VhdFooter", "checksum", head_bad))
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
                self.fatal.append(("VhdFooter", "checksum", bad))
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
        self._load_dynamic(policy)

    def _load_dynamic(self, policy) -> None:
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
            self.fatal.append(("VhdDynamicDiskHeader", "checksum",
                               f"checksum is {stored:#010x}, the header sums to"
                               f" {computed:#010x}"))
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
        bat = array("I")
        bat.frombytes(f.read_exact(bat_at, self.nblocks * 4, "BAT"))
        if bat.itemsize != 4:  # pragma: no cover - every supported platform
            raise UnsupportedError("this platform has no 4-byte unsigned array type")
        bat.byteswap()
        self.bat = bat
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
        self.data_end = max([end for _, _, end in self._metadata()]
                            + [off + reserved for _, _, off, _, reserved in
                               self.locator_entries]
                            + ([top * SECTOR + span] if top is not None else []))
        if self.disk_type == DIFFERENCING and not self.fatal and self._open_parent_too:
            # (with a bad checksum nothing is read anyway: check needs no parent)
            self._open_parent(policy)

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

    def _open_parent(self, policy) -> None:
        from ...policy import OpenPolicy
        from ...registry import open_image
        policy = policy or OpenPolicy().descend(self.path)
        hd = self.header
        name = _utf16be(hd.parent_unicode_name)
        tried, refused = [], None
        for cand in loc.candidates([(c, t) for c, t, *_ in self.locator_entries], name):
            try:
                path = os.path.normpath(policy.resolve(self.path, cand.path,
                                                       f"parent locator {cand.platform}"))
            except SafetyError as e:
                refused = refused or e
                continue
            if os.path.isfile(path):
                self.parent_locator = cand
                self.backing = open_image(path, "vpc", policy=policy)
                break
            tried.append(f"{cand.platform} '{cand.text}'")
        else:
            if refused is not None:
                raise refused
            where = "; ".join(tried) or "no parent locator or parent name"
            raise ImageIOError(f"differencing disk's parent not found (tried {where}):"
                               " put the parent beside it, or allow its directory with"
                               " --allow-root", self.path)
        parent = self.backing
        want = bytes(hd.parent_unique_id)
        if want != bytes(16) and bytes(parent.unique_id) != want:
            raise SafetyError(f"parent {parent.path} has unique id"
                              f" {_guid(parent.unique_id)}, but this differencing disk was"
                              f" made from {_guid(want)}: wrong or replaced parent",
                              self.path)
        stamp = hd.parent_time_stamp
        if stamp:
            mtime = vhd_time(os.stat(parent.path).st_mtime)
            if mtime != stamp:
                self.notes.append(f"parent time stamp {stamp} differs from the parent's"
                                  f" modification time {mtime}: the parent was changed or"
                                  " copied after this disk was made")

    # -- helpers ---------------------------------------------------------------------------
    def _ensure_sound(self) -> None:
        if self.fatal:
            structure, field, msg = self.fatal[0]
            raise CorruptImage(f"{msg}: the image is corrupt ('diskforge check' lists"
                               " every problem)", self.path, structure=structure,
                               field=field)

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

    def _fill_zero(self, mv, start: int, end: int) -> None:
        while start < end:
            n = min(end - start, ZERO_BUFFER_SIZE)
            mv[start:start + n] = ZEROES[:n]
            start += n

    def _read_file(self, host: int, mv, start: int, end: int) -> None:
        got = self.backend.readinto(host, mv[start:end])
        if got < end - start:  # the file shrank under us: what is gone reads as zeros
            self._fill_zero(mv, start + got, end)

    def _read_parent(self, offset: int, mv, start: int, end: int) -> None:
        parent = self.backing
        inside = max(0, min(end - start, parent.size - offset))
        if inside:
            parent.readinto(offset, mv[start:start + inside])
        self._fill_zero(mv, start + inside, end)

    def _pieces(self, offset: int, length: int):
        """``(block, offset in block, bytes, offset in request)`` for a range."""
        bs = self.block_size
        done = 0
        while done < length:
            off = offset + done
            blk, inb = divmod(off, bs)
            n = min(bs - inb, length - done)
            yield blk, inb, n, done
            done += n

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
                    self._fill_zero(mv, at, at + cnt)
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

    def _stored(self, base: int, host: int, a: int, b: int):
        """Extents of bytes ``a..b`` of a block stored at ``host``: where the host file
        has a hole they read as zeros, and are not read at all by convert or compare
        (qemu's map calls a whole allocated block data)."""
        for o, n, data in self.backend.data_ranges(host + a, host + b):
            yield Extent(base + o - host, n, ExtentKind.DATA if data else ExtentKind.ZERO,
                         True, o)

    # -- writing ---------------------------------------------------------------------------
    def _check_writable(self, offset: int, length: int) -> None:
        if not self.writable:
            raise UnsupportedError("vpc image is open read-only", self.path)
        self.check_range(offset, length)
        self._ensure_sound()

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self._check_writable(offset, len(mv))
        if self.disk_type == FIXED:
            self.backend.pwrite(offset, mv)
            return
        for blk, inb, cnt, at in self._pieces(offset, len(mv)):
            self._write_piece(offset + at - inb, blk, inb, cnt, mv[at:at + cnt])

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable(offset, length)
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
        end = host + length
        a, b = -(-host // 4096) * 4096, end // 4096 * 4096
        if b > a and self.backend.punch_hole(a, b - a):
            self._write_zeros(host, a)
            self._write_zeros(b, end)
        else:
            self._write_zeros(host, end)

    def _write_zeros(self, start: int, end: int) -> None:
        while start < end:
            n = min(end - start, ZERO_BUFFER_SIZE)
            self.backend.pwrite(start, ZEROES[:n])
            start += n

    def _allocate(self, blk: int) -> None:
        """Give block ``blk`` storage after the last one (module docstring)."""
        bm_size, bs = self.bitmap_size, self.block_size
        align = min(DATA_ALIGN, bs)
        data_at = -(-(self.data_end + bm_size) // align) * align
        at = data_at - bm_size
        end = data_at + bs
        if at < self.file_size:  # the old footer (and any slack) must not show through
            self._zero_host(at, min(end, self.file_size) - at)
        if self.disk_type == DYNAMIC:
            self.backend.pwrite(at, b"\xff" * bm_size)
        self.backend.pwrite(end, self.footer_raw)
        self.file_size = max(self.file_size, end + FOOTER_SIZE)
        self.footer_at = end
        self.backend.pwrite(self.bat_at + 4 * blk, struct.pack(">I", at // SECTOR))
        self.bat[blk] = at // SECTOR
        self.data_end = end
        self._bitmaps.pop(blk, None)

    def flush(self) -> None:
        if self.writable:
            self.backend.flush()

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point a differencing disk at another parent without copying (rebase -u).
        The new parent must be a VHD: its unique id is recorded. With no name, the
        disk becomes a plain dynamic disk."""
        if not self.writable:
            raise UnsupportedError("vpc image is open read-only", self.path)
        self._ensure_sound()
        if self.disk_type != DIFFERENCING:
            raise UnsupportedError("not supported yet: giving a parent to a VHD that is"
                                   " not a differencing disk", self.path)
        if fmt not in (None, "vpc", "vhd"):
            raise UnsupportedError(f"a VHD differencing disk's parent must be a VHD, not"
                                   f" {fmt}", self.path)
        from ...policy import OpenPolicy
        from ...registry import open_image
        from .structs import build_header
        from .writer import locator_entries, parent_name
        hd = self.header
        if name is None:
            new_parent = None
            raw = with_checksum(self.header_raw[:40] + bytes(16 + 4 + 4 + 512 + 192)
                                + self.header_raw[768:], HEADER_CHECKSUM_AT)
        else:
            path = name if os.path.isabs(name) else os.path.join(
                os.path.dirname(os.path.abspath(self.path)), name)
            new_parent = open_image(path, "vpc", policy=OpenPolicy().descend(self.path))
            try:
                # new locator data goes after everything else; the old becomes slack
                start = -(-self.data_end // SECTOR) * SECTOR
                entries, blobs, end = locator_entries(
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
                    parent_unicode_name=parent_name(os.path.abspath(path)),
                    locators=entries)
            except BaseException:
                new_parent.close()
                raise
        self.backend.pwrite(self.header_at, raw)
        self.header_raw = raw
        self.header = VhdDynamicDiskHeader.parse(raw)
        self.locator_entries = self._read_locators(self.header)
        if name is None:
            self._write_type(DYNAMIC)
        if self.backing is not None:
            self.backing.close()
        self.backing = new_parent
        self.parent_locator = None if name is None else loc.Locator("name", name, name)
        self._bitmaps.clear()

    def _write_type(self, disk_type: int) -> None:
        raw = bytearray(self.footer_raw)
        raw[60:64] = disk_type.to_bytes(4, "big")
        raw = with_checksum(bytes(raw), FOOTER_CHECKSUM_AT)
        self.backend.pwrite(self.footer_at, raw)
        if self.footer_copy_at is not None:
            self.backend.pwrite(self.footer_copy_at, raw)
        self.footer_raw = raw
        self.footer = VhdFooter.parse(raw)
        self.disk_type = disk_type

    # -- checking --------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Checksum problems (footer, its copy, the dynamic header)."""
        out = [f"{s}.{f}: {m}" for s, f, m in self.fatal]
        out += [p for p in self.problems if "checksum" in p]
        return out

    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        res = CheckResult(filename=self.path, format="vpc")
        msgs = [f"ERROR {s}.{f}: {m}" for s, f, m in self.fatal]
        msgs += [f"ERROR {p}" for p in self.problems]
        if self.disk_type != FIXED:
            msgs += [f"ERROR {m}" for m in self._check_blocks()]
            res.total_clusters = self.nblocks
            res.allocated_clusters = self.allocated_blocks()
            res.image_end_offset = self.data_end + FOOTER_SIZE
        else:
            res.image_end_offset = self.footer_at + FOOTER_SIZE
        for m in msgs:
            res.add(ProblemKind.CORRUPTION, m)
        if repair and msgs:
            fixed = self._repair_footer_copies()
            res.corruptions_fixed = fixed
            res.corruptions -= fixed
            if fixed:
                res.note(f"Repaired {fixed} footer cop{'y' if fixed == 1 else 'ies'}")
        for n in self.notes:
            res.note(f"Warning: {n}")
        return res

    def _metadata(self) -> list[tuple[str, int, int]]:
        """``(name, start, end)`` of every structure besides the blocks."""
        regions = [("the footer copy", 0, FOOTER_SIZE),
                   ("the dynamic disk header", self.header_at, self.header_at + HEADER_SIZE),
                   ("the BAT", self.bat_at,
                    self.bat_at + -(-self.bat_bytes // SECTOR) * SECTOR)]
        for code, _, off, n, _ in self.locator_entries:
            regions.append((f"parent locator {code.decode('latin-1')}", off, off + n))
        return regions

    def allocated_blocks(self) -> int:
        return len(self.bat) - self.bat.count(UNUSED)

    def _check_blocks(self) -> list[str]:
        """Blocks that overlap the metadata or each other: the regions in file order
        (blocks as indices sorted by offset, named only when a message needs them)."""
        import heapq
        span = self.bitmap_size + self.block_size
        bat = self.bat
        # a sorted list of block indices (about 40 bytes each): ask the budget first
        check_alloc(self.allocated_blocks() * 40, self.path, "BAT",
                    "allocated entries (sorted to check for overlaps)")
        blocks = sorted(self._used_blocks(), key=bat.__getitem__)
        regions = heapq.merge(
            sorted(((start, end, name) for name, start, end in self._metadata()),
                   key=lambda r: r[0]),
            ((bat[i] * SECTOR, bat[i] * SECTOR + span, i) for i in blocks),
            key=lambda r: r[0])
        out = []
        last, last_end = None, 0

        def named(who) -> str:
            return who if isinstance(who, str) else f"block {who}"
        for start, end, who in regions:
            if last is not None and start < last_end:
                out.append(f"{named(who)} at offset {start} overlaps {named(last)}")
            if end > last_end:
                last, last_end = who, end
        return out

    def _repair_footer_copies(self) -> int:
        """Rewrite a footer copy that is damaged or stale from the sound one."""
        if not self.writable or self.fatal or self.footer_copy_at is None:
            return 0
        if not any("footer" in p for p in self.problems):
            return 0
        self.backend.pwrite(self.footer_copy_at, self.footer_raw)
        self.backend.pwrite(self.footer_at, self.footer_raw)
        self.backend.flush()
        before = len(self.problems)
        self.problems = [p for p in self.problems if "footer" not in p.lower()]
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
                info.backing_format = "vpc"
        if self.notes:
            details["warnings"] = list(self.notes)
        return info

    def close(self) -> None:
        if not self.closed:
            self.backend.close()
        super().close()

