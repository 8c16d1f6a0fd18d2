"""Partition tables inside a disk: MBR (primary, extended, logical), GPT, Apple APM.

Read for ``info`` on any image or device, for imaging, for ``check``, and by writers
that lay out per-partition structures (a DMG has one ``blkx`` entry per partition).
Everything read is validated before use: entry counts and sizes are bounded, EBR chains
are loop-checked, GPT header and entry-array CRCs are verified on both copies, and what
is wrong is reported in ``problems`` rather than raised, since a damaged table is a fact
to show, not a reason to refuse the disk.

References: UEFI Specification 2.10 §5.2 (MBR) and §5.3 (GPT); the Apple "Inside
Macintosh: Devices" partition map (APM); sfdisk(8) for the extended-partition chain.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

from construct import Bytes, Const, Int8ul, Int16ub, Int32ub, Int32ul, Int64ul, Struct

from .blockdev import BlockDevice

MBR_SIGNATURE = b"\x55\xaa"
EXTENDED_TYPES = {0x05, 0x0F, 0x85}
MAX_LOGICAL = 256
MAX_GPT_ENTRY_BYTES = 4 << 20   # the spec's minimum is 16 KiB; real disks use 16 KiB
MAX_APM_ENTRIES = 256

# UEFI §5.2.1, Table 5-1 / 5-2: Legacy MBR and its partition record
MbrPartitionRecord = Struct(
    "boot_indicator" / Int8ul,
    "starting_chs" / Bytes(3),
    "os_type" / Int8ul,
    "ending_chs" / Bytes(3),
    "starting_lba" / Int32ul,
    "size_in_lba" / Int32ul,
)
LegacyMbr = Struct(
    "boot_code" / Bytes(440),
    "unique_mbr_disk_signature" / Int32ul,
    "unknown" / Bytes(2),
    "partition_record" / MbrPartitionRecord[4],
    "signature" / Bytes(2),
)

# UEFI §5.3.2, Table 5-5: GPT Header
GptHeader = Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "partition_entry_lba" / Int64ul,
    "number_of_partition_entries" / Int32ul,
    "size_of_partition_entry" / Int32ul,
    "partition_entry_array_crc32" / Int32ul,
)
# UEFI §5.3.3, Table 5-6: GPT Partition Entry
GptPartitionEntry = Struct(
    "partition_type_guid" / Bytes(16),
    "unique_partition_guid" / Bytes(16),
    "starting_lba" / Int64ul,
    "ending_lba" / Int64ul,
    "attributes" / Int64ul,
    "partition_name" / Bytes(72),
)
# Inside Macintosh: Devices, "Partition Map Entry" (big-endian)
ApmPartition = Struct(
    "pmSig" / Const(b"PM"),
    "pmSigPad" / Int16ub,
    "pmMapBlkCnt" / Int32ub,
    "pmPyPartStart" / Int32ub,
    "pmPartBlkCnt" / Int32ub,
    "pmPartName" / Bytes(32),
    "pmParType" / Bytes(32),
)

GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery environment",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS/HFS+",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
    "55465300-0000-11aa-aa11-00306543ecac": "Apple UFS",
    "426f6f74-0000-11aa-aa11-00306543ecac": "Apple boot",
    "516e7cb4-6ecf-11d6-8ff8-00022d09712b": "FreeBSD data",
    "83bd6b9d-7f41-11dc-be0b-001560b84f0f": "FreeBSD boot",
}
MBR_TYPES = {
    0x00: "Empty", 0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT", 0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)", 0x27: "Hidden NTFS WinRE",
    0x82: "Linux swap", 0x83: "Linux", 0x85: "Linux extended", 0x8E: "Linux LVM",
    0xA5: "FreeBSD", 0xAF: "HFS / HFS+", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}


@dataclass
class Partition:
    """One partition of an MBR, GPT or APM table."""
    number: int                 # 1-based, as fdisk/sfdisk number them
    start: int                  # bytes from the start of the disk
    size: int                   # bytes
    type: str                   # "0x83" for MBR, the type GUID for GPT, the APM type
    type_name: str = ""
    name: str = ""              # GPT partition name, APM partition name
    guid: str = ""              # GPT unique partition GUID
    bootable: bool = False
    kind: str = "primary"       # primary, extended, logical (MBR); gpt; apm
    attributes: int = 0

    def to_json(self) -> dict:
        d = {"number": self.number, "start": self.start, "size": self.size,
             "type": self.type, "type-name": self.type_name, "kind": self.kind}
        if self.name:
            d["name"] = self.name
        if self.guid:
            d["guid"] = self.guid
        if self.bootable:
            d["bootable"] = True
        if self.attributes:
            d["attributes"] = self.attributes
        return d


@dataclass
class PartitionTable:
    """A disk's partition table."""
    scheme: str                 # "mbr", "gpt" or "apm"
    sector_size: int
    disk_id: str = ""
    partitions: list[Partition] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # GPT: which copies are valid; the protective MBR is kept for "hybrid" reporting
    primary_ok: bool = True
    backup_ok: bool = True
    mbr: "PartitionTable | None" = None

    def to_json(self) -> dict:
        d = {"scheme": self.scheme, "sector-size": self.sector_size,
             "partitions": [p.to_json() for p in self.partitions]}
        if self.disk_id:
            d["disk-id"] = self.disk_id
        if self.scheme == "gpt":
            d["primary-header-valid"] = self.primary_ok
            d["backup-header-valid"] = self.backup_ok
        if self.problems:
            d["problems"] = list(self.problems)
        if self.mbr is not None and any(p.type != "0xee" for p in self.mbr.partitions):
            d["hybrid-mbr"] = [p.to_json() for p in self.mbr.partitions]
        return d


