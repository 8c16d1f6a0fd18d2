"""vpc differencing disks: writing them (convert -B, create -b), finding parents
safely, composing chains, writing in place, rebasing."""

import os
import random
import shutil

import pytest
from conftest import cli, cli_merged, need, one_line_error, run
from vhd_helpers import (have_pyvhdi, patch_header, pyvhdi_sha256, qemu_raw, random_disk,
                         read_header, sha256)

import diskforge
from diskforge.blockdev import ExtentKind
from diskforge.errors import SafetyError
from diskforge.policy import OpenPolicy


def read_all(path, **kw) -> bytes:
    with diskforge.open(path, **kw) as dev:
        return dev.read(0, dev.size)


def own_sectors(path: str) -> bytes:
    """What a reader that ignores the parent (qemu) must see: this disk's own sectors,
    zeros elsewhere."""
    with diskforge.open(path) as dev:
        out = bytearray(dev.size)
        for e in dev.extents():
            if e.kind is ExtentKind.DATA:
                out[e.offset:e.end] = dev.read(e.offset, e.length)
    return bytes(out)


@pytest.fixture
def chain(workdir):
    """base.raw → parent.vhd (qemu-made); new.raw differs from base in places."""
    need("qemu-img")
    size = 8 << 20
    base = bytearray(random_disk(os.path.join(workdir, "base.raw"), size, seed=1,
                                 chunks=30))
    rng = random.Random(2)
    new = bytearray(base)
    for off, n in [(1000, 100), (3 << 20, 5000), (5 << 20, 1 << 20), (size - 700, 700)]:
        new[off:off + n] = rng.randbytes(n)
    new[(6 << 20):(6 << 20) + 8192] = bytes(8192)
    new[(2 << 20) + 4096:(2 << 20) + 8192] = b"\xff" * 4096
    with open(os.path.join(workdir, "new.raw"), "wb") as f:
        f.write(new)
    parent = os.path.join(workdir, "parent.vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on",
        os.path.join(workdir, "base.raw"), parent)
    return workdir, bytes(base), bytes(new)


def test_convert_with_base_writes_only_the_differences(chain):
    d, base, new = chain
    child = os.path.join(d, "child.vhd")
    code, _, err = cli("convert", "-B", "parent.vhd", "-O", "vpc",
                       os.path.join(d, "new.raw"), child)
    assert code == 0, err
    assert read_all(child) == new
    assert cli("compare", os.path.join(d, "new.raw"), child)[0] == 0
    with diskforge.open(child) as dev:
        info = dev.info()
        assert info.backing_filename == ".\\parent.vhd" and info.backing_format == "vpc"
        assert info.details["disk-type"] == "differencing"
        own = sum(e.length for e in dev.extents() if e.kind is not ExtentKind.BACKING)
    assert own <= 1 << 20 | 64 << 10  # the differences, in 4 KiB granules
    assert os.stat(child).st_blocks * 512 < 3 << 20
    # qemu ignores parents: it must read exactly the sectors this disk holds
    assert qemu_raw(child) == own_sectors(child)
    if have_pyvhdi():  # libvhdi composes the chain itself
        assert pyvhdi_sha256(child, [os.path.join(d, "parent.vhd")]) == (len(new),
                                                                          sha256(new))


def test_three_level_chain(chain):
    d, base, new = chain
    mid = os.path.join(d, "mid.vhd")
    assert cli("convert", "-B", "parent.vhd", "-O", "vpc", os.path.join(d, "new.raw"),
               mid)[0] == 0
    top_raw = bytearray(new)
    top_raw[7 << 20:(7 << 20) + 4096] = b"top!" * 1024
    with open(os.path.join(d, "top.raw"), "wb") as f:
        f.write(top_raw)
    top = os.path.join(d, "top.vhd")
    assert cli("convert", "-B", "mid.vhd", "-O", "vpc", os.path.join(d, "top.raw"),
               top)[0] == 0
    assert read_all(top) == top_raw
    code, out, _ = cli("info", "--backing-chain", "--output", "json", top)
    import json
    infos = json.loads(out)
    assert code == 0 and [i["format"] for i in infos] == ["vpc"] * 3
    assert infos[0]["backing-filename"] == ".\\mid.vhd"
    if have_pyvhdi():
        assert pyvhdi_sha256(top, [mid, os.path.join(d, "parent.vhd")]) == (
            len(top_raw), sha256(bytes(top_raw)))


