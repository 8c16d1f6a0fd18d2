"""vdi differencing images: the parent found by UUID (formats/vdi.md's rule), written
with -B, and commit, rebase and make_empty on them. qemu cannot read differencing
VDIs, so what we write is checked by flattening (the child converted to raw must be
the disk given, and qemu-img reads the parent) and by dissect.hypervisor, which reads
a child over the parent it is handed."""

from __future__ import annotations

import os
import random

import pytest

import diskforge
import dissect_oracle
from conftest import cli, cli_merged, need, one_line_error, run
from vdi_helpers import build, header, uuid, virtualbox_header_problems, \
    virtualbox_layout_differences

MIB = 1 << 20


def _pair(d: str) -> tuple[bytes, bytes]:
    """A base disk and a changed copy: whole blocks, part blocks, a zeroed block."""
    rng = random.Random(3)
    base = bytearray(5 * MIB)
    base[100000:1600000] = rng.randbytes(1500000)
    base[3 * MIB:4 * MIB] = rng.randbytes(MIB)
    new = bytearray(base)
    new[3000:10000] = b"x" * 7000                # part of block 0
    new[3 * MIB:4 * MIB] = bytes(MIB)            # block 3 zeroed whole
    new[4 * MIB + 100:4 * MIB + 200] = b"y" * 100
    for name, data in (("base.raw", base), ("new.raw", new)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return bytes(base), bytes(new)


def _flat(path: str, d: str) -> bytes:
    out = os.path.join(d, "flat.raw")
    code, _, err = cli("convert", "-O", "raw", path, out)
    assert code == 0, err
    return open(out, "rb").read()


def test_convert_with_a_parent_writes_only_the_differences(tmp_path):
    d = str(tmp_path)
    base, new = _pair(d)
    assert cli("convert", "-O", "vdi", os.path.join(d, "base.raw"),
               os.path.join(d, "base.vdi"))[0] == 0
    child = os.path.join(d, "child.vdi")
    code, _, err = cli("convert", "-O", "vdi", "-B", "base.vdi",
                       os.path.join(d, "new.raw"), child)
    assert code == 0, err
    h, hb = header(child), header(os.path.join(d, "base.vdi"))
    assert h["u32Type"] == 4
    assert (h["uuidLinkage"], h["uuidParentModify"]) == (hb["uuidCreate"], hb["uuidModify"])
    assert virtualbox_header_problems(child) == []
    assert virtualbox_layout_differences(child) == []
    assert h["cBlocksAllocated"] == 2               # blocks 0 and 4; block 3 a zero entry
    entries = open(child, "rb").read()[h["offBlocks"]:h["offBlocks"] + 20]
    assert entries[12:16] == b"\xfe\xff\xff\xff"
    assert _flat(child, d) == new
    assert dissect_oracle.vdi_read(child, [os.path.join(d, "base.vdi")]) == new
    with diskforge.open(child) as dev:
        assert dev.backing.path.endswith("base.vdi")
        info = dev.info().to_json()
        assert info["backing-filename"] == "base.vdi"
        assert info["diskforge"]["uuid-linkage"] == dev.backing.info().details["uuid-create"]
    need("qemu-img")   # the parent stays a file qemu reads as before
    run("qemu-img", "compare", "-f", "raw", "-F", "vdi", os.path.join(d, "base.raw"),
        os.path.join(d, "base.vdi"))


@pytest.mark.parametrize("bs", ["64k", "256k", "2M"])
def test_children_of_any_block_size_read_by_dissect_over_the_parent(tmp_path, bs):
    """A child's block size need not be its parent's: the blocks convert touched are
    stored whole, a block zeroed whole is a VDI_IMAGE_BLOCK_ZERO entry, the rest read
    through (VDI_IMAGE_BLOCK_FREE), and dissect composes them as we do."""
    d = str(tmp_path)
    base, new = _pair(d)
    same = random.Random(4).randbytes(4 * MIB)    # shared by both: left to the parent
    new += same
    for name in ("base.raw", "new.raw"):
        with open(os.path.join(d, name), "ab") as f:
            f.write(same)
    assert cli("convert", "-O", "vdi", os.path.join(d, "base.raw"),
               os.path.join(d, "base.vdi"))[0] == 0
    child = os.path.join(d, "child.vdi")
    code, _, err = cli("convert", "-O", "vdi", "-o", f"block_size={bs}", "-B", "base.vdi",
                       os.path.join(d, "new.raw"), child)
    assert code == 0, err
    h = header(child)
    assert virtualbox_header_problems(child) == []
    with open(child, "rb") as f:
        f.seek(h["offBlocks"])
        entries = set(memoryview(f.read(4 * h["cBlocks"])).cast("I"))
    assert {0xFFFFFFFF, 0xFFFFFFFE} <= entries       # both kinds of unstored entry
    assert dissect_oracle.vdi_read(child, [os.path.join(d, "base.vdi")]) == new
    assert _flat(child, d) == new


def test_a_chain_in_a_snapshots_folder_with_the_base_above(tmp_path):
    """VirtualBox's layout: base in the VM folder, differencing images in Snapshots/.
    The folder above is searched by default; in untrusted mode only where the open
    policy allows it."""
    d = str(tmp_path)
    base, _ = _pair(d)
    snaps = os.path.join(d, "Snapshots")
    os.mkdir(snaps)
    build(os.path.join(d, "base.vdi"), base, create=uuid(1), modify=uuid(2))
    one = bytearray(base)
    one[:MIB] = b"\x01" * MIB
    build(os.path.join(snaps, "{a}.vdi"), bytes(one), order=[0], image_type=4,
          create=uuid(3), modify=uuid(4), linkage=uuid(1), parent_modify=uuid(2))
    two = bytearray(one)
    two[2 * MIB:3 * MIB] = b"\x02" * MIB
    top = build(os.path.join(snaps, "{b}.vdi"), bytes(two), order=[2], image_type=4,
                create=uuid(5), modify=uuid(6), linkage=uuid(3), parent_modify=uuid(4))
    code, _, err = cli("--untrusted", "info", top)
    one_line_error(code, err)
    assert "parent not found" in err and "--allow-root" in err
    code, _, err = cli("--untrusted", "convert", "--allow-root", d, "-O", "raw", top,
                       os.path.join(d, "x.raw"))
    assert code == 0, err
    assert open(os.path.join(d, "x.raw"), "rb").read() == bytes(two)
    os.unlink(os.path.join(d, "x.raw"))
    # by default the folder above is searched, as VirtualBox's layout needs
    code, _, err = cli("convert", "-O", "raw", top, os.path.join(d, "x.raw"))
    assert code == 0, err
    assert open(os.path.join(d, "x.raw"), "rb").read() == bytes(two)


@pytest.mark.parametrize("case", ["missing", "self", "loop", "ambiguous", "wrong-type"])
def test_parent_problems_are_one_line_errors(tmp_path, case):
    d = str(tmp_path)
    disk = bytes(MIB)
    child = os.path.join(d, "child.vdi")
    if case == "missing":
        build(child, disk, image_type=4, create=uuid(1), linkage=uuid(9))
        words = "parent not found"
    elif case == "self":
        build(child, disk, image_type=4, create=uuid(1), linkage=uuid(1))
        words = "loop"
    elif case == "loop":
        build(child, disk, image_type=4, create=uuid(1), linkage=uuid(2))
        build(os.path.join(d, "other.vdi"), disk, image_type=4, create=uuid(2),
              linkage=uuid(1))
        words = "loop"
    elif case == "ambiguous":
        build(child, disk, image_type=4, create=uuid(1), linkage=uuid(2))
        for name in ("p1.vdi", "p2.vdi"):
            build(os.path.join(d, name), disk, create=uuid(2))
        words = "cannot tell which"
    else:
        build(child, disk, image_type=4, create=uuid(1))      # no uuidLinkage
        words = "uuidLinkage"
    # (plain info names the parent without opening it, as for a qcow2 overlay: the
    # chain is checked where it is opened)
    code, _, err = cli("info", "--backing-chain", child)
    one_line_error(code, err)
    assert words in err


def test_a_parent_modified_later_is_used_with_a_warning(tmp_path):
    d = str(tmp_path)
    build(os.path.join(d, "base.vdi"), b"\x07" * MIB, create=uuid(1), modify=uuid(5))
    child = build(os.path.join(d, "c.vdi"), bytes(MIB), order=[], image_type=4,
                  create=uuid(2), linkage=uuid(1), parent_modify=uuid(4))
    with diskforge.open(child) as dev:
        assert dev.read(0, 16) == b"\x07" * 16
    code, out, _ = cli_merged("check", child)
    assert code == 0 and "was modified after" in out


def test_commit_rebase_and_make_empty(tmp_path):
    d = str(tmp_path)
    base, new = _pair(d)
    p = lambda n: os.path.join(d, n)  # noqa: E731
    assert cli("convert", "-O", "vdi", p("base.raw"), p("base.vdi"))[0] == 0
    assert cli("convert", "-O", "vdi", "-B", "base.vdi", p("new.raw"), p("child.vdi"))[0] == 0
    # rebase onto another parent with other contents: the child keeps reading `new`
    other = bytearray(base)
    other[2 * MIB:2 * MIB + 10] = b"z" * 10
    with open(p("other.raw"), "wb") as f:
        f.write(other)
    assert cli("convert", "-O", "vdi", p("other.raw"), p("other.vdi"))[0] == 0
    code, _, err = cli("rebase", "-b", "other.vdi", "-F", "vdi", p("child.vdi"))
    assert code == 0, err
    assert header(p("child.vdi"))["uuidLinkage"] == header(p("other.vdi"))["uuidCreate"]
    assert _flat(p("child.vdi"), d) == new
    # commit into the new parent, which then reads `new`; the child is emptied
    code, _, err = cli("commit", p("child.vdi"))
    assert code == 0, err
    assert _flat(p("other.vdi"), d) == new
    assert header(p("child.vdi"))["cBlocksAllocated"] == 0
    assert virtualbox_header_problems(p("other.vdi")) == []
    need("qemu-img")
    run("qemu-img", "compare", "-f", "raw", "-F", "vdi", p("new.raw"), p("other.vdi"))
    run("qemu-img", "check", p("other.vdi"))
    # writing in place into a child copies the parent's part of a new block
    with diskforge.open(p("child.vdi"), writable=True) as dev:
        dev.write(MIB + 5, b"hello")
    flat = _flat(p("child.vdi"), d)
    assert flat[MIB:2 * MIB] == new[MIB:MIB + 5] + b"hello" + new[MIB + 10:2 * MIB]
    assert dissect_oracle.vdi_read(p("child.vdi"), [p("other.vdi")]) == flat
    # rebase with no parent: the child becomes a dynamic image reading the same
    code, _, err = cli("rebase", "-b", "", p("child.vdi"))
    assert code == 0, err
    assert header(p("child.vdi"))["u32Type"] == 1
    assert _flat(p("child.vdi"), d) == flat


def test_a_parent_outside_the_search_is_refused_when_writing(tmp_path):
    d = str(tmp_path)
    far = os.path.join(d, "a", "b")
    os.makedirs(far)
    build(os.path.join(d, "base.vdi"), bytes(MIB))
    raw = os.path.join(far, "x.raw")
    with open(raw, "wb") as f:
        f.truncate(MIB)
    code, _, err = cli("convert", "-O", "vdi", "-B", "../../base.vdi", raw,
                       os.path.join(far, "c.vdi"))
    one_line_error(code, err)
    assert "found again" in err


def test_open_through_a_given_backend(tmp_path):
    from diskforge.blockdev import FileBackend
    from diskforge.registry import get
    disk = random.Random(1).randbytes(MIB + 512)
    img = build(str(tmp_path / "w.vdi"), disk)
    with get("vdi").open(img, backend=FileBackend(img)) as dev:
        assert dev.read(0, dev.size) == disk
