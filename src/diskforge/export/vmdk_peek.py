"""What an import rule needs to know of a VMDK: its ``createType`` and capacity.

AWS and vSphere decide on the descriptor's ``createType`` ("streamOptimized" or
not), which is text, so the checkers read it here rather than through a VMDK reader:
they then work on any VMDK, whether or not a plugin reads that kind, and never
decode grains. Layouts from VMware's "Virtual Disk Format 5.0" specification:
"Hosted Sparse Extent Header" (``SparseExtentHeader``, magic ``KDMV``, the embedded
descriptor at ``descriptorOffset`` sectors, ``descriptorSize`` sectors long) and "The
Descriptor File" (a text file starting ``# Disk DescriptorFile``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from construct import Bytes, Int8ub, Int16ul, Int32ul, Int64ul, Struct

from ..errors import FormatError

SECTOR = 512
MAX_DESCRIPTOR = 64 << 10     # real descriptors are under 2 KiB; qemu reads at most 1 MiB

# spec: "Hosted Sparse Extent Header"
SparseExtentHeader = Struct(
    "magicNumber" / Bytes(4),
    "version" / Int32ul,
    "flags" / Int32ul,
    "capacity" / Int64ul,
    "grainSize" / Int64ul,
    "descriptorOffset" / Int64ul,
    "descriptorSize" / Int64ul,
    "numGTEsPerGT" / Int32ul,
    "rgdOffset" / Int64ul,
    "gdOffset" / Int64ul,
    "overHead" / Int64ul,
    "uncleanShutdown" / Int8ub,
    "singleEndLineChar" / Bytes(1),
    "nonEndLineChar" / Bytes(1),
    "doubleEndLineChar1" / Bytes(1),
    "doubleEndLineChar2" / Bytes(1),
    "compressAlgorithm" / Int16ul,
)
_CREATE_TYPE = re.compile(rb'^\s*createType\s*=\s*"([^"\r\n]*)"', re.M)


@dataclass
class VmdkFacts:
    create_type: str | None
    capacity: int | None          # bytes; from the sparse header


def peek(path: str) -> VmdkFacts | None:
    """The facts of the VMDK at ``path``, or None when it is not a VMDK."""
    from ..devices import open_input_file
    with open_input_file(path) as f:
        return peek_file(f, 0, path)


def peek_file(f, base: int, name: str) -> VmdkFacts | None:
    """The same for a VMDK that starts at ``base`` in the open file ``f`` (a disk
    inside an OVA); ``name`` is what errors call it."""
    f.seek(base)
    head = f.read(SECTOR)
    if head.startswith(b"# Disk DescriptorFile"):
        f.seek(base)
        return VmdkFacts(_create_type(f.read(MAX_DESCRIPTOR)), None)
    if head[:4] != b"KDMV" or len(head) < SparseExtentHeader.sizeof():
        return None
    h = SparseExtentHeader.parse(head)
    desc = b""
    if h.descriptorOffset and h.descriptorSize:
        if h.descriptorSize * SECTOR > MAX_DESCRIPTOR:
            raise FormatError(f"{h.descriptorSize} sectors is more than a descriptor"
                              " holds", name, structure="SparseExtentHeader",
                              field="descriptorSize")
        f.seek(base + h.descriptorOffset * SECTOR)
        desc = f.read(h.descriptorSize * SECTOR)
    return VmdkFacts(_create_type(desc), h.capacity * SECTOR)


def _create_type(text: bytes) -> str | None:
    m = _CREATE_TYPE.search(text.split(b"\x00", 1)[0])
    return m.group(1).decode("latin-1") if m else None
