"""A hostile integrity record (``IMAGE.integrity.json``) beside an image: a 1-byte chunk
size, millions of tiny chunks, a chunk count no disk has. ``verify`` refuses each in one
line naming the record and the field, in a bounded child (tests/bounded.py), instead of
hashing the disk a few bytes per Python step or parsing millions of values. And names
from inside images (backing files) are escaped in ``info`` and ``map``'s human output."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from bounded import assert_one_line, run_bounded
from conftest import cli, need

MIB = 1 << 20
HASH = "0" * 64


def _record(image: str, size: int, chunk: int, chunks) -> str:
    path = image + ".integrity.json"
    with open(path, "w") as f:
        if isinstance(chunks, str):     # pre-rendered, for the huge ones
            f.write('{"diskforge-integrity": 1, "image": "disk.raw", "format": "raw",'
                    f' "virtual-size": {size}, "sha256": "{HASH}", "chunk-size": {chunk},'
                    f' "chunks": [{chunks}]}}')
        else:
            json.dump({"diskforge-integrity": 1, "image": "disk.raw", "format": "raw",
                       "virtual-size": size, "sha256": HASH, "chunk-size": chunk,
                       "chunks": chunks}, f)
    return path


@pytest.mark.parametrize("case,size,chunk,words", [
    ("one-byte chunks", 4096, 1, ("integrity record.chunk-size", "not a chunk size")),
    ("8 million tiny chunks", 64 * MIB, 8, ("integrity record", "JSON values")),
    ("an exabyte of chunks", 1 << 60, 64 * MIB, ("integrity record.chunk-size",
                                                 "more than 524288")),
])
def test_a_hostile_integrity_record_is_refused_in_one_line(case, size, chunk, words,
                                                           tmp_path):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(min(size, MIB))
    if case == "8 million tiny chunks":
        _record(image, size, chunk, ",".join(['""'] * (size // chunk)))
    else:
        _record(image, size, chunk, [HASH] * min(-(-size // chunk), 16))
    res = run_bounded("verify", image)
    assert_one_line(res, "disk.raw.integrity.json", *words, seconds=10)


def test_a_record_diskforge_wrote_still_verifies(tmp_path):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(3 * MIB)
        f.write(b"data" * 1000)
    out = str(tmp_path / "img.qcow2")
    code, _, err = cli("image", "-q", image, out)
    assert code == 0, err
    code, stdout, err = cli("verify", out)
    assert code == 0 and "verify passed" in stdout, err


# -- backing names in human output ----------------------------------------------------------

def test_backing_names_with_control_characters_are_printed_escaped(tmp_path):
    need("qemu-img")
    base = "base\nFORGED\x1b[2J.raw"
    with open(tmp_path / base, "wb") as f:
        f.write(b"x" * 65536)
    overlay = str(tmp_path / "o.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                    overlay], check=True, cwd=tmp_path, timeout=30)
    for argv in (["info", overlay], ["info", "--backing-chain", overlay],
                 ["map", overlay]):
        code, out, err = cli(*argv)
        assert code == 0, err
        assert "\x1b" not in out and "\nFORGED" not in out, out
        assert "base\\nFORGED\\x1b[2J.raw" in out
    code, out, _ = cli("info", "--output", "json", overlay)
    assert json.loads(out)["backing-filename"] == base     # JSON stays JSON
    assert os.path.exists(tmp_path / base)