def _guid(raw: bytes) -> str:
    """A GPT GUID as text: ``str(uuid.UUID(bytes_le=raw))``, written out because
    ``import uuid`` (with ``platform``) was 3 ms of the start-up of every command that
    reads a partition table (a DMG write does)."""
    h = (raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:16]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _read(dev: BlockDevice, offset: int, length: int) -> bytes | None:
    if offset < 0 or offset + length > dev.size:
        return None
    return dev.read(offset, length)


def read_partitions(dev: BlockDevice) -> PartitionTable | None:
    """The partition table of ``dev``: GPT when there is one (with its protective or
    hybrid MBR kept in ``.mbr``), else MBR, else APM; None when the disk has none."""
    gpt = read_gpt(dev)
    if gpt is not None:
        return gpt
    mbr = read_mbr(dev)
    if mbr is not None:
        return mbr
    return read_apm(dev)


# -- MBR ------------------------------------------------------------------------------

def read_mbr(dev: BlockDevice, sector_size: int = 512) -> PartitionTable | None:
    head = _read(dev, 0, 512)
    if head is None or head[510:512] != MBR_SIGNATURE:
        return None
    mbr = LegacyMbr.parse(head)
    records = mbr.partition_record
    # A boot sector of a partitionless FAT/NTFS volume also ends in 55 AA: accept only
    # tables whose records are plausible (status 0x00/0x80, in range, non-overlapping).
    for r in records:
        if r.os_type and r.boot_indicator not in (0x00, 0x80):
            return None
    table = PartitionTable("mbr", sector_size,
                           disk_id=f"0x{mbr.unique_mbr_disk_signature:08x}")
    disk_sectors = dev.size // sector_size
    for i, r in enumerate(records, 1):
        if r.os_type == 0 or r.size_in_lba == 0:
            continue
        kind = "extended" if r.os_type in EXTENDED_TYPES else "primary"
        if r.os_type == 0xEE:
            kind = "protective"
        table.partitions.append(Partition(
            i, r.starting_lba * sector_size, r.size_in_lba * sector_size,
            f"0x{r.os_type:02x}", MBR_TYPES.get(r.os_type, "unknown"),
            bootable=r.boot_indicator == 0x80, kind=kind))
        if r.starting_lba + r.size_in_lba > disk_sectors and r.os_type != 0xEE:
            table.problems.append(f"partition {i} ends past the end of the disk")
        if kind == "extended":
            _read_logical(dev, table, r.starting_lba, r.size_in_lba, sector_size)
    if not table.partitions:
        return None
    return table