def test_create_with_backing_reads_as_the_parent(chain):
    d, base, _ = chain
    os.mkdir(os.path.join(d, "sub"))
    child = os.path.join(d, "sub", "c.vhd")
    code, _, err = cli("create", "-q", "-b", "../parent.vhd", "-F", "vpc", child)
    assert code == 0, err
    with diskforge.open(child, policy=OpenPolicy(allowed_roots=(d,))) as dev:
        assert dev.size == len(base) and dev.read(0, dev.size) == base
        assert dev.info().backing_filename == "..\\parent.vhd"
        assert all(e.kind is ExtentKind.BACKING for e in dev.extents())
    # the parent's size fields are copied, so the sizes agree exactly
    assert read_header(child).block_size == 2 << 20
    # -u: the parent is not opened as an image, but its unique id is still recorded
    child2 = os.path.join(d, "c2.vhd")
    assert cli("create", "-q", "-u", "-b", "parent.vhd", "-F", "vpc", child2, "8M")[0] == 0
    assert read_all(child2) == base


def test_a_moved_chain_still_resolves(chain):
    d, _, new = chain
    child = os.path.join(d, "child.vhd")
    assert cli("convert", "-B", "parent.vhd", "-O", "vpc", os.path.join(d, "new.raw"),
               child)[0] == 0
    moved = os.path.join(d, "moved")
    os.mkdir(moved)
    for name in ("child.vhd", "parent.vhd"):
        shutil.move(os.path.join(d, name), os.path.join(moved, name))
    with diskforge.open(os.path.join(moved, "child.vhd")) as dev:
        assert dev.backing.path == os.path.join(moved, "parent.vhd")  # W2ru, not W2ku
        assert dev.read(0, dev.size) == new


def test_wrong_parent_is_refused(chain):
    d, _, _ = chain
    child = os.path.join(d, "child.vhd")
    assert cli("convert", "-B", "parent.vhd", "-O", "vpc", os.path.join(d, "new.raw"),
               child)[0] == 0
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on",
        os.path.join(d, "new.raw"), os.path.join(d, "parent.vhd"))  # same name, new id
    code, _, err = cli("convert", "-O", "raw", child, os.path.join(d, "out.raw"))
    one_line_error(code, err)
    assert "wrong or replaced parent" in err
    assert not os.path.exists(os.path.join(d, "out.raw"))


def test_parent_outside_the_allowed_roots(chain):
    d, _, new = chain
    os.mkdir(os.path.join(d, "kids"))
    child = os.path.join(d, "kids", "child.vhd")
    assert cli("convert", "-B", "../parent.vhd", "-O", "vpc", os.path.join(d, "new.raw"),
               child)[0] == 0
    # followed by default, as qemu-img follows backing files; confined when untrusted
    code, _, err = cli("--untrusted", "info", child)
    one_line_error(code, err)
    assert "outside the image's directory" in err and "--allow-root" in err
    code, _, err = cli("--untrusted", "info", "--allow-root", d, child)
    assert code == 0, err
    assert cli("info", child)[0] == 0
    with pytest.raises(SafetyError):
        diskforge.open(child, policy=OpenPolicy.untrusted())
    with diskforge.open(child, policy=OpenPolicy.untrusted(allowed_roots=(d,))) as dev:
        assert dev.read(0, dev.size) == new
    with diskforge.open(child) as dev:
        assert dev.read(0, dev.size) == new


def test_absolute_locator_elsewhere_is_refused(workdir, chain):
    """A hostile W2ku naming a file outside the allowed roots is never opened."""
    d, _, _ = chain
    child = os.path.join(d, "child.vhd")
    assert cli("create", "-q", "-b", "parent.vhd", child)[0] == 0
    hd = read_header(child)
    entries = {bytes(e.platform_code): e for e in hd.parent_locator_entries}
    w2ku = entries[b"W2ku"]
    evil = "/etc/hostname".encode("utf-16-le")
    with open(child, "r+b") as f:
        f.seek(w2ku.platform_data_offset)
        f.write(evil.ljust(w2ku.platform_data_space, b"\0"))
    idx = [bytes(e.platform_code) for e in hd.parent_locator_entries].index(b"W2ru")
    patch_header(child, locators={idx: {"platform_code": bytes(4)}},
                 parent_unicode_name=bytes(512))
    i = [bytes(e.platform_code) for e in hd.parent_locator_entries].index(b"W2ku")
    patch_header(child, locators={i: {"platform_data_length": len(evil)}})
    code, _, err = cli("--untrusted", "info", child)
    one_line_error(code, err)
    assert "/etc/hostname" in err and "outside" in err
    # followed by default (info opens the chain with --backing-chain): a regular file,
    # not a VHD
    code, _, err = cli("info", "--backing-chain", child)
    one_line_error(code, err)
    assert "/etc/hostname" in err


