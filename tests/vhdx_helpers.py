"""Helpers shared by the VHDX tests: sparse sources, an independent reader (libvhdi),
and surgery on VHDX files (headers, metadata, BAT) to build damaged or logged files."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import uuid

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
    from diskforge.formats.vhdx.structs import HEADER_OFFSETS, HEADER_SIZE
    from diskforge.formats.vhdx.tables import parse_header
    return [parse_header(read_at(path, off, HEADER_SIZE)) for off in HEADER_OFFSETS]


def rewrite_headers(path: str, **changes) -> None:
    """Rewrite both headers with ``changes`` (checksums recomputed, sequence kept)."""
    from construct import Container

    from diskforge.formats.vhdx.structs import HEADER_OFFSETS
    from diskforge.formats.vhdx.tables import build_header
    for off, h in zip(HEADER_OFFSETS, headers(path)):
        h = Container(h)
        h.update(changes)
        write_at(path, off, build_header(h))


def regions(path: str):
    from diskforge.formats.vhdx.structs import REGION_TABLE_OFFSETS, REGION_TABLE_SIZE
    from diskforge.formats.vhdx.tables import parse_region_table
    return parse_region_table(read_at(path, REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE),
                              path, os.path.getsize(path))


def bat_offset(path: str) -> int:
    from diskforge.formats.vhdx.structs import BAT_GUID
    return regions(path)[BAT_GUID].offset


def metadata_offset(path: str) -> int:
    from diskforge.formats.vhdx.structs import METADATA_GUID
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


def pending_log(img, *, wrapped=False, extras=True, seed=0):
    """Leave a two-entry active sequence in the log: entry A maps a new block (its
    data appended past the end, as payload is never logged) by rewriting a BAT sector;
    entry B zeroes 8 KiB and rewrites 4 KiB inside block 0's data. After them, an
    entry with another LogGuid and a torn entry, which must both be ignored.
    ``wrapped`` puts A across the end of the circular log."""
    import diskforge
    from diskforge.formats.vhdx.structs import LOG_SECTOR
    from diskforge.formats.vhdx.log import build_entry
    rnd = random.Random(seed)
    with diskforge.open(img) as dev:
        bat = list(dev.bat)
        host0 = (bat[0] >> 20) << 20
        log_off, log_len = dev.header.LogOffset, dev.header.LogLength
        free = next(i for i in range(dev.nblocks) if bat[i] & 7 != 6)
    size = os.path.getsize(img)
    new = -(-size // MiB) * MiB
    with open(img, "r+b") as f:
        f.truncate(new + MiB)
        f.seek(new)
        f.write(rnd.randbytes(MiB))
    bat[free] = (new >> 20) << 20 | 6
    sector = struct.pack("<512Q", *(bat + [0] * 512)[:512])
    guid = uuid.UUID(int=rnd.getrandbits(128)).bytes_le
    a_pos = log_len - LOG_SECTOR if wrapped else 2 * LOG_SECTOR
    a = build_entry(sequence=10, tail=a_pos, log_guid=guid, flushed_file_offset=new + MiB,
                    last_file_offset=new + MiB, data=[(bat_offset(img), sector)])
    b_pos = (a_pos + len(a)) % log_len
    b = build_entry(sequence=11, tail=a_pos, log_guid=guid, flushed_file_offset=new + MiB,
                    last_file_offset=new + MiB, zeros=[(host0 + 8192, 8192)],
                    data=[(host0 + 65536, rnd.randbytes(LOG_SECTOR))])
    log = bytearray(read_at(img, log_off, log_len))

    def put(pos, entry):
        for i in range(0, len(entry), LOG_SECTOR):
            p = (pos + i) % log_len
            log[p:p + LOG_SECTOR] = entry[i:i + LOG_SECTOR]
    put(a_pos, a)
    put(b_pos, b)
    c_pos = (b_pos + len(b)) % log_len
    if extras:
        stale = build_entry(sequence=12, tail=c_pos, log_guid=uuid.uuid4().bytes_le,
                            flushed_file_offset=0, last_file_offset=0,
                            zeros=[(host0, MiB)])
        put(c_pos, stale)
        torn = bytearray(build_entry(sequence=12, tail=a_pos, log_guid=guid,
                                     flushed_file_offset=0, last_file_offset=0,
                                     zeros=[(host0, MiB)]))
        torn[100] ^= 1
        put((c_pos + len(stale)) % log_len, torn)
    write_at(img, log_off, bytes(log))
    rewrite_headers(img, LogGuid=guid)