def _read_logical(dev: BlockDevice, table: PartitionTable, ext_start: int, ext_size: int,
                  sector_size: int) -> None:
    """Follow the chain of extended boot records (EBRs) inside an extended partition."""
    ebr_lba = ext_start
    seen: set[int] = set()
    number = 5
    while len(seen) < MAX_LOGICAL:
        if ebr_lba in seen:
            table.problems.append("extended partition chain loops")
            return
        seen.add(ebr_lba)
        if not ext_start <= ebr_lba < ext_start + ext_size:
            table.problems.append(f"extended boot record at sector {ebr_lba} is outside"
                                  " the extended partition")
            return
        raw = _read(dev, ebr_lba * sector_size, 512)
        if raw is None or raw[510:512] != MBR_SIGNATURE:
            table.problems.append(f"extended boot record at sector {ebr_lba} is missing"
                                  " its 55 AA signature")
            return
        first, nxt = LegacyMbr.parse(raw).partition_record[:2]
        if first.os_type and first.size_in_lba:
            table.partitions.append(Partition(
                number, (ebr_lba + first.starting_lba) * sector_size,
                first.size_in_lba * sector_size, f"0x{first.os_type:02x}",
                MBR_TYPES.get(first.os_type, "unknown"),
                bootable=first.boot_indicator == 0x80, kind="logical"))
            number += 1
        if nxt.os_type not in EXTENDED_TYPES or nxt.size_in_lba == 0:
            return
        ebr_lba = ext_start + nxt.starting_lba
    table.problems.append(f"more than {MAX_LOGICAL} logical partitions")


# -- GPT ------------------------------------------------------------------------------

def _gpt_header_at(dev: BlockDevice, lba: int, sector_size: int):
    """(header, problem): the parsed header at ``lba`` if its signature and CRC hold."""
    raw = _read(dev, lba * sector_size, sector_size)
    if raw is None or raw[:8] != b"EFI PART":
        return None, "no GPT header signature"
    hdr = GptHeader.parse(raw)
    if not 92 <= hdr.header_size <= sector_size:
        return None, f"header size {hdr.header_size} out of range"
    check = bytearray(raw[:hdr.header_size])
    check[16:20] = b"\0\0\0\0"
    if binascii.crc32(check) != hdr.header_crc32:
        return None, "header CRC32 mismatch"
    if hdr.my_lba != lba:
        return None, f"header says it lives at LBA {hdr.my_lba}, found at {lba}"
    nbytes = hdr.number_of_partition_entries * hdr.size_of_partition_entry
    if hdr.size_of_partition_entry < 128 or hdr.size_of_partition_entry % 8 \
            or nbytes > MAX_GPT_ENTRY_BYTES:
        return None, (f"partition entry array of {hdr.number_of_partition_entries} x "
                      f"{hdr.size_of_partition_entry} bytes is out of range")
    return hdr, None


def _gpt_entries(dev: BlockDevice, hdr, sector_size: int):
    nbytes = hdr.number_of_partition_entries * hdr.size_of_partition_entry
    raw = _read(dev, hdr.partition_entry_lba * sector_size, nbytes)
    if raw is None:
        return None, "partition entry array is past the end of the disk"
    if binascii.crc32(raw) != hdr.partition_entry_array_crc32:
        return None, "partition entry array CRC32 mismatch"
    return raw, None


def read_gpt(dev: BlockDevice) -> PartitionTable | None:
    for sector_size in (512, 4096):
        table = _read_gpt(dev, sector_size)
        if table is not None:
            return table
    return None


