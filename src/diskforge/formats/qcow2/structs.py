"""qcow2's on-disk structures and constants, as docs/interop/qcow2.txt and QEMU's
block/qcow2.h name them, and the small helpers every module of the package shares.

The leaf of the package (it imports none of its siblings), as qcow2.h is the one header
every qcow2 file includes: the construct ``Struct`` of each structure (header,
extensions, snapshot table entry, bitmap directory entry), the L1/L2/refcount entry
masks and flags, the feature bits, qemu's implementation limits, the subcluster types
the cluster map classifies L2 entries into, and the geometry (sizes and masks that
follow from the header, computed once per open so the hot paths only do integer
arithmetic on plain ints). Every magic number is defined here once.
"""

from __future__ import annotations

import struct

from construct import Const, Int8ub, Int16ub, Int32ub, Int64ub, PaddedString, Struct

from ...records import FrozenRecord


# L1/L2 entry bits (qcow2.txt "Cluster mapping")
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
# bits that must be zero in a standard L2 entry (1-8 and 56-61); bit 0 too with
# extended L2 entries
L2E_STD_RESERVED = 0x3F00_0000_0000_01FE
L1E_RESERVED = 0x7F00_0000_0000_01FF

# qemu's implementation limits (qcow2.h); images beyond them are refused as qemu does
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_L1_SIZE = 32 << 20            # bytes of L1 table
QCOW_MAX_REFTABLE_SIZE = 8 << 20       # bytes of refcount table
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 64 << 20     # bytes of snapshot table
QCOW_MAX_BACKING_NAME = 1023
QCOW_MAX_BITMAPS = 65535
QCOW_MAX_BITMAP_DIRECTORY_SIZE = 64 << 20
SUBCLUSTERS = 32                       # per cluster with extended L2 entries
SECTOR = 512                           # compressed descriptors count 512-byte sectors

# feature bits (qcow2.txt "Header", bytes 72-95; qcow2.h QCOW2_INCOMPAT_* etc.)
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = 0x1F
# compatible / autoclear bits
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_AUTOCLEAR_MASK = 0x3

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# the feature-name table qemu writes (type, bit, name): 0 incompatible, 1 compatible,
# 2 autoclear
FEATURE_NAMES = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
)


QCOW_MAGIC = b"QFI\xfb"

