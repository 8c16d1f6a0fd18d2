"""VHDX maintenance qemu-img cannot do: resize (grow, --shrink; the BAT region moved
when it is too small), rebase (a parent given, changed, removed), commit into a VHDX
parent, and what an interrupted resize leaves. Every result is read by qemu-img
(fixed and dynamic disks with 512-byte sectors) or 7-Zip (differencing), and by
libvhdi, against the contents expected."""

import os
import random
import shutil
import subprocess

import pytest
from conftest import cli, need, one_line_error, run
from vhd_helpers import pyvhdi_prefix, pyvhdi_sha256, qemu_raw, sha256

import diskforge
from diskforge.formats.vhdx.structs import BAT_GUID

MiB = 1 << 20


def expected(content: bytes, size: int) -> bytes:
    return content[:size].ljust(size, b"\0")


def read_all(path: str) -> bytes:
    with diskforge.open(path) as dev:
        return dev.read(0, dev.size)


def sevenzip_raw(path: str, check: bool = True) -> bytes:
    need("7zz")
    return subprocess.run(["7zz", "x", "-so", path], capture_output=True,
                          check=check).stdout


def assert_reads(path: str, content: bytes, parents=(), qemu: bool = True,
                 libvhdi: bool = True) -> None:
    assert read_all(path) == content
    if libvhdi:
        assert pyvhdi_sha256(path, list(parents)) == (len(content), sha256(content))
    if qemu:
        need("qemu-img")
        assert qemu_raw(path, "vhdx") == content
        out = run("qemu-img", "check", "-f", "vhdx", path).stdout
        assert "No errors" in out
    else:
        assert sevenzip_raw(path) == content
    code, _, err = cli("check", path)
    assert code == 0, err


