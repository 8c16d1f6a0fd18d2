"""VHD maintenance qemu-img cannot do: resize (grow, --shrink) of fixed, dynamic and
differencing disks, rebase (a parent given to a dynamic disk), commit into a VHD, and
what an interrupted resize leaves. Every result is read by qemu-img (fixed and
dynamic) or 7-Zip (differencing), and by libvhdi, against the contents expected."""

import os
import random
import subprocess

import pytest
from conftest import cli, need, one_line_error, run
from vhd_helpers import (pyvhdi_prefix, pyvhdi_sha256, qemu_raw, random_disk,
                         read_header, sha256)

import diskforge

MiB = 1 << 20


def expected(content: bytes, size: int) -> bytes:
    return content[:size].ljust(size, b"\0")


def read_all(path: str) -> bytes:
    with diskforge.open(path) as dev:
        return dev.read(0, dev.size)


def sevenzip_raw(path: str, check: bool = True) -> bytes:
    """The disk as 7-Zip flattens it (it follows a differencing disk's parent)."""
    need("7zz")
    return subprocess.run(["7zz", "x", "-so", path], capture_output=True,
                          check=check).stdout


def assert_reads(path: str, content: bytes, parents=(), qemu: bool = True,
                 libvhdi_upto: int | None = None) -> None:
    """diskforge, libvhdi and (fixed/dynamic) qemu-img or (differencing) 7-Zip all
    read ``content``; qemu-img's check finds nothing wrong."""
    assert read_all(path) == content
    if libvhdi_upto is None:
        assert pyvhdi_sha256(path, list(parents)) == (len(content), sha256(content))
    else:
        assert pyvhdi_prefix(path, list(parents), libvhdi_upto) == content[:libvhdi_upto]
    if qemu:
        need("qemu-img")
        assert qemu_raw(path) == content
        run("qemu-img", "check", "-f", "vpc", path, check=False)  # "no checks": not 1
        info = run("qemu-img", "info", "-f", "vpc", "--output", "json", path).stdout
        assert f'"virtual-size": {len(content)}' in info
    else:
        assert sevenzip_raw(path) == content
    code, _, err = cli("check", "--format-checks", path)
    assert code == 0, err


@pytest.fixture
def disk(workdir):
    path = os.path.join(workdir, "src.raw")
    content = random_disk(path, 6 * MiB, seed=7, chunks=20)
    return path, content


def make(workdir: str, src: str, name: str, tool: str, *opts: str) -> str:
    out = os.path.join(workdir, name)
    if tool == "qemu":
        need("qemu-img")
        run("qemu-img", "convert", "-f", "raw", "-O", "vpc", *opts, src, out)
    else:
        code, _, err = cli("convert", "-O", "vpc", *opts, src, out)
        assert code == 0, err
    return out


@pytest.mark.parametrize("tool,opts", [
    ("diskforge", ()), ("diskforge", ("-o", "subformat=fixed")),
    ("diskforge", ("-o", "block_size=16K")), ("qemu", ("-o", "force_size=on")),
    ("qemu", ()), ("qemu", ("-o", "subformat=fixed,force_size=on"))])
def test_grow_then_shrink(disk, workdir, tool, opts):
    src, content = disk
    path = make(workdir, src, "d.vhd", tool, *opts)
    content = read_all(path)            # qemu's default rounds the size to a geometry
    for size, flags in [(40 * MiB, ()), (3 * MiB + 512, ("--shrink",)),
                        (9 * MiB, ())]:
        code, out, err = cli("resize", *flags, path, str(size))
        assert code == 0, err
        content = expected(content, size)
        assert_reads(path, content)
    with diskforge.open(path) as dev:
        fixed = dev.disk_type == 2
    if fixed:
        assert os.path.getsize(path) == 9 * MiB + 512


def test_shrink_frees_blocks_and_cuts_the_file(disk, workdir):
    src, content = disk
    path = make(workdir, src, "d.vhd", "diskforge")
    before = os.path.getsize(path)
    code, _, err = cli("resize", "--shrink", path, str(1 * MiB))
    assert code == 0, err
    assert os.path.getsize(path) < before - 3 * MiB
    assert_reads(path, content[:MiB])
    with diskforge.open(path) as dev:
        assert dev.info().details["allocated-blocks"] <= 1


