"""VMDK on-disk structures, as VMware's "Virtual Disk Format 5.0" technical note
(VMware, 2011; earlier editions 1.0 and 1.1) names them, and ESX's COWD header as
qemu's ``block/vmdk.c`` and VMware's ``vmware-vdiskmanager`` lay it out.

Every multi-byte field is little-endian. Sizes and offsets are in 512-byte sectors
("SectorType", a uint64) unless a name says bytes.

The package's leaf: structures, constants and small pure helpers every sibling shares.
It imports nothing from its siblings.
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

SECTOR = 512

# -- hosted sparse extents ("Hosted Sparse Extent Header") ---------------------------------
SPARSE_MAGIC = b"KDMV"          # magicNumber 0x564d444b, as bytes on disk
SPARSE_HEADER_SIZE = 512

# flags (spec: "Hosted Sparse Extent Header", flags)
FLAG_VALID_NEWLINE_TEST = 1 << 0   # the four newline characters below are meaningful
FLAG_REDUNDANT_GT = 1 << 1         # rgdOffset holds a redundant grain directory
FLAG_ZEROED_GRAIN_GTE = 1 << 2     # a grain table entry of 1 means "grain reads as zeros"
FLAG_COMPRESSED = 1 << 16          # grains are compressed (compressAlgorithm)
FLAG_MARKERS = 1 << 17             # grains and metadata are preceded by markers (stream)

# compressAlgorithm
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1            # RFC 1950 zlib streams (what VMware and qemu write)

# gdOffset of a streamOptimized extent whose grain directory is found through the
# footer at the end of the file (spec: "Stream-Optimized Compressed Sparse Extents")
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# grain table entries (spec: "Grain Tables"; zeroed grains: "Hosted Sparse Extent
# Header", flags bit 2)
GTE_UNALLOCATED = 0                # read from the parent, or zeros
GTE_ZEROED = 1                     # reads as zeros, even over a parent

# What VMware and qemu write and accept; the spec allows other values for some.
DEFAULT_GRAIN_SECTORS = 128        # 64 KiB grains
DEFAULT_GTES_PER_GT = 512          # every VMware tool writes 512 (qemu requires it)
MIN_GRAIN_SECTORS, MAX_GRAIN_SECTORS = 1, 128   # qemu refuses grains over 128 sectors
DESCRIPTOR_DEFAULT_OFFSET = 1      # sectors: right after the header
DESCRIPTOR_DEFAULT_SECTORS = 20    # 10 KiB, what VMware reserves for an embedded descriptor

# Newline test characters (spec: singleEndLineChar, nonEndLineChar, doubleEndLineChar1/2):
# a file transferred in text mode (FTP ASCII) changes them, which a reader can detect.
NEWLINE_TEST = b"\n \r\n"

# spec: "Hosted Sparse Extent Header"
SparseExtentHeader = Struct(
    "magicNumber" / Bytes(4),
    "version" / Int32ul,
    "flags" / Int32ul,
    "capacity" / Int64ul,
    "grainSize" / Int64ul,
    "descriptorOffset" / Int64ul,
    "descriptorSize" / Int64ul,
    "numGTEsPerGT" / Int32ul,
    "rgdOffset" / Int64ul,
    "gdOffset" / Int64ul,
    "overHead" / Int64ul,
    "uncleanShutdown" / Int8ul,
    "newlineTest" / Bytes(4),          # singleEndLineChar .. doubleEndLineChar2
    "compressAlgorithm" / Int16ul,
    "pad" / Bytes(433),
)
assert SparseExtentHeader.sizeof() == SPARSE_HEADER_SIZE

# -- stream-optimized markers (spec: "Stream-Optimized Compressed Sparse Extents") --------
# A grain marker: the grain's first sector (lba), the compressed length, then the data.
# A metadata marker: numSectors of metadata following, size 0, then a type; it fills a
# whole sector.
MARKER_EOS = 0           # end of stream
MARKER_GT = 1            # a grain table follows
MARKER_GD = 2            # the grain directory follows
MARKER_FOOTER = 3        # the footer (a copy of the header with the real gdOffset) follows
MARKER_NAMES = {MARKER_EOS: "end-of-stream", MARKER_GT: "grain table",
                MARKER_GD: "grain directory", MARKER_FOOTER: "footer"}

GrainMarker = Struct(
    "lba" / Int64ul,
    "size" / Int32ul,
)
GRAIN_MARKER_SIZE = GrainMarker.sizeof()      # 12: the compressed data starts here

MetadataMarker = Struct(
    "numSectors" / Int64ul,
    "size" / Int32ul,                # 0: tells a metadata marker from a grain marker
    "type" / Int32ul,
    "pad" / Bytes(496),
)
assert MetadataMarker.sizeof() == SECTOR

# -- ESX hosted "COWD" sparse extents (vmfsSparse: ESX snapshot deltas) -----------------
# Laid out as qemu's VMDK3Header and the ESX 3 "COWDisk_Header": 2048 bytes, and every
# grain table holds 4096 entries whatever the header says.
COWD_MAGIC = b"COWD"
COWD_HEADER_SIZE = 2048
COWD_GTES_PER_GT = 4096

COWDiskHeader = Struct(
    "magicNumber" / Bytes(4),
    "version" / Int32ul,
    "flags" / Int32ul,
    "numSectors" / Int32ul,            # capacity
    "grainSize" / Int32ul,             # sectors
    "gdOffset" / Int32ul,              # sectors
    "numGDEntries" / Int32ul,
    "freeSector" / Int32ul,
    # union: a root disk's geometry (cylinders, heads, sectors), or a child's
    # parentFileName[1024] and parentGeneration
    "u" / Bytes(1028),
    "generation" / Int32ul,
    "name" / Bytes(60),
    "description" / Bytes(512),
    "savedGeneration" / Int32ul,
    "reserved" / Bytes(8),
    "uncleanShutdown" / Int32ul,
    "padding" / Bytes(396),
)
assert COWDiskHeader.sizeof() == COWD_HEADER_SIZE

# -- seSparse (ESXi 6.5+ space-efficient sparse extents), read only as in qemu ------------
SESPARSE_MAGIC = b"\xbe\xba\xfe\xca\x00\x00\x00\x00"   # 0x00000000cafebabe, little-endian


def sectors(nbytes: int) -> int:
    """Whole sectors holding ``nbytes`` bytes."""
    return -(-nbytes // SECTOR)


def grain_tables_needed(capacity_sectors: int, grain_sectors: int, gtes_per_gt: int) -> int:
    """Grain directory entries (= grain tables) covering ``capacity_sectors``."""
    grains = -(-capacity_sectors // grain_sectors)
    return -(-grains // gtes_per_gt)


def default_geometry(capacity_sectors: int, adapter_type: str) -> tuple[int, int, int]:
    """``(cylinders, heads, sectors)`` for ``ddb.geometry.*`` as qemu computes them: IDE
    disks use 16 heads, SCSI adapters 255, 63 sectors per track. Guests ignore the
    geometry of SCSI disks, but VMware's tools expect the keys to be there."""
    heads, secs = (16, 63) if adapter_type == "ide" else (255, 63)
    return capacity_sectors // (heads * secs), heads, secs


