"""Opening a VHDX file as a BlockDevice: headers, log replay, regions, metadata, BAT,
differencing parents, and random-access writes.

Reading: every payload block is translated through the BAT. FULLY_PRESENT blocks are
read from the file (and host-file holes inside them are reported as zeros, so convert
does not read them); NOT_PRESENT blocks read from the parent in a differencing disk and
as zeros otherwise; ZERO, UNDEFINED and UNMAPPED blocks read as zeros (the specification
allows zeros for all three, and it is what qemu does); PARTIALLY_PRESENT blocks are
split by their sector bitmap between this file and the parent.

Writing (``open(writable=True)``) follows the specification's ordering: the headers are
updated first (new FileWriteGuid, then a new DataWriteGuid before the first change a
reader could see); payload data goes to newly allocated space past the end of the file
and is flushed; then every metadata change (BAT entries, sector bitmaps) is written as a
log entry, flushed, applied and flushed; on close the log is emptied (LogGuid zero). A
crash at any point leaves a file that opens as either the old or the new state.
"""

from __future__ import annotations

import errno
import os
from array import array

from construct import Container

from ...blockdev import (ZERO_BUFFER_SIZE, ZEROES, Extent, ExtentKind, FileDevice,
                         ImageInfo, coalesce, fill_zero, pieces, plain_host)
from ...byteorder import le_bytes
from ...checks import CheckResult, Problem, ProblemKind, Repair
from ...errors import FormatError, ImageIOError, SafetyError, UnsupportedError
from ...policy import OpenPolicy
from ...registry import open_image
from .structs import (ALIGNMENT, BAT_GUID, BAT_OFFSET_SHIFT, BAT_STATE_MASK, FILE_SIGNATURE,
                      HEADER_OFFSETS, HEADER_SECTION_SIZE, HEADER_SIZE, LOG_SECTOR,
                      METADATA_GUID, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
                      PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_UNDEFINED,
                      PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_UNMAPPED_V095, PAYLOAD_BLOCK_ZERO,
                      REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, SB_BLOCK_NOT_PRESENT,
                      SB_BLOCK_PRESENT, SECTOR_BITMAP_BLOCK, ZERO_GUID,
                      align_up, bat_entries, bit_runs, bitmap_index, chunk_ratio, guid_text,
                      new_guid, payload_index, set_bits)
from .bat import BatTable
from .log import OverlayIO, build_entry, desc_sectors, find_active
from .tables import (build_header, header_problem, parse_header, parse_metadata,
                     parse_region_table)

_ZERO_STATES = (PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED,
                PAYLOAD_BLOCK_UNMAPPED_V095)
_VALID_STATES = (PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_FULLY_PRESENT,
                 PAYLOAD_BLOCK_PARTIALLY_PRESENT) + _ZERO_STATES
# payload states that map no file space: a block reads as zeros or from the parent
_UNIFORM_STATES = (PAYLOAD_BLOCK_NOT_PRESENT,) + _ZERO_STATES


