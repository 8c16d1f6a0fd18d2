"""The on-disk structures of MS-VHDX, named as the specification names them.

Section numbers refer to [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format".
Every multi-byte value is little-endian; GUIDs are stored in Microsoft's mixed-endian
binary form (``uuid.UUID(bytes_le=...)``), converted here without importing uuid (it
costs start-up time for every command that opens a VHDX).

The package's leaf (every format's ``structs.py`` holds its construct structures and
specification constants): it imports nothing from its siblings.
"""

from __future__ import annotations

import os

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# 2.2: the header section is 1 MiB of five 64 KiB items
FILE_IDENTIFIER_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION_SIZE = 1 * MiB
ALIGNMENT = 1 * MiB            # 2.1: every object is 1 MiB aligned
LOG_SECTOR = 4 * KiB           # 2.3
METADATA_TABLE_SIZE = 64 * KiB  # 2.6
MAX_TABLE_ENTRIES = 2047       # region and metadata tables
SECTOR_BITMAP_BLOCK = 1 * MiB  # 2.4
SECTORS_PER_BITMAP = 1 << 23   # 2.4: bits in one sector bitmap block
MIN_BLOCK, MAX_BLOCK = 1 * MiB, 256 * MiB   # 2.6.2.1
MAX_DISK_SIZE = 64 * TiB                    # 2.6.2.2
SECTOR_SIZES = (512, 4096)                  # 2.6.2.4, 2.6.2.5

# 2.5.1.1 payload BAT entry states, 2.5.1.2 sector bitmap states
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5  # the value of UNMAPPED in the v0.95 draft (qemu reads it)
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
BAT_STATE_MASK = 7
BAT_OFFSET_SHIFT = 20          # FileOffsetMB occupies bits 20..63


def guid(text: str) -> bytes:
    """The binary (bytes_le) form of a GUID written as text in the specification."""
    b = bytes.fromhex(text.replace("-", "").strip("{}"))
    return b[3::-1] + b[5:3:-1] + b[7:5:-1] + b[8:]


def new_guid() -> bytes:
    """A random (version 4) GUID in binary form."""
    b = bytearray(os.urandom(16))
    b[7] = (b[7] & 0x0F) | 0x40     # version, in the little-endian third field
    b[8] = (b[8] & 0x3F) | 0x80     # variant
    return bytes(b)


# 2.2.3 known regions
BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
# 2.6.2 known metadata items
FILE_PARAMETERS_GUID = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID_GUID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")   # "page 83 data"
LOGICAL_SECTOR_SIZE_GUID = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
# 2.6.2.6.3
VHDX_PARENT_LOCATOR_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ZERO_GUID = bytes(16)

METADATA_NAMES = {FILE_PARAMETERS_GUID: "FileParameters",
                  VIRTUAL_DISK_SIZE_GUID: "VirtualDiskSize",
                  VIRTUAL_DISK_ID_GUID: "VirtualDiskId",
                  LOGICAL_SECTOR_SIZE_GUID: "LogicalSectorSize",
                  PHYSICAL_SECTOR_SIZE_GUID: "PhysicalSectorSize",
                  PARENT_LOCATOR_GUID: "ParentLocator"}

# 2.2.1 File Type Identifier
FileTypeIdentifier = Struct(
    "Signature" / Bytes(8),        # b"vhdxfile"
    "Creator" / Bytes(512),        # UTF-16LE, optional, diagnostic only
)
FILE_SIGNATURE = b"vhdxfile"

# 2.2.2 Headers (4 KiB; the checksum covers all 4 KiB)
Header = Struct(
    "Signature" / Bytes(4),        # b"head"
    "Checksum" / Int32ul,
    "SequenceNumber" / Int64ul,
    "FileWriteGuid" / Bytes(16),
    "DataWriteGuid" / Bytes(16),
    "LogGuid" / Bytes(16),
    "LogVersion" / Int16ul,
    "Version" / Int16ul,
    "LogLength" / Int32ul,
    "LogOffset" / Int64ul,
)
HEADER_SIGNATURE = b"head"

# 2.2.3.1 Region Table Header, 2.2.3.2 Region Table Entry
RegionTableHeader = Struct(
    "Signature" / Bytes(4),        # b"regi"
    "Checksum" / Int32ul,
    "EntryCount" / Int32ul,
    "Reserved" / Int32ul,
)
RegionTableEntry = Struct(
    "Guid" / Bytes(16),
    "FileOffset" / Int64ul,
    "Length" / Int32ul,
    "Required" / Int32ul,          # bit 0
)
REGION_SIGNATURE = b"regi"