# qcow2.txt "Header", bytes 0-71 (all of version 2)
QCowHeader = Struct(
    "magic" / Const(QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

# qcow2.txt "Header", bytes 72-103 (version 3 and higher)
QCowHeaderV3 = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
# qemu writes the compression_type byte (offset 104) and pads to a multiple of 8
V3_HEADER_LENGTH_WITH_COMPRESSION = 112

# qcow2.txt "Header extensions"
QCowExtension = Struct("magic" / Int32ub, "len" / Int32ub)
QCOW2_EXT_MAGIC_END = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

# qcow2.txt "Feature name table"
Qcow2Feature = Struct("type" / Int8ub, "bit" / Int8ub, "name" / PaddedString(46, "ascii"))
FEATURE_ENTRY_SIZE = 48

# qcow2.txt "Bitmaps extension"
Qcow2BitmapHeaderExt = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

# qcow2.txt "Full disk encryption header pointer"
Qcow2CryptoHeaderExtension = Struct("offset" / Int64ub, "length" / Int64ub)

# qcow2.txt "Snapshot table entry", bytes 0-39
QCowSnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
# the extra data qemu knows (qcow2.txt: bytes 40-55, and icount since qemu 5.0)
QCowSnapshotExtraData = Struct(
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,
)
SNAPSHOT_HEADER_SIZE = 40
# the same 40 bytes for reading: a table may hold qemu's maximum of 65536 entries, and
# the checked construct parser costs ~100 us each (seconds per open)
QCOW_SNAPSHOT_HEADER_FAST = struct.Struct(">QIHHIIQII")
SNAPSHOT_EXTRA_SIZE = 24
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024

# qcow2.txt "Bitmap directory": the fixed part of an entry
Qcow2BitmapDirEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)
BITMAP_DIR_ENTRY_SIZE = 24
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BME_RESERVED_FLAGS = 0xFFFF_FFFC   # qemu 7.2 knows in_use and auto only
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF00_0000_0000_01FE
BME_MAX_TABLE_SIZE = 0x8000000   # qemu's limit, entries
BME_MAX_PHYS_SIZE = 0x20000000   # qemu's limit on a bitmap's data, bytes
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BT_DIRTY_TRACKING_BITMAP = 1     # the only bitmap type qcow2.txt defines

# QEMU's QCow2SubclusterType (block/qcow2.h): what one L2 entry (or one subcluster of an
# extended entry) says about a guest range; the cluster map's runs carry these. Without
# extended L2 entries a cluster is one subcluster. _UNALLOCATED_ALLOC: an unallocated
# subcluster of a cluster that has a host cluster, which qemu's map reports with its
# offset.
QCOW2_SUBCLUSTER_NORMAL = 0
QCOW2_SUBCLUSTER_ZERO_PLAIN = 1
QCOW2_SUBCLUSTER_ZERO_ALLOC = 2
QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN = 3
QCOW2_SUBCLUSTER_COMPRESSED = 4
QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC = 5
QCOW2_SUBCLUSTER_INVALID = 6


def l2_entry_type(entry: int, has_data_file: bool) -> int:
    """The subcluster type of a standard (not extended) L2 entry, as qemu's
    ``qcow2_get_subcluster_type`` gives it: compressed, zero (plain or with a host
    cluster), normal data, or unallocated. With an external data file a cluster is
    allocated by its COPIED bit alone (host offset 0 is valid there)."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return QCOW2_SUBCLUSTER_COMPRESSED
    host = entry & L2E_OFFSET_MASK
    if entry & QCOW_OFLAG_ZERO:
        return QCOW2_SUBCLUSTER_ZERO_ALLOC if host else QCOW2_SUBCLUSTER_ZERO_PLAIN
    if host or (has_data_file and entry & QCOW_OFLAG_COPIED):
        return QCOW2_SUBCLUSTER_NORMAL
    return QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN


class Geometry(FrozenRecord):
    """Sizes derived from ``cluster_bits``, ``refcount_order`` and the extended-L2 bit."""
    __slots__ = ("cluster_bits", "refcount_order", "extended_l2")

    def __init__(self, cluster_bits: int, refcount_order: int, extended_l2: bool):
        self.cluster_bits = cluster_bits
        self.refcount_order = refcount_order
        self.extended_l2 = extended_l2

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Guest clusters one L2 table maps."""
        return self.cluster_size // self.l2_entry_size

    @property
    def l2_bits(self) -> int:
        return self.l2_entries.bit_length() - 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // SUBCLUSTERS if self.extended_l2 else self.cluster_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def refblock_entries(self) -> int:
        """Clusters one refcount block counts."""
        return self.cluster_size * 8 // self.refcount_bits

    # compressed cluster descriptor (x = 62 - (cluster_bits - 8))
    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def l1_entries_for(self, size: int) -> int:
        """L1 entries needed to map ``size`` virtual bytes."""
        per_l2 = self.l2_entries << self.cluster_bits
        return -(-size // per_l2)

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes) a compressed L2 entry covers, as qemu counts it: from
        the offset to the end of its last 512-byte sector."""
        off = entry & self.cluster_offset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return off, sectors * SECTOR - (off & (SECTOR - 1))

    def compressed_entry(self, host: int, length: int) -> int:
        """The L2 entry for ``length`` compressed bytes stored at ``host``."""
        extra = ((host + length - 1) >> 9) - (host >> 9)
        return QCOW_OFLAG_COMPRESSED | (extra << self.csize_shift) | host