def test_grow_relocates_the_bat_past_the_blocks(disk, workdir):
    src, content = disk
    # 64 KiB blocks: the BAT's sector at 1536 and the next before the first block hold
    # 512 entries, 32 MiB
    path = make(workdir, src, "d.vhd", "diskforge", "-o", "block_size=64K")
    content = read_all(path)
    assert read_header(path).table_offset == 1536
    code, _, err = cli("resize", path, "+30M")
    assert code == 0, err
    hd = read_header(path)
    size = len(content) + 30 * MiB
    assert hd.table_offset > MiB and hd.max_table_entries == -(-size // 65536)
    assert_reads(path, expected(content, size))
    # the grown disk takes writes after the moved BAT (qemu-io, then every reader)
    need("qemu-io")
    run("qemu-io", "-f", "vpc", "-c", f"write -P 0x5a {size - 3 * MiB} 64k", path)
    data = bytearray(expected(content, size))
    data[size - 3 * MiB:size - 3 * MiB + 65536] = b"\x5a" * 65536
    assert_reads(path, bytes(data))


def test_sizes_refused(disk, workdir):
    src, _ = disk
    path = make(workdir, src, "d.vhd", "diskforge")
    before = open(path, "rb").read()
    for argv, words in [(("resize", path, "10000001"), "multiple of 512"),
                        (("resize", path, "2041G"), "2040 GiB"),
                        (("resize", path, "1M"), "--shrink")]:
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert words in err
    assert open(path, "rb").read() == before


def test_differencing_grows_beyond_its_parent(disk, workdir):
    """The new area reads zeros: past a smaller parent, and over a larger one (the
    parent must not show through, as qemu does for qcow2)."""
    src, content = disk
    parent = make(workdir, src, "parent.vhd", "diskforge")
    child = os.path.join(workdir, "child.vhd")
    code, _, err = cli("create", "-f", "vpc", "-b", "parent.vhd", "-F", "vpc", child)
    assert code == 0, err
    with diskforge.open(child, writable=True) as dev:
        dev.write(MiB, b"\x11" * 3000)
    view = bytearray(content)
    view[MiB:MiB + 3000] = b"\x11" * 3000
    code, _, err = cli("resize", "--shrink", child, str(2 * MiB + 512))
    assert code == 0, err
    code, _, err = cli("resize", child, str(12 * MiB))
    assert code == 0, err
    want = expected(bytes(view[:2 * MiB + 512]), 12 * MiB)
    assert read_all(child) == want
    # libvhdi and 7-Zip fail on the blocks past the parent's end ("unable to read data
    # from parent file", "Unexpected end of data"): libvhdi reads the part inside it
    assert pyvhdi_prefix(child, [parent], len(content)) == want[:len(content)]
    assert sevenzip_raw(child, check=False)[:len(content)] == want[:len(content)]
    # qemu reads a differencing disk as dynamic: the sectors this file stores, whole
    # (the partly written one filled from the parent), zeros elsewhere
    own = bytearray(12 * MiB)
    own[MiB:MiB + 3072] = view[MiB:MiB + 3072]
    assert qemu_raw(child) == bytes(own)
    code, _, err = cli("check", "--format-checks", child)
    assert code == 0, err


def test_rebase_gives_a_dynamic_disk_a_parent(disk, workdir):
    """Safe rebase of a dynamic disk onto a parent: it becomes a differencing disk
    that reads as before (zeros it held stay zeros over the parent's data)."""
    src, content = disk
    parent = make(workdir, src, "parent.vhd", "diskforge")
    rng = random.Random(3)
    own = bytearray(len(content))
    own[2 * MiB:2 * MiB + 70000] = rng.randbytes(70000)
    with open(os.path.join(workdir, "own.raw"), "wb") as f:
        f.write(own)
    child = make(workdir, os.path.join(workdir, "own.raw"), "child.vhd", "diskforge")
    code, _, err = cli("rebase", "-b", "parent.vhd", "-F", "vpc", child)
    assert code == 0, err
    with diskforge.open(child) as dev:
        assert dev.info().details["disk-type"] == "differencing"
    assert_reads(child, bytes(own), [parent], qemu=False)
    # unsafe: only the name; the parent's data now shows where the child stores nothing
    child2 = make(workdir, os.path.join(workdir, "own.raw"), "child2.vhd", "diskforge")
    code, _, err = cli("rebase", "-u", "-b", "parent.vhd", "-F", "vpc", child2)
    assert code == 0, err
    mixed = bytearray(content)
    mixed[2 * MiB:2 * MiB + 70000] = own[2 * MiB:2 * MiB + 70000]
    # the whole 2 MiB block holding the child's data is the child's
    mixed[2 * MiB:4 * MiB] = own[2 * MiB:4 * MiB]
    assert_reads(child2, bytes(mixed), [parent], qemu=False)


def test_commit_into_a_vhd_parent(disk, workdir):
    src, content = disk
    parent = make(workdir, src, "parent.vhd", "diskforge")
    child = os.path.join(workdir, "child.vhd")
    code, _, err = cli("create", "-f", "vpc", "-b", "parent.vhd", "-F", "vpc", child,
                       str(8 * MiB))
    assert code == 0, err
    with diskforge.open(child, writable=True) as dev:
        dev.write(100, b"\x22" * 5000)
        dev.write(7 * MiB, b"\x33" * 4096)
        dev.write_zeroes(3 * MiB, 1 * MiB)
    want = bytearray(expected(content, 8 * MiB))
    want[100:5100] = b"\x22" * 5000
    want[7 * MiB:7 * MiB + 4096] = b"\x33" * 4096
    want[3 * MiB:4 * MiB] = bytes(MiB)
    code, out, err = cli("commit", child)
    assert code == 0, err
    assert_reads(parent, bytes(want))                 # grown to the child's size
    assert_reads(child, bytes(want), [parent], qemu=False)
    with diskforge.open(child) as dev:
        assert dev.info().details["allocated-blocks"] == 0


@pytest.mark.parametrize("kind,size,shrink", [
    ("dynamic", 40 * MiB, False), ("dynamic", 2 * MiB, True),
    ("fixed", 9 * MiB, False), ("fixed", 2 * MiB, True)])
def test_interrupted_resize_leaves_a_readable_disk(disk, workdir, monkeypatch, kind,
                                                   size, shrink):
    """Every write of a resize fails in turn: qemu-img still opens what is left, at
    the old or the new size, with the data the old disk had there."""
    need("qemu-img")
    src, content = disk
    opts = ("-o", "subformat=fixed") if kind == "fixed" else ("-o", "block_size=64K")
    pristine = make(workdir, src, "pristine.vhd", "diskforge", *opts)
    content = read_all(pristine)
    path = os.path.join(workdir, "d.vhd")
    for n in range(0, 40):
        with open(pristine, "rb") as f, open(path, "wb") as out:
            out.write(f.read())
        calls = [0]
        with diskforge.open(path, writable=True) as dev:
            real = dev.backend.pwrite

            def failing(offset, data, real=real):
                calls[0] += 1
                if calls[0] > n:
                    raise OSError(5, "injected failure")
                return real(offset, data)
            monkeypatch.setattr(dev.backend, "pwrite", failing)
            try:
                dev.resize(size, shrink=shrink)
                done = True
            except OSError:
                done = False
        got = qemu_raw(path)
        assert len(got) in (len(content), size)
        want = content if len(got) == len(content) else expected(content, size)
        if got != want and kind == "fixed" and not done:
            # the one window a fixed disk has: the new footer is written before the
            # old one is zeroed, whose 512 bytes then show at the old end
            old = len(content)
            assert got[old:old + 8] == b"conectix"
            got = got[:old] + bytes(512) + got[old + 512:]
        assert got == want
        if done:
            assert len(got) == size
            break
    else:
        pytest.fail("the resize did not finish within 40 writes")


def test_damaged_disk_is_not_resized(disk, workdir):
    """A footer whose checksum fails: one line naming the field, nothing written."""
    from vhd_helpers import patch_footer
    src, _ = disk
    path = make(workdir, src, "d.vhd", "diskforge")
    patch_footer(path, fix_checksum=False, current_size=1 << 30)
    before = open(path, "rb").read()
    for argv in (("resize", path, "20M"), ("rebase", "-u", "-b", "x.vhd", "-F", "vpc",
                                          path)):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert "checksum" in err
    assert open(path, "rb").read() == before


def test_mutated_disks_resize_or_fail_in_one_line(disk, workdir):
    """Bytes of the footer copy, header and BAT flipped (fixed seed): resize either
    works or gives one line; never a traceback."""
    src, _ = disk
    pristine = make(workdir, src, "p.vhd", "diskforge", "-o", "block_size=64K")
    data = open(pristine, "rb").read()
    rng = random.Random(11)
    path = os.path.join(workdir, "m.vhd")
    for i in range(40):
        buf = bytearray(data)
        for _ in range(rng.choice([1, 3, 8])):
            buf[rng.randrange(4096)] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(buf)
        code, _, err = cli("resize", "--shrink", path, rng.choice(["40M", "1M", "+7M"]))
        if code:
            one_line_error(code, err)


@pytest.mark.parametrize("sample", ["vhd/dissect_win10_dynamic.vhd.gz",
                                    "vhd/node-vhd_win_fixed_10M.vhd.gz"])
def test_windows_made_disks(workdir, sample):
    """Windows' own files (creator 'win ': current-size rule, its BAT layout) grow and
    shrink, read alike by qemu-img, libvhdi and diskforge."""
    from conftest import need_real
    from vhd_helpers import gunzip
    path = gunzip(need_real(sample), os.path.join(workdir, "w.vhd"))
    content = read_all(path)
    # back to its own size: smaller would cut its partition, which check reports
    for size, flags in [(30 * MiB, ()), (len(content), ("--shrink",))]:
        code, _, err = cli("resize", *flags, path, str(size))
        assert code == 0, err
        content = expected(content, size)
        assert_reads(path, content)