class VhdxDevice(FileDevice):
    format = "vhdx"

    # -- opening --------------------------------------------------------------------------
    def _read(self, offset: int, length: int, what: str = "data") -> bytes:
        return self.io.read_exact(offset, length, what)

    def _open(self) -> None:
        self.io = self.backend
        self.parent = None
        self.parent_name: str | None = None
        self.parent_path: str | None = None  # opened or, under open_backing=False, named
        self._session_header = False   # FileWriteGuid changed this session
        self._session_data = False      # DataWriteGuid changed this session
        self._log_pos = 0
        self._log_seq = 1
        self._alloc_end = None
        self._bitmaps: dict[int, bytes] = {}
        self.replayed = None            # the log replay done at open, if any
        path = self.path
        size = self.backend.size
        if size < HEADER_SECTION_SIZE:
            raise FormatError(f"the file is {size} bytes, shorter than the 1 MiB VHDX header"
                              " section: truncated", path)
        ident = self.backend.read_exact(0, 520, "file type identifier")
        if ident[:8] != FILE_SIGNATURE:
            raise FormatError(f"signature is {ident[:8]!r}, not b'vhdxfile'", path,
                              structure="FileTypeIdentifier", field="Signature")
        self.creator = ident[8:520].decode("utf-16-le", "replace").split("\0")[0]
        self._read_headers()
        h = self.header
        if h.Version != 1:
            raise UnsupportedError(f"not supported yet: VHDX version {h.Version}", path)
        if h.LogGuid != ZERO_GUID:
            self._replay_log()
        problems = []
        for off in REGION_TABLE_OFFSETS:
            try:
                raw = self._read(off, REGION_TABLE_SIZE, "region table")
                self.regions = parse_region_table(raw, path, self.io.size)
                break
            except FormatError as e:
                problems.append(e)
        else:
            raise problems[0]
        bat_region = self.regions[BAT_GUID]
        meta_region = self.regions[METADATA_GUID]
        self.md = md = parse_metadata(self._read, meta_region, path)
        self.size = md.virtual_size
        self.block_size = md.block_size
        self.lss = md.logical_sector_size
        self.differencing = md.has_parent
        self.ratio = chunk_ratio(md.block_size, md.logical_sector_size)
        self.nblocks = -(-md.virtual_size // md.block_size)
        need = bat_entries(md.virtual_size, md.block_size, md.logical_sector_size,
                           md.has_parent)
        if need * 8 > bat_region.length:
            raise FormatError(f"the BAT region holds {bat_region.length // 8} entries, the"
                              f" disk needs {need}", path, structure="RegionTableEntry",
                              field="Length")
        # entries up to the end of the 4 KiB sector holding the last one: the unit of
        # logged updates
        nbytes = min(bat_region.length, align_up(need * 8, LOG_SECTOR))
        self.bat_offset = bat_region.offset
        # sized by the metadata and checked only against the file (or the replayed
        # view), which a sparse file satisfies: read in pieces as it is used
        self.bat = BatTable(self._read, bat_region.offset, nbytes // 8)
        self.file_size = self.io.size   # kept current by _allocate
        if md.has_parent:
            self._open_parent()

    def _read_headers(self) -> None:
        """2.2.2: the valid header with the greater SequenceNumber is current."""
        self.headers = [parse_header(self.backend.read_exact(off, HEADER_SIZE, "header"))
                        for off in HEADER_OFFSETS]
        valid = [i for i, h in enumerate(self.headers) if not isinstance(h, str)]
        if not valid:
            raise FormatError(f"neither header is valid (header 1: {self.headers[0]};"
                              f" header 2: {self.headers[1]}): corrupt", self.path,
                              structure="Header")
        if len(valid) == 2:
            s0, s1 = (h.SequenceNumber for h in self.headers)
            self.current = 0 if s0 > s1 else 1
        else:
            self.current = valid[0]
        self.header = self.headers[self.current]
        h = self.header
        if h.LogGuid != ZERO_GUID and h.LogVersion != 0:
            raise UnsupportedError(f"not supported yet: log version {h.LogVersion}",
                                   self.path)
        if h.LogLength % ALIGNMENT or h.LogOffset % ALIGNMENT or (
                h.LogLength and h.LogOffset < HEADER_SECTION_SIZE):
            raise FormatError(f"log {h.LogOffset}+{h.LogLength} is not 1 MiB aligned past"
                              " the header section", self.path, structure="Header",
                              field="LogOffset")

    def _replay_log(self) -> None:
        h = self.header
        size = self.backend.size
        if h.LogLength == 0 or h.LogOffset + h.LogLength > size:
            raise FormatError(f"log {h.LogOffset}+{h.LogLength} is outside the file"
                              f" ({size} bytes)", self.path, structure="Header",
                              field="LogLength")
        replay = find_active(lambda o, n: self.backend.read_exact(o, n, "log"), h.LogOffset,
                             h.LogLength, h.LogGuid, size, self.path)
        self.replayed = replay
        self._log_seq = replay.next_sequence
        if not self.writable:
            self.io = OverlayIO(self.backend, replay)
            return
        # 2.2.2.1 / 2.3.3: headers first, then the replay, then an empty log
        self._update_header()
        for kind, off, arg in replay.ops:
            if kind == "data":
                self.backend.pwrite(off, arg)
            else:
                self._zero_file(off, arg)
        if self.backend.size < replay.head.last_file_offset:
            self.backend.truncate(replay.head.last_file_offset)
        self.backend.flush()
        self._update_header(LogGuid=ZERO_GUID)

    def _zero_file(self, off: int, n: int) -> None:
        """Zero file bytes: past the end by growing the file, else a hole (or zeros
        written where the file system cannot punch one)."""
        end = off + n
        size = self.backend.size
        if end > size:
            self.backend.truncate(end)
            end = min(end, size)
        if end > off and not self.backend.punch_hole(off, end - off):
            self.backend.write_zeroes(off, end - off)

    def _open_parent(self) -> None:
        """2.6.2.6.3: relative_path, volume_path, then absolute_win32_path. Windows
        absolute paths cannot be opened here, so those are looked for beside this file
        by their file name. Every candidate goes through the open policy."""
        loc = self.md.parent_locator or {}
        policy = self.policy or OpenPolicy().descend(self.path)
        candidates = []
        for key in ("relative_path", "volume_path", "absolute_win32_path"):
            value = loc.get(key)
            if not value:
                continue
            local = value.replace("\\", "/")
            if key != "relative_path":
                local = local.rsplit("/", 1)[-1]
            candidates.append((key, value, local))
        if not candidates:
            raise FormatError("the parent locator names no path (relative_path,"
                              " volume_path or absolute_win32_path)", self.path,
                              structure="ParentLocator")
        safety, tried, named = None, [], None
        for key, value, local in candidates:
            try:
                path = policy.resolve(self.path, local, "parent")
            except SafetyError as e:
                safety = safety or e
                continue
            named = named or (value, path if "://" in path else os.path.normpath(path))
            if "://" in path:  # an object beside a remote image (remote/refs.py)
                from ...remote.refs import exists
                if exists(path):
                    break
            elif os.path.exists(path):
                break
            else:
                path = os.path.normpath(path)
            if path not in tried:
                tried.append(path)
        else:
            if safety is not None and not tried:
                raise safety
            if not policy.open_backing:  # named only: the first locator, as stored
                self.parent_name, self.parent_path = named
                return
            key, value, _ = candidates[0]
            # qemu-img's nested words (open_image adds "Could not open 'CHILD': Could
            # not open backing file: "), then where diskforge looked
            err = ImageIOError(f"Could not open '{tried[0]}': No such file or directory"
                               f" (the parent of this differencing disk, {key} '{value}',"
                               f" was not found; looked for: {', '.join(tried)})", self.path)
            err.backing_missing, err.errno = True, errno.ENOENT
            raise err
        self.parent_name = value
        if "://" not in path:
            path = os.path.normpath(path)
        self.parent_path = path
        if not policy.open_backing:
            # (info without --backing-chain, rebase -u: the parent is named, not
            # opened, so its DataWriteGuid is checked only when it is opened)
            return
        parent = open_image(path, "vhdx", policy=policy)
        try:
            links = {loc.get("parent_linkage", "").lower(), loc.get("parent_linkage2",
                                                                     "").lower()}
            have = "{" + guid_text(parent.header.DataWriteGuid) + "}"
            if have not in links:
                raise FormatError(f"parent {path} has DataWriteGuid {have}, not the"
                                  f" parent_linkage {loc.get('parent_linkage')} recorded"
                                  " here: the parent changed after this differencing disk"
                                  " was made", self.path, structure="ParentLocator",
                                  field="parent_linkage")
            if parent.lss != self.lss:
                raise FormatError(f"parent {path} has {parent.lss}-byte logical sectors,"
                                  f" this disk {self.lss}", self.path,
                                  structure="LogicalSectorSize")
        except BaseException:
            parent.close()
            raise
        self.parent = self.backing = parent

    # -- translation ----------------------------------------------------------------------
    def _entry(self, block: int) -> tuple[int, int]:
        """(state, file offset) of payload block ``block``, validated."""
        idx = payload_index(block, self.ratio)
        e = self.bat[idx]
        state = e & BAT_STATE_MASK
        if state not in _VALID_STATES or (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT
                                          and not self.differencing):
            raise FormatError(f"payload block {block} has the invalid state {state}",
                              self.path, structure="BAT", field=f"entry {idx}")
        if state in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            off = (e >> BAT_OFFSET_SHIFT) << 20
            if off < HEADER_SECTION_SIZE or off >= self.file_size:
                raise FormatError(f"payload block {block} at file offset {off} is outside"
                                  f" the file ({self.file_size} bytes)", self.path,
                                  structure="BAT", field=f"entry {idx}")
            return state, off
        return state, 0

    def _bitmap(self, block: int) -> bytes:
        """The sector bitmap bits of payload block ``block`` (block_size/lss bits)."""
        got = self._bitmaps.get(block)
        if got is not None:
            return got
        chunk = block // self.ratio
        idx = bitmap_index(chunk, self.ratio)
        e = self.bat[idx] if idx < len(self.bat) else 0
        off = (e >> BAT_OFFSET_SHIFT) << 20
        if e & BAT_STATE_MASK != SB_BLOCK_PRESENT:
            raise FormatError(f"payload block {block} is PARTIALLY_PRESENT but its sector"
                              " bitmap block is not present", self.path, structure="BAT",
                              field=f"entry {idx}")
        if off < HEADER_SECTION_SIZE or off + SECTOR_BITMAP_BLOCK > self.file_size:
            raise FormatError(f"sector bitmap block at file offset {off} is outside the"
                              f" file ({self.file_size} bytes)", self.path, structure="BAT",
                              field=f"entry {idx}")
        per = self.block_size // self.lss // 8
        raw = self._read(off + (block % self.ratio) * per, per, "sector bitmap")
        if len(self._bitmaps) > 64:
            self._bitmaps.clear()
        self._bitmaps[block] = raw
        return raw

    def _pieces(self, offset: int, length: int):
        """(virtual offset, length, block, offset in block) per block touched: the
        shared splitter's pieces, by block."""
        bs = self.block_size
        for off, n in pieces(offset, length, bs):
            yield off, n, *divmod(off, bs)

    def _file_read(self, host: int, mv) -> None:
        got = self.io.readinto(host, mv)
        if got < len(mv):   # a block cut short by the end of the file reads as zeros
            fill_zero(mv, got, len(mv))

    def _parent_read(self, off: int, mv) -> None:
        n = len(mv)
        inside = 0 if self.parent is None else max(0, min(n, self.parent.size - off))
        if inside:
            self.parent.readinto(off, mv[:inside])
        fill_zero(mv, inside, n)

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        pos = 0
        for off, k, block, within in self._pieces(offset, n):
            view = mv[pos:pos + k]
            state, host = self._entry(block)
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                self._file_read(host + within, view)
            elif state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                self._read_partial(block, host, off, within, view)
            elif state == PAYLOAD_BLOCK_NOT_PRESENT and self.differencing:
                self._parent_read(off, view)
            else:
                fill_zero(view, 0, k)
            pos += k
        return n

    def _sector_runs(self, block: int, within: int, k: int):
        """(offset in block, length, present) runs for bytes [within, within+k)."""
        lss = self.lss
        s0, s1 = within // lss, -(-(within + k) // lss)
        for s, c, bit in bit_runs(self._bitmap(block), s0, s1 - s0):
            a, b = max(s * lss, within), min((s + c) * lss, within + k)
            yield a, b - a, bit

    def _read_partial(self, block, host, off, within, view) -> None:
        for a, n, present in self._sector_runs(block, within, len(view)):
            part = view[a - within:a - within + n]
            if present:
                self._file_read(host + a, part)
            else:
                self._parent_read(off + a - within, part)

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(self._refine(coalesce(self._raw_extents(offset, length))))

    def _plain_entries(self):
        """Indices of the BAT entries worth a look one by one: those that map file space
        (or carry an invalid state). Runs of one "reads as zero/parent" payload entry
        (with empty sector bitmap entries between) are skipped at memory speed, so
        walks are bounded by what is allocated, not by the virtual size."""
        bat, i, n, r1 = self.bat, 0, len(self.bat), self.ratio + 1
        while i < n:
            e = bat[i]
            if (i + 1) % r1 == 0:   # a sector bitmap entry
                if e:
                    yield i
                i += 1
            elif e & BAT_STATE_MASK in _UNIFORM_STATES:
                i = self._uniform_run(i, n, e)
            else:
                yield i
                i += 1

    def _matches(self, lo: int, hi: int, e: int) -> bool:
        """``bat[lo:hi]`` holds ``e`` at every payload entry and 0 at every sector
        bitmap entry (one C-level array comparison)."""
        r1 = self.ratio + 1
        expected = array("Q", [e]) * (hi - lo)
        first = -(lo + 1) % r1
        if first < hi - lo:
            expected[first::r1] = array("Q", bytes(8 * len(range(first, hi - lo, r1))))
        return self.bat[lo:hi] == expected

    def _uniform_run(self, lo: int, hi: int, e: int) -> int:
        """The first BAT index in ``[lo, hi)`` that breaks the run ``_matches``
        describes (``bat[lo]`` is ``e``): galloping in bounded steps, then bisecting."""
        pos, step = lo, 64
        while pos < hi:
            m = min(hi, pos + step)
            if self._matches(pos, m, e):
                pos = m
                step = min(step * 4, 1 << 16)
                continue
            a, b = pos, m   # [lo, a) matches; the break is in [a, b)
            while b - a > 1:
                mid = (a + b) // 2
                if self._matches(a, mid, e):
                    a = mid
                else:
                    b = mid
            return a
        return hi

    def _raw_extents(self, offset: int, length: int):
        bs, end, r1 = self.block_size, offset + length, self.ratio + 1
        while offset < end:
            block = offset // bs
            idx = payload_index(block, self.ratio)
            e = self.bat[idx]
            state = e & BAT_STATE_MASK
            if state in _UNIFORM_STATES:
                # the blocks after it are likely the same: find where that stops at
                # memory speed (payload entries before index j: j - j // (ratio + 1))
                j = self._uniform_run(idx, payload_index((end - 1) // bs, self.ratio) + 1,
                                      e)
                run_end = min(end, (j - j // r1) * bs)
                if state == PAYLOAD_BLOCK_NOT_PRESENT and self.differencing:
                    yield Extent(offset, run_end - offset, ExtentKind.BACKING, False)
                else:
                    yield Extent(offset, run_end - offset, ExtentKind.ZERO,
                                 state == PAYLOAD_BLOCK_ZERO)
                offset = run_end
                continue
            within = offset - block * bs
            k = min(end - offset, bs - within)
            yield from self._block_extent(offset, k, block, within)
            offset += k

    def _block_extent(self, off: int, k: int, block: int, within: int):
        """The extents of bytes ``within..within+k`` of payload block ``block``."""
        state, host = self._entry(block)
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            yield Extent(off, k, ExtentKind.DATA, True, host + within)
        elif state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            for a, n, present in self._sector_runs(block, within, k):
                o = off + a - within
                yield (Extent(o, n, ExtentKind.DATA, True, host + a) if present
                       else Extent(o, n, ExtentKind.BACKING, False))
        elif state == PAYLOAD_BLOCK_NOT_PRESENT and self.differencing:
            yield Extent(off, k, ExtentKind.BACKING, False)
        else:
            yield Extent(off, k, ExtentKind.ZERO, state == PAYLOAD_BLOCK_ZERO)

    def _refine(self, extents):
        """Split DATA extents by the host file's holes: a hole reads as zeros."""
        for e in extents:
            if e.kind is not ExtentKind.DATA:
                yield e
                continue
            for h, n, data in self.io.data_ranges(e.host_offset, e.host_offset + e.length):
                yield Extent(e.offset + h - e.host_offset, n,
                             ExtentKind.DATA if data else ExtentKind.ZERO, True, h)

    # -- facts ----------------------------------------------------------------------------
    @property
    def subformat(self) -> str:
        if self.differencing:
            return "differencing"
        return "fixed" if self.md.leave_blocks_allocated else "dynamic"

    def info(self) -> ImageInfo:
        h, md = self.header, self.md
        details = {
            "subformat": self.subformat,
            "block-size": md.block_size,
            "logical-sector-size": md.logical_sector_size,
            "physical-sector-size": md.physical_sector_size,
            "creator": self.creator,
            "virtual-disk-id": guid_text(md.virtual_disk_id) if md.virtual_disk_id else None,
            "current-header": self.current + 1,
            "sequence-number": h.SequenceNumber,
            "file-write-guid": guid_text(h.FileWriteGuid),
            "data-write-guid": guid_text(h.DataWriteGuid),
            "log": {"offset": h.LogOffset, "length": h.LogLength,
                    "replayed": len(self.replayed.entries) if self.replayed else 0},
        }
        bad = [i + 1 for i, x in enumerate(self.headers) if isinstance(x, str)]
        if bad:
            details["damaged-headers"] = bad
        info = ImageInfo(filename=self.path, format="vhdx", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(),
                         cluster_size=md.block_size, details=details)
        if self.differencing:
            details["parent-locator"] = dict(md.parent_locator or {})
            if self.parent_path is not None:
                info.backing_filename = self.parent_name
                info.full_backing_filename = (self.parent.path if self.parent is not None
                                              else self.parent_path)
                info.backing_format = "vhdx"
        return info

    def verify(self) -> list[str]:
        return [p.message for p in self._checksum_problems()]

    def _checksum_problems(self) -> list[Problem]:
        """The headers and region tables that are not valid (2.2.2, 2.2.3): both
        copies are checked, though one sound copy is enough to open the file."""
        problems = []
        for i, h in enumerate(self.headers):
            if isinstance(h, str):
                raw = self.backend.read_exact(HEADER_OFFSETS[i], HEADER_SIZE, "header")
                field = (header_problem(raw) or (None, h))[0]
                problems.append(Problem(ProblemKind.CORRUPTION, f"header {i + 1}: {h}",
                                        "Header", field))
        for i, off in enumerate(REGION_TABLE_OFFSETS):
            try:
                parse_region_table(self._read(off, REGION_TABLE_SIZE), self.path,
                                   self.io.size)
            except FormatError as e:
                problems.append(Problem(ProblemKind.CORRUPTION,
                                        f"region table {i + 1}: {e.message}", e.structure,
                                        e.field))
        return problems

    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        """BAT entries: valid states, inside the file, not overlapping each other nor the
        header section, log, BAT or metadata regions; sector bitmaps where needed."""
        result = CheckResult(self.path, "vhdx")
        for p in self._checksum_problems():
            result.add(ProblemKind.CORRUPTION, f"ERROR {p.message}", p.structure, p.field)
        if self.replayed is not None:
            n = len(self.replayed.entries)
            result.note(
                f"The log held {n} pending entries: written into the file" if self.writable
                else f"The log holds {n} pending entries, replayed in memory for reading;"
                " 'check -r all' writes them into the file")
        used = [(0, HEADER_SECTION_SIZE, "header section")]
        h = self.header
        if h.LogLength:
            used.append((h.LogOffset, h.LogOffset + h.LogLength, "log"))
        for r in self.regions.values():
            used.append((r.offset, r.offset + r.length, "region"))
        for idx in self._plain_entries():
            e = self.bat[idx]
            state, off = e & BAT_STATE_MASK, (e >> BAT_OFFSET_SHIFT) << 20
            is_bitmap = (idx + 1) % (self.ratio + 1) == 0
            what = "sector bitmap" if is_bitmap else "payload block"
            if is_bitmap:
                ok = state in (SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT)
                present = state == SB_BLOCK_PRESENT
                length = SECTOR_BITMAP_BLOCK
            else:
                ok = state in _VALID_STATES and (self.differencing or
                                                 state != PAYLOAD_BLOCK_PARTIALLY_PRESENT)
                present = state in (PAYLOAD_BLOCK_FULLY_PRESENT,
                                    PAYLOAD_BLOCK_PARTIALLY_PRESENT)
                length = self.block_size
            if not ok:
                if not is_bitmap or self.differencing:
                    result.add(ProblemKind.CORRUPTION, f"ERROR BAT entry {idx}: invalid"
                               f" {what} state {state}", "BAT", "State")
                continue
            if not present:
                continue
            if off < HEADER_SECTION_SIZE or off >= self.io.size:
                result.add(ProblemKind.CORRUPTION, f"ERROR BAT entry {idx}: {what} at {off}"
                           f" is outside the file ({self.io.size} bytes)", "BAT",
                           "FileOffsetMB")
                continue
            used.append((off, off + length, f"{what} (BAT entry {idx})"))
        used.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(used, used[1:]):
            if b0 < a1:
                result.add(ProblemKind.CORRUPTION, f"ERROR {bn} at {b0} overlaps {an} at"
                           f" {a0}", "BAT", "FileOffsetMB")
        # qemu's vhdx_co_check reports no block counts or end offset, so neither does
        # this (``check`` output stays qemu-img's, line for line)
        return result

    def host_backend(self, extent: Extent):
        """Payload is stored as it is, unless a log replayed in memory overlays the file
        (then the file's bytes are not the disk's; ``convert -C``)."""
        return plain_host(self.backend, extent) if self.io is self.backend else None

    def files(self) -> list[str]:
        return [self.path] + (self.parent.files() if self.parent is not None else [])

    # -- writing --------------------------------------------------------------------------
    def _update_header(self, **changes) -> None:
        """2.2.2.1: write the non-current header with SequenceNumber + 1 and flush; twice,
        so that both copies are up to date."""
        for _ in range(2):
            h = Container(self.header)
            h.update(changes)
            if not self._session_header:
                h.FileWriteGuid = new_guid()
                self._session_header = True
            h.SequenceNumber = self.header.SequenceNumber + 1
            slot = 1 - self.current
            self.backend.pwrite(HEADER_OFFSETS[slot], build_header(h))
            self.backend.flush()
            self.headers[slot] = h
            self.current, self.header = slot, h
            changes = {}

    def _begin_write(self) -> None:
        """2.2.2.1: a new DataWriteGuid before the first change a reader could see."""
        if not self._session_data:
            self._update_header(DataWriteGuid=new_guid())
            self._session_data = True

    def _log_commit(self, sectors: dict[int, bytes]) -> None:
        """Write metadata sectors through the log (2.3): log entry, flush, apply, flush.
        Each entry is its own tail, since everything before it is applied already.
        When the log is empty (LogGuid zero) the first entry is written before the
        header names its LogGuid: a crash in between leaves an empty log, never a
        LogGuid whose log holds no entry (which a reader must refuse as corrupt)."""
        h = self.header
        if h.LogLength == 0:
            raise UnsupportedError("not supported yet: writing to a VHDX without a log",
                                   self.path)
        pending = None
        if h.LogGuid == ZERO_GUID:
            pending = new_guid()
            self._log_pos = 0
        items = sorted(sectors.items())
        per_entry = (h.LogLength // LOG_SECTOR - 1) // 2  # descriptors and data fit
        for i in range(0, len(items), per_entry):
            part = items[i:i + per_entry]
            length = (desc_sectors(len(part)) + len(part)) * LOG_SECTOR
            if self._log_pos + length > h.LogLength:
                self._log_pos = 0
            size = self.backend.size
            entry = build_entry(sequence=self._log_seq, tail=self._log_pos,
                                log_guid=pending or self.header.LogGuid,
                                flushed_file_offset=size, last_file_offset=size,
                                data=part)
            self.backend.pwrite(h.LogOffset + self._log_pos, entry)
            self.backend.flush()
            if pending is not None:
                self._update_header(LogGuid=pending)
                pending = None
            for off, sector in part:
                self.backend.pwrite(off, sector)
            self.backend.flush()
            self._log_pos += length
            self._log_seq += 1

    def _bat_sector(self, idx: int) -> tuple[int, bytes]:
        first = idx // 512 * 512
        raw = le_bytes(self.bat[first:first + 512])
        return self.bat_offset + first * 8, raw + bytes(LOG_SECTOR - len(raw))

    def _allocate(self, length: int) -> int:
        """Space for a new block past every structure, 1 MiB aligned, zero-filled."""
        if self._alloc_end is None:
            end = self.backend.size
            h = self.header
            end = max(end, h.LogOffset + h.LogLength)
            for r in self.regions.values():
                end = max(end, r.offset + r.length)
            for idx in self._plain_entries():
                e = self.bat[idx]
                if e & BAT_STATE_MASK in (PAYLOAD_BLOCK_FULLY_PRESENT,
                                          PAYLOAD_BLOCK_PARTIALLY_PRESENT, SB_BLOCK_PRESENT):
                    is_bitmap = (idx + 1) % (self.ratio + 1) == 0
                    n = SECTOR_BITMAP_BLOCK if is_bitmap else self.block_size
                    end = max(end, ((e >> BAT_OFFSET_SHIFT) << 20) + n)
            self._alloc_end = align_up(end)
        off = self._alloc_end
        self._alloc_end = off + align_up(length)
        self.backend.truncate(self._alloc_end)
        self.file_size = self._alloc_end
        return off

    def _set_entry(self, idx: int, state: int, off: int, changed: dict) -> None:
        self.bat[idx] = (off >> 20) << BAT_OFFSET_SHIFT | state
        so, raw = self._bat_sector(idx)
        changed[so] = raw

    # BlockDevice.write/write_zeroes checked writability and the range
    def _write(self, offset: int, mv: memoryview) -> None:
        self._begin_write()
        pos = 0
        for off, k, block, within in self._pieces(offset, len(mv)):
            self._write_block(block, within, off, mv[pos:pos + k])
            pos += k

    def _write_block(self, block: int, within: int, off: int, data) -> None:
        state, host = self._entry(block)
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            self.backend.pwrite(host + within, data)
            return
        changed: dict[int, bytes] = {}
        if self.differencing and state in (PAYLOAD_BLOCK_NOT_PRESENT,
                                           PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            lss = self.lss
            a = within // lss * lss
            b = min(-(-(within + len(data)) // lss) * lss, self.block_size)
            if (a, b) != (within, within + len(data)):   # whole sectors only
                buf = bytearray(b - a)
                base = off - within
                inside = max(0, min(b, self.size - base) - a)
                self.readinto(base + a, memoryview(buf)[:inside])
                buf[within - a:within - a + len(data)] = data
                data, within = buf, a
            if state == PAYLOAD_BLOCK_NOT_PRESENT:
                host = self._allocate(self.block_size)
            self.backend.pwrite(host + within, data)
            self.backend.flush()
            changed.update(self._set_bitmap_bits(block, within // lss,
                                                 -(-len(data) // lss)))
            if state == PAYLOAD_BLOCK_NOT_PRESENT:
                self._set_entry(payload_index(block, self.ratio),
                                PAYLOAD_BLOCK_PARTIALLY_PRESENT, host, changed)
        else:   # a block that reads as zeros: allocate it (zero-filled) and write into it
            host = self._allocate(self.block_size)
            self.backend.pwrite(host + within, data)
            self.backend.flush()
            self._set_entry(payload_index(block, self.ratio), PAYLOAD_BLOCK_FULLY_PRESENT,
                            host, changed)
        self._log_commit(changed)

    def _set_bitmap_bits(self, block: int, first: int, count: int) -> dict[int, bytes]:
        chunk = block // self.ratio
        idx = bitmap_index(chunk, self.ratio)
        e = self.bat[idx]
        changed: dict[int, bytes] = {}
        if e & BAT_STATE_MASK != SB_BLOCK_PRESENT:
            sb = self._allocate(SECTOR_BITMAP_BLOCK)
            self._set_entry(idx, SB_BLOCK_PRESENT, sb, changed)
        else:
            sb = (e >> BAT_OFFSET_SHIFT) << 20
        bits_per_block = self.block_size // self.lss
        bit0 = (block % self.ratio) * bits_per_block + first
        s_first = bit0 // 8 // LOG_SECTOR
        s_last = (bit0 + count - 1) // 8 // LOG_SECTOR
        for s in range(s_first, s_last + 1):
            sector = bytearray(self._read(sb + s * LOG_SECTOR, LOG_SECTOR, "sector bitmap"))
            lo = max(bit0, s * LOG_SECTOR * 8)
            hi = min(bit0 + count, (s + 1) * LOG_SECTOR * 8)
            set_bits(sector, lo - s * LOG_SECTOR * 8, hi - lo)
            changed[sb + s * LOG_SECTOR] = bytes(sector)
        self._bitmaps.pop(block, None)
        return changed

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._begin_write()
        changed: dict[int, bytes] = {}
        for off, k, block, within in self._pieces(offset, length):
            state, host = self._entry(block)
            whole = k == self.block_size or (within == 0 and off + k == self.size)
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                self._zero_file(host + within, k)
            elif whole and self.differencing and state in (PAYLOAD_BLOCK_NOT_PRESENT,
                                                           PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                # over the parent: a new block left sparse, as the writer does (libvhdi
                # misreads ZERO blocks in differencing disks)
                self._set_entry(payload_index(block, self.ratio),
                                PAYLOAD_BLOCK_FULLY_PRESENT,
                                self._allocate(self.block_size), changed)
            elif whole and state != PAYLOAD_BLOCK_ZERO:
                self._set_entry(payload_index(block, self.ratio), PAYLOAD_BLOCK_ZERO, 0,
                                changed)
            elif self.differencing and state in (PAYLOAD_BLOCK_NOT_PRESENT,
                                                 PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                if changed:
                    self._log_commit(changed)
                    changed = {}
                done = 0
                while done < k:
                    n = min(k - done, ZERO_BUFFER_SIZE)
                    self._write_block(block, within + done, off + done, ZEROES[:n])
                    done += n
            # else: the block already reads as zeros
        if changed:
            self._log_commit(changed)

    def flush(self) -> None:
        if self.writable:
            self.backend.flush()

    # -- maintenance (maintenance.py) -------------------------------------------------------
    def _maintainable(self) -> None:
        if not self.writable:
            raise UnsupportedError("vhdx image is open read-only", self.path)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow, or shrink with ``shrink`` (qemu-img cannot): maintenance.py."""
        from . import maintenance
        self._maintainable()
        maintenance.resize(self, size, shrink)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Give this disk a VHDX parent (rebase), another one, or none."""
        from . import maintenance
        self._maintainable()
        maintenance.set_backing(self, name, fmt)

    def make_empty(self) -> None:
        from . import maintenance
        self._maintainable()
        maintenance.make_empty(self)

    def relink_backing(self) -> None:
        from . import maintenance
        self._maintainable()
        maintenance.relink(self)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        try:
            if (self.writable and getattr(self, "header", None) is not None
                    and self.header.LogGuid != ZERO_GUID and self.backend.fd >= 0):
                self.backend.flush()
                self._update_header(LogGuid=ZERO_GUID)   # every entry is applied: empty
        finally:
            super().close()   # the parent, then the backend

