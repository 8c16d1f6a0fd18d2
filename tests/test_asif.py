"""Apple ASIF (macOS 26 sparse images), read-only.

No tool on Linux writes ASIF, so the reader is checked against the one real sample
(fox-it/dissect.hypervisor's test image, AGPL: it stays in ../shared/fixtures-real and
these tests skip without it): its flat sha256 as dissect.hypervisor 3.21 (an
independent reader, run once outside this project) reads it, which also matches that
project's own test (chunk i of the first 100 MiB filled with byte i). Hostile images
are small synthetic ones, laid out as the format note describes, and damaged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct

import pytest
from conftest import cli, need_real, one_line_error

# dissect.hypervisor 3.21 reading dissect_basic.asif: 512,000,000 bytes
BASIC_SIZE = 512_000_000
BASIC_SHA256 = "fc6505543ff7fe23cd82f71378a79217cecff7cf3d3d67130dd5aa9f78efacb6"
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    gz = need_real("asif/dissect_basic.asif.gz")
    path = str(tmp_path_factory.mktemp("asif") / "basic.asif")
    with gzip.open(gz) as f, open(path, "wb") as out:
        shutil.copyfileobj(f, out, 8 << 20)
    return path


def test_real_sample_reads_as_dissect_reads_it(basic, workdir):
    import diskforge
    with diskforge.open(basic) as dev:
        assert dev.format == "asif" and dev.size == BASIC_SIZE
        h = hashlib.sha256()
        for off in range(0, dev.size, 8 << 20):
            h.update(dev.read(off, min(8 << 20, dev.size - off)))
        assert h.hexdigest() == BASIC_SHA256
        for i in (0, 1, 99, 254):  # dissect.hypervisor's own test: chunk i is byte i
            assert dev.read(i << 20, 1 << 20) == bytes([i]) * (1 << 20)
        ext = list(dev.extents())
    assert [(e.offset, e.length, e.kind.value) for e in ext] == [
        (0, 1 << 20, "data"), (1 << 20, 254 << 20, "data"),
        (255 << 20, BASIC_SIZE - (255 << 20), "zero")]
    code, out, err = cli("info", "--output", "json", basic)
    assert code == 0, err
    d = json.loads(out)
    assert d["format"] == "asif" and d["virtual-size"] == BASIC_SIZE
    assert d["cluster-size"] == 1 << 20


def synthetic(path: str, *, sector_count: int = (4 * CHUNK) // 512,
              chunks: dict[int, int] | None = None) -> str:
    """A small ASIF laid out as formats/asif.md describes (64 KiB chunks): header,
    directories at 512 (version 2, current) and 1024 (version 1), the table in chunk 1,
    data chunks 2 and 3 for disk chunks 0 and 2 (filled with 0xA0, 0xA2)."""
    chunks = {0: 2, 2: 3} if chunks is None else chunks
    buf = bytearray(4 * CHUNK)
    struct.pack_into(">4sIII QQ 16s QQ IHH Q", buf, 0, b"shdw", 1, 512, 0, 512, 1024,
                     bytes(range(16)), sector_count, sector_count, CHUNK, 512, 0, 0)
    struct.pack_into(">QQ", buf, 512, 2, 1)
    struct.pack_into(">QQ", buf, 1024, 1, 0)
    for disk_chunk, host in chunks.items():
        struct.pack_into(">Q", buf, CHUNK + 8 * disk_chunk, host)  # entries < 2048
        buf[host * CHUNK:(host + 1) * CHUNK] = bytes([0xA0 + disk_chunk]) * CHUNK
    with open(path, "wb") as f:
        f.write(buf)
    return path


def test_synthetic_image_and_convert(workdir):
    path = synthetic(os.path.join(workdir, "s.asif"))
    out = os.path.join(workdir, "s.raw")
    code, _, err = cli("convert", "-O", "raw", path, out)
    assert code == 0, err
    with open(out, "rb") as f:
        data = f.read()
    assert data == b"\xa0" * CHUNK + bytes(CHUNK) + b"\xa2" * CHUNK + bytes(CHUNK)
    code, out_json, err = cli("map", "--output", "json", path)
    assert code == 0, err
    assert [(e["start"], e["data"]) for e in json.loads(out_json)] == [
        (0, True), (CHUNK, False), (2 * CHUNK, True), (3 * CHUNK, False)]


def _poke(path: str, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


HOSTILE = {
    "chunk-size": (64, ">I", (1000,), "chunk_size"),
    "block-size": (68, ">H", (3,), "block_size"),
    "sector-count": (48, ">Q", (1 << 62,), "sector_count"),
    "directory-past-eof": (16, ">Q", (1 << 40,), "directory_offsets"),
    "version": (4, ">I", (7,), "version"),
    "table-past-eof": (520, ">Q", (1 << 40,), "table"),
    "data-past-eof": (CHUNK, ">Q", (1 << 50,), "chunk"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE) + ["truncated", "huge-empty",
                                                    "one-table-many-times"])
def test_hostile_asif_is_one_line(workdir, case):
    path = synthetic(os.path.join(workdir, "h.asif"))
    out = os.path.join(workdir, "o.raw")
    if case == "truncated":
        os.truncate(path, 60)
        field = "AsifHeader"
    elif case == "huge-empty":  # 1 TiB of nothing: map and convert stay cheap
        _poke(path, 48, ">QQ", 1 << 31, 1 << 31)
        with open(path, "r+b") as f:
            base = f.seek(0, 2)
            f.write(bytes(8 + 8 * 2731))  # a directory with no tables
        _poke(path, 16, ">QQ", base, base)
        code, out_json, err = cli("map", "--output", "json", path)
        assert code == 0, err
        assert json.loads(out_json) == [{"start": 0, "length": 1 << 40, "depth": 0,
                                         "present": False, "zero": True, "data": False}]
        return
    elif case == "one-table-many-times":
        # every directory entry names the one table: the work stays per distinct table
        n = 1 << 10
        _poke(path, 48, ">QQ", n * 6144 * CHUNK // 512, n * 6144 * CHUNK // 512)
        with open(path, "r+b") as f:
            f.seek(0, 2)
            base = f.tell()
            f.write(struct.pack(">Q", 3) + struct.pack(">Q", 1) * n)
        _poke(path, 16, ">QQ", base, base)
        code, out_json, err = cli("map", "--output", "json", path)
        assert code == 0, err
        assert len(json.loads(out_json)) == 4 * n
        return
    else:
        offset, fmt, values, field = HOSTILE[case]
        _poke(path, offset, fmt, *values)
    code, _, err = cli("convert", "-O", "raw", path, out)
    one_line_error(code, err)
    assert path in err and field in err, err
    assert not os.path.exists(out)
