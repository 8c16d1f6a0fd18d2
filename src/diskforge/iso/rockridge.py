"""Rock Ridge (RRIP) entries in the System Use Sharing Protocol (SUSP) area of a record.

A record's system use area holds entries ``sig(2) len(1) version(1) data``; a "CE"
entry continues the area in another block. Rock Ridge adds POSIX attributes (PX),
alternate names (NM), symbolic links (SL), timestamps (TF), device numbers (PN) and the
relocation triple CL/PL/RE that lets directories nest deeper than ISO 9660's eight
levels. Continuations are bounds-checked and their number is capped, so a looping or
oversized chain is an error, not a hang.

References: IEEE P1281 (SUSP 1.12) §5; IEEE P1282 (RRIP 1.12) §4.1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..blockdev import BlockDevice
from ..errors import FormatError
from .records import long_date, record_date

MAX_CONTINUATIONS = 64
MAX_NAME_BYTES = 4096
MAX_LINK_BYTES = 65536


@dataclass
class RockRidge:
    """The Rock Ridge facts of one directory record."""
    name: bytes | None = None
    mode: int | None = None        # st_mode, type bits included
    nlink: int | None = None
    uid: int | None = None
    gid: int | None = None
    target: bytes | None = None    # symlink target
    mtime: float | None = None
    atime: float | None = None
    child_link: int | None = None  # CL: this entry is a relocated directory, there
    relocated: bool = False        # RE: the real record of a relocated directory
    rdev: tuple[int, int] | None = None
    name_flags: int = 0            # NM flags: 2 "current" (.), 4 "parent" (..)
    skip: int | None = None        # SP: bytes to skip at the start of every area


def parse(area: bytes, dev: BlockDevice, block_size: int, skip: int = 0,
          path: str | None = None) -> RockRidge:
    """Parse one record's system use area (``skip`` bytes are skipped, per SP)."""
    rr = RockRidge()
    name = bytearray()
    link_parts: list[bytes] = []
    link_continue = False
    link_abs = False
    link_seen = False
    areas = [area[skip:]]
    hops = 0
    seen: set[tuple[int, int, int]] = set()
    while areas:
        data = areas.pop()
        pos = 0
        n = len(data)
        while pos + 4 <= n:
            sig = data[pos:pos + 2]
            length = data[pos + 2]
            if length < 4 or pos + length > n:
                break  # padding or a damaged tail: the rest is not entries
            body = data[pos + 4:pos + length]
            pos += length
            if sig == b"ST":  # SUSP §5.4: System Use Sharing Protocol Terminator
                break
            if sig == b"CE" and len(body) >= 24:  # SUSP §5.1: Continuation Area
                hops += 1
                if hops > MAX_CONTINUATIONS:
                    raise FormatError(f"more than {MAX_CONTINUATIONS} continuation areas"
                                      " (a loop?)", path, structure="SUSP", field="CE")
                block, offset, ce_len = (struct.unpack_from("<L", body, 0)[0],
                                         struct.unpack_from("<L", body, 8)[0],
                                         struct.unpack_from("<L", body, 16)[0])
                if (block, offset, ce_len) in seen:
                    raise FormatError(f"continuation area loop: block {block} (+{offset},"
                                      f" {ce_len} bytes) is continued into twice", path,
                                      structure="SUSP", field="CE")
                seen.add((block, offset, ce_len))
                start = block * block_size + offset
                if ce_len > 65536 or block == 0 or start + ce_len > dev.size:
                    raise FormatError(f"continuation area at block {block} (+{offset},"
                                      f" {ce_len} bytes) is outside the image", path,
                                      structure="SUSP", field="CE")
                areas.append(dev.read(start, ce_len))
            elif sig == b"SP" and len(body) >= 3 and body[:2] == b"\xbe\xef":  # SUSP §5.3
                rr.skip = body[2]
            elif sig == b"PX" and len(body) >= 32:  # RRIP §4.1.1: POSIX file attributes
                rr.mode, rr.nlink, rr.uid, rr.gid = (
                    struct.unpack_from("<L", body, i)[0] for i in (0, 8, 16, 24))
            elif sig == b"NM" and len(body) >= 1:  # RRIP §4.1.4: alternate name
                rr.name_flags |= body[0] & 0x06
                if len(name) + len(body) - 1 > MAX_NAME_BYTES:
                    raise FormatError(f"alternate name longer than {MAX_NAME_BYTES} bytes",
                                      path, structure="RRIP", field="NM")
                name += body[1:]
            elif sig == b"SL" and len(body) >= 1:  # RRIP §4.1.3: symbolic link
                link_seen = True
                i = 1
                while i + 2 <= len(body):
                    cflags, clen = body[i], body[i + 1]
                    comp = body[i + 2:i + 2 + clen]
                    i += 2 + clen
                    if cflags & 0x02:
                        piece = b"."
                    elif cflags & 0x04:
                        piece = b".."
                    elif cflags & 0x08:
                        piece = b""
                        link_abs = link_abs or not link_parts
                    else:
                        piece = comp
                    if link_continue and link_parts:
                        link_parts[-1] += piece
                    else:
                        link_parts.append(piece)
                    link_continue = bool(cflags & 0x01)
                    if sum(map(len, link_parts)) > MAX_LINK_BYTES:
                        raise FormatError("symbolic link target longer than"
                                          f" {MAX_LINK_BYTES} bytes", path,
                                          structure="RRIP", field="SL")
            elif sig == b"TF" and len(body) >= 1:  # RRIP §4.1.6: time stamps
                flags = body[0]
                size = 17 if flags & 0x80 else 7
                conv = long_date if flags & 0x80 else record_date
                i = 1
                for bit in range(7):
                    if flags & (1 << bit):
                        stamp = conv(body[i:i + size])
                        if bit == 1:
                            rr.mtime = stamp
                        elif bit == 2:
                            rr.atime = stamp
                        i += size
            elif sig == b"CL" and len(body) >= 4:  # RRIP §4.1.5.1: child link
                rr.child_link = struct.unpack_from("<L", body, 0)[0]
            elif sig == b"RE":  # RRIP §4.1.5.3: relocated directory
                rr.relocated = True
            elif sig == b"PN" and len(body) >= 16:  # RRIP §4.1.2: POSIX device number
                rr.rdev = (struct.unpack_from("<L", body, 0)[0],
                           struct.unpack_from("<L", body, 8)[0])
    if name or rr.name_flags:
        rr.name = bytes(name)
    if link_seen:
        if link_abs:
            rr.target = b"/" + b"/".join(link_parts[1:])
        else:
            rr.target = b"/".join(link_parts)
    return rr


def decode_name(raw: bytes) -> str:
    """A Rock Ridge name as the file system would spell it (bytes that are not UTF-8
    survive as surrogate escapes, as ``os.fsdecode`` does on a UTF-8 system)."""
    return raw.decode("utf-8", "surrogateescape")