def _read_gpt(dev: BlockDevice, sector_size: int) -> PartitionTable | None:
    if dev.size < 3 * sector_size:
        return None
    primary, p_problem = _gpt_header_at(dev, 1, sector_size)
    entries = e_problem = None
    if primary is not None:
        entries, e_problem = _gpt_entries(dev, primary, sector_size)
    last_lba = dev.size // sector_size - 1
    backup_lba = primary.alternate_lba if primary is not None else last_lba
    backup, b_problem = _gpt_header_at(dev, backup_lba, sector_size)
    if backup is None and backup_lba != last_lba:
        backup, b_problem = _gpt_header_at(dev, last_lba, sector_size)
    b_entries = be_problem = None
    if backup is not None:
        b_entries, be_problem = _gpt_entries(dev, backup, sector_size)
    if primary is None and backup is None:
        raw = _read(dev, sector_size, 8)
        if raw == b"EFI PART":  # a header is there but broken, and no backup
            table = PartitionTable("gpt", sector_size, primary_ok=False, backup_ok=False)
            table.problems.append(f"primary GPT: {p_problem}; backup GPT: {b_problem}")
            return table
        return None
    table = PartitionTable("gpt", sector_size)
    table.primary_ok = primary is not None and entries is not None
    table.backup_ok = backup is not None and b_entries is not None
    if not table.primary_ok:
        table.problems.append(f"primary GPT is corrupt ({p_problem or e_problem});"
                              " using the backup")
    if not table.backup_ok:
        table.problems.append(f"backup GPT is corrupt or missing ({b_problem or be_problem})")
    if table.primary_ok and table.backup_ok and backup_lba != last_lba:
        table.problems.append("backup GPT is not at the end of the disk (resized? use"
                              " --fix-gpt)")
    hdr, raw = (primary, entries) if table.primary_ok else (backup, b_entries)
    if hdr is None or raw is None:
        return table
    table.disk_id = _guid(hdr.disk_guid)
    size = hdr.size_of_partition_entry
    disk_sectors = dev.size // sector_size
    for i in range(hdr.number_of_partition_entries):
        e = GptPartitionEntry.parse(raw[i * size:i * size + 128])
        if e.partition_type_guid == bytes(16):
            continue
        type_guid = _guid(e.partition_type_guid)
        name = e.partition_name.decode("utf-16-le", "replace").split("\0", 1)[0]
        if e.ending_lba < e.starting_lba:
            table.problems.append(f"partition {i + 1} ends before it starts")
            continue
        if e.ending_lba >= disk_sectors:
            table.problems.append(f"partition {i + 1} ends past the end of the disk")
        table.partitions.append(Partition(
            i + 1, e.starting_lba * sector_size,
            (e.ending_lba - e.starting_lba + 1) * sector_size, type_guid,
            GPT_TYPES.get(type_guid, "unknown"), name=name,
            guid=_guid(e.unique_partition_guid), kind="gpt", attributes=e.attributes))
    table.mbr = read_mbr(dev, 512)
    return table


# -- APM ------------------------------------------------------------------------------

def read_apm(dev: BlockDevice) -> PartitionTable | None:
    head = _read(dev, 0, 512)
    if head is None or head[:2] != b"ER":
        return None
    block = int.from_bytes(head[2:4], "big") or 512
    if block not in (512, 1024, 2048, 4096):
        block = 512
    first = _read(dev, block, 512)
    if first is None or first[:2] != b"PM":
        return None
    count = ApmPartition.parse(first).pmMapBlkCnt
    table = PartitionTable("apm", block)
    if not 1 <= count <= MAX_APM_ENTRIES:
        table.problems.append(f"partition map claims {count} entries")
        count = min(max(count, 1), MAX_APM_ENTRIES)
    for i in range(1, count + 1):
        raw = _read(dev, i * block, 512)
        if raw is None or raw[:2] != b"PM":
            table.problems.append(f"partition map entry {i} is missing")
            break
        e = ApmPartition.parse(raw)
        table.partitions.append(Partition(
            i, e.pmPyPartStart * block, e.pmPartBlkCnt * block,
            e.pmParType.split(b"\0", 1)[0].decode("ascii", "replace"),
            e.pmParType.split(b"\0", 1)[0].decode("ascii", "replace"),
            name=e.pmPartName.split(b"\0", 1)[0].decode("mac_roman", "replace"),
            kind="apm"))
    return table


