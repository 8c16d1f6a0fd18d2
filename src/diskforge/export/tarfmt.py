"""Tar headers, as GNU tar writes them: POSIX ustar members (the OVA) and GNU "oldgnu"
sparse members (Google Cloud's ``disk.raw``).

Layouts from GNU tar's manual, "Basic Tar Format" (``tar.h``: ``struct
posix_header``, ``struct oldgnu_header``, ``struct sparse``, ``struct
sparse_header``). Every header is one 512-byte block; numbers are octal text, or
GNU's base-256 (first byte 0x80, then big-endian) when they do not fit, which is
how GNU tar stores sizes of 8 GiB and more; the checksum is the byte sum of the
block with the checksum field read as spaces.

An oldgnu sparse member (type ``S``) lists the data regions of a file: four
``(offset, numbytes)`` pairs in the header, 21 more in each extension block that
follows while ``isextended`` is set, ``realsize`` the whole file's size; then the
regions' bytes, back to back, padded to a block. A file that ends in a hole gets a
last, empty region at its end, as GNU tar writes it.
"""

from __future__ import annotations

from construct import Bytes, Const, Int8ub, Struct

from ..tarheader import BLOCK, PosixHeader

RECORD = 20 * BLOCK   # GNU tar's default blocking factor: archives end on a record

REGTYPE, GNUTYPE_SPARSE = b"0", b"S"
USTAR_MAGIC = b"ustar\x0000"      # magic "ustar\0" + version "00" (POSIX)
OLDGNU_MAGIC = b"ustar  \x00"     # magic "ustar " + version " \0" (GNU before POSIX)

# tar.h: "struct sparse"
Sparse = Struct("offset" / Bytes(12), "numbytes" / Bytes(12))

# tar.h: "struct oldgnu_header", the view of bytes 345-511 of an oldgnu header
OldgnuHeaderTail = Struct(
    "atime" / Bytes(12),
    "ctime" / Bytes(12),
    "offset" / Bytes(12),
    "longnames" / Bytes(4),
    "unused_pad2" / Bytes(1),
    "sp" / Sparse[4],
    "isextended" / Int8ub,
    "realsize" / Bytes(12),
    "pad" / Bytes(17),
)

# tar.h: "struct sparse_header", an extension block of sparse entries
SparseHeader = Struct(
    "sp" / Sparse[21],
    "isextended" / Int8ub,
    "pad" / Const(bytes(7)),
)


def number(value: int, width: int) -> bytes:
    """``value`` in a field of ``width`` bytes: octal digits and a NUL, or GNU's
    base-256 when the octal does not fit (sizes and offsets of 8 GiB and more)."""
    digits = width - 1
    if 0 <= value < 8 ** digits:
        return b"%0*o\x00" % (digits, value)
    if value < 0 or value >= 1 << (8 * width - 1):
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    raw = bytearray(value.to_bytes(width, "big"))
    raw[0] |= 0x80
    return bytes(raw)


def parse_number(field: bytes) -> int:
    """The value of a numeric field, octal or base-256."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _text(value: str, width: int) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) >= width:
        raise ValueError(f"'{value}' is too long for a {width}-byte tar field")
    return raw.ljust(width, b"\x00")


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def member_header(name: str, size: int, mtime: int, *, mode: int = 0o644,
                  typeflag: bytes = REGTYPE, magic: bytes = USTAR_MAGIC,
                  uname: str = "root", gname: str = "root") -> bytearray:
    """One header block (checksum not yet set) for a regular file owned by 0:0."""
    return bytearray(PosixHeader.build(dict(
        name=_text(name, 100), mode=number(mode, 8), uid=number(0, 8), gid=number(0, 8),
        size=number(size, 12), mtime=number(mtime, 12), chksum=b" " * 8,
        typeflag=typeflag, linkname=bytes(100), magic=magic[:6], version=magic[6:],
        uname=_text(uname, 32), gname=_text(gname, 32), devmajor=number(0, 8),
        devminor=number(0, 8), prefix=bytes(155), pad=bytes(12))))


def ustar_header(name: str, size: int, mtime: int) -> bytes:
    """A POSIX ustar header for a regular file, mode 0644, owner root (0:0); sizes
    of 8 GiB and more in base-256, as GNU tar and ovftool write them."""
    return _with_checksum(member_header(name, size, mtime))


def sparse_headers(name: str, realsize: int, regions: list[tuple[int, int]],
                   mtime: int) -> bytes:
    """The header block and extension blocks of an oldgnu sparse member whose data
    regions are ``regions`` (``(offset, length)``, in order, not overlapping)."""
    entries = list(regions)
    if not entries or entries[-1][0] + entries[-1][1] < realsize:
        entries.append((realsize, 0))   # GNU tar marks a trailing hole this way
    stored = sum(n for _, n in entries)
    head = member_header(name, stored, mtime, typeflag=GNUTYPE_SPARSE, magic=OLDGNU_MAGIC)

    def sp(chunk, slots):
        out = [dict(offset=number(o, 12), numbytes=number(n, 12)) for o, n in chunk]
        return out + [dict(offset=bytes(12), numbytes=bytes(12))] * (slots - len(out))

    first, rest = entries[:4], entries[4:]
    head[345:] = OldgnuHeaderTail.build(dict(
        atime=bytes(12), ctime=bytes(12), offset=bytes(12), longnames=bytes(4),
        unused_pad2=b"\x00", sp=sp(first, 4), isextended=1 if rest else 0,
        realsize=number(realsize, 12), pad=bytes(17)))
    blocks = [_with_checksum(head)]
    while rest:
        chunk, rest = rest[:21], rest[21:]
        blocks.append(SparseHeader.build(dict(sp=sp(chunk, 21),
                                              isextended=1 if rest else 0)))
    return b"".join(blocks)


def padding(size: int) -> bytes:
    """Zeros from the end of a member's data to the next block."""
    return bytes(-size % BLOCK)


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros to the end of the record, as GNU tar ends an
    archive (``written``: bytes of the archive so far)."""
    end = written + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))
