"""VHD on-disk structures, as the Virtual Hard Disk Image Format Specification
(Microsoft, October 2006, version 1.0) names them.

Every multi-byte field is big-endian. Timestamps count seconds since 2000-01-01 UTC.
Both checksums are the one's complement of the byte sum of the structure with its
checksum field taken as zero.

The package's leaf: the structures, constants and the small helpers every sibling
shares (checksums, the sector bitmap's bit order, where block data is aligned). It
imports nothing from its siblings, so the other modules import one way: structs <-
geometry, locators <- device <- writer.
"""

from __future__ import annotations

import os
import re
import time

from construct import Array, Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

SECTOR = 512
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
HEADER_SIZE = 1024
VHD_EPOCH = 946684800            # 2000-01-01 00:00:00 UTC as a Unix time
FORMAT_VERSION = 0x00010000
UNUSED = 0xFFFFFFFF              # a BAT entry of a block with no storage
NO_OFFSET = 0xFFFFFFFFFFFFFFFF   # "Data Offset" of a fixed disk (qemu and Windows
#                                  write all 64 bits, the specification says 32)

MIN_BLOCK = SECTOR
MAX_BLOCK = 256 << 20       # a 64 KiB bitmap; Windows writes 2 MiB (and 512 KiB)
DATA_ALIGN = 4096           # where new block data starts, as Windows places it

# Disk Type (spec: "Hard Disk Footer Format", Disk Type)
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
DISK_TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}

# spec: "Hard Disk Footer Format"
VhdFooter = Struct(
    "cookie" / Bytes(8),
    "features" / Int32ub,
    "file_format_version" / Int32ub,
    "data_offset" / Int64ub,
    "time_stamp" / Int32ub,
    "creator_application" / Bytes(4),
    "creator_version" / Int32ub,
    "creator_host_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "disk_geometry" / Struct(
        "cylinders" / Int16ub,
        "heads" / Int8ub,
        "sectors_per_track" / Int8ub,
    ),
    "disk_type" / Int32ub,
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)
FOOTER_CHECKSUM_AT = 64

# spec: "Dynamic Disk Header Format", Parent Locator Entries
ParentLocatorEntry = Struct(
    "platform_code" / Bytes(4),
    "platform_data_space" / Int32ub,
    "platform_data_length" / Int32ub,
    "reserved" / Int32ub,
    "platform_data_offset" / Int64ub,
)

EMPTY_LOCATOR = dict(platform_code=bytes(4), platform_data_space=0, platform_data_length=0,
                     reserved=0, platform_data_offset=0)

# spec: "Dynamic Disk Header Format"
VhdDynamicDiskHeader = Struct(
    "cookie" / Bytes(8),
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,
    "header_version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_unique_id" / Bytes(16),
    "parent_time_stamp" / Int32ub,
    "reserved" / Int32ub,
    "parent_unicode_name" / Bytes(512),
    "parent_locator_entries" / Array(8, ParentLocatorEntry),
    "reserved2" / Bytes(256),
)
HEADER_CHECKSUM_AT = 36

# spec: "Block Allocation Table and Data Blocks": one big-endian sector number per block
# (the table itself is read and written whole, as an array: diskforge.byteorder)
BatEntry = Int32ub


def checksum(buf, at: int) -> int:
    """The VHD checksum of ``buf`` whose 4-byte checksum field starts at ``at``."""
    total = sum(buf) - sum(buf[at:at + 4])
    return ~total & 0xFFFFFFFF


def with_checksum(buf: bytes, at: int) -> bytes:
    out = bytearray(buf)
    out[at:at + 4] = bytes(4)
    out[at:at + 4] = checksum(out, at).to_bytes(4, "big")
    return bytes(out)


def rebuilt(struct, raw: bytes, at: int, **fields) -> bytes:
    """``raw`` (a footer or dynamic disk header) with ``fields`` changed, built through
    its structure and checksummed again: fields are never patched at raw offsets."""
    parsed = struct.parse(raw)
    parsed.update(fields)
    return with_checksum(struct.build(parsed), at)


def vhd_time(unix: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC (``SOURCE_DATE_EPOCH`` when set, for reproducible
    outputs), clamped to the field's range."""
    if unix is None:
        sde = os.environ.get("SOURCE_DATE_EPOCH", "")
        unix = int(sde) if sde.isdigit() else time.time()
    return max(0, min(0xFFFFFFFF, int(unix) - VHD_EPOCH))


def footer_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a valid footer (its cookie or its checksum), or None."""
    if raw[:8] != FOOTER_COOKIE:
        return "no 'conectix' cookie"
    stored = VhdFooter.parse(raw).checksum
    computed = checksum(raw, FOOTER_CHECKSUM_AT)
    if stored != computed:
        return f"checksum is {stored:#010x}, the footer sums to {computed:#010x}"
    return None


def build_footer(*, disk_type: int, current_size: int, geometry: tuple[int, int, int],
                 unique_id: bytes, creator: bytes, creator_version: int,
                 data_offset: int, time_stamp: int, original_size: int | None = None,
                 ) -> bytes:
    c, h, s = geometry
    raw = VhdFooter.build(dict(
        cookie=FOOTER_COOKIE, features=2, file_format_version=FORMAT_VERSION,
        data_offset=data_offset, time_stamp=time_stamp, creator_application=creator,
        creator_version=creator_version, creator_host_os=b"Wi2k",
        original_size=current_size if original_size is None else original_size,
        current_size=current_size,
        disk_geometry=dict(cylinders=c, heads=h, sectors_per_track=s),
        disk_type=disk_type, checksum=0, unique_id=unique_id, saved_state=0,
        reserved=bytes(427)))
    return with_checksum(raw, FOOTER_CHECKSUM_AT)


def build_header(*, table_offset: int, max_table_entries: int, block_size: int,
                 parent_unique_id: bytes = bytes(16), parent_time_stamp: int = 0,
                 parent_unicode_name: str = "",
                 locators: list[dict] | None = None) -> bytes:
    name = parent_unicode_name.encode("utf-16-be")[:510]
    entries = list(locators or [])
    entries += [EMPTY_LOCATOR] * (8 - len(entries))
    raw = VhdDynamicDiskHeader.build(dict(
        cookie=HEADER_COOKIE, data_offset=NO_OFFSET, table_offset=table_offset,
        header_version=FORMAT_VERSION, max_table_entries=max_table_entries,
        block_size=block_size, checksum=0, parent_unique_id=parent_unique_id,
        parent_time_stamp=parent_time_stamp, reserved=0,
        parent_unicode_name=name.ljust(512, b"\0"), parent_locator_entries=entries,
        reserved2=bytes(256)))
    return with_checksum(raw, HEADER_CHECKSUM_AT)


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap before each block: one bit per sector, padded to a
    whole sector (spec: "Block Allocation Table and Data Blocks")."""
    bitmap_bytes = -(-(block_size // SECTOR) // 8)
    return -(-bitmap_bytes // SECTOR) * SECTOR


def align_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return -(-n // unit) * unit


# -- the sector bitmap (spec: "Block Allocation Table and Data Blocks"): one bit per
# sector of the block, the most significant bit of byte 0 first ---------------------------

_ZERO_RUN = re.compile(rb"\x00+")
_ONE_RUN = re.compile(rb"\xff+")


def bitmap_runs(bitmap: bytes, first: int, count: int):
    """``(sector, n, is_set)`` runs of bits ``first..first+count`` of a sector bitmap.
    Whole 0x00/0xFF bytes are skipped a run at a time; only mixed bytes are looked at
    bit by bit."""
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
