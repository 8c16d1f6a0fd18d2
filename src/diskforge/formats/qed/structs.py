"""QED on-disk structures, as QEMU's docs/interop/qed_spec.txt names them.

Every field is little-endian. The package's leaf: it imports no sibling.
"""

from __future__ import annotations

from construct import Bytes, Int32ul, Int64ul, Struct

QED_MAGIC = b"QED\x00"
HEADER_SIZE = 64        # the header with its backing file fields

# qed_spec.txt "Feature bits"
QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE

# qed_spec.txt "Field descriptions": cluster_size a power of 2 in [2^12, 2^26],
# table_size a power of 2 in [1, 16]
MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE = 1 << 12, 1 << 26
MIN_TABLE_SIZE, MAX_TABLE_SIZE = 1, 16
MAX_BACKING_NAME = 1023     # qemu's bs->backing_file holds 1024 bytes with the NUL

# qed_spec.txt "Data cluster offsets": 1 is a zero cluster
QED_ZERO_CLUSTER = 1

# qed_spec.txt "Header"
QEDHeader = Struct(
    "magic" / Bytes(4),
    "cluster_size" / Int32ul,           # in bytes
    "table_size" / Int32ul,             # for L1 and L2 tables, in clusters
    "header_size" / Int32ul,            # in clusters
    "features" / Int64ul,
    "compat_features" / Int64ul,
    "autoclear_features" / Int64ul,
    "l1_table_offset" / Int64ul,        # in bytes
    "image_size" / Int64ul,             # in bytes
    "backing_filename_offset" / Int32ul,  # in bytes from the start of the header
    "backing_filename_size" / Int32ul,
)
assert QEDHeader.sizeof() == HEADER_SIZE


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
