"""UDIF structures and constants, named as Apple's and libdmg's sources name them.

The ``koly`` trailer (``UDIFResourceFile``), the checksum record (``UDIFChecksum``),
the ``mish`` block table (``BLKXTable``) and its chunk entries (``BLKXChunkEntry``, with
their ``EntryType`` values), and the header of an Apple sparse image
(``SparseImageHeader``). One place for them, importing nothing from the package, so the
readers (``udif``, ``reader``, ``sparse``), the writer and the codecs share one
definition.

References: Jonathan Levin, "Demystifying the DMG File Format" (newosxbook.com/DMG.html);
libyal's "Mac OS disk image types" (libmodi documentation); libdmg-hfsplus ``dmg.h``.
"""

from __future__ import annotations

import struct

from construct import Bytes, Const, Int32ub, Int64ub, Struct

SECTOR = 512
KOLY_SIZE = 512

# Levin §"The koly block": the checksum record used by the trailer and by each mish
UDIFChecksum = Struct(
    "Type" / Int32ub,       # 0 none, 2 CRC-32
    "Size" / Int32ub,       # in bits: 32 for CRC-32
    "Data" / Bytes(128),    # the checksum, big-endian, left-aligned
)

# Levin §"The koly block" / libmodi §"UDIF resource file": 512 bytes, big-endian
UDIFResourceFile = Struct(
    "Signature" / Const(b"koly"),
    "Version" / Int32ub,                # 4
    "HeaderSize" / Int32ub,             # 512
    "Flags" / Int32ub,                  # bit 0: flattened (data fork only, no rsrc fork)
    "RunningDataForkOffset" / Int64ub,
    "DataForkOffset" / Int64ub,
    "DataForkLength" / Int64ub,
    "RsrcForkOffset" / Int64ub,         # legacy binary resource fork (not read)
    "RsrcForkLength" / Int64ub,
    "SegmentNumber" / Int32ub,          # 1-based; 0 in images from recent hdiutil
    "SegmentCount" / Int32ub,
    "SegmentID" / Bytes(16),            # a UUID
    "DataChecksum" / UDIFChecksum,      # over the data fork bytes
    "XMLOffset" / Int64ub,
    "XMLLength" / Int64ub,
    "Reserved1" / Bytes(120),
    "MasterChecksum" / UDIFChecksum,    # over the blkx checksums, in order
    "ImageVariant" / Int32ub,           # 1 device image, 2 partition image
    "SectorCount" / Int64ub,            # the virtual disk, in 512-byte sectors
    "Reserved2" / Int32ub,
    "Reserved3" / Int32ub,
    "Reserved4" / Int32ub,
)
assert UDIFResourceFile.sizeof() == KOLY_SIZE

# Levin §"The mish block" / libmodi §"block table": the header of a blkx entry's Data
BLKXTable = Struct(
    "Signature" / Const(b"mish"),
    "Version" / Int32ub,                # 1
    "SectorNumber" / Int64ub,           # first disk sector this table describes
    "SectorCount" / Int64ub,
    "DataOffset" / Int64ub,             # added to every chunk's CompressedOffset
    "BuffersNeeded" / Int32ub,          # sectors of buffer a decoder needs
    "BlockDescriptors" / Int32ub,       # hdiutil: the entry's index (-2 whole disk)
    "Reserved" / Bytes(24),
    "Checksum" / UDIFChecksum,          # CRC-32 of the decompressed stored chunks
    "NumberOfBlockChunks" / Int32ub,
)
BLKX_HEADER_SIZE = BLKXTable.sizeof()   # 204

# Levin §"The mish block": one chunk; parsed as an array (struct), never per entry
BLKXChunkEntry = Struct(
    "EntryType" / Int32ub,              # ZERO_FILL ... TERMINATOR, below
    "Comment" / Int32ub,
    "SectorNumber" / Int64ub,           # relative to the table's SectorNumber
    "SectorCount" / Int64ub,
    "CompressedOffset" / Int64ub,       # relative to the data fork (+ DataOffset)
    "CompressedLength" / Int64ub,
)
CHUNK_STRUCT = struct.Struct(">IIQQQQ")
assert CHUNK_STRUCT.size == BLKXChunkEntry.sizeof() == 40

CHECKSUM_NONE, CHECKSUM_CRC32 = 0, 2

# Levin §"The mish block" / libdmg ``BLOCK_*``: BLKXChunkEntry.EntryType
ZERO_FILL = 0x00000000   # sectors read as zeros, nothing stored
RAW = 0x00000001         # stored as they are (UDRO, UDRW; incompressible chunks)
IGNORE = 0x00000002      # free space: reads as zeros, nothing stored
ADC = 0x80000004         # UDCO
ZLIB = 0x80000005        # UDZO
BZIP2 = 0x80000006       # UDBZ
LZFSE = 0x80000007       # ULFO
LZMA = 0x80000008        # ULMO (an .xz stream without integrity check)
COMMENT = 0x7FFFFFFE     # no sectors; hdiutil's annotations
TERMINATOR = 0xFFFFFFFF  # ends a chunk table

# -- Apple sparse images (UDSP, ``.sparseimage``) ----------------------------------------
HEADER_SIZE = 4096                 # the header, then the bands
BAND_TABLE_OFFSET = 64             # the band numbers, 32 bits each

# libmodi "Mac OS disk image types", §Sparse disk image, file header (first 64 bytes)
SparseImageHeader = Struct(
    "signature" / Const(b"sprs"),
    "version" / Int32ub,            # 3
    "sectors_per_band" / Int32ub,
    "unknown1" / Int32ub,           # seen: 1
    "sector_count" / Int32ub,       # the disk, in 512-byte sectors
    "unknown2" / Bytes(12),
    "unknown3" / Int32ub,           # seen: equal to sector_count
    "unknown4" / Bytes(28),
)
