"""qcow version 1 on-disk structures, as qemu's block/qcow.c names them (the format has
no specification document; qemu's driver is the reference).

Every field is big-endian. The package's leaf: it imports no sibling.
"""

from __future__ import annotations

from construct import Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

QCOW_MAGIC = b"QFI\xfb"
QCOW_VERSION = 1
HEADER_SIZE = 48

# QCowHeader.crypt_method
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1

# L2 entry flag (block/qcow.c QCOW_OFLAG_COMPRESSED): the cluster is deflated; the
# compressed size sits above bit 63 - cluster_bits, the host offset below it
QCOW_OFLAG_COMPRESSED = 1 << 63

# qemu's limits (qcow_open): clusters of 512 B - 64 KiB, L2 tables of 512 B - 64 KiB,
# a backing file name below 1024 bytes
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13
MAX_BACKING_NAME = 1023

# block/qcow.c: QCowHeader
QCowHeader = Struct(
    "magic" / Bytes(4),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "mtime" / Int32ub,
    "size" / Int64ub,               # in bytes
    "cluster_bits" / Int8ub,
    "l2_bits" / Int8ub,
    "padding" / Int16ub,
    "crypt_method" / Int32ub,
    "l1_table_offset" / Int64ub,
)
assert QCowHeader.sizeof() == HEADER_SIZE


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, stored size) of a compressed cluster's L2 entry (qcow.c's
    get_cluster_offset / decompress_cluster)."""
    shift = 63 - cluster_bits
    size = (entry >> shift) & ((1 << cluster_bits) - 1)
    return entry & ((1 << shift) - 1), size
