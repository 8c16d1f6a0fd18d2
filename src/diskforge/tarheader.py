"""The tar header block, declared once for the OVA reader (``formats/ova/tar.py``)
and the archive writers (``export/tarfmt.py``), which may not import each other.

Layout: IEEE Std 1003.1-2001, pax, "ustar Interchange Format" (GNU tar's ``tar.h``,
``struct posix_header``): one 512-byte block, numbers as octal text (or GNU's base-256),
the checksum the byte sum of the block with ``chksum`` read as spaces. GNU headers
(magic ``ustar  \\0``) use bytes 345-511 differently (atime, ctime, the old sparse
map): for them ``prefix`` is not part of the name.
"""

from __future__ import annotations

from construct import Bytes, Struct

BLOCK = 512
CHKSUM_AT, CHKSUM_LEN = 148, 8

# tar.h: "struct posix_header" (offsets 0-499; 500-511 pad)
PosixHeader = Struct(
    "name" / Bytes(100),
    "mode" / Bytes(8),
    "uid" / Bytes(8),
    "gid" / Bytes(8),
    "size" / Bytes(12),
    "mtime" / Bytes(12),
    "chksum" / Bytes(8),
    "typeflag" / Bytes(1),
    "linkname" / Bytes(100),
    "magic" / Bytes(6),
    "version" / Bytes(2),
    "uname" / Bytes(32),
    "gname" / Bytes(32),
    "devmajor" / Bytes(8),
    "devminor" / Bytes(8),
    "prefix" / Bytes(155),
    "pad" / Bytes(12),
)
assert PosixHeader.sizeof() == BLOCK
