"""ASIF on-disk structures and the table geometry they imply.

No official specification exists. The facts here were taken from the public notes of
fox-it's dissect.hypervisor (which reversed Apple's ``diskimagescontroller``) and
checked on a real image (``formats/asif.md``); names are ours, describing each field.
Every integer is big-endian.

- ``AsifHeader`` at offset 0: signature ``shdw``, version 1, two directory offsets (bytes),
  the disk's size and maximum size in blocks, chunk size (the allocation unit, 1 MiB
  as Apple writes it) and block size (512).
- A *directory* (at each directory offset): a 64-bit version, then one 64-bit chunk
  number per *table*; the directory with the higher version is the current one (the
  other is the previous state, so updates are atomic).
- A *table* (one chunk): 64-bit entries, each a chunk number in its low 55 bits (0:
  not allocated, reads as zeros) with flags above (bit 63 "content dirty", bit 62
  "entry dirty", bits 55-61 reserved). After every ``reserved_entries`` data entries
  comes one entry that is not a data chunk (it names a chunk of per-group state that
  reading does not need), so data chunk ``c`` of a table is entry ``c + c //
  reserved_entries``.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import Array, Bytes, Int16ub, Int32ub, Int64ub, Struct

from ...errors import FormatError, UnsupportedError

ASIF_SIGNATURE = b"shdw"
ASIF_VERSION = 1
CHUNK_MASK = (1 << 55) - 1

AsifHeader = Struct(
    "signature" / Bytes(4),
    "version" / Int32ub,
    "header_size" / Int32ub,
    "flags" / Int32ub,
    "directory_offsets" / Array(2, Int64ub),
    "guid" / Bytes(16),
    "sector_count" / Int64ub,
    "max_sector_count" / Int64ub,
    "chunk_size" / Int32ub,
    "block_size" / Int16ub,
    "total_segments" / Int16ub,
    "metadata_chunk" / Int64ub,
    "reserved" / Bytes(16),
    "read_only_flags" / Int32ub,
    "metadata_flags" / Int32ub,
    "metadata_read_only_flags" / Int32ub,
)
HEADER_SIZE = AsifHeader.sizeof()  # 108


@dataclass(frozen=True)
class Geometry:
    """How a table maps the disk: ``entries`` per table, ``reserved_entries`` data
    entries per group (each group followed by one entry that is not data), and the
    bytes of disk one table covers."""
    chunk_size: int
    block_size: int
    entries: int
    reserved_entries: int
    bytes_per_table: int

    def entry_index(self, chunk_in_table: int) -> int:
        return chunk_in_table + chunk_in_table // self.reserved_entries


def geometry(h, path: str | None) -> Geometry:
    """The table geometry of header ``h``, validated (the arithmetic is
    ``diskimagescontroller``'s as dissect.hypervisor records it)."""
    cs, bs = h.chunk_size, h.block_size
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        raise FormatError(f"{bs} is not a block size (a power of two, 512..65536)", path,
                          structure="AsifHeader", field="block_size")
    if cs < 4096 or cs > 64 << 20 or cs & (cs - 1) or cs % bs:
        raise FormatError(f"{cs} is not a chunk size (a power of two, 4 KiB..64 MiB, a"
                          " multiple of block_size)", path, structure="AsifHeader",
                          field="chunk_size")
    blocks_per_chunk = cs // bs
    reserved_size = 4 * cs
    reserved = 1 if reserved_size < blocks_per_chunk else reserved_size // blocks_per_chunk
    most = cs >> 3
    entries = most - most % (reserved + 1)
    directory_reserved = (reserved + entries) // (reserved + 1)
    usable = entries - directory_reserved
    if usable <= 0:
        raise UnsupportedError(f"AsifHeader.chunk_size: not supported yet: {cs}-byte chunks"
                               f" of {bs}-byte blocks (tables with no data entries)", path)
    return Geometry(cs, bs, entries, reserved, usable * cs)
