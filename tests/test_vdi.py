"""vdi: reading what qemu-img and hand-built files hold, writing what qemu-img, 7-Zip,
dissect.hypervisor and VirtualBox's header rules accept, writing in place (convert -n,
resize, commit, rebase), info, map, check and measure."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil

import pytest

import diskforge
import dissect_oracle
from conftest import (cli, cli_merged, make_sparse, need, need_real, run, sha256_device,
                      sha256_file)
from vdi_helpers import (FREE, ZERO, build, header, uuid, virtualbox_header_problems,
                         virtualbox_layout_differences)

MIB = 1 << 20


def _disk(path: str, size: int, seed: int = 1) -> bytes:
    """A raw disk of ``size`` bytes: random runs, zero blocks, a tail piece."""
    rng = random.Random(seed)
    data = bytearray(size)
    for off, n in ((3000, 7000), (MIB + 4096, 200000), (3 * MIB - 100, 300),
                   (size - 5000, 5000)):
        if 0 <= off < size:
            data[off:off + n] = rng.randbytes(min(n, size - off))
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def _raw_of(path: str, tmp: str, name: str = "out.raw") -> str:
    out = os.path.join(tmp, name)
    code, _, err = cli("convert", "-O", "raw", path, out)
    assert code == 0, err
    return out


def _7zip_sha(path: str, tmp: str) -> str:
    need("7zz")
    d = os.path.join(tmp, "7z-" + os.path.basename(path))
    run("7zz", "e", "-y", f"-o{d}", path)
    names = os.listdir(d)
    assert len(names) == 1, names
    return sha256_file(os.path.join(d, names[0]))


# -- reading what qemu-img writes -------------------------------------------------------

@pytest.mark.parametrize("static", ["off", "on"])
@pytest.mark.parametrize("size", [3 * MIB, 3000000, 5 * MIB + 512])
def test_reads_qemu_img_images_bit_exact(tmp_path, static, size):
    need("qemu-img")
    d = str(tmp_path)
    raw = os.path.join(d, "src.raw")
    _disk(raw, size)
    img = os.path.join(d, "q.vdi")
    run("qemu-img", "convert", "-O", "vdi", "-o", f"static={static}", raw, img)
    theirs = os.path.join(d, "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", img, theirs)
    with diskforge.open(img) as dev:
        assert dev.size == os.path.getsize(theirs)
        assert sha256_device(dev) == sha256_file(theirs)
    assert virtualbox_header_problems(img) == []     # qemu's output passes VirtualBox's rules


def test_reads_qemu_io_writes_into_a_created_image(tmp_path):
    need("qemu-io")
    img = str(tmp_path / "w.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", img, "4M")
    run("qemu-io", "-c", "write -P 0x5a 2M 5k", "-c", "write -P 0x11 512 512", img)
    theirs = str(tmp_path / "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", img, theirs)
    assert sha256_file(_raw_of(img, str(tmp_path))) == sha256_file(theirs)
    qmap = json.loads(run("qemu-img", "map", "--output", "json", img).stdout)
    code, out, _ = cli("map", "--output", "json", img)
    assert code == 0 and json.loads(out) == qmap


def test_real_sample_reads_as_expected(tmp_path):
    src = need_real("vdi/dissect_qemu_basic.vdi.gz")
    rows = open(os.path.join(os.path.dirname(os.path.dirname(src)), "EXPECTED.tsv"),
                encoding="utf-8").read().splitlines()
    size, digest = next(r.split("\t")[1:3] for r in rows
                        if r.startswith("vdi/dissect_qemu_basic.vdi.gz\t"))
    img = str(tmp_path / "basic.vdi")
    with gzip.open(src) as f, open(img, "wb") as out:
        shutil.copyfileobj(f, out)
    with diskforge.open(img) as dev:
        assert dev.format == "vdi" and dev.size == int(size)
        assert sha256_device(dev) == digest
    code, out, err = cli_merged("check", img)
    assert code == 0, out + err


# -- reading layouts qemu does not write (hand-built from VDICore.h) --------------------

@pytest.mark.parametrize("kw", [
    dict(order=[2, 0, 1]),                                 # blocks out of disk order
    dict(zero_blocks=(1,)),                                # VDI_IMAGE_BLOCK_ZERO
    dict(off_blocks=4096, off_data=3 * MIB + 512),         # offsets anywhere valid
    dict(plus=False),                                      # 384-byte VDIHEADER1
])
def test_reads_hand_built_layouts_as_qemu_does(tmp_path, kw):
    """Layouts qemu also reads: its reading proves the builder right."""
    need("qemu-img")
    disk = bytearray(_disk(str(tmp_path / "d.raw"), 3 * MIB))
    if "zero_blocks" in kw:
        disk[MIB:2 * MIB] = bytes(MIB)
    img = build(str(tmp_path / "h.vdi"), bytes(disk), **kw)
    theirs = str(tmp_path / "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", img, theirs)
    assert sha256_file(theirs) == sha256_file(_raw_of(img, str(tmp_path)))
    # the oracle of our own output reads out-of-order blocks, ~1 entries, short headers
    assert dissect_oracle.vdi_read(img) == bytes(disk)


@pytest.mark.parametrize("kw", [
    dict(block_size=4096),
    dict(block_size=64 << 10, extra=512),                  # cbBlockExtra before each block
    dict(block_size=4 * MIB),
    dict(block_size=2),                                    # the smallest VirtualBox allows
    dict(version=0x00000002, block_size=512 << 10),        # a VDI 0.2 header
    dict(off_blocks=472, off_data=1001),                   # unaligned (qemu refuses)
])
def test_reads_block_sizes_extra_data_and_old_headers(tmp_path, kw):
    size = 3 * MIB if kw.get("block_size", MIB) > 2 else 6000
    disk = _disk(str(tmp_path / "d.raw"), size)
    img = build(str(tmp_path / "h.vdi"), disk, **kw)
    with diskforge.open(img) as dev:
        assert dev.size == size
        assert dev.read(0, size) == disk
    if "extra" not in kw and "version" not in kw:   # what dissect misreads (dissect_oracle)
        assert dissect_oracle.vdi_read(img) == disk
        # extents never call data zero, nor zero data
        for e in dev.extents():
            if e.kind.value == "zero":
                assert not disk[e.offset:e.end].strip(b"\0")
    assert cli_merged("check", img)[0] == 0


def test_static_and_qemu_driver_choice(tmp_path):
    need("qemu-img")
    from diskforge.registry import get
    img = str(tmp_path / "s.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", "-o", "static=on", img, "2M")
    odd = build(str(tmp_path / "odd.vdi"), bytes(3 * MIB), block_size=64 << 10)
    with diskforge.open(img) as a, diskforge.open(odd) as b:
        assert get("vdi").qemu_driver(a) == "vdi"
        assert get("vdi").qemu_driver(b) is None      # qemu reads only 1 MiB blocks


# -- writing ------------------------------------------------------------------------------

@pytest.mark.parametrize("static", ["off", "on"])
@pytest.mark.parametrize("size", [3 * MIB, 3000000])
def test_writes_what_qemu_img_and_7zip_read_and_virtualbox_accepts(tmp_path, static, size):
    need("qemu-img")
    d = str(tmp_path)
    raw = os.path.join(d, "src.raw")
    _disk(raw, size)
    img = os.path.join(d, "ours.vdi")
    code, _, err = cli("convert", "-O", "vdi", "-o", f"static={static}", raw, img)
    assert code == 0, err
    assert virtualbox_header_problems(img) == []
    assert virtualbox_layout_differences(img) == []
    h = header(img)
    assert h["u32Type"] == (2 if static == "on" else 1)
    assert h["cbDisk"] == -(-size // 512) * 512
    padded = os.path.join(d, "padded.raw")   # qemu-img and 7-Zip see whole sectors
    shutil.copy(raw, padded)
    with open(padded, "r+b") as f:
        f.truncate(h["cbDisk"])
    run("qemu-img", "compare", "-f", "raw", "-F", "vdi", padded, img)
    run("qemu-img", "check", img)
    assert _7zip_sha(img, d) == sha256_file(padded)
    assert dissect_oracle.vdi_read(img) == open(padded, "rb").read()


def test_dynamic_output_stores_only_blocks_with_data(tmp_path):
    raw = make_sparse(str(tmp_path / "s.raw"), 8 * MIB, [(5 * MIB + 7, b"x" * 10)])
    img = str(tmp_path / "s.vdi")
    assert cli("convert", "-O", "vdi", raw, img)[0] == 0
    h = header(img)
    assert h["cBlocksAllocated"] == 1
    assert os.path.getsize(img) == h["offData"] + MIB
    assert os.stat(img).st_blocks * 512 < 64 << 10      # zeros inside the block: holes


def _layered(path: str, bs: int) -> bytes:
    """A raw disk of four and a half blocks of ``bs`` plus a sector piece: block 0 holds
    data, a written zero run and more data; block 1 is written zeros and block 2 a hole
    (both unallocated in a dynamic VDI); block 3 data near its end; the short last block
    data at the disk's end."""
    rng = random.Random(bs)
    size = 4 * bs + bs // 2 + 700
    q = bs // 4
    make_sparse(path, size, [(0, rng.randbytes(q)), (q, bytes(q)),
                             (2 * q, rng.randbytes(1000)), (bs, bytes(bs)),
                             (4 * bs - 600, rng.randbytes(500)),
                             (size - 900, rng.randbytes(900))])
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("static", ["off", "on"])
@pytest.mark.parametrize("bs", ["64k", "256k", "1M", "2M", "4M", "8M"])
def test_every_block_size_read_back_by_dissect(tmp_path, bs, static):
    """qemu and 7-Zip read only 1 MiB blocks: dissect.hypervisor, which takes cbBlock
    from the header, is the second reader for the other sizes (VirtualBox accepts any
    power of two: its AllocationBlockSize setting, checked by vdiValidateHeader). At
    1 MiB qemu-img and 7-Zip read the same file too."""
    d = str(tmp_path)
    raw = os.path.join(d, "src.raw")
    nbytes = {"k": 1 << 10, "M": MIB}[bs[-1]] * int(bs[:-1])
    disk = _layered(raw, nbytes)
    img = os.path.join(d, "b.vdi")
    code, _, err = cli("convert", "-O", "vdi", "-o", f"block_size={bs},static={static}",
                       raw, img)
    assert code == 0, err
    assert virtualbox_header_problems(img) == []
    assert virtualbox_layout_differences(img) == []
    h = header(img)
    with open(img, "rb") as f:
        f.seek(h["offBlocks"])
        entries = list(memoryview(f.read(4 * h["cBlocks"])).cast("I"))
    assert h["cbBlock"] == nbytes == dissect_oracle.vdi_block_size(img)
    if static == "off":                      # unallocated entries are what is tested
        assert entries[1] == entries[2] == FREE and entries[0] == 0
    padded = disk + bytes(h["cbDisk"] - len(disk))
    assert dissect_oracle.vdi_read(img) == padded
    with diskforge.open(img) as dev:
        assert dev.read(0, dev.size) == padded
    if bs == "1M":
        need("qemu-img")
        with open(raw, "r+b") as f:
            f.truncate(h["cbDisk"])
        run("qemu-img", "compare", "-f", "raw", "-F", "vdi", raw, img)
        run("qemu-img", "check", img)
        assert _7zip_sha(img, d) == sha256_file(raw)