# The footer of a stream-optimized extent whose header says gdOffset == GD_AT_END: the
# last three sectors are a footer marker, the footer (a header copy with the real
# gdOffset) and the end-of-stream marker (spec: "Stream-Optimized Compressed Sparse
# Extents"; found at end - 1536 bytes, as qemu's vmdk_open_vmdk4 looks for it).
FOOTER_FROM_END = 3 * SECTOR

# seSparse, as qemu's block/vmdk.c reads it ("format not officially documented"): a
# const header in sector 0, a volatile header it points at, 64-bit grain directory and
# grain table entries.
SESPARSE_VOLATILE_MAGIC = b"\xfe\xca\xfe\xca\x00\x00\x00\x00"  # 0x00000000cafecafe
SESPARSE_VERSION = 0x0000000200000001
SESPARSE_GRAIN_SECTORS = 8            # the only grain size qemu (and ESXi) use
SESPARSE_GT_SECTORS = 64              # grain table size, sectors: 4096 entries

# qemu: VMDKSESparseConstHeader
SESparseConstHeader = Struct(
    "magic" / Bytes(8),
    "version" / Int64ul,
    "capacity" / Int64ul,
    "grain_size" / Int64ul,
    "grain_table_size" / Int64ul,
    "flags" / Int64ul,
    "reserved1" / Int64ul,
    "reserved2" / Int64ul,
    "reserved3" / Int64ul,
    "reserved4" / Int64ul,
    "volatile_header_offset" / Int64ul,
    "volatile_header_size" / Int64ul,
    "journal_header_offset" / Int64ul,
    "journal_header_size" / Int64ul,
    "journal_offset" / Int64ul,
    "journal_size" / Int64ul,
    "grain_dir_offset" / Int64ul,
    "grain_dir_size" / Int64ul,
    "grain_tables_offset" / Int64ul,
    "grain_tables_size" / Int64ul,
    "free_bitmap_offset" / Int64ul,
    "free_bitmap_size" / Int64ul,
    "backmap_offset" / Int64ul,
    "backmap_size" / Int64ul,
    "grains_offset" / Int64ul,
    "grains_size" / Int64ul,
    "pad" / Bytes(304),
)
assert SESparseConstHeader.sizeof() == SECTOR

# qemu: VMDKSESparseVolatileHeader
SESparseVolatileHeader = Struct(
    "magic" / Bytes(8),
    "free_gt_number" / Int64ul,
    "next_txn_seq_number" / Int64ul,
    "replay_journal" / Int64ul,
    "pad" / Bytes(480),
)
assert SESparseVolatileHeader.sizeof() == SECTOR
