"""VDI on-disk structures, named as VirtualBox's ``VDICore.h`` names them.

Every integer is little-endian. A file starts with ``VDIPREHEADER`` (72 bytes: an
informational text, the signature, the version), then the header of that version:
``VDIHEADER0`` for version 0.x (VirtualBox before 1.5), ``VDIHEADER1`` for 1.1, or
``VDIHEADER1PLUS`` (1.1 with the LCHS geometry appended; what VirtualBox writes, told
apart by ``cbHeader``). The block map is an array of ``VDIIMAGEBLOCKPOINTER`` (uint32)
at ``offBlocks``; allocated blocks follow at ``offData``, each ``cbBlockExtra`` bytes
of service data then ``cbBlock`` bytes of disk.

The package's leaf: it imports nothing from its siblings.
"""

from __future__ import annotations

import os

from construct import Bytes, Int32ul, Int64ul, Struct

SECTOR = 512                              # VDI_GEOMETRY_SECTOR_SIZE
VDI_IMAGE_SIGNATURE = 0xBEDA107F
VDI_IMAGE_VERSION = 0x00010001            # 1.1: what VirtualBox and qemu write
VDI_IMAGE_VERSION_OLD = 0x00000002        # 0.2: the one 0.x version VirtualBox reads
VDI_IMAGE_FILE_INFO = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
VDI_IMAGE_COMMENT_SIZE = 256
VDI_DATA_ALIGN = 1 << 20                  # where VirtualBox puts the map and the data

# block map entries (VDICore.h): >= VDI_IMAGE_BLOCK_ZERO means "not in the file"
VDI_IMAGE_BLOCK_FREE = 0xFFFFFFFF         # reads as zeros, or from the parent
VDI_IMAGE_BLOCK_ZERO = 0xFFFFFFFE         # reads as zeros, even over a parent

# VDIIMAGETYPE
VDI_IMAGE_TYPE_NORMAL, VDI_IMAGE_TYPE_FIXED, VDI_IMAGE_TYPE_UNDO, VDI_IMAGE_TYPE_DIFF = \
    1, 2, 3, 4
IMAGE_TYPES = {VDI_IMAGE_TYPE_NORMAL: "dynamic", VDI_IMAGE_TYPE_FIXED: "static",
               VDI_IMAGE_TYPE_UNDO: "undo", VDI_IMAGE_TYPE_DIFF: "differencing"}
# VD_VDI_IMAGE_FLAGS_ZERO_EXPAND, the one flag VirtualBox accepts (stored >> 8)
VDI_IMAGE_FLAGS_ZERO_EXPAND = 1

# VDICore.h: VDIDISKGEOMETRY
VDIDISKGEOMETRY = Struct(
    "cCylinders" / Int32ul,
    "cHeads" / Int32ul,
    "cSectors" / Int32ul,
    "cbSector" / Int32ul,
)

# VDICore.h: VDIPREHEADER
VDIPREHEADER = Struct(
    "szFileInfo" / Bytes(64),
    "u32Signature" / Int32ul,
    "u32Version" / Int32ul,
)
PREHEADER_SIZE = 72

# VDICore.h: VDIHEADER0 (version 0.x; the map and data offsets are implied)
VDIHEADER0 = Struct(
    "u32Type" / Int32ul,
    "fFlags" / Int32ul,
    "szComment" / Bytes(VDI_IMAGE_COMMENT_SIZE),
    "LegacyGeometry" / VDIDISKGEOMETRY,
    "cbDisk" / Int64ul,
    "cbBlock" / Int32ul,
    "cBlocks" / Int32ul,
    "cBlocksAllocated" / Int32ul,
    "uuidCreate" / Bytes(16),
    "uuidModify" / Bytes(16),
    "uuidLinkage" / Bytes(16),
)
HEADER0_SIZE = 348

