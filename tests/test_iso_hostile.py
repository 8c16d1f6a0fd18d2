"""Hostile ISOs, crafted here, and a valid one that used to exhaust file descriptors.

- A file of 150,000 multi-extent sections (its join was quadratic) is refused past
  65,536 sections; 1,000 sections still join into the right bytes.
- A UDF information length of 2^64-1 (was "internal error: OverflowError").
- Reference loops: a Rock Ridge CE area continued into itself, a UDF File Identifier
  pointing back at the root's ICB.
- Traversal through each path-bearing field (ISO 9660, Joliet, Rock Ridge NM and SL,
  UDF names) is refused and nothing lands outside DEST.
- Names with a newline and ESC are printed escaped by ``iso ls`` and in ``iso extract``'s
  refusals (one refusal, one line).
- 1,500 sibling directories (xorriso) and 300 nested ones extract under an
  RLIMIT_NOFILE of 64.

Every command runs in a child (tests/bounded.py): one line naming the file, structure
and field, a non-zero exit, no traceback, seconds and a bounded peak RSS.
"""

from __future__ import annotations

import binascii
import json
import os
import re
import struct
import subprocess

import pytest
from bounded import assert_one_line, run_bounded
from conftest import cli, need
from isotools import patch

SECTOR = 2048


# -- a minimal ISO 9660 writer, for what no mastering tool will write ---------------------

def record(name: bytes, location: int, length: int, flags: int = 0) -> bytes:
    """ECMA-119 §9.1 directory record (both-endian fields, no system use)."""
    pad = 0 if len(name) % 2 else 1
    return (bytes((33 + len(name) + pad, 0)) + struct.pack("<I", location)
            + struct.pack(">I", location) + struct.pack("<I", length)
            + struct.pack(">I", length) + bytes(7) + bytes((flags, 0, 0))
            + struct.pack("<H", 1) + struct.pack(">H", 1) + bytes((len(name),)) + name
            + bytes(pad))


def tiny_iso(path: str, entries: list[bytes], data: list[bytes]) -> str:
    """An ISO of one root directory holding ``entries`` (records whose locations count
    from the first data sector, added here), then the ``data`` sectors."""
    sectors: list[bytearray] = [bytearray()]
    for r in entries:   # a record never crosses a sector (ECMA-119 §6.8.1.1)
        if len(sectors[-1]) + len(r) > SECTOR:
            sectors.append(bytearray())
        sectors[-1] += r
    root_at = 18
    dir_sectors = len(sectors) + 1
    root_len = dir_sectors * SECTOR
    first_data = root_at + dir_sectors
    body = bytearray((record(b"\x00", root_at, root_len, 2)
                      + record(b"\x01", root_at, root_len, 2)).ljust(SECTOR, b"\0"))
    for sec in sectors:
        fixed = bytearray()
        pos = 0
        while pos < len(sec):   # relocate each record's extent past the directory
            n = sec[pos]
            rec = bytearray(sec[pos:pos + n])
            loc = struct.unpack_from("<I", rec, 2)[0] + first_data
            rec[2:10] = struct.pack("<I", loc) + struct.pack(">I", loc)
            fixed += rec
            pos += n
        body += fixed.ljust(SECTOR, b"\0")
    total = first_data + len(data)
    pvd = bytearray(SECTOR)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[40:72] = b"HOSTILE".ljust(32)
    pvd[80:88] = struct.pack("<I", total) + struct.pack(">I", total)
    for at, value in ((120, 1), (124, 1), (128, SECTOR)):   # set size, sequence, block
        pvd[at:at + 4] = struct.pack("<H", value) + struct.pack(">H", value)
    pvd[156:190] = record(b"\x00", root_at, root_len, 2)
    pvd[881] = 1
    term = bytearray(SECTOR)
    term[0:7] = b"\xffCD001\x01"
    with open(path, "wb") as f:
        f.write(bytes(16 * SECTOR) + pvd + term + body
                + b"".join(d.ljust(SECTOR, b"\0") for d in data))
    return path


def multi_extent(sections: int, distinct: bool) -> tuple[list[bytes], list[bytes]]:
    entries = [record(b"F;1", i if distinct else 0, SECTOR, 0x80 if i < sections - 1 else 0)
               for i in range(sections)]
    data = [bytes((i % 251,)) * SECTOR for i in range(sections if distinct else 1)]
    return entries, data


def test_a_file_of_many_sections_joins_in_linear_time(tmp_path):
    iso = tiny_iso(str(tmp_path / "m.iso"), *multi_extent(1000, True))
    res = run_bounded("iso", "extract", iso, str(tmp_path / "d"))
    assert res.code == 0, res.err
    want = b"".join(bytes((i % 251,)) * SECTOR for i in range(1000))
    assert (tmp_path / "d" / "F").read_bytes() == want


