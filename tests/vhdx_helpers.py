"""Helpers shared by the VHDX tests: sparse sources, an independent reader (libvhdi),
and surgery on VHDX files (headers, metadata, BAT) to build damaged or logged files."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
from conftest import make_sparse

MiB = 1 << 20


def random_disk(path: str, size: int, seed: int = 1, pieces: int = 12) -> str:
    """A sparse raw disk with random runs of data, some zero runs written as data."""
    rnd = random.Random(seed)
    extents = []
    for _ in range(pieces):
        off = rnd.randrange(0, size)
        n = min(rnd.randrange(1, 600_000), size - off)
        extents.append((off, rnd.randbytes(n) if rnd.random() < 0.8 else bytes(n)))
    return make_sparse(path, size, extents)


def sha_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def libvhdi_sha(path: str, parents: tuple[str, ...] = ()) -> tuple[int, str]:
    """Size and sha256 of the disk as libvhdi (pyvhdi) reads it, parents chained."""
    from conftest import libvhdi_sha256
    return libvhdi_sha256(path, parents)


def padded_sha(path: str, size: int) -> str:
    """sha256 of a raw file's bytes padded with zeros (or cut) to ``size``."""
    with open(path, "rb") as f:
        data = f.read(size)
    return sha_of_bytes(data + bytes(size - len(data)))


def read_at(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def write_at(path: str, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def headers(path: str):
    from diskforge.formats.vhdx.layout import HEADER_OFFSETS, HEADER_SIZE
    from diskforge.formats.vhdx.tables import parse_header
    return [parse_header(read_at(path, off, HEADER_SIZE)) for off in HEADER_OFFSETS]


def rewrite_headers(path: str, **changes) -> None:
    """Rewrite both headers with ``changes`` (checksums recomputed, sequence kept)."""
    from construct import Container

    from diskforge.formats.vhdx.layout import HEADER_OFFSETS
    from diskforge.formats.vhdx.tables import build_header
    for off, h in zip(HEADER_OFFSETS, headers(path)):
        h = Container(h)
        h.update(changes)
        write_at(path, off, build_header(h))


def regions(path: str):
    from diskforge.formats.vhdx.layout import REGION_TABLE_OFFSETS, REGION_TABLE_SIZE
    from diskforge.formats.vhdx.tables import parse_region_table
    return parse_region_table(read_at(path, REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE),
                              path, os.path.getsize(path))


def bat_offset(path: str) -> int:
    from diskforge.formats.vhdx.layout import BAT_GUID
    return regions(path)[BAT_GUID].offset


def metadata_offset(path: str) -> int:
    from diskforge.formats.vhdx.layout import METADATA_GUID
    return regions(path)[METADATA_GUID].offset


def set_bat_entry(path: str, index: int, state: int, file_offset: int) -> None:
    write_at(path, bat_offset(path) + 8 * index,
             struct.pack("<Q", (file_offset >> 20) << 20 | state))


def metadata_item(path: str, guid: bytes) -> int:
    """File offset of a metadata item's value."""
    base = metadata_offset(path)
    table = read_at(path, base, 65536)
    (count,) = struct.unpack_from("<H", table, 10)
    for i in range(count):
        e = table[32 + 32 * i:64 + 32 * i]
        if e[:16] == guid:
            return base + struct.unpack_from("<I", e, 16)[0]
    raise KeyError(guid)
