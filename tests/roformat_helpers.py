"""Shared by the read-only format tests (qcow version 1, QED, Parallels): a sparse
source disk with a fixed pattern, a real sample unpacked, and qemu-img as the oracle
(for these formats it is the only other reader: 7-Zip, libyal and the rest do not read
them)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import struct

from conftest import REAL, cli, need, need_real, one_line_error, run

MIB = 1 << 20


def pattern_disk(path: str, size: int = 8 * MIB, seed: int = 1) -> str:
    """A sparse raw disk with 20 random runs of data (some crossing clusters)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(20):
            f.seek(rng.randrange(0, size - 70000, 512))
            f.write(rng.randbytes(rng.choice([512, 4096, 70000])))
    return path


def unpacked(relpath: str, dest: str) -> str:
    """A gzipped real sample, unpacked into ``dest``."""
    src = need_real(relpath)
    out = os.path.join(dest, os.path.basename(relpath).removesuffix(".gz"))
    with gzip.open(src) as f, open(out, "wb") as o:
        shutil.copyfileobj(f, o)
    return out


def expected(relpath: str) -> tuple[int, str]:
    """(size, sha256) of the flat disk, from the real samples' EXPECTED.tsv."""
    import pytest
    table = os.path.join(REAL, "EXPECTED.tsv")
    if not os.path.exists(table):
        pytest.skip(f"{table} not found")
    with open(table) as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if cols[0] == relpath:
                return int(cols[1]), cols[2]
    raise AssertionError(f"{relpath} not in EXPECTED.tsv")


def flat_sha256(path: str, fmt: str | None = None) -> tuple[int, str]:
    """(virtual size, sha256) of what diskforge reads."""
    import diskforge
    with diskforge.open(path, fmt) as dev:
        h, off = hashlib.sha256(), 0
        while off < dev.size:
            n = min(MIB, dev.size - off)
            h.update(dev.read(off, n))
            off += n
        return dev.size, h.hexdigest()


def qemu_raw(path: str, out: str, fmt: str | None = None) -> str:
    need("qemu-img")
    run("qemu-img", "convert", *(("-f", fmt) if fmt else ()), "-O", "raw", path, out)
    return out


def same_as_qemu(path: str, tmp: str, fmt: str | None = None) -> None:
    """diskforge's flat read equals qemu-img's, and so do the maps (JSON)."""
    ours = os.path.join(tmp, "ours.raw")
    theirs = qemu_raw(path, os.path.join(tmp, "theirs.raw"), fmt)
    code, _, err = cli("convert", "-O", "raw", path, ours)
    assert code == 0, err
    assert open(ours, "rb").read() == open(theirs, "rb").read()
    code, out, err = cli("map", "--output", "json", path)
    assert code == 0, err
    qmap = run("qemu-img", "map", "--output", "json", path).stdout
    assert json.loads(out) == json.loads(qmap)


def patch(path: str, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def refused(path: str, *words: str, cmd: str = "info") -> str:
    """``diskforge CMD path`` fails with one line holding every word."""
    code, _, err = cli(cmd, path)
    one_line_error(code, err)
    for w in words:
        assert w in err, err
    return err