def format_human(table: PartitionTable) -> list[str]:
    """Lines for ``diskforge info``: a table like fdisk -l's."""
    lines = [f"Partition table: {table.scheme.upper()}"
             + (f", disk id {table.disk_id}" if table.disk_id else "")
             + f", {table.sector_size}-byte sectors"]
    lines.append(f"    {'#':>3}  {'start':>12}  {'size':>12}  {'type':<38} name")
    for p in table.partitions:
        flag = "*" if p.bootable else " "
        typ = f"{p.type_name} ({p.type})" if p.type_name and p.type_name != p.type \
            else p.type
        lines.append(f"   {flag}{p.number:>3}  {p.start:>12}  {p.size:>12}  {typ:<38}"
                     f" {p.name}".rstrip())
    for problem in table.problems:
        lines.append(f"    problem: {problem}")
    return lines


# -- repair ---------------------------------------------------------------------------

def relocate_backup_gpt(dev: BlockDevice) -> int:
    """Move the backup GPT to the end of a (resized) disk, as ``sgdisk -e`` does: the
    backup entry array and header go to the last sectors, the primary header's
    alternate and last-usable LBAs follow, and the protective MBR covers the disk.
    Returns the new backup header LBA. The disk must be open writable."""
    from .errors import FormatError
    table = read_gpt(dev)
    if table is None:
        raise FormatError("no GPT on this disk", dev.path)
    ss = table.sector_size
    primary, problem = _gpt_header_at(dev, 1, ss)
    if primary is None:
        raise FormatError(f"primary GPT header is not valid ({problem}); cannot relocate"
                          " the backup from it", dev.path)
    entries, problem = _gpt_entries(dev, primary, ss)
    if entries is None:
        raise FormatError(f"primary GPT entries are not valid ({problem})", dev.path)
    last = dev.size // ss - 1
    entry_sectors = -(-len(entries) // ss)
    backup_entries = last - entry_sectors
    last_usable = backup_entries - 1
    for p in table.partitions:
        if (p.start + p.size) // ss - 1 > last_usable:
            raise FormatError(f"partition {p.number} ends past the new last usable sector"
                              f" {last_usable}", dev.path)
    raw = bytearray(dev.read(ss, ss))

    def seal(hdr: bytearray) -> bytes:
        hdr[16:20] = b"\0\0\0\0"
        crc = binascii.crc32(bytes(hdr[:primary.header_size]))
        hdr[16:20] = crc.to_bytes(4, "little")
        return bytes(hdr)

    hdr = bytearray(raw)
    hdr[32:40] = last.to_bytes(8, "little")            # alternate_lba
    hdr[48:56] = last_usable.to_bytes(8, "little")     # last_usable_lba
    new_primary = seal(hdr)
    backup = bytearray(hdr)
    backup[24:32] = last.to_bytes(8, "little")         # my_lba
    backup[32:40] = (1).to_bytes(8, "little")          # alternate_lba
    backup[72:80] = backup_entries.to_bytes(8, "little")  # partition_entry_lba
    new_backup = seal(backup)
    padded = entries + bytes(entry_sectors * ss - len(entries))
    dev.write(backup_entries * ss, padded)
    dev.write(last * ss, new_backup)
    dev.write(ss, new_primary)
    mbr = bytearray(dev.read(0, 512))
    if mbr[510:512] == MBR_SIGNATURE and mbr[446 + 4] == 0xEE:
        mbr[446 + 12:446 + 16] = min(dev.size // 512 - 1, 0xFFFFFFFF).to_bytes(4, "little")
        dev.write(0, bytes(mbr))
    dev.flush()
    return last
