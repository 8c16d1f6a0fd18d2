"""qcow2 geometry: the masks and sizes that follow from the header (qcow2.txt,
"Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor").

Everything per-cluster is computed here once per open so the hot paths only do
integer arithmetic on plain ints.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# compatible / autoclear bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = 0x3

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# the feature-name table qemu writes (type, bit, name): 0 incompatible, 1 compatible,
# 2 autoclear
FEATURE_NAMES = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
)


@dataclass(frozen=True)
class Geometry:
    """Sizes derived from ``cluster_bits``, ``refcount_order`` and the extended-L2 bit."""
    cluster_bits: int
    refcount_order: int
    extended_l2: bool

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
