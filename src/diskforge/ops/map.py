"""map: where every byte of a virtual disk comes from, like ``qemu-img map``.

BACKING extents are resolved down the chain, so each entry says at which depth the
data lives (``depth``), whether some layer allocates it (``present``), whether it reads
as zeros (``zero``), whether a layer stores bytes for it (``data``), and where in that
layer's file (``offset``). ``compare -s`` uses the same resolution.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..blockdev import BlockDevice, ExtentKind, chain_extents
from ..errors import printable
from ..records import Record


class MapEntry(Record):
    """One run of ``map``'s output, as qemu-img map prints it."""
    __slots__ = ("start", "length", "depth", "present", "zero", "data", "offset",
                 "filename")

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool,
                 data: bool, offset: int | None, filename: str | None):
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename

    def continues(self, other: "MapEntry") -> bool:
        """True when ``other`` directly follows this entry and can merge with it."""
        if (self.start + self.length != other.start or self.depth != other.depth
                or self.present != other.present or self.zero != other.zero
                or self.data != other.data or self.filename != other.filename):
            return False
        if self.offset is None or other.offset is None:
            return self.offset is None and other.offset is None
        return self.offset + self.length == other.offset

    def to_json(self) -> dict:
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def resolve(dev: BlockDevice, offset: int = 0, length: int | None = None, *,
            as_mapped: bool = False) -> Iterator[MapEntry]:
    """Uncoalesced entries for ``[offset, offset+length)`` with the chain resolved
    (``as_mapped``: as ``qemu-img map`` reports them, see ``BlockDevice.map_extents``)."""
    for le in chain_extents(dev, offset, length, as_mapped=as_mapped):
        e, depth = le.extent, le.depth
        if e.kind is ExtentKind.ZERO:
            # qemu shows the offset of reserved but unallocated space too (qcow2
            # subclusters, preallocated clusters): "present" false, "offset" set
            yield MapEntry(e.offset, e.length, depth, e.allocated, True, False,
                           e.host_offset,
                           e.host_file or le.device.path
                           if e.allocated and e.host_offset is not None else None)
        else:
            yield MapEntry(e.offset, e.length, depth, True, False, True, e.host_offset,
                           e.host_file or le.device.path)


def map_image(dev: BlockDevice, offset: int = 0, length: int | None = None, *,
              as_mapped: bool = False) -> Iterator[MapEntry]:
    """Coalesced map entries, in order, covering the requested range (``as_mapped``:
    qemu-img map's granularity, for the ``map`` command; measure keeps the finer one)."""
    if length is None:
        length = dev.size - offset
    length = max(0, min(length, dev.size - offset))
    cur: MapEntry | None = None
    for e in resolve(dev, offset, length, as_mapped=as_mapped):
        if cur is not None and cur.continues(e):
            cur.length += e.length
        else:
            if cur is not None:
                yield cur
            cur = e
    if cur is not None:
        yield cur


def format_json(entries) -> str:
    """The exact layout ``qemu-img map --output json`` prints."""
    import json  # only here: convert imports this module through measure
    rows = []
    for e in entries:
        d = e.to_json()
        rows.append("{ " + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in d.items()) + "}")
    return "[" + ",\n".join(rows) + "]"


def _hex(n: int) -> str:
    return "0" if n == 0 else f"{n:#x}"


def format_human(entries) -> str:
    """The ``qemu-img map`` table: only ranges whose data lives in some file."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset is not None:
            lines.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}"
                         f"{printable(e.filename)}")
    return "\n".join(lines)
