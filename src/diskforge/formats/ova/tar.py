"""Indexing a tar archive (an OVA) in place: where each member's bytes are, nothing
extracted and no member name ever opened on disk.

An OVA is a tar (OVF 1.1+, DSP0243 "OVF package": the descriptor first, then the
manifest and certificate, then the files it references). Disks inside one are read
through a window onto the archive (``blockdev.WindowBackend``), so all this module has
to say is: which members there are, their names, sizes and data offsets.

Read: POSIX ustar headers (IEEE Std 1003.1-2001, "ustar Interchange Format"), the
pre-POSIX V7 header (no magic), GNU's ``ustar  `` headers with ``L``/``K`` long names
and base-256 sizes (GNU tar manual, "Basic Tar Format"), and pax extended headers
(``x`` per member, ``g`` global; ``path``, ``linkpath`` and ``size`` records).
Refused with "not supported yet": GNU sparse members (type ``S`` and pax
``GNU.sparse.*``), multi-volume continuations (type ``M``). Bounded: a member's data
must lie inside the file, long names and pax headers are at most ``MAX_META`` bytes,
at most ``MAX_MEMBERS`` members, and every step moves forward by at least one block,
so the walk is bounded by the file's size. A name that appears twice is refused (tar
would let the last one win; an OVA whose manifest checks one copy and whose disk is
read from another must not pass).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import FormatError, LimitError, UnsupportedError
from ...limits import check_alloc
from ...tarheader import BLOCK, CHKSUM_AT, CHKSUM_LEN, PosixHeader

MAX_META = 1 << 20          # a long name or pax header; real ones are a few hundred bytes
MAX_MEMBERS = 100_000       # an OVA holds a handful
ZERO_BLOCK = bytes(BLOCK)

USTAR_MAGIC = b"ustar\0"
GNU_MAGIC = b"ustar "

REGULAR = (b"0", b"\0", b"7")     # 7: contiguous file, read as a regular one
KINDS = {b"1": "hard link", b"2": "symbolic link", b"3": "character device",
         b"4": "block device", b"5": "directory", b"6": "FIFO"}


@dataclass(frozen=True)
class Member:
    """One archive member: its name (pax or GNU long name applied), kind ("file" for
    regular files), data size and where its data starts in the archive."""
    name: str
    kind: str
    size: int
    offset: int
    header_offset: int

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


def _strip_dot(name: str) -> str:
    """``./vm.ovf`` is ``vm.ovf`` (``tar -C dir .`` spells every name so)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def number(raw: bytes, path: str, field: str, at: int) -> int:
    """A numeric header field: octal ASCII (NUL- or space-terminated), or GNU's
    base-256 (first byte's top bit set), which tar uses for sizes of 8 GiB and more."""
    if raw[:1] and raw[0] & 0x80:
        if raw[0] & 0x40:
            raise FormatError(f"negative base-256 number in the header at offset {at}",
                              path, structure="tar header", field=field)
        return int.from_bytes(bytes([raw[0] & 0x3F]) + raw[1:], "big")
    text = raw.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise FormatError(f"{raw!r} is not an octal number (header at offset {at})", path,
                          structure="tar header", field=field)
    return int(text, 8)


def checksum_ok(block: bytes, path: str, at: int) -> bool:
    """The header checksum: the byte sum with the chksum field as spaces (unsigned, or
    signed as some old tars summed)."""
    want = number(block[CHKSUM_AT:CHKSUM_AT + CHKSUM_LEN], path, "chksum", at)
    rest = block[:CHKSUM_AT] + b" " * CHKSUM_LEN + block[CHKSUM_AT + CHKSUM_LEN:]
    unsigned = sum(rest)
    signed = unsigned - 256 * sum(1 for b in rest if b > 127)
    return want in (unsigned, signed)


