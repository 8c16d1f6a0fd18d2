"""Writing VMDKs in place (issue 14: random-access writing for the hosted sparse and
flat kinds): ``convert -n``, ``commit``, ``rebase`` and direct writes, on files qemu-img
made and on files diskforge has already written, each checked by qemu-img (``check``
and ``compare``) afterwards; the kinds that cannot be written say so."""

import os
import struct

import pytest
from conftest import cli, make_sparse, need, one_line_error, qemu_img_json, run
from vmdk_helpers import build, descriptor

import diskforge
from diskforge.errors import UnsupportedError

MIB = 1 << 20
SIZE = 4 * MIB
LAYOUT = [(4096, os.urandom(70000)), (MIB + 100, b"\x5a" * 3000),
          (3 * MIB, b"\x01" * 65536)]


def _q_ok(path: str, raw: str) -> None:
    """qemu-img finds no errors and reads ``raw``'s bytes."""
    check = run("qemu-img", "check", path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    run("qemu-img", "compare", "-f", "raw", "-F", "vmdk", raw, path)


@pytest.mark.parametrize("maker", ["qemu-img", "diskforge"])
@pytest.mark.parametrize("opts", ["subformat=monolithicSparse",
                                  "subformat=twoGbMaxExtentSparse",
                                  "subformat=monolithicFlat",
                                  "subformat=twoGbMaxExtentFlat",
                                  "zeroed_grain=on"])
def test_convert_n_into_vmdks(workdir, opts, maker):
    """Into files qemu-img wrote and files diskforge's writer wrote."""
    need("qemu-img")
    src = make_sparse(os.path.join(workdir, "src.raw"), SIZE, LAYOUT)
    old = make_sparse(os.path.join(workdir, "old.raw"), SIZE, [(0, b"\xff" * SIZE)])
    path = os.path.join(workdir, "t.vmdk")
    if maker == "qemu-img":
        run("qemu-img", "convert", "-O", "vmdk", "-o", opts, old, path)
    else:
        assert cli("convert", "-O", "vmdk", "-o", opts, old, path)[0] == 0
    code, _, err = cli("convert", "-n", "-O", "vmdk", src, path)
    assert code == 0, err
    _q_ok(path, src)
    # and again over what diskforge wrote (a second writer's view of our grains)
    src2 = make_sparse(os.path.join(workdir, "src2.raw"), SIZE, [(MIB, b"\x33" * MIB)])
    assert cli("convert", "-n", "-O", "vmdk", src2, path)[0] == 0
    _q_ok(path, src2)


def test_writes_allocate_grain_tables_a_file_lacks(workdir):
    """VMware leaves grain directory entries 0 until a table is needed: a write there
    appends a table for both directories."""
    need("qemu-img")
    path = os.path.join(workdir, "g.vmdk")
    lay = build(path, 8192, {}, desc=descriptor(8192, "g.vmdk"))
    for at in (lay["gd"], lay["rgd"]):
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes(16))          # 4 tables: none allocated
    with diskforge.open(path, writable=True) as dev:
        dev.write(3 * MIB + 7, b"hello")
        dev.write(100, b"x" * 70000)
    want = make_sparse(os.path.join(workdir, "w.raw"), 8192 * 512,
                       [(100, b"x" * 70000), (3 * MIB + 7, b"hello")])
    _q_ok(path, want)
    code, out, _ = cli("check", path)
    assert code == 0, out


def _chain(d: str) -> tuple[str, str, str, str]:
    p = lambda n: os.path.join(d, n)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "vmdk", p("base.vmdk"), "4M")
    run("qemu-io", "-c", "write -P 0x11 0 3M", p("base.vmdk"))
    run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
        p("mid.vmdk"))
    run("qemu-io", "-c", "write -P 0x22 1M 1M", p("mid.vmdk"))
    run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "mid.vmdk", "-F", "vmdk",
        p("top.vmdk"))
    run("qemu-io", "-c", "write -P 0x33 1536k 64k", "-c", "write -P 0x44 3000k 3k",
        "-c", "write -z 0 4k", p("top.vmdk"))
    flat = p("flat.raw")
    run("qemu-img", "convert", "-O", "raw", p("top.vmdk"), flat)
    return p("base.vmdk"), p("mid.vmdk"), p("top.vmdk"), flat