# VDICore.h: VDIHEADER1 (version 1.1)
_HEADER1_FIELDS = (
    "cbHeader" / Int32ul,
    "u32Type" / Int32ul,
    "fFlags" / Int32ul,
    "szComment" / Bytes(VDI_IMAGE_COMMENT_SIZE),
    "offBlocks" / Int32ul,
    "offData" / Int32ul,
    "LegacyGeometry" / VDIDISKGEOMETRY,
    "u32Dummy" / Int32ul,
    "cbDisk" / Int64ul,
    "cbBlock" / Int32ul,
    "cbBlockExtra" / Int32ul,
    "cBlocks" / Int32ul,
    "cBlocksAllocated" / Int32ul,
    "uuidCreate" / Bytes(16),
    "uuidModify" / Bytes(16),
    "uuidLinkage" / Bytes(16),
    "uuidParentModify" / Bytes(16),
)
VDIHEADER1 = Struct(*_HEADER1_FIELDS)
HEADER1_SIZE = 384

# VDICore.h: VDIHEADER1PLUS (1.1 with the LCHS geometry; VirtualBox writes this one)
VDIHEADER1PLUS = Struct(*_HEADER1_FIELDS, "LCHSGeometry" / VDIDISKGEOMETRY)
HEADER1PLUS_SIZE = 400

NULL_UUID = bytes(16)


def version_text(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


def uuid_text(raw: bytes) -> str:
    """An RTUUID as VirtualBox prints it: its first three fields are stored
    little-endian (formatted by hand: importing uuid costs start-up time)."""
    b = bytes(raw)
    h = (b[3::-1] + b[5:3:-1] + b[7:5:-1] + b[8:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_uuid() -> bytes:
    """A random (version 4) RTUUID as stored: the version nibble sits in the
    little-endian third field, so in byte 7."""
    u = bytearray(os.urandom(16))
    u[7] = u[7] & 0x0F | 0x40
    u[8] = u[8] & 0x3F | 0x80
    return bytes(u)


def align_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def build_header(*, image_type: int, cb_disk: int, cb_block: int, c_blocks: int,
                 c_blocks_allocated: int, off_blocks: int, off_data: int,
                 uuid_create: bytes, uuid_modify: bytes, uuid_linkage: bytes = NULL_UUID,
                 uuid_parent_modify: bytes = NULL_UUID, comment: bytes = b"") -> bytes:
    """``VDIPREHEADER`` + ``VDIHEADER1PLUS`` as VirtualBox's vdiInitHeader fills them:
    both geometries "not calculated" (zero, with 512-byte sectors), no flags, no
    per-block extra data."""
    geometry = dict(cCylinders=0, cHeads=0, cSectors=0, cbSector=SECTOR)
    pre = VDIPREHEADER.build(dict(szFileInfo=VDI_IMAGE_FILE_INFO.ljust(64, b"\0"),
                                  u32Signature=VDI_IMAGE_SIGNATURE,
                                  u32Version=VDI_IMAGE_VERSION))
    hdr = VDIHEADER1PLUS.build(dict(
        cbHeader=HEADER1PLUS_SIZE, u32Type=image_type, fFlags=0,
        szComment=comment[:VDI_IMAGE_COMMENT_SIZE - 1].ljust(VDI_IMAGE_COMMENT_SIZE, b"\0"),
        offBlocks=off_blocks, offData=off_data, LegacyGeometry=geometry, u32Dummy=0,
        cbDisk=cb_disk, cbBlock=cb_block, cbBlockExtra=0, cBlocks=c_blocks,
        cBlocksAllocated=c_blocks_allocated, uuidCreate=uuid_create,
        uuidModify=uuid_modify, uuidLinkage=uuid_linkage,
        uuidParentModify=uuid_parent_modify, LCHSGeometry=geometry))
    return pre + hdr


def layout(cb_disk: int, cb_block: int) -> tuple[int, int, int]:
    """``(cBlocks, offBlocks, offData)`` of a new image, as VirtualBox places them:
    the block map and the data each start on a 1 MiB boundary (VDI_DATA_ALIGN)."""
    c_blocks = -(-cb_disk // cb_block)
    off_blocks = align_up(PREHEADER_SIZE + HEADER1PLUS_SIZE, VDI_DATA_ALIGN)
    off_data = align_up(off_blocks + 4 * c_blocks, VDI_DATA_ALIGN)
    return c_blocks, off_blocks, off_data
