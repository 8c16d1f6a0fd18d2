"""The VMDK text descriptor: parsed, validated and written.

Layout (Virtual Disk Format 5.0, "The Descriptor File"): a header section of
``key=value`` lines (``version``, ``encoding``, ``CID``, ``parentCID``, ``createType``,
``parentFileNameHint`` ...), an extent section of lines ``ACCESS SECTORS TYPE
["FILENAME" [OFFSET]]``, and the disk database, ``ddb.key = "value"`` lines. VMware
writes spaces around ``=`` in the database and none in the header; VirtualBox writes
none anywhere and its own keys (``ddb.uuid.image``, ``ddb.uuid.parent`` ...); the stream
converter (open-vmdk) adds comment lines. The parser accepts all of these and keeps
unknown keys, in order, so a descriptor rewritten by us (a new CID, a new parent hint)
keeps what other tools put there.

The descriptor is attacker-controlled text: its size is capped before it is read,
the number of extents is bounded, and every field is checked here, with the line it
came from, so no other module has to.
"""

from __future__ import annotations

import dataclasses
import re

from ...errors import FormatError, UnsupportedError

SIGNATURE = "# Disk DescriptorFile"
MAX_DESCRIPTOR_BYTES = 1 << 20     # VMware's are under 2 KiB; qemu refuses over 1 MiB
MAX_EXTENTS = 4096                 # a 2 GiB-split 8 TiB disk has 4096 extents
NO_PARENT_CID = 0xFFFFFFFF

ACCESS = ("RW", "RDONLY", "NOACCESS")
# extent types we read; raw-device types are recognised and refused
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE")
RAW_DEVICE_EXTENTS = ("VMFSRDM", "VMFSRAW")
CREATE_TYPES = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                "twoGbMaxExtentFlat", "streamOptimized", "vmfs", "vmfsThin",
                "vmfsSparse", "seSparse", "vmfsPreallocated", "vmfsEagerZeroedThick",
                "custom")
RAW_DEVICE_CREATE_TYPES = ("vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap",
                           "fullDevice", "partitionedDevice")

_EXTENT_RE = re.compile(
    r'^(?P<access>\w+)\s+(?P<sectors>\d+)\s+(?P<type>\w+)'
    r'(?:\s+"(?P<name>[^"]*)"(?:\s+(?P<offset>\d+))?)?\s*$')
_KV_RE = re.compile(r'^(?P<key>[A-Za-z0-9_.]+)\s*=\s*(?P<value>.*?)\s*$')


@dataclasses.dataclass
class ExtentLine:
    """One line of the extent section. ``offset`` (sectors) is where a FLAT/VMFS
    extent's data starts in its file; ``filename`` is None for ZERO extents."""
    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int = 0

    def render(self) -> str:
        if self.filename is None:
            return f"{self.access} {self.sectors} {self.type}"
        text = f'{self.access} {self.sectors} {self.type} "{self.filename}"'
        if self.type in ("FLAT", "VMFS"):
            text += f" {self.offset}"   # VMware and qemu always write it, 0 included
        return text


@dataclasses.dataclass
class Descriptor:
    """A parsed descriptor. ``header`` and ``ddb`` keep every key in file order with
    its value unquoted; the typed properties read and write through them."""
    header: dict[str, str] = dataclasses.field(default_factory=dict)
    extents: list[ExtentLine] = dataclasses.field(default_factory=list)
    ddb: dict[str, str] = dataclasses.field(default_factory=dict)

    # -- typed views -----------------------------------------------------------------
    @property
    def create_type(self) -> str:
        return self.header.get("createType", "")

    @property
    def cid(self) -> int:
        return int(self.header.get("CID", "ffffffff"), 16)  # checked by parse()

    @cid.setter
    def cid(self, value: int) -> None:
        self.header["CID"] = f"{value:08x}"

    @property
    def parent_cid(self) -> int:
        return int(self.header.get("parentCID", "ffffffff"), 16)

    @parent_cid.setter
    def parent_cid(self, value: int) -> None:
        self.header["parentCID"] = f"{value:08x}"

    @property
    def parent_hint(self) -> str | None:
        return self.header.get("parentFileNameHint") or None

    @property
    def capacity_sectors(self) -> int:
        return sum(e.sectors for e in self.extents)

    # -- writing ---------------------------------------------------------------------
    def render(self) -> str:
        """The descriptor as VMware's tools write it: header without spaces around
        ``=``, quoted where VMware quotes, database keys with spaces."""
        lines = [SIGNATURE]
        for key, value in self.header.items():
            if key in ("version", "CID", "parentCID"):
                lines.append(f"{key}={value}")
            else:
                lines.append(f'{key}="{value}"')
        lines += ["", "# Extent description"]
        lines += [e.render() for e in self.extents]
        lines += ["", "# The Disk Data Base", "#DDB", ""]
        lines += [f'{key} = "{value}"' for key, value in self.ddb.items()]
        return "\n".join(lines) + "\n"


