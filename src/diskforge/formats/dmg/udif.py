"""Reading UDIF: the ``koly`` trailer, the XML resource fork, ``mish`` tables, checked.

A UDIF image (what hdiutil calls UDRO, UDZO, UDBZ, ULFO, ULMO, UDCO, UDRW) is a *data
fork* of chunks, an XML property list, and a 512-byte trailer at the very end of the
file (``UDIFResourceFile``, signature ``koly``). The plist's ``resource-fork`` dict
holds one ``blkx`` entry per partition (a base64 ``BLKXTable``, signature ``mish``,
followed by its chunk entries) plus other resources (``plst``, ``cSum``, ``nsiz``...),
kept here for ``info``. The structures themselves are declared in ``structs``.

Field names follow the reverse-engineered specifications: Jonathan Levin, "Demystifying
the DMG File Format" (newosxbook.com/DMG.html), and libyal's "Mac OS disk image types"
(libmodi documentation). Everything read is validated here before the reader trusts
it: offsets and lengths against the file, sector ranges against the disk, chunk counts
against the bytes that hold them, and chunk tables against each other.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from ...errors import FormatError, UnsupportedError
from . import codecs
from .structs import (BLKX_HEADER_SIZE, CHECKSUM_CRC32, CHUNK_STRUCT, KOLY_SIZE, SECTOR,
                      BLKXTable, UDIFResourceFile)

# Limits on what a file may make us allocate or trust
MAX_XML_BYTES = 256 << 20      # a 1 TiB UDZO's plist is about 55 MiB
MAX_CHUNK_BYTES = 64 << 20     # a compressed chunk's decompressed size (qemu's limit);
                               # hdiutil writes at most 1 MiB
MAX_SECTORS = (1 << 63) // SECTOR


def checksum_value(ck) -> int | None:
    """The CRC-32 in a UDIFChecksum, or None when it is not a CRC-32."""
    if ck.Type == CHECKSUM_CRC32 and ck.Size == 32:
        return int.from_bytes(ck.Data[:4], "big")
    return None


def make_checksum(crc: int) -> dict:
    return {"Type": CHECKSUM_CRC32, "Size": 32,
            "Data": crc.to_bytes(4, "big") + bytes(124)}


# -- the trailer ---------------------------------------------------------------------------

def parse_trailer(raw: bytes, file_size: int, path: str):
    """The validated ``koly`` trailer (a construct Container)."""
    if len(raw) < KOLY_SIZE or raw[:4] != b"koly":
        at = raw.find(b"koly")
        if at > 0:
            raise FormatError(f"the trailer is cut off ({at} bytes missing at the end of"
                              " the file): truncated", path, structure="UDIFResourceFile")
        raise FormatError("no UDIF trailer ('koly') in the last 512 bytes: truncated or"
                          " not a DMG", path, structure="UDIFResourceFile")
    koly = UDIFResourceFile.parse(raw)
    where = {"structure": "UDIFResourceFile"}
    if koly.Version != 4:
        raise UnsupportedError(f"not supported yet: UDIF trailer version {koly.Version}"
                               " (only 4 is known)", path)
    if koly.HeaderSize != KOLY_SIZE:
        raise FormatError(f"{koly.HeaderSize} is not 512", path, field="HeaderSize", **where)
    body = file_size - KOLY_SIZE
    for name in ("DataFork", "RsrcFork", "XML"):
        off, length = koly[f"{name}Offset"], koly[f"{name}Length"]
        if off > body or length > body - off:
            raise FormatError(f"{name} at {off} (+{length}) runs past the end of the file"
                              f" ({file_size} bytes): truncated or corrupt", path,
                              field=f"{name}Length", **where)
    if koly.SegmentCount > 1:
        raise UnsupportedError(f"not supported yet: segmented DMG (segment"
                               f" {koly.SegmentNumber} of {koly.SegmentCount})", path)
    if koly.SectorCount > MAX_SECTORS:
        raise FormatError(f"{koly.SectorCount} sectors is beyond any disk", path,
                          field="SectorCount", **where)
    if koly.XMLLength == 0:
        raise UnsupportedError("not supported yet: DMG without an XML property list"
                               " (legacy resource fork or UDIF stub)", path)
    if koly.XMLLength > MAX_XML_BYTES:
        raise FormatError(f"property list of {koly.XMLLength} bytes is larger than the"
                          f" {MAX_XML_BYTES >> 20} MiB limit", path, field="XMLLength",
                          **where)
    return koly


# -- the property list -----------------------------------------------------------------------

@dataclass
class BlkxEntry:
    """One ``blkx`` resource: its names and its parsed table."""
    index: int
    name: str
    id: str
    attributes: str
    table: object                     # BLKXTable container
    chunks: list[tuple] = field(repr=False, default_factory=list)  # CHUNK_STRUCT tuples
    checksum: int | None = None       # the stored CRC-32, None when not a CRC-32


@dataclass
class ResourceFork:
    """A UDIF resource fork: the blkx tables and the resources kept as they are."""
    blkx: list[BlkxEntry]
    other: dict[str, list[dict]]      # resource type -> [{"ID", "Name", "Attributes", size}]


def parse_plist(xml, path: str) -> ResourceFork:
    """The blkx entries and the other resources of the XML property list (its bytes,
    or an iterable of pieces of them: it is parsed as it is read, never held whole)."""
    from .plist import PlistError, loads
    try:
        top = loads(xml, max_bytes=MAX_XML_BYTES)
    except PlistError as e:
        raise FormatError(f"the XML property list is not valid ({e})", path,
                          structure="plist") from None
    fork = top.get("resource-fork") if isinstance(top, dict) else None
    if not isinstance(fork, dict):
        raise FormatError("the property list has no 'resource-fork' dictionary", path,
                          structure="plist")
    blkx = fork.get("blkx")
    if not isinstance(blkx, list) or not blkx:
        raise FormatError("the resource fork has no 'blkx' entries", path,
                          structure="plist")
    entries = []
    for i, res in enumerate(blkx):
        if not isinstance(res, dict) or not isinstance(res.get("Data"), bytes):
            raise FormatError(f"blkx entry {i} has no Data", path, structure="plist")
        name = res.get("Name") or res.get("CFName") or ""
        entries.append(_parse_blkx(i, str(name), str(res.get("ID", "")),
                                   str(res.get("Attributes", "")), res["Data"], path))
    other = {}
    for kind, items in fork.items():
        if kind == "blkx" or not isinstance(items, list):
            continue
        other[kind] = [{"ID": str(r.get("ID", "")), "Name": str(r.get("Name", "")),
                        "Attributes": str(r.get("Attributes", "")),
                        "size": len(r.get("Data", b"")) if isinstance(r.get("Data"), bytes)
                        else 0}
                       for r in items if isinstance(r, dict)]
    return ResourceFork(entries, other)


def _parse_blkx(index: int, name: str, ident: str, attributes: str, data: bytes,
                path: str) -> BlkxEntry:
    where = {"structure": "BLKXTable"}
    if len(data) < BLKX_HEADER_SIZE or data[:4] != b"mish":
        raise FormatError(f"blkx entry {index} ('{name}') does not start with a 'mish'"
                          " table", path, **where)
    table = BLKXTable.parse(data)
    n = table.NumberOfBlockChunks
    if BLKX_HEADER_SIZE + n * CHUNK_STRUCT.size > len(data):
        raise FormatError(f"{n} chunks do not fit in blkx entry {index}'s"
                          f" {len(data)} bytes", path, field="NumberOfBlockChunks", **where)
    if table.SectorNumber > MAX_SECTORS or table.SectorCount > MAX_SECTORS \
            or table.SectorNumber + table.SectorCount > MAX_SECTORS:
        raise FormatError(f"blkx entry {index} covers sectors beyond any disk", path,
                          field="SectorCount", **where)
    view = memoryview(data)[BLKX_HEADER_SIZE:BLKX_HEADER_SIZE + n * CHUNK_STRUCT.size]
    chunks = list(CHUNK_STRUCT.iter_unpack(view))
    return BlkxEntry(index, name, ident, attributes, table, chunks,
                     checksum_value(table.Checksum))


# -- the chunk map ---------------------------------------------------------------------------

GAP = 0xFFFFFFF0  # a range no chunk describes: reads as zeros


@dataclass
class ChunkMap:
    """Every sector of the disk, as contiguous runs sorted by offset (arrays, not
    objects: a 1 TiB image has a million chunks). Run ``i`` covers bytes
    ``[start[i], start[i+1])``; ``start`` has a final sentinel equal to the disk size."""
    start: array      # 'Q' disk byte offsets, len n+1
    kind: array       # 'L' chunk type (or GAP)
    offset: array     # 'Q' absolute file offset of the stored bytes
    length: array     # 'Q' stored bytes
    blkx: array       # 'l' index of the blkx entry, -1 for gaps

    def __len__(self) -> int:
        return len(self.kind)


def build_chunk_map(koly, fork: ResourceFork, path: str) -> tuple[ChunkMap, int]:
    """The disk's chunk map and its size in bytes, after checking every chunk against
    the data fork, its table and every other chunk."""
    df_start = koly.DataForkOffset
    df_end = df_start + koly.DataForkLength
    runs = []
    for entry in fork.blkx:
        t = entry.table
        base = t.SectorNumber
        for j, (kind, _comment, sec, count, coff, clen) in enumerate(entry.chunks):
            if kind in codecs.MARKERS or count == 0:
                continue
            where = f"blkx entry {entry.index} ('{entry.name}') chunk {j}"
            if kind not in codecs.NAMES:
                raise UnsupportedError(f"not supported yet: {where} has chunk type"
                                       f" 0x{kind:08x}", path)
            if sec > t.SectorCount or count > t.SectorCount - sec:
                raise FormatError(f"{where}: sectors {sec}+{count} are outside its table's"
                                  f" {t.SectorCount} sectors", path,
                                  structure="BLKXChunkEntry", field="SectorCount")
            if kind in codecs.STORED:
                nbytes = count * SECTOR
                if kind != codecs.RAW and nbytes > MAX_CHUNK_BYTES:
                    raise FormatError(f"{where}: declares {nbytes} decompressed bytes,"
                                      f" more than the {MAX_CHUNK_BYTES >> 20} MiB a chunk"
                                      " may hold", path, structure="BLKXChunkEntry",
                                      field="SectorCount")
                if kind == codecs.RAW and clen != nbytes:
                    raise FormatError(f"{where}: a raw chunk of {count} sectors stores"
                                      f" {clen} bytes", path, structure="BLKXChunkEntry",
                                      field="CompressedLength")
                if kind != codecs.RAW and clen > nbytes + nbytes // 8 + 4096:
                    raise FormatError(f"{where}: {clen} compressed bytes for {nbytes}"
                                      " bytes of data", path, structure="BLKXChunkEntry",
                                      field="CompressedLength")
                start = df_start + t.DataOffset + coff
                if start + clen > df_end:
                    raise FormatError(f"{where}: stored at {start} (+{clen}), outside the"
                                      f" data fork [{df_start}, {df_end})", path,
                                      structure="BLKXChunkEntry",
                                      field="CompressedOffset")
            else:
                start, clen = 0, 0
            runs.append(((base + sec) * SECTOR, count * SECTOR, kind, start, clen,
                         entry.index))
    runs.sort()
    size = koly.SectorCount * SECTOR
    end_of_chunks = runs[-1][0] + runs[-1][1] if runs else 0
    if size == 0:
        size = end_of_chunks
    if end_of_chunks > size:
        raise FormatError(f"chunks describe {end_of_chunks} bytes, more than the disk's"
                          f" {size}", path, structure="UDIFResourceFile",
                          field="SectorCount")
    cmap = ChunkMap(array("Q"), array("L"), array("Q"), array("Q"), array("l"))
    pos = 0
    prev = None
    for start, n, kind, off, clen, bi in runs:
        if start < pos:
            raise FormatError(f"chunk tables overlap: bytes {start}-{pos} of the disk are"
                              f" claimed by blkx entries {prev} and {bi}", path,
                              structure="BLKXChunkEntry", field="SectorNumber")
        if start > pos:
            _append(cmap, pos, GAP, 0, 0, -1)
        _append(cmap, start, kind, off, clen, bi)
        pos, prev = start + n, bi
    if pos < size or not len(cmap):
        _append(cmap, pos, GAP, 0, 0, -1)
    cmap.start.append(size)
    return cmap, size


def _append(cmap: ChunkMap, start: int, kind: int, off: int, length: int, bi: int) -> None:
    cmap.start.append(start)
    cmap.kind.append(kind)
    cmap.offset.append(off)
    cmap.length.append(length)
    cmap.blkx.append(bi)