def test_commit_into_a_chain_diskforge_made(workdir):
    need("qemu-img")
    p = lambda n: os.path.join(workdir, n)  # noqa: E731
    make_sparse(p("b.raw"), SIZE, [(0, b"\x11" * (3 * MIB))])
    make_sparse(p("t.raw"), SIZE, [(0, b"\x11" * (3 * MIB)), (MIB + 5, b"\x77" * 9000)])
    assert cli("convert", "-O", "vmdk", p("b.raw"), p("base.vmdk"))[0] == 0
    code, _, err = cli("convert", "-O", "vmdk", "-B", "base.vmdk", p("t.raw"),
                       p("top.vmdk"))
    assert code == 0, err
    assert cli("commit", p("top.vmdk"))[0] == 0
    _q_ok(p("base.vmdk"), p("t.raw"))
    _q_ok(p("top.vmdk"), p("t.raw"))


def test_commit_into_the_parent_then_the_top_reads_through(workdir):
    need("qemu-io")
    base, mid, top, flat = _chain(workdir)
    code, out, err = cli("commit", top)
    assert code == 0, err
    _q_ok(mid, flat)
    _q_ok(top, flat)                      # emptied, and its parentCID follows mid's
    assert qemu_img_json("map", top)[0]["depth"] >= 1
    info = qemu_img_json("info", top)["format-specific"]["data"]
    assert info["parent-cid"] == qemu_img_json("info", mid)["format-specific"]["data"]["cid"]


def test_rebase_safe_and_unsafe(workdir):
    need("qemu-io")
    base, mid, top, flat = _chain(workdir)
    code, _, err = cli("rebase", "-b", "base.vmdk", "-F", "vmdk", top)
    assert code == 0, err
    _q_ok(top, flat)
    info = qemu_img_json("info", top)
    assert info["backing-filename"] == "base.vmdk"
    assert info["format-specific"]["data"]["parent-cid"] == \
        qemu_img_json("info", base)["format-specific"]["data"]["cid"]
    # unsafe: the name only; then no parent at all
    assert cli("rebase", "-u", "-b", "", top)[0] == 0
    info = qemu_img_json("info", top)
    assert "backing-filename" not in info
    assert info["format-specific"]["data"]["parent-cid"] == 0xFFFFFFFF
    run("qemu-img", "check", top)


def test_partial_writes_over_a_parent_keep_the_rest_of_the_grain(workdir):
    need("qemu-io")
    base, mid, top, flat = _chain(workdir)
    with diskforge.open(top, writable=True) as dev:
        dev.write(2 * MIB + 1000, b"\x99" * 100)      # a grain top does not have yet
        dev.write_zeroes(MIB, 65536)                   # a whole grain hiding mid's
    with open(flat, "r+b") as f:
        f.seek(2 * MIB + 1000)
        f.write(b"\x99" * 100)
        f.seek(MIB)
        f.write(bytes(65536))
    _q_ok(top, flat)


def test_kinds_that_cannot_be_written_in_place_say_so(workdir):
    need("qemu-img")
    src = make_sparse(os.path.join(workdir, "src.raw"), SIZE, LAYOUT)
    stream = os.path.join(workdir, "s.vmdk")
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src,
        stream)
    with pytest.raises(UnsupportedError, match="not supported yet: writing"
                       " streamOptimized"):
        diskforge.open(stream, writable=True)
    code, _, err = cli("convert", "-n", "-O", "vmdk", src, stream)
    one_line_error(code, err)
    v3 = os.path.join(workdir, "v3.vmdk")
    build(v3, 64, {}, version=3, desc=descriptor(64, "v3.vmdk"))
    with pytest.raises(UnsupportedError, match="version 3"):
        diskforge.open(v3, writable=True)
    code, _, err = cli("resize", stream, "+1M")      # test_vmdk_resize.py: the others
    one_line_error(code, err)
    assert "not supported yet: writing streamOptimized" in err


def test_first_write_gives_a_new_cid(workdir):
    need("qemu-img")
    path = os.path.join(workdir, "c.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", path, "4M")
    before = qemu_img_json("info", path)["format-specific"]["data"]["cid"]
    with diskforge.open(path, writable=True) as dev:
        dev.write(0, b"a" * 512)
        dev.write(MIB, b"b" * 512)
    after = qemu_img_json("info", path)["format-specific"]["data"]
    assert after["cid"] != before
    with open(path, "rb") as f:
        assert struct.unpack_from("<Q", f.read(512), 28)[0] == 1   # still embedded
