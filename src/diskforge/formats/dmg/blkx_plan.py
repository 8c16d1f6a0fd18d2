"""How hdiutil divides a disk into ``blkx`` entries, from the disk's partition table.

hdiutil writes one ``blkx`` entry per partition-map structure, per partition and per
free gap, in disk order, each named ``"<name> (<type> : <n>)"``. For a GPT disk:

    Protective Master Boot Record (MBR : 0)          sector 0
    GPT Header (Primary GPT Header : 1)              sector 1
    GPT Partition Data (Primary GPT Table : 2)       the entry array
     (Apple_Free : 3)                                 a gap
    disk image (Apple_HFS : 4)                       a partition: its GPT name and type
    ...
    GPT Partition Data (Backup GPT Table : n)
    GPT Header (Backup GPT Header : n+1)

MBR disks get ``Master Boot Record (MBR : 0)`` and ``" (<type> : n)"`` per primary
partition; APM disks ``Driver Descriptor Map (DDM : 0)`` and one entry per map entry.
A disk without a (sane) table is one ``whole disk`` entry. ``ID`` is -1 for the first
entry and counts from 0 after it, as hdiutil numbers them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from construct import ConstructError

from .structs import SECTOR

_GPT_NAMES = {
    "48465300-0000-11aa-aa11-00306543ecac": "Apple_HFS",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple_APFS",
    "426f6f74-0000-11aa-aa11-00306543ecac": "Apple_Boot",
    "55465300-0000-11aa-aa11-00306543ecac": "Apple_UFS",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft Basic Data",
}
_MBR_NAMES = {0x01: "DOS_FAT_12", 0x04: "DOS_FAT_16", 0x06: "Windows_FAT_16",
              0x0E: "Windows_FAT_16", 0x0B: "Windows_FAT_32", 0x0C: "Windows_FAT_32",
              0x07: "Windows_NTFS", 0x82: "Linux_Swap", 0x83: "Linux", 0xAF: "Apple_HFS",
              0xEF: "EFI"}


@dataclass(frozen=True)
class Region:
    """A range of sectors that gets its own blkx resource."""
    start: int          # first sector
    end: int            # sector after the last
    label: str          # "<name> (<type>" ; " : n)" is added once numbered
    name: str = ""      # the full blkx name, set by plan()
    id: int = 0
    descriptor: int = 0  # BLKXTable.BlockDescriptors

    @property
    def start_byte(self) -> int:
        return self.start * SECTOR

    @property
    def end_byte(self) -> int:
        return self.end * SECTOR


class Layout:
    """The regions, in order, covering the whole disk; ``next_boundary`` is what the
    compressing threads ask (read-only, so safe to share)."""

    def __init__(self, regions: list[Region]):
        self.regions = regions
        self._ends = [r.end_byte for r in regions]

    def next_boundary(self, offset: int) -> int:
        """The first region end after ``offset`` (bytes)."""
        i = bisect.bisect_right(self._ends, offset)
        return self._ends[i] if i < len(self._ends) else self._ends[-1]


def plan(table, head: bytes, sectors: int) -> Layout:
    """The blkx regions for a disk of ``sectors`` sectors whose partition table is
    ``table`` (partitions.PartitionTable or None); ``head`` holds the disk's first bytes
    (the GPT header is read from it). Anything inconsistent, and tables in 4 KiB sectors
    (a DMG counts 512-byte sectors), give the whole-disk layout."""
    parts = None
    if table is not None and table.sector_size == SECTOR \
            and not (table.scheme == "gpt" and not table.primary_ok):
        try:
            parts = _structures(table, head, sectors)
        except (ValueError, ConstructError):
            parts = None
    if parts is None:
        return Layout([Region(0, sectors, "whole disk (unknown", "whole disk (unknown : 0)",
                              0, 0xFFFFFFFE)])
    regions = []
    pos = 0
    for start, end, label in sorted(parts):
        if start > pos:
            regions.append((pos, start, " (Apple_Free"))
        regions.append((start, end, label))
        pos = end
    if pos < sectors:
        regions.append((pos, sectors, " (Apple_Free"))
    return Layout([Region(s, e, label, f"{label} : {i})", i - 1, i)
                   for i, (s, e, label) in enumerate(regions)])


def _structures(table, head: bytes, sectors: int) -> list[tuple[int, int, str]]:
    """(start, end, label) of the partition map's own sectors and of each partition;
    ValueError when they overlap or leave the disk."""
    out: list[tuple[int, int, str]] = []
    if table.scheme == "gpt":
        from ...partitions import GptHeader
        hdr = GptHeader.parse(head[SECTOR:2 * SECTOR])
        entry_sectors = -(-hdr.number_of_partition_entries * hdr.size_of_partition_entry
                          // SECTOR)
        out += [(0, 1, "Protective Master Boot Record (MBR"),
                (1, 2, "GPT Header (Primary GPT Header"),
                (hdr.partition_entry_lba, hdr.partition_entry_lba + entry_sectors,
                 "GPT Partition Data (Primary GPT Table")]
        alt = hdr.alternate_lba
        if entry_sectors < alt < sectors:
            out += [(alt - entry_sectors, alt, "GPT Partition Data (Backup GPT Table"),
                    (alt, alt + 1, "GPT Header (Backup GPT Header")]
        for p in table.partitions:
            kind = _GPT_NAMES.get(p.type, p.type.upper())
            out.append((p.start // SECTOR, (p.start + p.size) // SECTOR,
                        f"{_clean(p.name)} ({kind}"))
    elif table.scheme == "mbr":
        out.append((0, 1, "Master Boot Record (MBR"))
        for p in table.partitions:
            if p.kind == "logical":
                continue  # inside their extended partition's entry
            code = int(p.type, 16)
            kind = _MBR_NAMES.get(code, f"0x{code:02X}")
            out.append((p.start // SECTOR, (p.start + p.size) // SECTOR, f" ({kind}"))
    elif table.scheme == "apm":
        out.append((0, 1, "Driver Descriptor Map (DDM"))
        for p in table.partitions:
            out.append((p.start // SECTOR, (p.start + p.size) // SECTOR,
                        f"{_clean(p.name)} ({_clean(p.type)}"))
    else:
        raise ValueError(table.scheme)
    out = [r for r in out if r[1] > r[0]]
    out.sort()
    pos = 0
    for start, end, _ in out:
        if start < pos or end > sectors:
            raise ValueError("overlapping or out of range")
        pos = end
    return out


def _clean(text: str) -> str:
    """A name safe inside an XML plist and a blkx name: no control characters, no
    parentheses that would confuse the ``(type : n)`` suffix readers parse."""
    return "".join(c if c.isprintable() and c not in "()" else "_" for c in text)