def test_options_are_refused_clearly(tmp_path):
    raw = make_sparse(str(tmp_path / "s.raw"), MIB, [])
    for opt, words in (("block_size=1000", "power of two"), ("nope=1", "invalid option")):
        code, _, err = cli("convert", "-O", "vdi", "-o", opt, raw, str(tmp_path / "x.vdi"))
        assert code != 0 and words in err
    code, out, _ = cli("convert", "-O", "vdi", "-o", "help", raw, str(tmp_path / "x.vdi"))
    assert "static" in out  # qemu-img's listing: its vdi driver has no block_size key
    code, out, _ = cli("formats", "--options", "vdi")
    assert "static" in out and "block_size" in out


def test_measure_matches_what_is_written(tmp_path):
    raw = make_sparse(str(tmp_path / "s.raw"), 8 * MIB, [(5 * MIB, b"x"), (7 * MIB, b"y")])
    code, out, err = cli("measure", "--output", "json", "-O", "vdi", raw)
    assert code == 0, err
    m = json.loads(out)
    img = str(tmp_path / "s.vdi")
    assert cli("convert", "-O", "vdi", raw, img)[0] == 0
    assert m["required"] == os.path.getsize(img)
    assert m["fully-allocated"] == header(img)["offData"] + 8 * MIB


