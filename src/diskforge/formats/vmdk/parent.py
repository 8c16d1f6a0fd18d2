"""What a delta disk records of its parent: the parent's content ID (``CID``), which the
child keeps as ``parentCID`` (VMware checks the two match before it reads through).

The reader's device, when the parent was opened by it, has the parsed descriptor; a
parent that was only named (``create -u``, or before the reader existed) is read here:
a descriptor file, or the descriptor embedded in a sparse extent. Both are bounded
(``descriptor.MAX_DESCRIPTOR_BYTES``) and every field is validated before use.
"""

from __future__ import annotations

from ...blockdev import FileBackend
from ...errors import FormatError
from .descriptor import MAX_DESCRIPTOR_BYTES, Descriptor, looks_like_descriptor, parse
from .structs import SECTOR, SPARSE_HEADER_SIZE, SPARSE_MAGIC, SparseExtentHeader


def parent_descriptor(path: str, device=None) -> Descriptor:
    """The parent's descriptor: from its opened device when it has one, else read."""
    known = getattr(device, "descriptor", None)
    if isinstance(known, Descriptor):
        return known
    with FileBackend(path, lock=False) as f:  # a glance, as qemu-img's create does
        head = f.pread(0, SPARSE_HEADER_SIZE)
        if head[:4] == SPARSE_MAGIC and len(head) == SPARSE_HEADER_SIZE:
            h = SparseExtentHeader.parse(head)
            if not h.descriptorOffset or not h.descriptorSize:
                raise FormatError("the parent is an extent without a descriptor: name"
                                  " its descriptor file", path,
                                  structure="SparseExtentHeader", field="descriptorOffset")
            nbytes = h.descriptorSize * SECTOR
            if nbytes > MAX_DESCRIPTOR_BYTES:
                raise FormatError(f"{h.descriptorSize} sectors, more than a descriptor"
                                  " may have", path, structure="SparseExtentHeader",
                                  field="descriptorSize")
            if h.descriptorOffset * SECTOR + nbytes > f.size:
                raise FormatError(f"sector {h.descriptorOffset} (+{h.descriptorSize}) is"
                                  " past the end of the file", path,
                                  structure="SparseExtentHeader", field="descriptorOffset")
            data = f.read_exact(h.descriptorOffset * SECTOR, nbytes, "the descriptor")
        elif looks_like_descriptor(head):
            data = f.pread(0, MAX_DESCRIPTOR_BYTES + 1)
        else:
            raise FormatError("not a VMDK descriptor or sparse extent", path,
                              structure="descriptor")
    return parse(data, path)
