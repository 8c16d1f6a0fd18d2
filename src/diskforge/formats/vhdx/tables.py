"""Parsing and building the VHDX header section and metadata region.

Each ``parse_*`` validates what it reads (signatures, checksums, counts, offsets and
lengths against the file) before anything uses it, and raises a FormatError naming the
structure and field; each ``build_*`` produces the exact bytes to write, checksum
included.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import FormatError, UnsupportedError
from .crc32c import crc32c
from .structs import (ALIGNMENT, BAT_GUID, FILE_PARAMETERS_GUID, HAS_PARENT, HEADER_SECTION_SIZE,
                      HEADER_SIGNATURE, HEADER_SIZE, IS_REQUIRED, IS_VIRTUAL_DISK,
                      LEAVE_BLOCKS_ALLOCATED, LOGICAL_SECTOR_SIZE_GUID, MAX_BLOCK,
                      MAX_DISK_SIZE, MAX_TABLE_ENTRIES, METADATA_GUID, METADATA_NAMES,
                      METADATA_SIGNATURE, METADATA_TABLE_SIZE, MIN_BLOCK, PARENT_LOCATOR_GUID,
                      PHYSICAL_SECTOR_SIZE_GUID, REGION_SIGNATURE, REGION_TABLE_SIZE,
                      SECTOR_SIZES, VHDX_PARENT_LOCATOR_TYPE, VIRTUAL_DISK_ID_GUID,
                      VIRTUAL_DISK_SIZE_GUID, FileParameters, Header, MetadataTableEntry,
                      MetadataTableHeader, ParentLocatorEntry, ParentLocatorHeader,
                      RegionTableEntry, RegionTableHeader, guid_text)


def _with_checksum(buf: bytearray) -> bytes:
    buf[4:8] = bytes(4)
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return bytes(buf)


def checksum_ok(raw: bytes) -> bool:
    buf = bytearray(raw)
    (stored,) = struct.unpack_from("<I", buf, 4)
    buf[4:8] = bytes(4)
    return crc32c(buf) == stored


# -- 2.2.2 headers ------------------------------------------------------------------------

def header_problem(raw: bytes) -> tuple[str | None, str] | None:
    """``(field, reason)`` when ``raw`` is not a valid header, else None."""
    if len(raw) < HEADER_SIZE:
        return None, "truncated"
    if raw[:4] != HEADER_SIGNATURE:
        return "Signature", f"signature is {bytes(raw[:4])!r}, not b'head'"
    if not checksum_ok(raw[:HEADER_SIZE]):
        return "Checksum", "checksum mismatch"
    return None


def parse_header(raw: bytes):
    """A header's fields, or the reason it is not valid (as a string)."""
    problem = header_problem(raw)
    return Header.parse(raw) if problem is None else problem[1]


def build_header(h) -> bytes:
    buf = bytearray(HEADER_SIZE)
    buf[:Header.sizeof()] = Header.build(dict(
        Signature=HEADER_SIGNATURE, Checksum=0, SequenceNumber=h.SequenceNumber,
        FileWriteGuid=h.FileWriteGuid, DataWriteGuid=h.DataWriteGuid, LogGuid=h.LogGuid,
        LogVersion=h.LogVersion, Version=h.Version, LogLength=h.LogLength,
        LogOffset=h.LogOffset))
    return _with_checksum(buf)


# -- 2.2.3 region table -------------------------------------------------------------------

@dataclass
class Region:
    """A region table entry (the BAT, the metadata region)."""
    guid: bytes
    offset: int
    length: int
    required: bool


def parse_region_table(raw: bytes, path: str, file_size: int) -> dict[bytes, Region]:
    if raw[:4] != REGION_SIGNATURE:
        raise FormatError(f"signature is {bytes(raw[:4])!r}, not b'regi'", path,
                          structure="RegionTableHeader", field="Signature")
    if not checksum_ok(raw):
        raise FormatError("checksum mismatch", path, structure="RegionTableHeader",
                          field="Checksum")
    h = RegionTableHeader.parse(raw)
    if h.EntryCount > MAX_TABLE_ENTRIES:
        raise FormatError(f"{h.EntryCount} entries (at most {MAX_TABLE_ENTRIES})", path,
                          structure="RegionTableHeader", field="EntryCount")
    out: dict[bytes, Region] = {}
    for i in range(h.EntryCount):
        e = RegionTableEntry.parse(raw[16 + 32 * i:48 + 32 * i])
        where = f"RegionTableEntry[{i}]"
        if e.Guid in out:
            raise FormatError(f"region {guid_text(e.Guid)} is listed twice", path,
                              structure=where, field="Guid")
        known = e.Guid in (BAT_GUID, METADATA_GUID)
        if not known and e.Required & 1:
            raise UnsupportedError(f"not supported yet: required region"
                                   f" {guid_text(e.Guid)} is unknown to diskforge", path)
        if e.FileOffset < HEADER_SECTION_SIZE or e.FileOffset % ALIGNMENT:
            raise FormatError(f"{e.FileOffset} is not a 1 MiB multiple past the header"
                              " section", path, structure=where, field="FileOffset")
        if e.Length == 0 or e.Length % ALIGNMENT:
            raise FormatError(f"{e.Length} is not a positive multiple of 1 MiB", path,
                              structure=where, field="Length")
        if known and e.FileOffset + e.Length > file_size:
            raise FormatError(f"region {e.FileOffset}+{e.Length} is past the end of the"
                              f" file ({file_size} bytes)", path, structure=where,
                              field="FileOffset")
        out[e.Guid] = Region(e.Guid, e.FileOffset, e.Length, bool(e.Required & 1))
    for g, name in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
        if g not in out:
            raise FormatError(f"no {name} region", path, structure="RegionTableHeader")
    spans = sorted((r.offset, r.offset + r.length) for r in out.values())
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"regions at {a0} and {b0} overlap", path,
                              structure="RegionTableEntry", field="FileOffset")
    return out