# -- writing in place ----------------------------------------------------------------------

def test_convert_n_into_a_qemu_image_then_qemu_reads_it(tmp_path):
    need("qemu-img")
    raw = str(tmp_path / "src.raw")
    _disk(raw, 4 * MIB)
    img = str(tmp_path / "t.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", img, "4M")
    code, _, err = cli("convert", "-n", "-O", "vdi", raw, img)
    assert code == 0, err
    run("qemu-img", "compare", "-f", "raw", "-F", "vdi", raw, img)
    run("qemu-img", "check", img)
    assert virtualbox_header_problems(img) == []


def test_resize_grows_while_the_map_has_room(tmp_path):
    need("qemu-img")
    raw = str(tmp_path / "src.raw")
    _disk(raw, 3 * MIB)
    img = str(tmp_path / "r.vdi")
    assert cli("convert", "-O", "vdi", raw, img)[0] == 0
    assert cli("resize", img, "+5M")[0] == 0
    with open(raw, "r+b") as f:
        f.truncate(8 * MIB)
    run("qemu-img", "compare", "-f", "raw", "-F", "vdi", raw, img)
    run("qemu-img", "check", img)
    assert virtualbox_header_problems(img) == []
    code, _, err = cli("resize", "--shrink", img, "1M")
    assert code != 0 and "not supported yet: shrinking" in err