# 2.3.1.1 Entry Header, 2.3.1.2 Zero Descriptor, 2.3.1.3 Data Descriptor,
# 2.3.1.4 Data Sector
LogEntryHeader = Struct(
    "Signature" / Bytes(4),        # b"loge"
    "Checksum" / Int32ul,
    "EntryLength" / Int32ul,
    "Tail" / Int32ul,
    "SequenceNumber" / Int64ul,
    "DescriptorCount" / Int32ul,
    "Reserved" / Int32ul,
    "LogGuid" / Bytes(16),
    "FlushedFileOffset" / Int64ul,
    "LastFileOffset" / Int64ul,
)
LOG_ENTRY_SIGNATURE = b"loge"
ZeroDescriptor = Struct(
    "ZeroSignature" / Bytes(4),    # b"zero"
    "Reserved" / Int32ul,
    "ZeroLength" / Int64ul,
    "FileOffset" / Int64ul,
    "SequenceNumber" / Int64ul,
)
DataDescriptor = Struct(
    "DataSignature" / Bytes(4),    # b"desc"
    "TrailingBytes" / Bytes(4),
    "LeadingBytes" / Bytes(8),
    "FileOffset" / Int64ul,
    "SequenceNumber" / Int64ul,
)
DataSector = Struct(
    "DataSignature" / Bytes(4),    # b"data"
    "SequenceHigh" / Int32ul,
    "Data" / Bytes(4084),
    "SequenceLow" / Int32ul,
)
ZERO_SIGNATURE, DESC_SIGNATURE, DATA_SIGNATURE = b"zero", b"desc", b"data"
LOG_HEADER_SIZE, DESCRIPTOR_SIZE = 64, 32

# 2.6.1.1 Metadata Table Header, 2.6.1.2 Metadata Table Entry
MetadataTableHeader = Struct(
    "Signature" / Bytes(8),        # b"metadata"
    "Reserved" / Int16ul,
    "EntryCount" / Int16ul,
    "Reserved2" / Bytes(20),
)
MetadataTableEntry = Struct(
    "ItemId" / Bytes(16),
    "Offset" / Int32ul,
    "Length" / Int32ul,
    "Flags" / Int32ul,             # bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired
    "Reserved2" / Int32ul,
)
METADATA_SIGNATURE = b"metadata"
IS_USER, IS_VIRTUAL_DISK, IS_REQUIRED = 1, 2, 4

# 2.6.2.1 File Parameters
FileParameters = Struct(
    "BlockSize" / Int32ul,
    "Flags" / Int32ul,             # bit 0 LeaveBlocksAllocated, bit 1 HasParent
)
LEAVE_BLOCKS_ALLOCATED, HAS_PARENT = 1, 2

# 2.6.2.6.1 Parent Locator Header, 2.6.2.6.2 Parent Locator Entry
ParentLocatorHeader = Struct(
    "LocatorType" / Bytes(16),
    "Reserved" / Int16ul,
    "KeyValueCount" / Int16ul,
)
ParentLocatorEntry = Struct(
    "KeyOffset" / Int32ul,
    "ValueOffset" / Int32ul,
    "KeyLength" / Int16ul,
    "ValueLength" / Int16ul,
)


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """2.4: payload blocks described by one sector bitmap block."""
    return SECTORS_PER_BITMAP * logical_sector_size // block_size


def bat_entries(size: int, block_size: int, logical_sector_size: int,
                differencing: bool) -> int:
    """2.5: the number of BAT entries a disk of this geometry needs."""
    ratio = chunk_ratio(block_size, logical_sector_size)
    payload = -(-size // block_size)
    bitmaps = -(-payload // ratio)
    if differencing:
        return bitmaps * (ratio + 1)
    return payload + (payload - 1) // ratio if payload else 0


def payload_index(block: int, ratio: int) -> int:
    """BAT index of payload block ``block``: a sector bitmap entry follows each chunk."""
    return block + block // ratio


def bitmap_index(chunk: int, ratio: int) -> int:
    """BAT index of the sector bitmap entry of chunk ``chunk``."""
    return chunk * (ratio + 1) + ratio


# 2.4 sector bitmap: bit 0 of byte 0 is sector 0 (least significant bit first)

def bit_runs(bitmap: bytes, first: int, count: int):
    """``(start, length, bit)`` runs of the ``count`` bits from bit ``first`` (bit 0 of
    byte 0 is sector 0, 2.4)."""
    v = int.from_bytes(bitmap, "little") >> first
    pos = 0
    while pos < count:
        if v & 1:
            n = ((~v) & (v + 1)).bit_length() - 1   # trailing ones
            bit = True
        else:
            n = (v & -v).bit_length() - 1 if v else count - pos  # trailing zeros
            bit = False
        n = min(n, count - pos)
        yield first + pos, n, bit
        v >>= n
        pos += n


def set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set the ``count`` bits from bit ``first``."""
    end = first + count
    while first < end and first % 8:
        bitmap[first // 8] |= 1 << (first % 8)
        first += 1
    full = (end - first) // 8
    if full:
        bitmap[first // 8:first // 8 + full] = b"\xff" * full
        first += full * 8
    while first < end:
        bitmap[first // 8] |= 1 << (first % 8)
        first += 1


def align_up(n: int, a: int = ALIGNMENT) -> int:
    return -(-n // a) * a


def guid_text(raw: bytes) -> str:
    """The lowercase text form of a binary GUID (as ``str(uuid.UUID(bytes_le=raw))``)."""
    raw = bytes(raw)
    h = (raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
