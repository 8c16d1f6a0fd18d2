"""What an import rule needs to know of a VMDK: its ``createType`` and capacity.

AWS and vSphere decide on the descriptor's ``createType`` ("streamOptimized" or
not), which is text, so the checkers read it here rather than opening the disk: they
then judge any VMDK, including kinds the reader refuses (raw-device maps) and flat
descriptors whose extents are not beside them, and never decode grains. Layouts from
VMware's "Virtual Disk Format 5.0" specification: "Hosted Sparse Extent Header"
(``SparseExtentHeader``, declared once by the VMDK plugin: magic ``KDMV``, the embedded
descriptor at ``descriptorOffset`` sectors, ``descriptorSize`` sectors long) and "The
Descriptor File" (a text file starting ``# Disk DescriptorFile``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import FormatError
from ..formats.vmdk.structs import SparseExtentHeader  # declared once, by the plugin

SECTOR = 512
MAX_DESCRIPTOR = 64 << 10     # real descriptors are under 2 KiB; qemu reads at most 1 MiB

_CREATE_TYPE = re.compile(rb'^\s*createType\s*=\s*"([^"\r\n]*)"', re.M)


@dataclass
class VmdkFacts:
    """The VMDK facts an import target's rules are checked against."""
    create_type: str | None
    capacity: int | None          # bytes; from the sparse header


def peek_file(f, base: int, name: str) -> VmdkFacts | None:
    """The facts of the VMDK that starts at ``base`` in the open file ``f`` (the whole
    file, or a disk inside an OVA), or None when it is not a VMDK; ``name`` is what
    errors call it."""
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