def pax_records(data: bytes, path: str, at: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header (POSIX pax, "pax Extended
    Header File Times"...); each record's length counts itself, so the walk always
    moves forward and stops at the data's end."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > 0 else b""
        if not digits.isdigit():
            raise FormatError(f"bad record length at byte {pos} (header at offset {at})",
                              path, structure="pax extended header", field="length")
        length = int(digits)
        if length <= space - pos + 1 or pos + length > len(data) or \
                data[pos + length - 1:pos + length] != b"\n":
            raise FormatError(f"record at byte {pos} says {length} bytes, which do not"
                              f" end in a newline inside the header (at offset {at})",
                              path, structure="pax extended header", field="length")
        key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise FormatError(f"record at byte {pos} has no '=' (header at offset {at})",
                              path, structure="pax extended header", field="keyword")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                   "surrogateescape")
        pos += length
    return out


def _meta(backend, path: str, at: int, size: int, what: str) -> bytes:
    """The data of a long-name or pax header member, bounded."""
    check_alloc(size, path, what, "size", budget=MAX_META)
    return backend.read_exact(at + BLOCK, size, f"{what} data")


def index(backend, path: str) -> list[Member]:
    """Every member of the tar read through ``backend`` (a FileBackend or a window),
    in archive order. Stops at the end-of-archive zero block, or at the end of the
    file when it comes exactly at a header boundary (GNU tar reads both)."""
    file_size = backend.size
    members: list[Member] = []
    seen: set[str] = set()
    pending: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    long_name: str | None = None
    pos = 0
    while pos < file_size:
        if pos + BLOCK > file_size:
            raise FormatError(f"header at offset {pos}: the file ends inside it (truncated"
                              f" at {file_size} bytes)", path, structure="tar header")
        block = backend.read_exact(pos, BLOCK, "tar header")
        if block == ZERO_BLOCK:
            break
        if not checksum_ok(block, path, pos):
            raise FormatError(f"header at offset {pos} does not match its checksum (not a"
                              " tar header: damaged or not a tar)", path,
                              structure="tar header", field="chksum")
        h = PosixHeader.parse(block)
        flag = h.typeflag
        size = number(h.size, path, "size", pos)
        data_end = pos + BLOCK + size
        if data_end > file_size:
            raise FormatError(f"member at offset {pos} has {size} bytes of data, past the"
                              f" end of the file ({file_size} bytes): truncated", path,
                              structure="tar header", field="size")
        nxt = pos + BLOCK + -(-size // BLOCK) * BLOCK
        if flag in (b"x", b"g"):
            records = pax_records(_meta(backend, path, pos, size, "pax extended header"),
                                  path, pos)
            (pending if flag == b"x" else global_pax).update(records)
            pos = nxt
            continue
        if flag in (b"L", b"K"):
            data = _meta(backend, path, pos, size, "GNU long name")
            if flag == b"L":
                long_name = _text(data)
            pos = nxt
            continue
        pax = {**global_pax, **pending}
        if h.magic == USTAR_MAGIC and h.prefix[:1] != b"\0":
            name = _text(h.prefix) + "/" + _text(h.name)
        else:
            name = _text(h.name)
        name = _strip_dot(pax.get("path", long_name if long_name is not None else name))
        if flag == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
            raise UnsupportedError(f"not supported yet: GNU sparse tar members ('{name}'"
                                   f" at offset {pos})", path)
        if flag == b"M":
            raise UnsupportedError(f"not supported yet: multi-volume tar archives ('{name}'"
                                   f" at offset {pos} continues another volume)", path)
        if flag == b"V":            # a volume label, not a member
            pending, long_name, pos = {}, None, nxt
            continue
        if "size" in pax and flag in REGULAR:
            try:
                size = int(pax["size"])
            except ValueError:
                raise FormatError(f"size record {pax['size']!r} of '{name}' is not a"
                                  " number", path, structure="pax extended header",
                                  field="size") from None
            data_end = pos + BLOCK + size
            if size < 0 or data_end > file_size:
                raise FormatError(f"member '{name}' at offset {pos} has {size} bytes of"
                                  f" data, past the end of the file ({file_size} bytes):"
                                  " truncated", path, structure="pax extended header",
                                  field="size")
            nxt = pos + BLOCK + -(-size // BLOCK) * BLOCK
        kind = "file" if flag in REGULAR else KINDS.get(flag, f"type {flag!r}")
        if kind != "file":
            size = 0
        clean = name.rstrip("/") if kind == "directory" else name
        if clean in seen:
            raise FormatError(f"member '{clean}' appears twice (at offset {pos} again);"
                              " which copy is meant is ambiguous", path,
                              structure="tar header", field="name")
        seen.add(clean)
        members.append(Member(clean, kind, size, pos + BLOCK, pos))
        if len(members) > MAX_MEMBERS:
            raise LimitError(f"tar: more than {MAX_MEMBERS} members", path)
        pending, long_name, pos = {}, None, nxt
    return members


def starts_a_tar(head: bytes) -> bool:
    """True when ``head`` begins with a tar header whose checksum holds: the file is an
    archive (and is read as one, so its damage is reported as a tar's)."""
    block = head[:BLOCK]
    if len(block) < BLOCK or block == ZERO_BLOCK:
        return False
    try:
        return checksum_ok(block, "", 0)
    except FormatError:
        return False


def first_member_name(head: bytes) -> str | None:
    """The name of the first member when ``head`` (the file's first bytes) starts a tar
    whose first header checks out: for probing. Long names and pax headers are
    followed while they fit in ``head``."""
    pos, name = 0, None
    for _ in range(4):
        block = head[pos:pos + BLOCK]
        if len(block) < BLOCK or block == ZERO_BLOCK:
            return None
        try:
            if not checksum_ok(block, "", pos):
                return None
            h = PosixHeader.parse(block)
            size = number(h.size, "", "size", pos)
        except (FormatError, ValueError):
            return None
        data = head[pos + BLOCK:pos + BLOCK + size]
        if h.typeflag in (b"x", b"g", b"L"):
            if len(data) < size:
                return None
            if h.typeflag == b"L":
                name = _text(data)
            elif h.typeflag == b"x":
                try:
                    name = pax_records(data, "", pos).get("path", name)
                except FormatError:
                    return None
            pos += BLOCK + -(-size // BLOCK) * BLOCK
            continue
        if name is None:
            name = _text(h.name)
            if h.magic == USTAR_MAGIC and h.prefix[:1] != b"\0":
                name = _text(h.prefix) + "/" + name
        return _strip_dot(name)
    return None