@pytest.mark.parametrize("static", ["off", "on"])
def test_resize_moves_blocks_when_the_map_runs_into_the_data(tmp_path, static):
    """qemu's map has room for the entries of its last 512-byte sector only: growing
    past that moves the first stored blocks to the end (as VirtualBox's vdiResize)."""
    need("qemu-img")
    raw = str(tmp_path / "src.raw")
    _disk(raw, 3 * MIB)
    img = str(tmp_path / "tight.vdi")
    run("qemu-img", "convert", "-O", "vdi", "-o", f"static={static}", raw, img)
    before = header(img)
    code, _, err = cli("resize", img, "130M")
    assert code == 0, err
    after = header(img)
    assert after["offData"] > before["offData"] and after["cBlocks"] == 130
    with open(raw, "r+b") as f:
        f.truncate(130 * MIB)
    run("qemu-img", "compare", "-f", "raw", "-F", "vdi", raw, img)
    run("qemu-img", "check", img)
    assert virtualbox_header_problems(img) == []


# -- check ----------------------------------------------------------------------------------

def test_check_reports_what_qemu_img_check_reports(tmp_path):
    need("qemu-img")
    disk = _disk(str(tmp_path / "d.raw"), 4 * MIB)
    img = build(str(tmp_path / "c.vdi"), disk, order=[0, 1, 3])
    with open(img, "r+b") as f:            # block 3 shares block 1's index
        f.seek(header(img)["offBlocks"] + 12)
        f.write((1).to_bytes(4, "little"))
    q = run("qemu-img", "check", img, check=False)
    code, out, _ = cli_merged("check", img)
    assert q.returncode == code == 2
    assert "also used by" in out and "allocated blocks mismatch" in out


def test_check_repairs_past_the_end_entries_and_the_count(tmp_path):
    disk = _disk(str(tmp_path / "d.raw"), 3 * MIB)
    img = build(str(tmp_path / "c.vdi"), disk, order=[0, 1])
    h = header(img)
    with open(img, "r+b") as f:
        f.seek(h["offBlocks"] + 8)
        f.write((7).to_bytes(4, "little"))   # block 2 stored far past the end
    code, out, _ = cli_merged("check", img)
    assert code == 2 and "past the end of the file" in out
    code, _, err = cli("convert", "-O", "raw", img, str(tmp_path / "x.raw"))
    assert code != 0 and "VDIIMAGEBLOCKPOINTER[2]" in err and len(err.splitlines()) == 1
    code, out, _ = cli_merged("check", "-r", "all", img)
    assert code == 0, out
    assert cli_merged("check", img)[0] == 0
    with open(img, "r+b") as f:              # a count that disagrees, alone: -r leaks
        f.seek(72 + 4 * 3 + 256 + 4 * 2 + 16 + 4 + 8 + 12)
        f.write((1).to_bytes(4, "little"))
    code, out, _ = cli_merged("check", img)
    assert code == 2 and "mismatch" in out
    assert cli_merged("check", "-r", "leaks", img)[0] == 0
    assert header(img)["cBlocksAllocated"] == 2


def test_info_shows_the_header(tmp_path):
    img = build(str(tmp_path / "i.vdi"), bytes(MIB), block_size=64 << 10)
    code, out, err = cli("info", "--details", "--output", "json", img)
    assert code == 0, err
    j = json.loads(out)
    assert j["format"] == "vdi" and j["cluster-size"] == 64 << 10
    df = j["diskforge"]
    assert df["version"] == "1.1" and df["image-type"] == "dynamic"
    assert df["uuid-create"] == "01010101-0101-0101-0101-010101010101"


def test_zero_entries_read_as_zeros_even_over_a_parent(tmp_path):
    d = str(tmp_path)
    base = build(os.path.join(d, "base.vdi"), b"\x55" * (2 * MIB), create=uuid(7),
                 modify=uuid(8))
    child = build(os.path.join(d, "child.vdi"), b"\x66" * MIB + bytes(MIB), order=[0],
                  zero_blocks=(1,), image_type=4, create=uuid(9), linkage=uuid(7),
                  parent_modify=uuid(8))
    assert header(child)["cBlocks"] == 2
    with diskforge.open(child) as dev:
        assert dev.backing is not None and dev.backing.path == base
        assert dev.read(0, 2 * MIB) == b"\x66" * MIB + bytes(MIB)
    assert ZERO == 0xFFFFFFFE