def test_parent_loops_are_refused(workdir):
    d = workdir
    first = os.path.join(d, "first.vhd")
    assert cli("create", "-q", "-o", "force_size=on", first, "4M")[0] == 0
    a, b = os.path.join(d, "a.vhd"), os.path.join(d, "b.vhd")
    assert cli("create", "-q", "-b", "first.vhd", a)[0] == 0
    assert cli("create", "-q", "-b", "a.vhd", b)[0] == 0
    # make a name b as its parent, recording b's unique id: a → b → a
    b_hd = read_header(b)
    with open(b, "rb") as f:
        b_id = f.read(512)[68:84]
    a_hd = read_header(a)
    for i, e in enumerate(a_hd.parent_locator_entries):
        if bytes(e.platform_code) == b"W2ru":
            with open(a, "r+b") as f:
                f.seek(e.platform_data_offset)
                f.write(".\\b.vhd".encode("utf-16-le").ljust(e.platform_data_space, b"\0"))
            patch_header(a, locators={i: {"platform_data_length": 14}})
        elif bytes(e.platform_code) != bytes(4):
            patch_header(a, locators={i: {"platform_code": bytes(4)}})
    patch_header(a, parent_unique_id=b_id, parent_unicode_name=bytes(512))
    assert b_hd.parent_unique_id != b_id
    code, _, err = cli("info", "--backing-chain", b)
    one_line_error(code, err)
    assert "loop" in err
    # a disk naming itself
    with open(a, "rb") as f:
        a_id = f.read(512)[68:84]
    patch_header(b, parent_unique_id=a_id)  # b → a → b
    code, _, err = cli("convert", "-O", "raw", a, os.path.join(d, "x.raw"))
    one_line_error(code, err)
    assert "loop" in err


def test_deep_chains_are_depth_limited(workdir):
    d = workdir
    prev = "d0.vhd"
    assert cli("create", "-q", "-o", "force_size=on", os.path.join(d, prev), "1M")[0] == 0
    for i in range(1, 5):
        cur = f"d{i}.vhd"
        assert cli("create", "-q", "-b", prev, os.path.join(d, cur))[0] == 0
        prev = cur
    with pytest.raises(SafetyError, match="deeper than 3"):
        diskforge.open(os.path.join(d, prev), policy=OpenPolicy(max_depth=3))
    with diskforge.open(os.path.join(d, prev)) as dev:
        assert dev.read(0, 512) == bytes(512)


def test_mac_x_locator(chain):
    d, _, new = chain
    child = os.path.join(d, "child.vhd")
    assert cli("convert", "-B", "parent.vhd", "-O", "vpc", os.path.join(d, "new.raw"),
               child)[0] == 0
    hd = read_header(child)
    url = ("file://localhost" + os.path.join(d, "parent.vhd").replace(" ", "%20")).encode()
    changes = {}
    for i, e in enumerate(hd.parent_locator_entries):
        code = bytes(e.platform_code)
        if code == b"W2ku":
            with open(child, "r+b") as f:
                f.seek(e.platform_data_offset)
                f.write(url.ljust(e.platform_data_space, b"\0"))
            changes[i] = {"platform_code": b"MacX", "platform_data_length": len(url)}
        elif code != bytes(4):
            changes[i] = {"platform_code": bytes(4)}
    patch_header(child, locators=changes, parent_unicode_name=bytes(512))
    with diskforge.open(child) as dev:
        assert dev.info().details["parent-locators"] == [
            {"platform": "Mac X", "path": url.decode()}]
        assert dev.backing.path == os.path.join(d, "parent.vhd")
        assert dev.read(0, dev.size) == new


def test_missing_parent_names_what_was_tried(chain):
    d, _, _ = chain
    child = os.path.join(d, "child.vhd")
    assert cli("create", "-q", "-b", "parent.vhd", child)[0] == 0
    os.unlink(os.path.join(d, "parent.vhd"))
    code, _, err = cli("map", child)
    one_line_error(code, err)
    assert "parent not found" in err and ".\\parent.vhd" in err