def random_raw(path: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(20):
        n = rng.choice([512, 4096, 70000])
        off = rng.randrange(size - n)
        data[off:off + n] = rng.randbytes(n)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


@pytest.fixture
def disk(workdir):
    path = os.path.join(workdir, "src.raw")
    return path, random_raw(path, 6 * MiB, 7)


def make(workdir: str, src: str, name: str, tool: str, *opts: str) -> str:
    out = os.path.join(workdir, name)
    if tool == "qemu":
        need("qemu-img")
        run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", *opts, src, out)
    else:
        code, _, err = cli("convert", "-O", "vhdx", *opts, src, out)
        assert code == 0, err
    return out


@pytest.mark.parametrize("tool,opts", [
    ("diskforge", ("-o", "block_size=1M")), ("diskforge", ("-o", "subformat=fixed")),
    ("qemu", ()), ("qemu", ("-o", "subformat=fixed,block_size=1M"))])
def test_grow_then_shrink(disk, workdir, tool, opts):
    src, content = disk
    path = make(workdir, src, "d.vhdx", tool, *opts)
    for size, flags in [(40 * MiB, ()), (3 * MiB + 512, ("--shrink",)), (9 * MiB, ())]:
        code, _, err = cli("resize", *flags, path, str(size))
        assert code == 0, err
        content = expected(content, size)
        assert_reads(path, content)


def test_4096_byte_sectors(disk, workdir):
    """qemu cannot read them: libvhdi and 7-Zip are the other readers."""
    src, content = disk
    path = make(workdir, src, "d.vhdx", "diskforge", "-o", "logical_sector_size=4096")
    code, _, err = cli("resize", path, str(6 * MiB + 512))
    one_line_error(code, err)
    assert "multiple of 4096" in err
    for size, flags in [(20 * MiB, ()), (2 * MiB, ("--shrink",))]:
        code, _, err = cli("resize", *flags, path, str(size))
        assert code == 0, err
        content = expected(content, size)
        assert_reads(path, content, qemu=False)


def test_shrink_frees_blocks_and_cuts_the_file(disk, workdir):
    src, content = disk
    path = make(workdir, src, "d.vhdx", "diskforge", "-o", "subformat=fixed,block_size=1M")
    before = os.path.getsize(path)
    code, _, err = cli("resize", "--shrink", path, str(2 * MiB))
    assert code == 0, err
    assert os.path.getsize(path) == before - 4 * MiB
    assert_reads(path, content[:2 * MiB])


def test_grow_moves_the_bat_region(disk, workdir):
    """A BAT region of 1 MiB holds 131072 entries: 200 GiB in 1 MiB blocks needs a
    larger one, written past the blocks; the region tables then point at it."""
    need("qemu-img")
    src, content = disk
    path = make(workdir, src, "d.vhdx", "diskforge", "-o", "block_size=1M")
    with diskforge.open(path) as dev:
        before = dev.regions[BAT_GUID]
    size = 200 << 30
    code, _, err = cli("resize", path, "200G")
    assert code == 0, err
    with diskforge.open(path) as dev:
        after = dev.regions[BAT_GUID]
        assert dev.size == size
        assert dev.read(0, len(content)) == content
    assert after.offset > before.offset and after.length > before.length
    assert "No errors" in run("qemu-img", "check", "-f", "vhdx", path).stdout
    # writes land after the moved BAT: qemu-io writes near the end, then every reader
    need("qemu-io")
    run("qemu-io", "-f", "vhdx", "-c", f"write -P 0x5a {size - 3 * MiB} 64k", path)
    ref = os.path.join(workdir, "ref.raw")
    with open(ref, "wb") as f:
        f.write(content)
        f.truncate(size)
        f.seek(size - 3 * MiB)
        f.write(b"\x5a" * 65536)
    # (qemu-img compare reads all 200 GiB here, qemu's vhdx driver having no block
    # status: qemu-io reads the pieces)
    for pattern, off, n in [(0x5a, size - 3 * MiB, 65536), (0, size - 3 * MiB + 65536,
                                                            3 * MiB - 65536),
                            (0, len(content), 64 * MiB), (0, 100 << 30, MiB)]:
        run("qemu-io", "-f", "vhdx", "-r", "-c", f"read -P {pattern} {off} {n}", path)
    code, out, err = cli("compare", path, ref)
    assert code == 0, err
    pyvhdi = pytest.importorskip("pyvhdi")
    f = pyvhdi.file()
    f.open(path)
    try:
        assert f.get_media_size() == size
        assert f.read_buffer_at_offset(len(content), 0) == content
        assert f.read_buffer_at_offset(65536, size - 3 * MiB) == b"\x5a" * 65536
    finally:
        f.close()


def test_sizes_refused(disk, workdir):
    src, _ = disk
    path = make(workdir, src, "d.vhdx", "diskforge")
    before = open(path, "rb").read()
    for argv, words in [(("resize", path, "10000001"), "multiple of 512"),
                        (("resize", path, "65T"), "64 TiB"),
                        (("resize", path, "1M"), "--shrink")]:
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert words in err
    assert open(path, "rb").read() == before


def child_of(workdir: str, parent: str, name: str = "child.vhdx", size=None) -> str:
    child = os.path.join(workdir, name)
    code, _, err = cli("create", "-f", "vhdx", "-b", os.path.basename(parent), "-F",
                       "vhdx", child, *([str(size)] if size else []))
    assert code == 0, err
    return child


def test_differencing_grows_beyond_its_parent(disk, workdir):
    src, content = disk
    parent = make(workdir, src, "parent.vhdx", "diskforge")
    child = child_of(workdir, parent)
    with diskforge.open(child, writable=True) as dev:
        dev.write(MiB, b"\x11" * 3000)
    view = bytearray(content)
    view[MiB:MiB + 3000] = b"\x11" * 3000
    code, _, err = cli("resize", "--shrink", child, str(2 * MiB))
    assert code == 0, err
    code, _, err = cli("resize", child, str(12 * MiB))
    assert code == 0, err
    want = expected(bytes(view[:2 * MiB]), 12 * MiB)
    assert read_all(child) == want
    # libvhdi and 7-Zip fail on the blocks past the parent's end (as for VHD): both
    # read the part inside it
    assert pyvhdi_prefix(child, [parent], len(content)) == want[:len(content)]
    assert sevenzip_raw(child, check=False) == want[:len(content)]
    code, _, err = cli("check", child)
    assert code == 0, err


def test_rebase_gives_changes_and_removes_a_parent(disk, workdir):
    src, content = disk
    parent = make(workdir, src, "parent.vhdx", "diskforge")
    own = bytearray(len(content))
    own[2 * MiB:2 * MiB + 70000] = random.Random(3).randbytes(70000)
    with open(os.path.join(workdir, "own.raw"), "wb") as f:
        f.write(own)
    child = make(workdir, os.path.join(workdir, "own.raw"), "child.vhdx", "diskforge")
    code, _, err = cli("rebase", "-b", "parent.vhdx", "-F", "vhdx", child)
    assert code == 0, err
    with diskforge.open(child) as dev:
        assert dev.info().details["subformat"] == "differencing"
    assert_reads(child, bytes(own), [parent], qemu=False)
    # onto another parent (safe: the child still reads the same), then none at all
    other = os.path.join(workdir, "other.vhdx")
    shutil.copy(parent, other)
    with diskforge.open(other, writable=True) as dev:
        dev.write(0, b"\x44" * 8192)
    code, _, err = cli("rebase", "-b", "other.vhdx", "-F", "vhdx", child)
    assert code == 0, err
    assert_reads(child, bytes(own), [other], qemu=False)
    code, _, err = cli("rebase", "-b", "", child)
    assert code == 0, err
    with diskforge.open(child) as dev:
        assert dev.info().details["subformat"] == "dynamic"
    assert_reads(child, bytes(own))
    # unsafe: only the link; the parent then shows in the blocks the child does not
    # store (1 MiB blocks: the child stores the one holding its data)
    child2 = make(workdir, os.path.join(workdir, "own.raw"), "child2.vhdx", "diskforge",
                  "-o", "block_size=1M")
    code, _, err = cli("rebase", "-u", "-b", "parent.vhdx", "-F", "vhdx", child2)
    assert code == 0, err
    mixed = bytearray(content)
    mixed[2 * MiB:3 * MiB] = own[2 * MiB:3 * MiB]
    assert_reads(child2, bytes(mixed), [parent], qemu=False)


def test_commit_into_a_vhdx_parent(disk, workdir):
    src, content = disk
    parent = make(workdir, src, "parent.vhdx", "diskforge", "-o", "block_size=1M")
    child = child_of(workdir, parent, size=8 * MiB)
    with diskforge.open(child, writable=True) as dev:
        dev.write(100, b"\x22" * 5000)
        dev.write(7 * MiB, b"\x33" * 4096)
        dev.write_zeroes(3 * MiB, 1 * MiB)
    want = bytearray(expected(content, 8 * MiB))
    want[100:5100] = b"\x22" * 5000
    want[7 * MiB:7 * MiB + 4096] = b"\x33" * 4096
    want[3 * MiB:4 * MiB] = bytes(MiB)
    code, _, err = cli("commit", "-d", child)     # kept: re-linked to the new parent
    assert code == 0, err
    assert_reads(parent, bytes(want))
    # libvhdi composes a child over a parent written in place with some sectors
    # wrong (formats/vhdx.md): 7-Zip is the other reader of the chain
    assert_reads(child, bytes(want), [parent], qemu=False, libvhdi=False)
    code, _, err = cli("commit", child)           # emptied this time
    assert code == 0, err
    assert_reads(child, bytes(want), [parent], qemu=False, libvhdi=False)
    with diskforge.open(child) as dev:
        assert all(e.kind.value == "backing" for e in dev.extents())


@pytest.mark.parametrize("size,shrink", [(200 << 30, False), (9 * MiB, False),
                                         (2 * MiB, True)])
def test_interrupted_resize_leaves_a_readable_disk(disk, workdir, monkeypatch, size,
                                                   shrink):
    """Every write of a resize fails in turn: the file still opens (its log replayed:
    by diskforge in memory, by ``qemu-img check -r all`` into the file) at the old or
    the new size, with the old data."""
    need("qemu-img")
    src, content = disk
    pristine = make(workdir, src, "pristine.vhdx", "diskforge", "-o", "block_size=1M")
    path = os.path.join(workdir, "d.vhdx")
    for n in range(0, 60):
        shutil.copy(pristine, path)
        calls = [0]
        done = False
        try:
            with diskforge.open(path, writable=True) as dev:
                real = dev.backend.pwrite

                def failing(offset, data, real=real):
                    calls[0] += 1
                    if calls[0] > n:
                        raise OSError(5, "injected failure")
                    return real(offset, data)
                monkeypatch.setattr(dev.backend, "pwrite", failing)
                dev.resize(size, shrink=shrink)
                done = True
        except OSError:
            pass
        with diskforge.open(path) as dev:
            assert dev.size in (len(content), size)
            common = min(size, len(content))
            assert dev.read(0, common) == content[:common]
            if dev.size == len(content):
                assert dev.read(0, dev.size) == content
        run("qemu-img", "check", "-r", "all", "-f", "vhdx", path, check=False)
        assert "No errors" in run("qemu-img", "check", "-f", "vhdx", path).stdout
        if size < 1 << 30:
            got = qemu_raw(path, "vhdx")
            assert got == (content if len(got) == len(content) else
                           expected(content, size))
        if done:
            break
    else:
        pytest.fail("the resize did not finish within 60 writes")


def test_damaged_disk_is_not_resized(disk, workdir):
    """A truncated file (its regions past the end): one line naming the structure,
    nothing written."""
    src, _ = disk
    path = make(workdir, src, "d.vhdx", "diskforge")
    with open(path, "r+b") as f:
        f.truncate(2 * MiB)
    before = open(path, "rb").read()
    code, _, err = cli("resize", path, "20M")
    one_line_error(code, err)
    assert "RegionTableEntry" in err or "metadata" in err.lower()
    assert open(path, "rb").read() == before


def test_mutated_disks_resize_or_fail_in_one_line(disk, workdir):
    """Bytes of the headers, region tables, metadata and BAT flipped (fixed seed):
    resize either works or gives one line; never a traceback."""
    src, _ = disk
    pristine = make(workdir, src, "p.vhdx", "diskforge", "-o", "block_size=1M")
    with diskforge.open(pristine) as dev:
        spots = [(64 << 10, 4096), (192 << 10, 4096), (dev.regions[BAT_GUID].offset, 4096)]
        meta = [r for g, r in dev.regions.items() if g != BAT_GUID][0]
        spots += [(meta.offset, 4096), (meta.offset + (64 << 10), 512)]
    data = open(pristine, "rb").read()
    rng = random.Random(12)
    path = os.path.join(workdir, "m.vhdx")
    for i in range(40):
        buf = bytearray(data)
        at, n = rng.choice(spots)
        for _ in range(rng.choice([1, 3, 8])):
            buf[at + rng.randrange(n)] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(buf)
        code, _, err = cli("resize", "--shrink", path, rng.choice(["40M", "1M", "+7M"]))
        if code:
            one_line_error(code, err)


@pytest.mark.parametrize("sample", ["vhdx/dissect_win10_dynamic_32MiBblock.vhdx.gz",
                                    "vhdx/dissect_win10_fixed.vhdx.gz"])
def test_windows_made_disks(workdir, sample):
    """Windows 10's own files (its metadata layout, Required regions) grow and shrink,
    read alike by qemu-img, libvhdi and diskforge."""
    import gzip
    from conftest import need_real
    path = os.path.join(workdir, "w.vhdx")
    with gzip.open(need_real(sample)) as f, open(path, "wb") as out:
        shutil.copyfileobj(f, out)
    content = read_all(path)
    # back to its own size: smaller would cut its partition, which check reports
    for size, flags in [(30 * MiB, ()), (len(content), ("--shrink",))]:
        code, _, err = cli("resize", *flags, path, str(size))
        assert code == 0, err
        content = expected(content, size)
        assert_reads(path, content)