def looks_like_descriptor(head: bytes) -> bool:
    """True when ``head`` starts like a text descriptor (VMware's signature line, or
    the stream converter's comment followed by ``version=1`` / ``createType``)."""
    if head.startswith(SIGNATURE.encode()):
        return True
    if not head.startswith(b"#"):
        return False
    text = head[:4096]
    if b"\x00" in text.rstrip(b"\x00"):
        return False
    return b"createType" in text and b"version=" in text


def parse(data: bytes, path: str | None = None) -> Descriptor:
    """Parse descriptor bytes (an embedded descriptor's sectors or a descriptor file),
    stopping at the first NUL (embedded descriptors are NUL-padded). Raises FormatError
    naming the line for anything malformed, UnsupportedError for raw-device disks."""
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise FormatError(f"{len(data)} bytes, more than the {MAX_DESCRIPTOR_BYTES} a"
                          " descriptor may have", path, structure="descriptor")
    data = data.split(b"\x00", 1)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # old VMware descriptors are in the host's code page
    desc = Descriptor()
    section = "header"
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if line.lower().startswith("#ddb") or "disk data base" in line.lower():
                section = "ddb"
            elif "extent description" in line.lower():
                section = "extents"
            continue
        m = _EXTENT_RE.match(line)
        if m and m["access"] in ACCESS:
            section = "extents"
            desc.extents.append(_extent(m, number, path))
            if len(desc.extents) > MAX_EXTENTS:
                raise FormatError(f"more than {MAX_EXTENTS} extents", path,
                                  structure="descriptor", field="extents")
            continue
        kv = _KV_RE.match(line)
        if kv is None:
            raise FormatError(f"line {number} is neither key=value nor an extent:"
                              f" {_short(line)}", path, structure="descriptor")
        key, value = kv["key"], _unquote(kv["value"])
        if key.startswith("ddb."):
            desc.ddb[key] = value
        elif section == "header" or not desc.extents:
            desc.header[key] = value
        else:
            desc.ddb[key] = value  # keys after the extents, without "ddb.": keep them
    _validate(desc, path)
    return desc


def _extent(m: re.Match, number: int, path: str | None) -> ExtentLine:
    kind = m["type"].upper()
    if kind in RAW_DEVICE_EXTENTS:
        raise UnsupportedError(f"not supported yet: VMDK extents of type {kind} (raw"
                               " device mappings) on descriptor line"
                               f" {number}", path)
    if kind not in EXTENT_TYPES:
        raise FormatError(f"line {number}: unknown extent type '{_short(m['type'])}'",
                          path, structure="descriptor", field="extent type")
    name = m["name"]
    if kind == "ZERO":
        name = None
    elif not name:
        raise FormatError(f"line {number}: a {kind} extent names no file", path,
                          structure="descriptor", field="extent file name")
    if "\x00" in (name or ""):
        raise FormatError(f"line {number}: NUL in the extent file name", path,
                          structure="descriptor", field="extent file name")
    return ExtentLine(access=m["access"], sectors=int(m["sectors"]), type=kind,
                      filename=name, offset=int(m["offset"] or 0))


def _validate(desc: Descriptor, path: str | None) -> None:
    ct = desc.create_type
    if ct in RAW_DEVICE_CREATE_TYPES:
        raise UnsupportedError(f"not supported yet: VMDK createType '{ct}' (the disk is a"
                               " raw device or partitions of one, not an image)", path)
    if not ct:
        raise FormatError("no createType", path, structure="descriptor",
                          field="createType")
    if ct not in CREATE_TYPES:
        raise FormatError(f"unknown createType '{_short(ct)}'", path,
                          structure="descriptor", field="createType")
    if not desc.extents:
        raise FormatError("no extents", path, structure="descriptor", field="extents")
    for key in ("CID", "parentCID"):
        if key in desc.header:
            _cid(desc.header[key], key, path)
    version = desc.header.get("version", "1")
    if version not in ("1", "2", "3"):
        raise FormatError(f"version {_short(version)} is not 1, 2 or 3", path,
                          structure="descriptor", field="version")


def _cid(text: str, field: str, path: str | None) -> int:
    if not re.fullmatch(r"[0-9a-fA-F]{1,8}", text):
        raise FormatError(f"'{_short(text)}' is not a 32-bit hexadecimal number", path,
                          structure="descriptor", field=field)
    return int(text, 16)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _short(text: str, limit: int = 60) -> str:
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."
