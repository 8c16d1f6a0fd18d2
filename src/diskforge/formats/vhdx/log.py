"""The VHDX log (MS-VHDX 2.3): finding the active sequence, replaying it, writing entries.

A VHDX whose header has a non-zero LogGuid may hold metadata updates that were logged
but not yet applied (a crash, or Hyper-V still had the file open). The specification
requires replaying them before any other read. Read-only, diskforge replays them in
memory (:class:`Replay` gives the final bytes of every logged 4 KiB sector and the zeroed
ranges, which :class:`OverlayIO` lays over the file); writable, it writes them to the
file and then empties the log.

The search follows 2.3.3 step by step: from each candidate tail, extend a sequence of
valid entries with consecutive sequence numbers; a sequence counts when its head's Tail
field points at one of its own entries; the valid sequence with the highest head
sequence number is the active one, and it is replayed from the entry its head's Tail
names. Work is bounded (the log is read once, at most 32 MiB of it; checksum and chain
steps have budgets) so a hostile log cannot hang the reader.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from ...errors import FormatError, UnsupportedError
from .crc32c import crc32c
from .structs import (DATA_SIGNATURE, DESC_SIGNATURE, DESCRIPTOR_SIZE, LOG_ENTRY_SIGNATURE,
                      LOG_HEADER_SIZE, LOG_SECTOR, REGION_TABLE_OFFSETS,
                      ZERO_SIGNATURE, DataDescriptor, LogEntryHeader, ZeroDescriptor)

MAX_REPLAY_LOG = 32 << 20       # larger logs are refused rather than read whole
MAX_FILE_OFFSET = 65 << 40      # 64 TiB of blocks plus every structure fits below this


@dataclass
class LogEntry:
    """A valid log entry, found by the log search."""
    offset: int                 # within the log
    length: int
    tail: int
    sequence: int
    flushed_file_offset: int
    last_file_offset: int
    # ("data", file_offset, 4096 bytes) or ("zero", file_offset, length), in order
    ops: list = field(default_factory=list)


@dataclass
class Replay:
    """The active sequence and what replaying it does."""
    entries: list[LogEntry]
    ops: list                                   # every op, tail entry first
    sectors: dict[int, bytes] = field(default_factory=dict)  # final logged sectors
    zeros: list[tuple[int, int]] = field(default_factory=list)  # (start, end)

    @property
    def head(self) -> LogEntry:
        return self.entries[-1]

    @property
    def next_sequence(self) -> int:
        return self.head.sequence + 1


def desc_sectors(count: int) -> int:
    """Sectors holding the entry header and ``count`` descriptors (2.3.1)."""
    return -(-(LOG_HEADER_SIZE + DESCRIPTOR_SIZE * count) // LOG_SECTOR)


class _Scanner:
    def __init__(self, data: bytes, log_guid: bytes, path: str):
        self.data = data
        self.length = len(data)
        self.guid = log_guid
        self.path = path
        self.memo: dict[int, LogEntry | None] = {}
        self.crc_budget = 8 * self.length + (8 << 20)
        self.step_budget = 16 * (self.length // LOG_SECTOR) + 4096

    def window(self, pos: int, n: int) -> bytes:
        """``n`` bytes of the circular log from ``pos``."""
        end = pos + n
        if end <= self.length:
            return self.data[pos:end]
        return self.data[pos:] + self.data[:end - self.length]

    def entry(self, pos: int) -> LogEntry | None:
        if pos in self.memo:
            return self.memo[pos]
        e = self.memo[pos] = self._parse(pos)
        return e

    def _parse(self, pos: int) -> LogEntry | None:
        raw = self.data[pos:pos + LOG_HEADER_SIZE]
        if raw[:4] != LOG_ENTRY_SIGNATURE:
            return None
        h = LogEntryHeader.parse(raw)
        n = h.EntryLength
        if (n == 0 or n % LOG_SECTOR or n > self.length or h.Tail % LOG_SECTOR
                or h.Tail >= self.length or h.SequenceNumber == 0 or h.LogGuid != self.guid):
            return None
        nd = desc_sectors(h.DescriptorCount)
        if nd * LOG_SECTOR > n:
            return None
        self.crc_budget -= n
        if self.crc_budget < 0:
            raise FormatError("the log holds too many overlapping entries to replay",
                              self.path, structure="LogEntryHeader")
        entry = bytearray(self.window(pos, n))
        entry[4:8] = bytes(4)
        if crc32c(entry) != h.Checksum:
            return None
        seq = h.SequenceNumber
        e = LogEntry(pos, n, h.Tail, seq, h.FlushedFileOffset, h.LastFileOffset)
        data_index = nd
        for i in range(h.DescriptorCount):
            d = LOG_HEADER_SIZE + DESCRIPTOR_SIZE * i
            raw = bytes(entry[d:d + DESCRIPTOR_SIZE])
            if raw[:4] == ZERO_SIGNATURE:
                z = ZeroDescriptor.parse(raw)
                if (z.SequenceNumber != seq or z.FileOffset % LOG_SECTOR
                        or z.ZeroLength % LOG_SECTOR):
                    return None
                e.ops.append(("zero", z.FileOffset, z.ZeroLength))
            elif raw[:4] == DESC_SIGNATURE:
                dd = DataDescriptor.parse(raw)
                if dd.SequenceNumber != seq or dd.FileOffset % LOG_SECTOR:
                    return None
                s = data_index * LOG_SECTOR
                if s + LOG_SECTOR > n:
                    return None
                sector = entry[s:s + LOG_SECTOR]
                sig, high = struct.unpack_from("<4sI", sector)
                (low,) = struct.unpack_from("<I", sector, LOG_SECTOR - 4)
                if sig != DATA_SIGNATURE or (high << 32 | low) != seq:
                    return None
                e.ops.append(("data", dd.FileOffset,
                              dd.LeadingBytes + bytes(sector[8:4092]) + dd.TrailingBytes))
                data_index += 1
            else:
                return None
        return e

    def sequence_from(self, tail: int) -> list[LogEntry]:
        seq: list[LogEntry] = []
        pos = tail
        while len(seq) * LOG_SECTOR < self.length:
            self.step_budget -= 1
            if self.step_budget < 0:
                raise FormatError("the log's entries chain too often to replay", self.path,
                                  structure="LogEntryHeader")
            e = self.entry(pos)
            if e is None or (seq and e.sequence != seq[-1].sequence + 1):
                break
            seq.append(e)
            pos = (pos + e.length) % self.length
        return seq

    def active(self) -> list[LogEntry] | None:
        """2.3.3: the newest valid and complete sequence, from its tail entry."""
        candidate: list[LogEntry] | None = None
        tail = old_tail = 0
        seen = set()
        while tail not in seen:
            seen.add(tail)
            seq = self.sequence_from(tail)
            valid = None
            if seq:
                head = seq[-1]
                for i, e in enumerate(seq):
                    if e.offset == head.tail:
                        valid = seq[i:]
                        break
            if valid and (candidate is None or valid[-1].sequence > candidate[-1].sequence):
                candidate = valid
            if valid:
                last = seq[-1]
                tail = (last.offset + last.length) % self.length
            else:
                tail = (tail + LOG_SECTOR) % self.length
            if tail < old_tail:
                break
            old_tail = tail
        return candidate


def find_active(read_log, log_offset: int, log_length: int, log_guid: bytes,
                file_size: int, path: str) -> Replay:
    """Read the log and return its active sequence (2.3.3), or raise when the file is
    corrupt: no valid sequence although LogGuid is set, a truncated file, or a logged
    write that would land on the header section, the log itself, or absurdly far."""
    if log_length > MAX_REPLAY_LOG:
        raise UnsupportedError(f"not supported yet: replaying a pending log of"
                               f" {log_length >> 20} MiB (more than"
                               f" {MAX_REPLAY_LOG >> 20} MiB)", path)
    data = read_log(log_offset, log_length)
    entries = _Scanner(data, log_guid, path).active()
    if not entries:
        raise FormatError("the header's LogGuid says the log must be replayed, but the"
                          " log holds no valid entry sequence: corrupt", path,
                          structure="LogEntryHeader")
    head = entries[-1]
    if file_size < head.flushed_file_offset:
        raise FormatError(f"the log says the file was at least {head.flushed_file_offset}"
                          f" bytes, but it is {file_size}: truncated", path,
                          structure="LogEntryHeader", field="FlushedFileOffset")
    if head.last_file_offset > MAX_FILE_OFFSET:
        raise FormatError(f"{head.last_file_offset} is beyond any VHDX file", path,
                          structure="LogEntryHeader", field="LastFileOffset")
    limit = max(file_size, head.last_file_offset)
    rep = Replay(entries, [op for e in entries for op in e.ops])
    protected = [(0, REGION_TABLE_OFFSETS[0]), (log_offset, log_offset + log_length)]
    for kind, off, arg in rep.ops:
        end = off + (LOG_SECTOR if kind == "data" else arg)
        if end > limit:
            raise FormatError(f"a logged {kind} write at {off}..{end} is past the file's"
                              f" last offset ({limit})", path, structure="LogEntry",
                              field="FileOffset")
        for a, b in protected:
            if off < b and end > a:
                raise FormatError(f"a logged {kind} write at {off}..{end} would overwrite"
                                  " the file identifier, the headers or the log", path,
                                  structure="LogEntry", field="FileOffset")
        if kind == "zero":
            rep.sectors = {s: v for s, v in rep.sectors.items() if not off <= s < end}
            rep.zeros.append((off, end))
        else:
            rep.sectors[off] = arg
    return rep


class OverlayIO:
    """The file as it reads after an in-memory replay: zeroed ranges, then the logged
    sectors, over the file's bytes; the file reads as ``size`` bytes (LastFileOffset may
    extend it)."""

    def __init__(self, backend, replay: Replay):
        self.backend = backend
        self.replay = replay
        self.size = max(backend.size, replay.head.last_file_offset)
        self.sector_keys = sorted(replay.sectors)

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        n = max(0, min(n, self.size - offset))
        got = self.backend.readinto(offset, mv[:n])
        if got < n:
            mv[got:n] = bytes(n - got)
        end = offset + n
        for a, b in self.replay.zeros:
            lo, hi = max(a, offset), min(b, end)
            if lo < hi:
                mv[lo - offset:hi - offset] = bytes(hi - lo)
        keys = self.sector_keys
        i = bisect.bisect_left(keys, offset - LOG_SECTOR + 1)
        while i < len(keys) and keys[i] < end:
            s = keys[i]
            lo, hi = max(s, offset), min(s + LOG_SECTOR, end)
            mv[lo - offset:hi - offset] = self.replay.sectors[s][lo - s:hi - s]
            i += 1
        return n

    def read_exact(self, offset: int, length: int, what: str = "data") -> bytes:
        buf = bytearray(length)
        if self.readinto(offset, buf) != length:
            raise FormatError(f"{what} at offset {offset} (+{length}) is past the end of the"
                              f" file ({self.size} bytes): truncated", self.backend.path)
        return bytes(buf)

    def data_ranges(self, offset: int, end: int):
        """``(offset, length, is_data)`` runs of the replayed file: the file's own data
        up to its real end, less the logged zero ranges, plus the logged sectors. Past
        the real end (a LastFileOffset that extends the file) only logged sectors are
        data: a 4 MiB file whose log claims 64 TiB is not read as 64 TiB of data."""
        data = [(o, o + n) for o, n, d in
                self.backend.data_ranges(offset, min(end, self.backend.size)) if d]
        for a, b in self.replay.zeros:
            if a < end and b > offset:
                data = [p for lo, hi in data
                        for p in ((lo, min(hi, a)), (max(lo, b), hi)) if p[0] < p[1]]
        keys = self.sector_keys
        i = bisect.bisect_left(keys, offset - LOG_SECTOR + 1)
        while i < len(keys) and keys[i] < end:
            data.append((max(keys[i], offset), min(keys[i] + LOG_SECTOR, end)))
            i += 1
        pos = offset
        for lo, hi in sorted(data):
            if hi <= pos:
                continue
            if lo > pos:
                yield pos, lo - pos, False
                pos = lo
            yield pos, hi - pos, True
            pos = hi
        if pos < end:
            yield pos, end - pos, False


def build_entry(*, sequence: int, tail: int, log_guid: bytes, flushed_file_offset: int,
                last_file_offset: int, data: list[tuple[int, bytes]] = (),
                zeros: list[tuple[int, int]] = ()) -> bytes:
    """One log entry (2.3.1): descriptors for ``zeros`` (file offset, length) and
    ``data`` (file offset, 4096 bytes), then the data sectors, with its checksum."""
    count = len(zeros) + len(data)
    nd = desc_sectors(count)
    length = (nd + len(data)) * LOG_SECTOR
    buf = bytearray(length)
    buf[:LOG_HEADER_SIZE] = LogEntryHeader.build(dict(
        Signature=LOG_ENTRY_SIGNATURE, Checksum=0, EntryLength=length, Tail=tail,
        SequenceNumber=sequence, DescriptorCount=count, Reserved=0, LogGuid=log_guid,
        FlushedFileOffset=flushed_file_offset, LastFileOffset=last_file_offset))
    pos = LOG_HEADER_SIZE
    for off, n in zeros:
        buf[pos:pos + DESCRIPTOR_SIZE] = ZeroDescriptor.build(dict(
            ZeroSignature=ZERO_SIGNATURE, Reserved=0, ZeroLength=n, FileOffset=off,
            SequenceNumber=sequence))
        pos += DESCRIPTOR_SIZE
    for i, (off, sector) in enumerate(data):
        sector = bytes(sector)
        assert len(sector) == LOG_SECTOR and off % LOG_SECTOR == 0
        buf[pos:pos + DESCRIPTOR_SIZE] = DataDescriptor.build(dict(
            DataSignature=DESC_SIGNATURE, TrailingBytes=sector[4092:],
            LeadingBytes=sector[:8], FileOffset=off, SequenceNumber=sequence))
        pos += DESCRIPTOR_SIZE
        s = (nd + i) * LOG_SECTOR
        buf[s:s + LOG_SECTOR] = (DATA_SIGNATURE + struct.pack("<I", sequence >> 32)
                                 + sector[8:4092] + struct.pack("<I", sequence & 0xFFFFFFFF))
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return bytes(buf)
