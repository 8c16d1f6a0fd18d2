"""Helpers for the VHD tests: sample disks, and surgery on VHD structures."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import subprocess

from diskforge.formats.vhd.structs import (FOOTER_CHECKSUM_AT, HEADER_CHECKSUM_AT,
                                           VhdDynamicDiskHeader, VhdFooter, with_checksum)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures", "vhd")


def gunzip(src: str, dst: str) -> str:
    with gzip.open(src, "rb") as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out)
    return dst


def random_disk(path: str, size: int, seed: int, chunks: int = 12) -> bytes:
    """A sparse raw disk with random, text-like and zero runs; returns its contents."""
    rng = random.Random(seed)
    content = bytearray(size)
    for _ in range(chunks):
        off = rng.randrange(size)
        n = min(size - off, rng.choice([1, 511, 512, 4096, 70000, 1 << 20]))
        kind = rng.random()
        if kind < 0.5:
            data = rng.randbytes(n)
        elif kind < 0.8:
            data = (b"diskforge vhd " * (n // 14 + 1))[:n]
        else:
            data = bytes(n)
        content[off:off + n] = data
    with open(path, "wb") as f:
        f.truncate(size)
        zero = bytes(4096)
        for pos in range(0, size, 4096):  # only non-zero pieces: the file stays sparse
            if not content.startswith(zero, pos) or pos + 4096 > size:
                piece = content[pos:pos + 4096]
                if piece.count(0) != len(piece):
                    f.seek(pos)
                    f.write(piece)
    return bytes(content)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def qemu_raw(path: str, fmt: str = "vpc") -> bytes:
    """The disk as ``qemu-img convert -O raw`` flattens it."""
    out = path + ".qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out], check=True,
                   capture_output=True)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def have_pyvhdi() -> bool:
    import importlib.util
    return importlib.util.find_spec("pyvhdi") is not None


def pyvhdi_sha256(path: str, parents: list[str] = ()) -> tuple[int, str]:
    """(media size, sha256) as libvhdi reads ``path`` with ``parents`` (nearest first)."""
    from conftest import libvhdi_sha256
    return libvhdi_sha256(path, parents)


def pyvhdi_prefix(path: str, parents: list[str], n: int) -> bytes:
    """The first ``n`` bytes as libvhdi reads them (it fails to read the blocks of a
    differencing disk that lie past its parent's end, which every other reader takes
    as zeros)."""
    import pytest
    pyvhdi = pytest.importorskip("pyvhdi")
    files = [pyvhdi.file() for _ in range(1 + len(parents))]
    for f, p in zip(files, [path, *parents]):
        f.open(p)
    for child, parent in reversed(list(zip(files, files[1:]))):
        child.set_parent(parent)
    try:
        return files[0].read_buffer_at_offset(n, 0)
    finally:
        for f in files:
            f.close()


# -- surgery --------------------------------------------------------------------------------

def footer_offsets(path: str) -> list[int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    return ([0] if head == b"conectix" else []) + [size - 512]


def patch_footer(path: str, *, fix_checksum: bool = True, where=None, **fields) -> None:
    """Change footer fields (in both copies unless ``where`` lists offsets)."""
    with open(path, "r+b") as f:
        for at in where if where is not None else footer_offsets(path):
            f.seek(at)
            ft = VhdFooter.parse(f.read(512))
            for k, v in fields.items():
                if k in ("cylinders", "heads", "sectors_per_track"):
                    ft.disk_geometry[k] = v
                else:
                    ft[k] = v
            raw = VhdFooter.build(ft)
            if fix_checksum:
                raw = with_checksum(raw, FOOTER_CHECKSUM_AT)
            f.seek(at)
            f.write(raw)


def read_header(path: str):
    with open(path, "rb") as f:
        f.seek(512)
        return VhdDynamicDiskHeader.parse(f.read(1024))


def patch_header(path: str, *, fix_checksum: bool = True, locators=None, **fields) -> None:
    """Change dynamic header fields; ``locators``: {index: {field: value}}."""
    with open(path, "r+b") as f:
        f.seek(512)
        hd = VhdDynamicDiskHeader.parse(f.read(1024))
        for k, v in fields.items():
            hd[k] = v
        for i, changes in (locators or {}).items():
            for k, v in changes.items():
                hd.parent_locator_entries[i][k] = v
        raw = VhdDynamicDiskHeader.build(hd)
        if fix_checksum:
            raw = with_checksum(raw, HEADER_CHECKSUM_AT)
        f.seek(512)
        f.write(raw)


def patch_bat(path: str, index: int, value: int) -> None:
    hd = read_header(path)
    with open(path, "r+b") as f:
        f.seek(hd.table_offset + 4 * index)
        f.write(value.to_bytes(4, "big"))
