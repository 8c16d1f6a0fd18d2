"""ECMA-119 directory records and recording dates.

A directory is a run of variable-length records packed into 2048-byte logical sectors;
a record never crosses a sector boundary (ECMA-119 §6.8.1.1) and a zero length byte
means "the rest of this sector is padding". Records are parsed with ``struct`` rather
than construct: a directory of thousands of files is a hot path (construct would cost
~30 µs a record). Every length is checked against the sector and the record before use.

References: ECMA-119 4th edition §9.1 (directory record), §9.1.5 (recording date),
§9.1.6 (file flags).
"""

from __future__ import annotations

import calendar
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..blockdev import BlockDevice
from ..errors import FormatError
from .structs import FLAG_DIRECTORY, SECTOR, DirectoryRecord

MAX_DIRECTORY_BYTES = 256 << 20   # no real directory comes close; bounds a hostile one


@dataclass(slots=True)
class Record:
    """One parsed directory record (the fields of ECMA-119 §9.1 that are used)."""
    offset: int            # where the record is in the image, for errors
    length: int
    ext_attr_length: int
    location: int
    data_length: int
    date: bytes
    flags: int
    file_unit_size: int
    interleave_gap: int
    name: bytes
    system_use: bytes

    @property
    def is_dir(self) -> bool:
        return bool(self.flags & FLAG_DIRECTORY)


def parse_record(buf, pos: int, path: str | None, *, limit: int | None = None,
                 lenient: bool = False, where: int = 0) -> Record | None:
    """The record at ``buf[pos:]`` (None at a zero length byte). ``limit`` is where the
    record's sector ends; ``where`` the record's byte offset in the image, for errors."""
    if limit is None:
        limit = len(buf)
    if pos >= limit or buf[pos] == 0:
        return None
    length = buf[pos]
    if length < 34 or pos + length > limit:
        if lenient:
            return None
        if length < 34:
            raise FormatError(f"length {length} at byte {where} is below the minimum of"
                              " 34", path, structure="DirectoryRecord", field="length")
        raise FormatError(f"length {length} at byte {where} runs past the end of its"
                          " sector", path, structure="DirectoryRecord", field="length")
    (length, ext_attr, location, data_length, date, flags, unit, gap, _seq,
     name_len) = DirectoryRecord.unpack_from(buf, pos)
    if 33 + name_len > length:
        if lenient:
            return None
        raise FormatError(f"file identifier of {name_len} bytes at byte {where} does not"
                          f" fit its {length}-byte record", path, structure="DirectoryRecord",
                          field="length_of_file_identifier")
    name = bytes(buf[pos + 33:pos + 33 + name_len])
    su_start = 33 + name_len + (1 - name_len % 2)  # a padding byte after an even name
    system_use = bytes(buf[pos + su_start:pos + length]) if su_start < length else b""
    return Record(where, length, ext_attr, location, data_length, date, flags, unit, gap,
                  name, system_use)


def iter_directory(dev: BlockDevice, location: int, length: int, block_size: int,
                   path: str | None) -> Iterator[Record]:
    """Every record of the directory whose extent starts at block ``location`` and holds
    ``length`` bytes, "." and ".." included, checked against the image and its sectors."""
    start = location * block_size
    if length > MAX_DIRECTORY_BYTES:
        raise FormatError(f"directory at block {location} claims {length} bytes (more than"
                          f" {MAX_DIRECTORY_BYTES >> 20} MiB)", path,
                          structure="DirectoryRecord", field="data_length")
    if location <= 0 or start + length > dev.size:
        raise FormatError(f"directory extent at block {location} (+{length} bytes) is"
                          f" outside the image ({dev.size} bytes)", path,
                          structure="DirectoryRecord", field="location_of_extent")
    end = start + length
    chunk = 32 * SECTOR
    off = start
    while off < end:
        n = min(chunk, -(-(end - off) // SECTOR) * SECTOR, dev.size - off)
        buf = dev.read(off, n)
        for sec in range(0, n, SECTOR):
            limit = min(sec + SECTOR, end - off, n)
            pos = sec
            while pos < limit:
                rec = parse_record(buf, pos, path, limit=min(sec + SECTOR, n),
                                   where=off + pos)
                if rec is None:
                    break
                yield rec
                pos += rec.length
        off += n


def record_date(raw: bytes) -> float | None:
    """ECMA-119 §9.1.5: years since 1900, month, day, hour, minute, second, and the
    offset from UTC in 15-minute units. Seconds since the epoch, or None if unset."""
    if len(raw) < 7:
        return None
    year, month, day, hour, minute, second = raw[0], raw[1], raw[2], raw[3], raw[4], raw[5]
    offset = struct.unpack("b", raw[6:7])[0]
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60
            and second < 61):
        return None
    try:
        t = calendar.timegm((1900 + year, month, day, hour, minute, min(second, 59), 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    return float(t - offset * 15 * 60)


def long_date(raw: bytes) -> float | None:
    """ECMA-119 §8.4.26.1, the 17-byte "YYYYMMDDHHMMSScc" form (Rock Ridge TF long
    form): seconds since the epoch, or None if unset."""
    digits = raw[:16]
    if len(raw) < 17 or not digits.isdigit() or digits.strip(b"0") == b"":
        return None
    s = digits.decode()
    offset = struct.unpack("b", raw[16:17])[0]
    try:
        t = calendar.timegm((int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]),
                             int(s[10:12]), min(int(s[12:14]), 59), 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    return t + int(s[14:16]) / 100 - offset * 15 * 60