def build_region_table(regions: list[Region]) -> bytes:
    buf = bytearray(REGION_TABLE_SIZE)
    buf[:16] = RegionTableHeader.build(dict(Signature=REGION_SIGNATURE, Checksum=0,
                                            EntryCount=len(regions), Reserved=0))
    for i, r in enumerate(regions):
        buf[16 + 32 * i:48 + 32 * i] = RegionTableEntry.build(dict(
            Guid=r.guid, FileOffset=r.offset, Length=r.length, Required=int(r.required)))
    return _with_checksum(buf)


# -- 2.6 metadata region ------------------------------------------------------------------

@dataclass
class Metadata:
    """The metadata region's items that reading and writing need."""
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    virtual_disk_id: bytes | None
    parent_locator: dict[str, str] | None = None
    locator_type: bytes | None = None
    items: list[str] = field(default_factory=list)


KNOWN_REQUIRED = (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, LOGICAL_SECTOR_SIZE_GUID,
                  PHYSICAL_SECTOR_SIZE_GUID)


def parse_metadata(read, region, path: str) -> Metadata:
    """``read(offset, length)`` reads the file; ``region`` is the metadata Region."""
    table = read(region.offset, METADATA_TABLE_SIZE, "metadata table")
    if table[:8] != METADATA_SIGNATURE:
        raise FormatError(f"signature is {bytes(table[:8])!r}, not b'metadata'", path,
                          structure="MetadataTableHeader", field="Signature")
    h = MetadataTableHeader.parse(table)
    if h.EntryCount > MAX_TABLE_ENTRIES:
        raise FormatError(f"{h.EntryCount} entries (at most {MAX_TABLE_ENTRIES})", path,
                          structure="MetadataTableHeader", field="EntryCount")
    values: dict[bytes, bytes] = {}
    for i in range(h.EntryCount):
        e = MetadataTableEntry.parse(table[32 + 32 * i:64 + 32 * i])
        where = f"MetadataTableEntry[{i}]"
        is_user = e.Flags & 1
        if e.ItemId not in METADATA_NAMES or is_user:
            if e.Flags & IS_REQUIRED:
                raise UnsupportedError(f"not supported yet: required metadata item"
                                       f" {guid_text(e.ItemId)} is unknown to diskforge",
                                       path)
            continue
        if e.ItemId in values:
            raise FormatError(f"metadata item {METADATA_NAMES[e.ItemId]} is listed twice",
                              path, structure=where, field="ItemId")
        if e.Length > 1 << 20 or (e.Length and (e.Offset < METADATA_TABLE_SIZE
                                                or e.Offset + e.Length > region.length)):
            raise FormatError(f"item {e.Offset}+{e.Length} is outside the metadata region"
                              f" ({region.length} bytes)", path, structure=where,
                              field="Offset")
        values[e.ItemId] = read(region.offset + e.Offset, e.Length,
                                METADATA_NAMES[e.ItemId]) if e.Length else b""

    def item(g: bytes, size: int) -> bytes:
        name = METADATA_NAMES[g]
        v = values.get(g)
        if v is None:
            raise FormatError(f"the required metadata item {name} is missing", path,
                              structure="MetadataTableHeader")
        if len(v) < size:
            raise FormatError(f"{len(v)} bytes, needs {size}", path, structure=name)
        return v

    fp = FileParameters.parse(item(FILE_PARAMETERS_GUID, 8))
    bs = fp.BlockSize
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise FormatError(f"{bs} is not a power of two between 1 MiB and 256 MiB", path,
                          structure="FileParameters", field="BlockSize")
    (size,) = struct.unpack_from("<Q", item(VIRTUAL_DISK_SIZE_GUID, 8))
    (lss,) = struct.unpack_from("<I", item(LOGICAL_SECTOR_SIZE_GUID, 4))
    (pss,) = struct.unpack_from("<I", item(PHYSICAL_SECTOR_SIZE_GUID, 4))
    if lss not in SECTOR_SIZES:
        raise FormatError(f"{lss} is neither 512 nor 4096", path,
                          structure="LogicalSectorSize", field="LogicalSectorSize")
    if pss not in SECTOR_SIZES:
        raise FormatError(f"{pss} is neither 512 nor 4096", path,
                          structure="PhysicalSectorSize", field="PhysicalSectorSize")
    if size > MAX_DISK_SIZE:
        raise FormatError(f"{size} bytes is more than the 64 TiB VHDX maximum", path,
                          structure="VirtualDiskSize", field="VirtualDiskSize")
    disk_id = values.get(VIRTUAL_DISK_ID_GUID)
    md = Metadata(bs, bool(fp.Flags & LEAVE_BLOCKS_ALLOCATED), bool(fp.Flags & HAS_PARENT),
                  size, lss, pss, bytes(disk_id[:16]) if disk_id and len(disk_id) >= 16
                  else None, items=[METADATA_NAMES[g] for g in values])
    if md.has_parent:
        raw = values.get(PARENT_LOCATOR_GUID)
        if raw is None:
            raise FormatError("HasParent is set but there is no parent locator", path,
                              structure="FileParameters", field="HasParent")
        md.locator_type, md.parent_locator = parse_parent_locator(raw, path)
    return md