def test_a_file_of_150000_sections_is_refused(tmp_path):
    iso = tiny_iso(str(tmp_path / "m.iso"), *multi_extent(150_000, False))
    for argv in (["iso", "ls", iso], ["iso", "extract", iso, str(tmp_path / "d")]):
        assert_one_line(run_bounded(*argv), "m.iso", "DirectoryRecord.file_flags",
                        "more than 65536 sections")
    assert not (tmp_path / "d").exists()


# -- UDF: crafted from what 'diskforge iso build --udf' writes ------------------------------

def retag(data: bytearray, at: int, length: int) -> None:
    """Recompute the descriptor CRC and tag checksum of the descriptor at ``at`` whose
    CRC covers ``length`` bytes after its tag (ECMA-167 3/7.2)."""
    data[at + 10:at + 12] = struct.pack("<H", length)
    data[at + 8:at + 10] = struct.pack("<H", binascii.crc_hqx(bytes(data[at + 16:at + 16
                                                                         + length]), 0))
    data[at + 4] = (sum(data[at:at + 4]) + sum(data[at + 5:at + 16])) & 0xFF


def udf_descriptors(data: bytes):
    """(sector, tag id, tag location) of every tagged FE/FID-bearing sector."""
    for s in range(len(data) // SECTOR):
        at = s * SECTOR
        tid = struct.unpack_from("<H", data, at)[0]
        if tid in (257, 261, 266) and data[at + 4] == \
                (sum(data[at:at + 4]) + sum(data[at + 5:at + 16])) & 0xFF:
            yield s, tid, struct.unpack_from("<I", data, at + 12)[0]


def fids(data: bytes, sector: int):
    """(offset, name bytes, ICB block) of each File Identifier Descriptor in a
    directory sector."""
    pos = sector * SECTOR
    while struct.unpack_from("<H", data, pos)[0] == 257:
        l_fi, l_iu = data[pos + 19], struct.unpack_from("<H", data, pos + 36)[0]
        yield pos, bytes(data[pos + 38 + l_iu:pos + 38 + l_iu + l_fi]), \
            struct.unpack_from("<I", data, pos + 24)[0]
        pos += (38 + l_iu + l_fi + 3) & ~3


@pytest.fixture
def udf(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f.txt").write_text("hello")
    (src / "sub" / "g.txt").write_text("world")
    iso = str(tmp_path / "u.iso")
    code, _, err = cli("iso", "build", "-q", "--udf", "--no-rock-ridge", "--no-joliet",
                       str(src), iso)
    assert code == 0, err
    return iso


def _udf_patch(iso: str, change) -> None:
    data = bytearray(open(iso, "rb").read())
    change(data)
    open(iso, "wb").write(bytes(data))


def _fid_named(data, name: bytes):
    for s, tid, _ in list(udf_descriptors(data)):
        if tid == 257:
            for at, raw, icb in fids(data, s):
                if raw[1:] == name:
                    return at, raw, icb
    raise AssertionError(f"no FID named {name!r}")


def test_udf_information_length_of_2_64_minus_1(udf, tmp_path):
    def huge(data):
        _, _, icb = _fid_named(data, b"f.txt")
        fe = next(s for s, tid, loc in udf_descriptors(data) if tid == 261 and loc == icb)
        at = fe * SECTOR
        data[at + 56:at + 64] = b"\xff" * 8
        retag(data, at, struct.unpack_from("<H", data, at + 10)[0])
    _udf_patch(udf, huge)
    for argv in (["iso", "ls", "-R", "--namespace", "udf", udf],
                 ["iso", "extract", "--namespace", "udf", udf, str(tmp_path / "d")]):
        assert_one_line(run_bounded(*argv), "u.iso", "FileEntry.information_length",
                        "18446744073709551615")
    assert not (tmp_path / "d").exists()


def test_udf_file_identifier_looping_back_to_the_root(udf, tmp_path):
    def loop(data):
        _, _, sub = _fid_named(data, b"sub")
        at, _, _ = _fid_named(data, b"g.txt")
        _, _, root = next(fids(data, at // SECTOR))   # sub's first FID: its parent
        assert root != sub
        data[at + 24:at + 28] = struct.pack("<I", root)       # g.txt is now the root
        l_iu = struct.unpack_from("<H", data, at + 36)[0]
        retag(data, at, (38 + l_iu + data[at + 19] + 3 & ~3) - 16)
    _udf_patch(udf, loop)
    for argv in (["iso", "ls", "-R", "--namespace", "udf", udf],
                 ["iso", "extract", "--namespace", "udf", udf, str(tmp_path / "d")]):
        assert_one_line(run_bounded(*argv), "u.iso", "directory loop")
    assert not (tmp_path / "d").exists()


def test_udf_names_cannot_climb_or_forge_lines(udf, tmp_path):
    def rename(data):
        for old, new in ((b"f.txt", b"../.."), (b"g.txt", b"a\n\x1bb\r")):
            at, raw, _ = _fid_named(data, old)
            l_iu = struct.unpack_from("<H", data, at + 36)[0]
            data[at + 38 + l_iu + 1:at + 38 + l_iu + 1 + len(new)] = new
            retag(data, at, (38 + l_iu + data[at + 19] + 3 & ~3) - 16)
    _udf_patch(udf, rename)
    res = run_bounded("iso", "ls", "-R", "--namespace", "udf", udf)
    assert res.code == 0, res.err
    assert "\x1b" not in res.out and "\r" not in res.out
    assert only_listing_lines(res.out, 3) and "sub/a\\n\\x1bb\\r" in res.out
    box = tmp_path / "box"
    box.mkdir()
    res = run_bounded("iso", "extract", "--namespace", "udf", udf, str(box / "d"))
    assert res.code == 1
    assert res.err.splitlines()[0] == \
        "diskforge: refused '../..': the name contains '/' or NUL"
    assert len(res.err.splitlines()) == 2
    assert sorted(os.listdir(box)) == ["d"] and (box / "d" / "sub" / "a\n\x1bb\r").exists()


def only_listing_lines(out: str, count: int) -> bool:
    """``count`` lines, each an ``ls -l``-like line (none forged by a name)."""
    lines = out.splitlines()
    return len(lines) == count and all(re.match(r"[-dlcbps][rwx-]{9} ", x) for x in lines)


# -- ISO 9660, Joliet and Rock Ridge names -------------------------------------------------

def nm(name: bytes) -> bytes:
    return b"NM" + bytes((5 + len(name), 1, 0)) + name


@pytest.fixture
def named(tmp_path):
    """An ISO (Rock Ridge, Joliet) whose names are patched below, same length each."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("aaaaaaa", "bbbbbbb", "ccccccc"):
        (src / name).write_text(name)
    os.symlink("target-xyz", src / "link")
    iso = str(tmp_path / "n.iso")
    code, _, err = cli("iso", "build", "-q", "--level", "4", str(src), iso)
    assert code == 0, err
    return iso


@pytest.mark.parametrize("namespace,old,new,refused", [
    ("iso9660", b"AAAAAAA", b"../../x", "../../x"),
    ("joliet", "aaaaaaa".encode("utf-16-be"), "../../x".encode("utf-16-be"), "../../x"),
    ("rock-ridge", nm(b"aaaaaaa"), nm(b"../../x"), "../../x"),
    ("rock-ridge", b"target-xyz", b"/etc/passw", "link"),
])
def test_traversal_in_each_name_field_is_refused(named, tmp_path, namespace, old, new,
                                                 refused):
    data = open(named, "rb").read()
    if namespace == "iso9660":   # level 4 keeps the case; the identifier is as written
        old, new = old.lower(), new
    patch(named, old, new, count=data.count(old))
    box = tmp_path / "box"
    box.mkdir()
    res = run_bounded("iso", "extract", "--namespace", namespace, named, str(box / "d"))
    assert res.code == 1 and not res.timed_out, res.err
    assert res.err.splitlines()[0].startswith(f"diskforge: refused '{refused}'"), res.err
    assert sorted(os.listdir(box)) == ["d"]
    assert not (tmp_path / "x").exists() and not os.path.exists("/etc/passw")


@pytest.mark.parametrize("namespace,old,new", [
    ("iso9660", b"bbbbbbb", b"b\n\x1bb/bb"),
    ("joliet", "bbbbbbb".encode("utf-16-be"), "b\n\x1bb/bb".encode("utf-16-be")),
    ("rock-ridge", nm(b"bbbbbbb"), nm(b"b\n\x1bb/bb")),
])
def test_names_with_control_characters_are_printed_escaped(named, tmp_path, namespace,
                                                           old, new):
    data = open(named, "rb").read()
    patch(named, old, new, count=data.count(old))
    res = run_bounded("iso", "ls", "--namespace", namespace, named)
    assert res.code == 0, res.err
    assert "\x1b" not in res.out and "b\\n\\x1bb/bb" in res.out
    listed = run_bounded("iso", "ls", "--output", "json", "--namespace", namespace, named)
    entries = json.loads(listed.out)["entries"]     # JSON stays JSON, the name intact
    assert "b\n\x1bb/bb" in [e["name"] for e in entries]
    assert only_listing_lines(res.out, len(entries))
    res = run_bounded("iso", "extract", "--namespace", namespace, named, str(tmp_path / "d"))
    assert res.code == 1
    # one refusal (the name holds '/'), one summary: no line forged by the name
    assert res.err.splitlines() == [
        "diskforge: refused 'b\\n\\x1bb/bb': the name contains '/' or NUL",
        "diskforge: 1 entries were refused (not extracted)"]


def test_a_continuation_area_continued_into_itself(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / ("n" * 240)).write_text("x")      # a name this long spills into a CE area
    iso = str(tmp_path / "ce.iso")
    assert cli("iso", "build", "-q", str(src), iso)[0] == 0
    data = bytearray(open(iso, "rb").read())
    at = data.index(b"CE\x1c\x01")
    block, offset, length = (struct.unpack_from("<I", data, at + 4 + i)[0]
                             for i in (0, 8, 16))
    area = block * SECTOR + offset
    # the area starts with a CE entry naming the area itself
    data[area:area + 28] = data[at:at + 28]
    struct.pack_into("<I", data, at + 20, 28)
    struct.pack_into(">I", data, at + 24, 28)
    data[area:area + 28] = data[at:at + 28]
    open(iso, "wb").write(bytes(data))
    for argv in (["iso", "ls", "-R", iso], ["iso", "extract", iso, str(tmp_path / "d")]):
        assert_one_line(run_bounded(*argv), "ce.iso", "SUSP.CE", "continuation area loop")


# -- descriptors: a valid tree of any shape -----------------------------------------------

@pytest.mark.parametrize("shape", ["1500 siblings", "300 nested"])
def test_extraction_holds_a_bounded_number_of_descriptors(shape, tmp_path):
    need("xorriso")
    src = tmp_path / "src"
    src.mkdir()
    count = int(shape.split()[0])
    if shape.endswith("siblings"):
        for i in range(count):
            (src / f"d{i:04d}").mkdir()
        (src / "d1499" / "last.txt").write_text("last")
    else:
        os.makedirs(os.path.join(src, *["d"] * count))
        with open(os.path.join(src, *["d"] * count, "last.txt"), "w") as f:
            f.write("last")
    iso = str(tmp_path / "t.iso")
    proc = subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-o", iso,
                           str(src)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "dest"
    res = run_bounded("iso", "extract", iso, str(dest), nofile=64)
    assert res.code == 0, res.err
    assert f"{count} directories" in res.out
    leaf = (dest / "d1499" / "last.txt") if shape.endswith("siblings") else \
        dest.joinpath(*["d"] * count, "last.txt")
    assert leaf.read_text() == "last"


def test_udf_allocation_extents_looping_back(udf, tmp_path):
    def loop(data):
        _, _, icb = _fid_named(data, b"f.txt")
        fe_sector = next(s for s, tid, loc in udf_descriptors(data)
                         if tid == 261 and loc == icb)
        start = fe_sector - icb                     # the partition's first sector
        at = fe_sector * SECTOR
        assert struct.unpack_from("<H", data, at + 34)[0] & 7 == 0   # short ADs
        l_ea = struct.unpack_from("<I", data, at + 168)[0]
        ad = at + 176 + l_ea
        block = struct.unpack_from("<I", data, ad + 4)[0]       # the data's block
        # the file's extent now continues its allocation descriptors in that block,
        # where an Allocation Extent Descriptor continues them in that block again
        struct.pack_into("<I", data, ad, (3 << 30) | SECTOR)
        retag(data, at, struct.unpack_from("<H", data, at + 10)[0])
        aed = (start + block) * SECTOR
        data[aed:aed + SECTOR] = bytes(SECTOR)
        struct.pack_into("<HH", data, aed, 258, 2)
        struct.pack_into("<I", data, aed + 12, block)
        struct.pack_into("<II", data, aed + 20, 8, (3 << 30) | SECTOR)
        struct.pack_into("<I", data, aed + 28, block)
        retag(data, aed, 16)
    _udf_patch(udf, loop)
    for argv in (["iso", "ls", "-R", "--namespace", "udf", udf],
                 ["iso", "extract", "--namespace", "udf", udf, str(tmp_path / "d")]):
        assert_one_line(run_bounded(*argv), "u.iso", "AllocationExtentDescriptor",
                        "allocation extent loop")
