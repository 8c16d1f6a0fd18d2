"""raw: reading, extents, the sparse writer, preallocation, block devices."""

import os
import shutil
import subprocess

import pytest
from conftest import make_sparse, need, qemu_img_json, run

import diskforge
from diskforge.blockdev import ExtentKind
from diskforge.ops.map import map_image


def test_extents_follow_holes_and_match_qemu_map(workdir):
    path = make_sparse(os.path.join(workdir, "d.raw"), 10 << 20,
                       [(5 << 16, os.urandom(3 << 16)), (8 << 20, b"x" * 4096)])
    with diskforge.open(path) as dev:
        assert dev.format == "raw" and dev.size == 10 << 20
        kinds = [(e.offset, e.length, e.kind) for e in dev.extents()]
        assert (5 << 16, 3 << 16, ExtentKind.DATA) in kinds
        ours = [e.to_json() for e in map_image(dev)]
    assert ours == qemu_img_json("map", "-f", "raw", path)


def test_read_at_any_offset_and_length(workdir):
    data = os.urandom(1 << 20)
    path = make_sparse(os.path.join(workdir, "d.raw"), 3 << 20, [(1 << 20, data)])
    with diskforge.open(path) as dev:
        assert dev.read((1 << 20) - 3, 10) == b"\0\0\0" + data[:7]
        assert dev.read((2 << 20) - 1, 2) == data[-1:] + b"\0"
        assert dev.read(0, 0) == b""
        with pytest.raises(diskforge.DiskforgeError):
            dev.read((3 << 20) - 1, 2)


def test_writable_device_writes_and_punches_holes(workdir):
    path = make_sparse(os.path.join(workdir, "d.raw"), 4 << 20, [(0, b"\xff" * (4 << 20))])
    with diskforge.open(path, writable=True) as dev:
        dev.write(100, b"hello")
        dev.write_zeroes(1 << 20, 2 << 20)
        dev.flush()
    with open(path, "rb") as f:
        content = f.read()
    assert content[100:105] == b"hello"
    assert content[1 << 20:3 << 20] == bytes(2 << 20)
    assert os.stat(path).st_blocks * 512 <= (2 << 20) + 65536  # the zeroed range is a hole


@pytest.mark.parametrize("prealloc,expect_full", [("off", False), ("falloc", True),
                                                  ("full", True)])
def test_create_preallocation(workdir, prealloc, expect_full):
    path = os.path.join(workdir, f"{prealloc}.raw")
    diskforge.create(path, 8 << 20, "raw", f"preallocation={prealloc}")
    st = os.stat(path)
    assert st.st_size == 8 << 20
    assert (st.st_blocks * 512 >= 8 << 20) == expect_full
    need("qemu-img")
    assert qemu_img_json("info", path)["virtual-size"] == 8 << 20


def test_block_device_opens_as_raw(workdir):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup to attach a loop device")
    path = make_sparse(os.path.join(workdir, "d.raw"), 4 << 20, [(4096, b"loopdata")])
    try:
        loop = run("losetup", "--find", "--show", path).stdout.strip()
    except (AssertionError, subprocess.SubprocessError):
        pytest.skip("loop devices are not available in this sandbox")
    try:
        with diskforge.open(loop) as dev:
            assert dev.format == "raw" and dev.size == 4 << 20
            assert dev.read(4096, 8) == b"loopdata"
    finally:
        run("losetup", "-d", loop, check=False)
