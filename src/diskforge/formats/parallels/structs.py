"""Parallels expandable image structures, as QEMU's docs/interop/parallels.txt names
them (qemu's block/parallels.c calls the header ``ParallelsHeader``).

Every field is little-endian. The package's leaf: it imports no sibling.
"""

from __future__ import annotations

from construct import Bytes, Int32ul, Int64ul, Struct

SECTOR = 512
HEADER_SIZE = 64

# parallels.txt "Header": magic. The first names BAT entries in sectors and keeps only
# the low 32 bits of nb_sectors; the second ("Format Extension") in clusters.
HEADER_MAGIC = b"WithoutFreeSpace"
HEADER_MAGIC2 = b"WithouFreSpacExt"
HEADER_VERSION = 2

# parallels.txt "Header": in_use
HEADER_INUSE_MAGIC = 0x746F6E59     # opened read-write (the image was not closed)
HEADER_CLOSED_MAGIC = 0x312E3276    # closed cleanly; 0: an old writer

# parallels.txt "Header": flags, bit 0
EMPTY_IMAGE_FLAG = 1

# qemu's limits (parallels_open): tracks below INT32_MAX / 513, BAT below INT_MAX bytes
MAX_TRACKS = 0x7FFFFFFF // 513
MAX_BAT_ENTRIES = 0x7FFFFFFF // 4

# parallels.txt "Header"
ParallelsHeader = Struct(
    "magic" / Bytes(16),
    "version" / Int32ul,
    "heads" / Int32ul,
    "cylinders" / Int32ul,
    "tracks" / Int32ul,              # cluster size, in sectors
    "bat_entries" / Int32ul,         # disk size, in clusters (BAT size)
    "nb_sectors" / Int64ul,          # disk size, in sectors
    "inuse" / Int32ul,
    "data_off" / Int32ul,            # in sectors
    "flags" / Int32ul,
    "ext_off" / Int64ul,             # in sectors
)
assert ParallelsHeader.sizeof() == HEADER_SIZE
