"""Hostile and malformed ISOs.

Crafted names ("..", "../../x", "/etc/x") and symlinks (absolute, escaping, chained)
never make extraction write outside DEST; pre-existing symlinks in DEST are never
written through. Truncated volume descriptors, records running past their sector,
directory loops and out-of-range extents give a one-line error, no traceback, and
DEST is not touched. Random corruption of a small ISO's metadata only ever raises
diskforge errors."""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from conftest import cli, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isotools import patch

import diskforge
from diskforge.errors import DiskforgeError


def nm(name: bytes) -> bytes:
    """A Rock Ridge NM entry (RRIP §4.1.4) as pycdlib writes it."""
    return b"NM" + bytes((5 + len(name), 1, 0)) + name


def build(src: str, iso: str, *args: str) -> str:
    code, _, err = cli("iso", "build", "-q", *args, src, iso)
    assert code == 0, err
    return iso


@pytest.fixture
def hostile(tmp_path):
    """An ISO whose Rock Ridge names and symlinks try to escape DEST."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "aa").write_text("dotdot")
    (src / "xxxxxxxxxxx").write_text("escape by name")
    (src / "yyyyyyyyy").write_text("absolute name")
    (src / "bb").write_text("joliet dotdot")
    (src / "sub" / "ok.txt").write_text("fine")
    (src / "good.txt").write_text("fine too")
    os.symlink("/etc/passwd", src / "abs")
    os.symlink("../../../../outside", src / "up")
    os.symlink("..", src / "sub" / "chain1")
    os.symlink("sub/chain1/..", src / "chain2")
    os.symlink("sub/ok.txt", src / "inside")
    iso = build(str(src), str(tmp_path / "hostile.iso"))
    patch(iso, nm(b"aa"), nm(b".."))
    patch(iso, nm(b"xxxxxxxxxxx"), nm(b"../../pwned"))
    patch(iso, nm(b"yyyyyyyyy"), nm(b"/etc/pwnd"))
    patch(iso, "bb".encode("utf-16-be"), "..".encode("utf-16-be"))   # the Joliet name
    return iso


def test_hostile_names_and_symlinks_stay_inside(hostile, tmp_path):
    box = tmp_path / "box"
    dest = box / "dest"
    box.mkdir()
    code, out, err = cli("iso", "extract", hostile, str(dest))
    assert code == 1
    refused = {line.split("'")[1] for line in err.splitlines() if "refused '" in line}
    assert refused == {"..", "../../pwned", "/etc/pwnd", "abs", "up", "chain2"}
    # nothing was written outside DEST, and the safe entries are there
    assert sorted(os.listdir(box)) == ["dest"]
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists("/etc/pwnd")
    assert (dest / "good.txt").read_text() == "fine too"
    assert (dest / "sub" / "ok.txt").read_text() == "fine"
    assert os.readlink(dest / "sub" / "chain1") == ".."
    assert os.readlink(dest / "inside") == "sub/ok.txt"
    assert sorted(os.listdir(dest)) == ["bb", "good.txt", "inside", "sub"]


def test_joliet_names_are_checked_too(hostile, tmp_path):
    code, out, err = cli("iso", "extract", "--namespace", "joliet", hostile,
                         str(tmp_path / "j"))
    assert code == 1 and "refused '..'" in err
    assert "bb" not in os.listdir(tmp_path / "j")


def test_absolute_symlinks_rerooted_or_kept_on_request(hostile, tmp_path):
    dest = tmp_path / "r"
    code, _, err = cli("iso", "extract", "--symlinks", "reroot", hostile, str(dest))
    assert os.readlink(dest / "abs") == "etc/passwd"      # re-rooted under DEST
    assert "refused 'abs'" not in err and "refused 'up'" in err
    dest = tmp_path / "k"
    cli("iso", "extract", "--symlinks", "keep", hostile, str(dest))
    assert os.readlink(dest / "abs") == "/etc/passwd"
    assert os.readlink(dest / "up") == "../../../../outside"


def test_never_writes_through_a_symlink_in_dest(hostile, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "pre"
    dest.mkdir()
    os.symlink(str(outside), dest / "sub")             # planted before extraction
    os.symlink(str(outside / "good.txt"), dest / "good.txt")
    code, _, err = cli("iso", "extract", "--overwrite", hostile, str(dest))
    assert code == 1
    assert "refused 'sub'" in err
    assert os.listdir(outside) == []
    # --overwrite replaced the planted link itself, not what it points to
    assert not os.path.islink(dest / "good.txt")
    assert (dest / "good.txt").read_text() == "fine too"


def test_a_symlink_and_a_directory_of_one_name(tmp_path):
    """A kept symlink "twin" to outside, then a directory also named "twin": the
    directory's file must not land outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    (src / "twim").mkdir(parents=True)
    (src / "twim" / "payload").write_text("x")
    os.symlink(str(outside), src / "twin")
    iso = build(str(src), str(tmp_path / "twin.iso"))
    patch(iso, nm(b"twim"), nm(b"twin"))
    code, _, err = cli("iso", "extract", "--symlinks", "keep", iso, str(tmp_path / "d"))
    assert code == 1 and "refused 'twin'" in err
    assert os.listdir(outside) == []