def parse_parent_locator(raw: bytes, path: str) -> tuple[bytes, dict[str, str]]:
    """2.6.2.6: the locator type and its key/value pairs (UTF-16LE strings)."""
    if len(raw) < 20:
        raise FormatError(f"{len(raw)} bytes, too short", path, structure="ParentLocator")
    h = ParentLocatorHeader.parse(raw)
    if h.LocatorType != VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedError(f"not supported yet: parent locator type"
                               f" {guid_text(h.LocatorType)} (only VHDX parents)", path)
    if 20 + 12 * h.KeyValueCount > len(raw):
        raise FormatError(f"{h.KeyValueCount} entries do not fit in {len(raw)} bytes", path,
                          structure="ParentLocatorHeader", field="KeyValueCount")
    out: dict[str, str] = {}
    for i in range(h.KeyValueCount):
        e = ParentLocatorEntry.parse(raw[20 + 12 * i:32 + 12 * i])
        where = f"ParentLocatorEntry[{i}]"
        for off, n, what in ((e.KeyOffset, e.KeyLength, "KeyOffset"),
                             (e.ValueOffset, e.ValueLength, "ValueOffset")):
            if off + n > len(raw) or n % 2:
                raise FormatError(f"{off}+{n} is outside the {len(raw)}-byte locator",
                                  path, structure=where, field=what)
        try:
            key = raw[e.KeyOffset:e.KeyOffset + e.KeyLength].decode("utf-16-le")
            value = raw[e.ValueOffset:e.ValueOffset + e.ValueLength].decode("utf-16-le")
        except UnicodeDecodeError:
            raise FormatError("not valid UTF-16", path, structure=where) from None
        out[key] = value
    return h.LocatorType, out


def build_parent_locator(entries: dict[str, str]) -> bytes:
    head = bytearray(ParentLocatorHeader.build(dict(
        LocatorType=VHDX_PARENT_LOCATOR_TYPE, Reserved=0, KeyValueCount=len(entries))))
    table = bytearray()
    strings = bytearray()
    base = 20 + 12 * len(entries)
    for k, v in entries.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        ko = base + len(strings)
        strings += kb
        vo = base + len(strings)
        strings += vb
        table += ParentLocatorEntry.build(dict(KeyOffset=ko, ValueOffset=vo,
                                               KeyLength=len(kb), ValueLength=len(vb)))
    return bytes(head + table + strings)


def build_metadata_region(md: Metadata, length: int = ALIGNMENT) -> bytes:
    """The metadata table and its items, packed from offset 64 KiB (what Hyper-V does)."""
    items = [
        (FILE_PARAMETERS_GUID, FileParameters.build(dict(
            BlockSize=md.block_size,
            Flags=(LEAVE_BLOCKS_ALLOCATED if md.leave_blocks_allocated else 0)
            | (HAS_PARENT if md.has_parent else 0))), IS_REQUIRED),
        (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", md.virtual_size),
         IS_REQUIRED | IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_SIZE_GUID, struct.pack("<I", md.logical_sector_size),
         IS_REQUIRED | IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_SIZE_GUID, struct.pack("<I", md.physical_sector_size),
         IS_REQUIRED | IS_VIRTUAL_DISK),
        (VIRTUAL_DISK_ID_GUID, md.virtual_disk_id, IS_REQUIRED | IS_VIRTUAL_DISK),
    ]
    if md.has_parent:
        items.append((PARENT_LOCATOR_GUID, build_parent_locator(md.parent_locator),
                      IS_REQUIRED))
    buf = bytearray(length)
    buf[:32] = MetadataTableHeader.build(dict(Signature=METADATA_SIGNATURE, Reserved=0,
                                              EntryCount=len(items), Reserved2=bytes(20)))
    pos = METADATA_TABLE_SIZE
    for i, (g, value, flags) in enumerate(items):
        buf[32 + 32 * i:64 + 32 * i] = MetadataTableEntry.build(dict(
            ItemId=g, Offset=pos, Length=len(value), Flags=flags, Reserved2=0))
        buf[pos:pos + len(value)] = value
        pos += len(value)
    return bytes(buf)
