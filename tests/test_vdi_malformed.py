"""Malformed VDIs: each damage gives one line naming the file, the structure and the
field (VDICore.h's names), a non-zero exit, no traceback, and leaves the file as it
was."""

from __future__ import annotations

import os
import struct

import pytest

from conftest import cli, one_line_error, sha256_file
from vdi_helpers import build, uuid

MIB = 1 << 20
H = 72          # where the 1.1 header starts
# offsets of VDIHEADER1 fields in the file
CB_HEADER, TYPE, FLAGS, OFF_BLOCKS, OFF_DATA = H, H + 4, H + 8, H + 268, H + 272
CB_DISK, CB_BLOCK, CB_EXTRA, C_BLOCKS, C_ALLOC = H + 296, H + 304, H + 308, H + 312, H + 316


def _poke(path: str, at: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<" + fmt, value))


def _image(d: str) -> str:
    disk = bytes(range(256)) * (3 * MIB // 256)
    return build(os.path.join(d, "bad.vdi"), disk)


CASES = {
    "version": (lambda p: _poke(p, 68, "I", 0x00020000), "not supported yet", None),
    "cbHeader": (lambda p: _poke(p, CB_HEADER, "I", 100), "VDIHEADER", "cbHeader"),
    "u32Type": (lambda p: _poke(p, TYPE, "I", 9), "VDIHEADER", "u32Type"),
    "undo": (lambda p: _poke(p, TYPE, "I", 3), "not supported yet", "undo"),
    "fFlags": (lambda p: _poke(p, FLAGS, "I", 0x10), "VDIHEADER", "fFlags"),
    "offBlocks": (lambda p: _poke(p, OFF_BLOCKS, "I", 100), "VDIHEADER", "offBlocks"),
    "offData": (lambda p: _poke(p, OFF_DATA, "I", 516), "VDIHEADER", "offData"),
    "cbDisk": (lambda p: _poke(p, CB_DISK, "Q", 0), "VDIHEADER", "cbDisk"),
    "cbBlock-0": (lambda p: _poke(p, CB_BLOCK, "I", 0), "VDIHEADER", "cbBlock"),
    "cbBlock-3M": (lambda p: _poke(p, CB_BLOCK, "I", 3 * MIB), "VDIHEADER", "cbBlock"),
    "cbBlockExtra": (lambda p: _poke(p, CB_EXTRA, "I", 3), "VDIHEADER", "cbBlockExtra"),
    "cBlocks-0": (lambda p: _poke(p, C_BLOCKS, "I", 0), "VDIHEADER", "cBlocks"),
    "cBlocks-small": (lambda p: (_poke(p, C_BLOCKS, "I", 2), _poke(p, C_ALLOC, "I", 2)),
                      "VDIHEADER", "cBlocks"),
    "cBlocks-huge": (lambda p: (_poke(p, C_BLOCKS, "I", 0x10000000),
                                _poke(p, OFF_DATA, "I", 0xFFFFFFFF)), "256 MiB", "cBlocks"),
    "map-past-eof": (lambda p: (_poke(p, C_BLOCKS, "I", 1 << 20),
                                _poke(p, OFF_DATA, "I", 0xFFFFFFFF)), "VDIHEADER",
                     "offBlocks"),
    "cBlocksAllocated": (lambda p: _poke(p, C_ALLOC, "I", 4), "VDIHEADER",
                         "cBlocksAllocated"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_headers(tmp_path, case):
    damage, structure, field = CASES[case]
    img = _image(str(tmp_path))
    damage(img)
    before = sha256_file(img)
    for argv in (("info", img), ("convert", "-O", "raw", img, str(tmp_path / "o.raw")),
                 ("map", img)):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert img in err
        for word in (structure, field):
            if word:
                assert word in err, err
    assert sha256_file(img) == before
    assert not os.path.exists(tmp_path / "o.raw")


@pytest.mark.parametrize("keep", [68, 71, 100, 455, 600])
def test_truncated_headers_and_maps(tmp_path, keep):
    img = _image(str(tmp_path))
    with open(img, "r+b") as f:
        f.truncate(keep)
    code, _, err = cli("info", "--details", img)  # (the map is read for the partitions)
    one_line_error(code, err)
    assert "truncated" in err or "too small" in err or "past the end" in err


def test_a_wrong_signature_named_as_vdi(tmp_path):
    img = _image(str(tmp_path))
    _poke(img, 64, "I", 0xBEDA1080)
    code, _, err = cli("info", "-f", "vdi", img)
    one_line_error(code, err)
    assert "VDIPREHEADER.u32Signature" in err
    assert cli("info", img)[0] == 0          # without the signature, it is a raw file


def test_a_block_past_the_end_is_an_error_when_read_and_a_finding_in_check(tmp_path):
    img = _image(str(tmp_path))
    with open(img, "r+b") as f:     # the last block cut off
        f.truncate(os.path.getsize(img) - 1)
    code, _, err = cli("convert", "-O", "raw", img, str(tmp_path / "o.raw"))
    one_line_error(code, err)
    assert "VDIIMAGEBLOCKPOINTER[2]" in err and "past the end" in err
    code, out, err = cli("check", img)  # the finding on stderr, as qemu-img prints it
    assert code == 2 and "past the end of the file" in err and "1 errors" in out


def test_a_parent_loop_through_two_files(tmp_path):
    d = str(tmp_path)
    a = build(os.path.join(d, "a.vdi"), bytes(MIB), image_type=4, create=uuid(1),
              linkage=uuid(2))
    build(os.path.join(d, "b.vdi"), bytes(MIB), image_type=4, create=uuid(2),
          linkage=uuid(1))
    for argv in (("info", "--backing-chain", a),
                 ("convert", "-O", "raw", a, os.path.join(d, "o.raw"))):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert "loop" in err


def test_untrusted_mode_confines_the_parent_search(tmp_path):
    d = str(tmp_path)
    os.mkdir(os.path.join(d, "up"))
    build(os.path.join(d, "base.vdi"), bytes(MIB), create=uuid(1))
    child = build(os.path.join(d, "up", "c.vdi"), bytes(MIB), image_type=4, create=uuid(2),
                  linkage=uuid(1))
    code, _, err = cli("--untrusted", "info", child)
    one_line_error(code, err)
    assert "parent not found" in err