def test_existing_files_are_not_overwritten_by_default(hostile, tmp_path):
    dest = tmp_path / "e"
    dest.mkdir()
    (dest / "good.txt").write_text("mine")
    code, _, err = cli("iso", "extract", hostile, str(dest))
    assert "refused 'good.txt': it already exists" in err
    assert (dest / "good.txt").read_text() == "mine"


# -- malformed ISOs: one line, no traceback, DEST untouched --------------------------------

@pytest.fixture
def good(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "f.txt").write_text("deep")
    for i in range(40):
        (src / f"file-with-a-longish-name-{i:03d}.txt").write_text(str(i) * 3000)
    return build(str(src), str(tmp_path / "good.iso"))


def records(iso: str):
    """(record, parent name) for the root directory of the ISO 9660 tree."""
    from diskforge.iso.records import iter_directory
    from diskforge.iso.volume import read_volume_set
    dev = diskforge.open(iso)
    vs = read_volume_set(dev)
    from diskforge.iso.records import parse_record
    root = parse_record(vs.primary.root_directory_record, 0, iso)
    recs = list(iter_directory(dev, root.location, root.data_length, 2048, iso))
    dev.close()
    return root, recs


def assert_fails_cleanly(iso: str, tmp_path, *words: str, commands=("ls", "extract")):
    for cmd in commands:
        dest = tmp_path / f"dest-{cmd}"
        argv = ["iso", "ls", "-R", iso] if cmd == "ls" else ["iso", "extract", iso, str(dest)]
        code, out, err = cli(*argv)
        one_line_error(code, err)
        for w in words:
            assert w in err, err
        assert not dest.exists()


def poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_volume_descriptors(good, tmp_path):
    for size, words in ((32768 + 2048 + 700, ("truncated",)),
                        (33000, ("too small", "truncated")),
                        (32768 + 4096 + 100, ("terminator",))):
        bad = str(tmp_path / f"t{size}.iso")
        with open(good, "rb") as f, open(bad, "wb") as g:
            g.write(f.read(size))
        if size == 32768 + 4096 + 100:   # keep the PVD, lose the terminator
            poke(bad, 32768 + 2048, b"\xff" + b"XXXXX")
        assert_fails_cleanly(bad, tmp_path, *words)
        code, _, err = cli("info", bad)
        one_line_error(code, err)


