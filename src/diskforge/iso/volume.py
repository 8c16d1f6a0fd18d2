"""The volume descriptor set and the El Torito boot catalog of an ISO image.

An ISO 9660 volume starts at byte 32768 (sector 16) with a sequence of 2048-byte volume
descriptors: the primary (type 1), supplementary ones (type 2; Joliet when its escape
sequences name UCS-2, ISO 9660:1999 "enhanced" when its version is 2), boot records
(type 0; El Torito's names the boot catalog) and a terminator (type 255). UDF's volume
recognition sequence (BEA01, NSR02/NSR03, TEA01) may follow the terminator, or stand
alone on a UDF-only disc. Everything here is read once per open, checked, and reported
(``describe``) for ``diskforge info``.

References: ECMA-119 4th edition (2019) §8 (volume descriptors), §9.1 (directory
record); "El Torito" Bootable CD-ROM Format Specification 1.0 (1995) §2; ECMA-167 3rd
edition 2/9 (volume recognition); syslinux doc/isolinux.txt (boot info table).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..blockdev import BlockDevice
from ..errors import FormatError
from .records import parse_record
from .structs import (EMULATIONS, PLATFORMS, SECTOR, VD_START, VD_TYPES, VRS_IDENTIFIERS,
                      BootInfoTable, BootRecord, SectionEntry, SectionHeader,
                      ValidationEntry, VolumeDescriptor)
from .udf import volume_identifier

MAX_DESCRIPTORS = 64          # real discs have 3-8; a hostile one may never terminate
MAX_CATALOG_ENTRIES = 1024    # 32 KiB of El Torito catalog


def text(raw: bytes, *, ucs2: bool = False) -> str:
    """A padded identifier field as text (a- and d-characters, or UCS-2 for Joliet)."""
    if ucs2:
        if len(raw) % 2:
            raw = raw[:-1]
        return raw.decode("utf-16-be", "replace").rstrip(" \0")
    return raw.decode("latin-1").rstrip(" \0")


def parse_vd_date(raw: bytes) -> str | None:
    """ECMA-119 §8.4.26.1: "YYYYMMDDHHMMSScc" digits and a signed offset in 15-minute
    units. Returns ISO 8601 text, or None for an unset (all zero) date."""
    digits = raw[:16]
    if not digits.isdigit() or digits.strip(b"0") == b"":
        return None
    s = digits.decode()
    off = struct.unpack("b", raw[16:17])[0] * 15
    sign = "+" if off >= 0 else "-"
    return (f"{s[0:4]}-{s[4:6]}-{s[6:8]}T{s[8:10]}:{s[10:12]}:{s[12:14]}.{s[14:16]}"
            f"{sign}{abs(off) // 60:02d}:{abs(off) % 60:02d}")


@dataclass
class Descriptor:
    """A volume descriptor of the set at sector 16."""
    sector: int
    kind: str               # primary, joliet, enhanced, supplementary, boot record, ...
    parsed: object = None   # the construct Container of a CD001 descriptor
    joliet_level: int = 0


@dataclass
class BootEntry:
    """An El Torito boot catalog entry."""
    platform_id: int
    bootable: bool
    media_type: int
    load_segment: int
    system_type: int
    sector_count: int
    load_rba: int
    boot_info_table: bool = False

    def to_json(self) -> dict:
        return {"platform": PLATFORMS.get(self.platform_id, "unknown"),
                "platform-id": f"0x{self.platform_id:02x}",
                "bootable": self.bootable,
                "emulation": EMULATIONS.get(self.media_type, f"unknown ({self.media_type})"),
                "load-segment": f"0x{self.load_segment:04x}",
                "system-type": f"0x{self.system_type:02x}",
                "load-size": self.sector_count,
                "image-location": self.load_rba,
                "boot-info-table": self.boot_info_table}


@dataclass
class VolumeSet:
    """What the volume descriptors say, checked."""
    descriptors: list[Descriptor] = field(default_factory=list)
    primary: object = None          # the PVD's construct Container
    joliet: object = None           # the Joliet SVD's
    joliet_level: int = 0
    enhanced: object = None         # an ISO 9660:1999 enhanced volume descriptor
    udf: str | None = None          # "NSR02"/"NSR03" when a UDF VRS is there
    boot_catalog: int | None = None
    block_size: int = SECTOR

    @property
    def volume_id(self) -> str:
        return text(self.primary.volume_identifier) if self.primary is not None else ""


def _read(dev: BlockDevice, offset: int, length: int, what: str) -> bytes:
    if offset < 0 or offset + length > dev.size:
        raise FormatError(f"{what} at byte {offset} (+{length}) is past the end of the"
                          f" image ({dev.size} bytes): truncated", dev.path)
    return dev.read(offset, length)


def read_volume_set(dev: BlockDevice) -> VolumeSet:
    """Read and check the volume descriptor set (and the UDF recognition sequence)."""
    path = dev.path
    if dev.size < VD_START + SECTOR:
        raise FormatError(f"{dev.size} bytes is too small for an ISO 9660 volume (the"
                          " volume descriptors start at byte 32768): truncated", path,
                          structure="VolumeDescriptor")
    vs = VolumeSet()
    terminated = False
    sector = 16
    for sector in range(16, 16 + MAX_DESCRIPTORS):
        if (sector + 1) * SECTOR > dev.size:
            break
        raw = dev.read(sector * SECTOR, SECTOR)
        ident = raw[1:6]
        if ident in VRS_IDENTIFIERS:
            if ident in (b"NSR02", b"NSR03"):
                vs.udf = ident.decode()
            vs.descriptors.append(Descriptor(sector, ident.decode()))
            continue
        if ident != b"CD001":
            break
        if terminated:  # a second ISO set after the terminator: not ours to read
            break
        vtype = raw[0]
        if vtype == 255:
            terminated = True
            vs.descriptors.append(Descriptor(sector, "terminator"))
        elif vtype == 0:
            br = BootRecord.parse(raw)
            d = Descriptor(sector, "boot record", br)
            vs.descriptors.append(d)
            if text(br.boot_system_identifier) == "EL TORITO SPECIFICATION":
                vs.boot_catalog = br.boot_catalog_pointer
        elif vtype in (1, 2):
            vd = VolumeDescriptor.parse(raw)
            d = Descriptor(sector, "primary" if vtype == 1 else "supplementary", vd)
            if vtype == 1 and vs.primary is None:
                vs.primary = vd
            elif vtype == 2 and vd.volume_descriptor_version == 2:
                d.kind = "enhanced"
                vs.enhanced = vs.enhanced or vd
            elif vtype == 2:
                esc = vd.escape_sequences[:3]
                level = {b"%/@": 1, b"%/C": 2, b"%/E": 3}.get(esc, 0)
                if level:
                    d.kind, d.joliet_level = "joliet", level
                    if vs.joliet is None:
                        vs.joliet, vs.joliet_level = vd, level
            vs.descriptors.append(d)
        else:
            vs.descriptors.append(Descriptor(sector, VD_TYPES.get(vtype, f"type {vtype}"),
                                             None))
    if vs.primary is None and vs.udf is None:
        if vs.descriptors and not terminated:
            raise FormatError("the volume descriptor set ends (at sector"
                              f" {sector}) without a primary descriptor or a terminator:"
                              " truncated", path, structure="VolumeDescriptor")
        raise FormatError("no primary volume descriptor and no UDF recognition sequence",
                          path, structure="VolumeDescriptor")
    if vs.primary is not None:
        if not terminated:
            raise FormatError("the volume descriptor set has no terminator (truncated or"
                              f" corrupt; read up to sector {sector})", path,
                              structure="VolumeDescriptor")
        bs = vs.primary.logical_block_size
        if bs not in (512, 1024, 2048):
            raise FormatError(f"logical block size {bs} is not 512, 1024 or 2048", path,
                              structure="PrimaryVolumeDescriptor",
                              field="logical_block_size")
        vs.block_size = bs
    return vs


def read_boot_catalog(dev: BlockDevice, vs: VolumeSet) -> list[BootEntry]:
    """The El Torito catalog's entries, validated (an empty list when there is none)."""
    if vs.boot_catalog is None:
        return []
    path = dev.path
    start = vs.boot_catalog * SECTOR
    first = _read(dev, start, 32, "El Torito boot catalog")
    try:
        ve = ValidationEntry.parse(first)
    except Exception:
        raise FormatError("the validation entry has no 01 header or 55 AA key", path,
                          structure="ValidationEntry") from None
    words = struct.unpack("<16H", first)
    if sum(words) & 0xFFFF:
        raise FormatError("checksum does not sum the entry to zero", path,
                          structure="ValidationEntry", field="checksum")
    limit = min(MAX_CATALOG_ENTRIES, (dev.size - start) // 32)
    entries: list[BootEntry] = []

    def entry_at(i: int, platform: int) -> BootEntry:
        e = SectionEntry.parse(dev.read(start + 32 * i, 32))
        return BootEntry(platform, e.boot_indicator == 0x88, e.boot_media_type & 0x0F,
                         e.load_segment, e.system_type, e.sector_count, e.load_rba)

    if limit < 2:
        raise FormatError("the catalog ends after its validation entry: truncated", path,
                          structure="InitialEntry")
    entries.append(entry_at(1, ve.platform_id))
    i = 2
    while i < limit:
        raw = dev.read(start + 32 * i, 32)
        if raw[0] not in (0x90, 0x91):
            break
        hdr = SectionHeader.parse(raw)
        i += 1
        for _ in range(hdr.number_of_section_entries):
            if i >= limit:
                break
            e = entry_at(i, hdr.platform_id)
            i += 1
            # skip section entry extensions (El Torito §2.5, indicator 0x44)
            while i < limit and dev.read(start + 32 * i, 1) == b"\x44":
                i += 1
            entries.append(e)
        if hdr.header_indicator == 0x91:
            break
    for e in entries:
        if e.media_type == 0 and e.load_rba * SECTOR + 64 <= dev.size:
            bit = BootInfoTable.parse(dev.read(e.load_rba * SECTOR + 8, 16))
            e.boot_info_table = bit.bi_pvd == 16 and bit.bi_file == e.load_rba
    return entries


def has_rock_ridge(dev: BlockDevice, vs: VolumeSet) -> bool:
    """Rock Ridge is recorded when the root's "." record carries a SUSP "SP" entry."""
    if vs.primary is None:
        return False
    root = parse_record(vs.primary.root_directory_record, 0, dev.path)
    if root is None or root.location * vs.block_size + 34 > dev.size:
        return False
    dot = parse_record(dev.read(root.location * vs.block_size, 255), 0, dev.path,
                       lenient=True)
    return dot is not None and dot.system_use[:4] == b"SP\x07\x01" \
        and dot.system_use[4:6] == b"\xbe\xef"


def describe(dev: BlockDevice) -> dict:
    """The facts ``diskforge info`` shows for an ISO: descriptors, identifiers, sizes,
    El Torito entries. Partition tables (hybrid MBR/GPT) are added by ``ops.info``."""
    vs = read_volume_set(dev)
    out: dict = {}
    descs = []
    for d in vs.descriptors:
        row: dict = {"sector": d.sector, "type": d.kind}
        if d.kind == "joliet":
            row["joliet-level"] = d.joliet_level
        if d.kind == "boot record" and d.parsed is not None:
            row["boot-system"] = text(d.parsed.boot_system_identifier)
        descs.append(row)
    out["volume-descriptors"] = descs
    if vs.primary is not None:
        p = vs.primary
        out["volume-id"] = text(p.volume_identifier)
        for key, fld in (("system-id", "system_identifier"),
                         ("volume-set-id", "volume_set_identifier"),
                         ("publisher", "publisher_identifier"),
                         ("preparer", "data_preparer_identifier"),
                         ("application", "application_identifier")):
            value = text(getattr(p, fld))
            if value:
                out[key] = value
        out["logical-block-size"] = vs.block_size
        out["volume-space-size"] = p.volume_space_size
        out["volume-size"] = p.volume_space_size * vs.block_size
        for key, fld in (("created", "volume_creation_date"),
                         ("modified", "volume_modification_date")):
            date = parse_vd_date(getattr(p, fld))
            if date:
                out[key] = date
        out["rock-ridge"] = has_rock_ridge(dev, vs)
        if p.volume_space_size * vs.block_size > dev.size:
            out["problems"] = [f"the volume is {p.volume_space_size * vs.block_size} bytes"
                               f" but the image only {dev.size}: truncated"]
    out["joliet"] = vs.joliet_level or False
    if vs.joliet is not None:
        out["joliet-volume-id"] = text(vs.joliet.volume_identifier, ucs2=True)
    out["iso9660-1999"] = vs.enhanced is not None
    out["udf"] = vs.udf or False
    if vs.udf:
        try:
            ident = volume_identifier(dev)
        except FormatError as e:
            out.setdefault("problems", []).append(f"UDF: {e.message}")
        else:
            if ident:
                out["udf-volume-id"] = ident
    if vs.boot_catalog is not None:
        out["el-torito"] = {"catalog-sector": vs.boot_catalog,
                            "entries": [e.to_json() for e in read_boot_catalog(dev, vs)]}
    return out