def test_parent_must_be_a_vhd(chain):
    d, _, _ = chain
    code, _, err = cli("convert", "-B", "base.raw", "-F", "raw", "-O", "vpc",
                       os.path.join(d, "new.raw"), os.path.join(d, "c.vhd"))
    one_line_error(code, err)
    assert "parent must be a VHD" in err and not os.path.exists(os.path.join(d, "c.vhd"))
    code, _, err = cli("convert", "-B", "parent.vhd", "-O", "vpc", "-o", "subformat=fixed",
                       os.path.join(d, "new.raw"), os.path.join(d, "c.vhd"))
    one_line_error(code, err)
    assert "fixed" in err


def test_writes_into_a_differencing_disk(chain):
    """Aligned and unaligned writes: partial sectors keep the parent's bytes."""
    d, base, _ = chain
    child = os.path.join(d, "child.vhd")
    assert cli("create", "-q", "-b", "parent.vhd", "-o", "block_size=64K", child)[0] == 0
    model = bytearray(base)
    rng = random.Random(5)
    with diskforge.open(child, writable=True) as dev:
        for _ in range(80):
            off = rng.randrange(dev.size)
            n = min(dev.size - off, rng.choice([1, 3, 100, 512, 513, 4096, 70000, 300000]))
            if rng.random() < 0.2:
                dev.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                dev.write(off, data)
                model[off:off + n] = data
        assert dev.read(0, dev.size) == model
    assert read_all(child) == model
    assert read_all(os.path.join(d, "parent.vhd")) == base  # the parent is untouched
    assert qemu_raw(child) == own_sectors(child)
    assert cli_merged("check", "--format-checks", child)[0] == 0


def test_rebase_unsafe(chain):
    d, base, new = chain
    child = os.path.join(d, "child.vhd")
    assert cli("convert", "-B", "parent.vhd", "-O", "vpc", os.path.join(d, "new.raw"),
               child)[0] == 0
    shutil.copy(os.path.join(d, "parent.vhd"), os.path.join(d, "copy.vhd"))
    with diskforge.open(child, writable=True) as dev:
        dev.set_backing("copy.vhd", "vpc")
    with diskforge.open(child) as dev:
        assert dev.backing.path.endswith("copy.vhd") and dev.read(0, dev.size) == new
        assert dev.info().backing_filename == ".\\copy.vhd"
    os.unlink(os.path.join(d, "parent.vhd"))
    assert cli_merged("check", "--format-checks", child)[0] == 0
    with diskforge.open(child, writable=True) as dev:  # no parent: a dynamic disk
        dev.set_backing(None, None)
    with diskforge.open(child) as dev:
        assert dev.info().details["disk-type"] == "dynamic"
        assert dev.read(0, dev.size) == own_sectors_of(new, base)
    assert qemu_raw(child) == read_all(child)


def own_sectors_of(new: bytes, base: bytes) -> bytes:
    """new where it differs from base (in 4 KiB granules), zeros elsewhere."""
    out = bytearray(len(new))
    for i in range(0, len(new), 4096):
        if new[i:i + 4096] != base[i:i + 4096]:
            out[i:i + 4096] = new[i:i + 4096]
    return bytes(out)


def test_changed_parent_is_a_check_warning(chain):
    d, _, _ = chain
    child = os.path.join(d, "child.vhd")
    assert cli("create", "-q", "-b", "parent.vhd", child)[0] == 0
    os.utime(os.path.join(d, "parent.vhd"), (1, 1_000_000_000))
    code, out, _ = cli_merged("check", "--format-checks", child)
    assert code == 0 and "Warning: parent time stamp" in out


def test_child_larger_than_parent(chain):
    d, base, _ = chain
    child = os.path.join(d, "big.vhd")
    assert cli("create", "-q", "-b", "parent.vhd", child, "12M")[0] == 0
    with diskforge.open(child, writable=True) as dev:
        assert dev.size == 12 << 20
        dev.write((10 << 20) + 1, b"tail")
        assert dev.read(0, len(base)) == base
        assert dev.read(len(base), 2 << 20) == bytes(2 << 20)
    assert read_all(child)[(10 << 20) + 1:(10 << 20) + 5] == b"tail"