def test_record_length_past_its_sector(good, tmp_path):
    root, recs = records(good)
    # after the last record of a directory sector, a record whose length runs 10
    # bytes into the next sector
    for sector in range(root.location, root.location + root.data_length // 2048):
        last = [r for r in recs if r.offset // 2048 == sector][-1]
        pos = last.offset + last.length
        room = (sector + 1) * 2048 - pos
        if 0 < room <= 245:
            break
    else:
        pytest.fail("no directory sector with room for the crafted record")
    poke(good, pos, bytes((max(34, room + 10),)))
    assert_fails_cleanly(good, tmp_path, "DirectoryRecord.length", "past the end of its sector")


def test_record_length_too_small(good, tmp_path):
    root, recs = records(good)
    poke(good, recs[3].offset, bytes((20,)))
    assert_fails_cleanly(good, tmp_path, "below the minimum")


def test_directory_loop(good, tmp_path):
    root, recs = records(good)
    sub = next(r for r in recs if r.name == b"SUB")
    poke(good, sub.offset + 2, struct.pack("<L", root.location))
    assert_fails_cleanly(good, tmp_path, "directory loop")
    # a plain, non-recursive listing still works (the loop is only found by walking)
    assert cli("iso", "ls", good)[0] == 0


def test_directory_outside_the_image(good, tmp_path):
    root, recs = records(good)
    sub = next(r for r in recs if r.name == b"SUB")
    poke(good, sub.offset + 2, struct.pack("<L", 0x7FFFFFF0))
    assert_fails_cleanly(good, tmp_path, "outside the image")


def test_file_data_past_the_end(good, tmp_path):
    size = os.path.getsize(good)
    with open(good, "r+b") as f:
        f.truncate(size - 8192)
    dest = tmp_path / "d"
    code, _, err = cli("iso", "extract", good, str(dest))
    one_line_error(code, err)
    assert "truncated" in err


def test_continuation_area_out_of_range(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    long = "n" * 240                     # a name this long spills into a CE area
    (src / long).write_text("x")
    iso = build(str(src), str(tmp_path / "ce.iso"))
    data = open(iso, "rb").read()
    at = data.index(b"CE\x1c\x01")
    poke(iso, at + 4, struct.pack("<L", 0x7FFFFFF0) + struct.pack(">L", 0x7FFFFFF0))
    assert_fails_cleanly(iso, tmp_path, "continuation area")


def test_bad_el_torito_catalog_in_info(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "boot.img").write_bytes(b"\xeb" * 4096)
    iso = build(str(src), str(tmp_path / "b.iso"), "--boot", "b/boot.img")
    data = open(iso, "rb").read()
    cat = struct.unpack_from("<L", data, 17 * 2048 + 71)[0]
    poke(iso, cat * 2048 + 28, b"\x00\x00")      # break the validation checksum
    code, _, err = cli("info", iso)
    one_line_error(code, err)
    assert "ValidationEntry.checksum" in err


def test_udf_only_with_a_broken_anchor(tmp_path):
    from conftest import need_real
    src = need_real("iso/libcdio_udf102_imgburn_udf-only.iso")
    bad = str(tmp_path / "udf.iso")
    shutil.copy(src, bad)
    os.chmod(bad, 0o644)
    size = os.path.getsize(bad)
    for sector in (256, size // 2048 - 1, size // 2048 - 257):
        poke(bad, sector * 2048 + 4, b"\x00")        # tag checksums no longer match
    assert_fails_cleanly(bad, tmp_path, "checksum")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(16 * 2048, 40 * 2048 - 1),
                                st.integers(0, 255)), min_size=1, max_size=12),
       namespace=st.sampled_from(["auto", "joliet", "iso9660", "udf"]))
def test_random_corruption_only_raises_diskforge_errors(corruptible, flips, namespace):
    from diskforge.iso.extract import extract
    from diskforge.iso.filesystem import open_filesystem
    path, pristine, workdir = corruptible
    data = bytearray(pristine)
    for off, value in flips:
        data[off] = value
    with open(path, "wb") as f:
        f.write(data)
    dest = os.path.join(workdir, "dest")
    shutil.rmtree(dest, ignore_errors=True)
    try:
        with diskforge.open(path, "iso") as dev:
            dev.info()
            tree = open_filesystem(dev, namespace)
            for _ in tree.walk(tree.root()):
                pass
            extract(tree, dest, symlinks="keep")
    except DiskforgeError:
        pass
    if os.path.isdir(dest):
        for dirpath, _, filenames in os.walk(dest):
            for n in filenames:
                assert os.path.realpath(os.path.join(dirpath, n)).startswith(
                    os.path.realpath(dest) + os.sep)


@pytest.fixture(scope="module")
def corruptible(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c.txt").write_text("c")
    (src / "hello.txt").write_text("hello")
    os.symlink("hello.txt", src / "link")
    iso = build(str(src), str(tmp / "base.iso"), "--udf")
    pristine = open(iso, "rb").read()
    return str(tmp / "fuzzed.iso"), pristine, str(tmp)
