"""vpc (VHD): reading what qemu-img and Windows made, writing what qemu-img, libvhdi
and dissect.hypervisor read back, the size rules, writing in place."""

import json
import os

import dissect_oracle
import pytest
from conftest import (cli, cli_merged, make_sparse, need, need_real, qemu_img_json, run,
                      sha256_device, sha256_file)
from vhd_helpers import (FIXTURES, gunzip, have_pyvhdi, pyvhdi_sha256, qemu_raw,
                         random_disk, sha256)

import diskforge
from diskforge.blockdev import ExtentKind
from diskforge.formats.vhd import geometry as geo
from diskforge.registry import get, probe


def read_all(path, **kw) -> bytes:
    with diskforge.open(path, **kw) as dev:
        return dev.read(0, dev.size)


def need_pyvhdi():
    if not have_pyvhdi():
        pytest.skip("libvhdi-python (pyvhdi, the [test] extra) is not installed")


# -- naming ---------------------------------------------------------------------------------

def test_names_and_extensions():
    assert get("vpc") is get("vhd") is get("VHD")
    assert get("vpc").name == "vpc"
    code, out, _ = cli("convert", "-O", "vhd", "-o", "help", "x", "y")
    assert code == 0 and "subformat=<str>" in out and "dynamic (default) | fixed" in out
    assert "force_size" in out
    code, out, _ = cli("formats", "--options", "vhd")  # diskforge's own keys too
    assert code == 0 and "block_size=<size>" in out and "dynamic, fixed" in out


# -- reading what qemu-img makes -------------------------------------------------------------

QEMU_SIZES = [1_000_000, 10 * 1000 * 1000 + 1234, 13 << 20, (5 << 20) + 512]


@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed",
                                  "subformat=dynamic,force_size=on",
                                  "subformat=fixed,force_size=on"])
@pytest.mark.parametrize("size", QEMU_SIZES)
def test_reads_qemu_images_like_qemu(workdir, opts, size):
    need("qemu-img")
    src = os.path.join(workdir, "src.raw")
    random_disk(src, size, seed=size)
    vhd = os.path.join(workdir, "q.vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", opts, src, vhd)
    theirs = qemu_raw(vhd)
    assert probe(vhd).name == "vpc"  # fixed ones too, which qemu-img probes as raw
    with diskforge.open(vhd) as dev:
        assert dev.size == len(theirs) == qemu_img_json("info", "-f", "vpc", vhd)[
            "virtual-size"]
        assert sha256(dev.read(0, dev.size)) == sha256(theirs)
        # what the extent map calls zero really is zero
        for e in dev.extents():
            if e.kind is ExtentKind.ZERO:
                assert not any(theirs[e.offset:e.end])
    out = os.path.join(workdir, "ours.raw")
    code, _, err = cli("convert", "-O", "raw", vhd, out)
    assert code == 0, err
    with open(out, "rb") as f:
        assert sha256(f.read()) == sha256(theirs)


def test_qemu_map_of_a_dynamic_disk_matches(workdir):
    need("qemu-img")
    src = os.path.join(workdir, "src.raw")
    with open(src, "wb") as f:  # whole blocks of data: no host holes inside them
        f.truncate(14 << 20)
        f.seek(2 << 20)
        f.write(os.urandom(2 << 20))
        f.seek(8 << 20)
        f.write(os.urandom(4 << 20))
    vhd = os.path.join(workdir, "q.vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", src, vhd)
    code, out, _ = cli("map", "--output", "json", vhd)
    assert code == 0
    assert json.loads(out) == qemu_img_json("map", "-f", "vpc", vhd)


def test_reads_huge_sparse_qemu_image_size(workdir):
    """Beyond 127 GiB the geometry is the maximum: the current size is the disk."""
    need("qemu-img")
    for opts in ("force_size=off", "force_size=on"):
        vhd = os.path.join(workdir, f"{opts}.vhd")
        run("qemu-img", "create", "-q", "-f", "vpc", "-o", opts, vhd, "200G")
        run("qemu-io", "-f", "vpc", "-c", "write -P 0x5a 150G 64k", vhd)
        with diskforge.open(vhd) as dev:
            assert dev.size == qemu_img_json("info", vhd)["virtual-size"]
            assert dev.read(150 << 30, 65536) == b"\x5a" * 65536
            assert dev.read((150 << 30) - 512, 512) == bytes(512)


# -- reading what Windows made ---------------------------------------------------------------

# flattened contents that qemu-img 7.2 and 7-Zip agree on (fixtures-real/EXPECTED.tsv)
WINDOWS = {
    "node-vhd_win_dynamic_512M": (
        536870912, "c461afded0b54cc1cfb5441e08f4d7f9d699d2eff7d9526d1cf6ad227da26683"),
    "node-vhd_win_fixed_10M": (
        10485760, "fa0490edf13cf9699ac7ead2b2024f2ec7921f583ff824039bca0529055e409d"),
    "dissect_win10_dynamic": (
        10485760, "ecff2ef6615a3cddc6a6885f1c6d9cf13a232697e1dc6575f2c2f01f57247784"),
    "dissect_win10_fixed": (
        10485760, "459325ab1fcd1d5ec9854cba790ee26378317cda177ffc1072008a1df88e6463"),
}


@pytest.mark.parametrize("name", ["node-vhd_win_dynamic_512M", "node-vhd_win_fixed_10M",
                                  "dissect_win10_dynamic", "dissect_win10_fixed"])
def test_reads_windows_images(workdir, name):
    copied = os.path.join(FIXTURES, f"{name}.vhd.gz")
    gz = copied if os.path.exists(copied) else need_real(f"vhd/{name}.vhd.gz")
    vhd = gunzip(gz, os.path.join(workdir, f"{name}.vhd"))
    size, digest = WINDOWS[name]
    with diskforge.open(vhd) as dev:
        assert dev.format == "vpc" and dev.size == size
        info = dev.info()
        assert info.details["creator-application"] == "win "
        assert info.details["size-from"] == "current_size"
        assert sha256_device(dev) == digest
    need("qemu-img")
    flat = os.path.join(workdir, "qemu.raw")
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, flat)
    assert sha256_file(flat) == digest


def test_windows_differencing_disk_without_its_parent(workdir):
    vhd = gunzip(os.path.join(FIXTURES, "dfvfs_win_fat-differential.vhd.gz"),
                 os.path.join(workdir, "fat-differential.vhd"))
    # plain info names the missing parent, as qemu-img names a qcow2's missing backing
    code, out, err = cli("info", vhd)
    assert code == 0 and "backing file: " in out and "fat-parent.vhd" in out, err
    code, _, err = cli("info", "--backing-chain", vhd)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "Could not open backing file: Could not open '" in err
    assert "parent not found" in err and "fat-parent.vhd" in err and "W2ru" in err


def test_windows_differencing_disk_with_a_parent(workdir):
    """Give the diskpart-made child a parent with the unique id it records: its
    Windows-written sector bitmaps (mixed bits, MSB first) then compose sector by
    sector, as a plain reading of the specification computes here."""
    need("qemu-img")
    vhd = gunzip(os.path.join(FIXTURES, "dfvfs_win_fat-differential.vhd.gz"),
                 os.path.join(workdir, "fat-differential.vhd"))
    from vhd_helpers import patch_footer, read_header
    src = os.path.join(workdir, "p.raw")
    random_disk(src, 4 << 20, seed=7, chunks=40)
    parent = os.path.join(workdir, "fat-parent.vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", src, parent)
    hd = read_header(vhd)
    patch_footer(parent, unique_id=hd.parent_unique_id)
    with diskforge.open(vhd) as dev:
        assert dev.backing is not None and dev.info().backing_filename == ".\\fat-parent.vhd"
        ours = dev.read(0, dev.size)
        kinds = {e.kind for e in dev.extents()}
    assert kinds >= {ExtentKind.BACKING, ExtentKind.DATA}
    # the reference: per sector, the child's bytes where its bit is set, else the parent's
    expect = bytearray(qemu_raw(parent))
    with open(vhd, "rb") as f:
        raw = f.read()
    bat = [int.from_bytes(raw[hd.table_offset + 4 * i:hd.table_offset + 4 * i + 4], "big")
           for i in range(hd.max_table_entries)]
    mixed = 0
    for blk, entry in enumerate(bat):
        if entry == 0xFFFFFFFF:
            continue
        bitmap = raw[entry * 512:entry * 512 + 512]
        mixed += sum(1 for b in bitmap if b not in (0, 255))
        for sec in range(hd.block_size // 512):
            if bitmap[sec >> 3] >> (7 - (sec & 7)) & 1:
                at = blk * hd.block_size + sec * 512
                host = entry * 512 + 512 + sec * 512
                expect[at:at + 512] = raw[host:host + 512]
    assert mixed > 0 and ours == expect


# -- writing, read back by qemu-img, libvhdi and dissect ----------------------------------------------

WRITE_OPTIONS = ["", "subformat=fixed", "force_size=on", "force_size=off",
                 "subformat=fixed,force_size=off", "subformat=fixed,force_size",
                 "block_size=4096", "block_size=512K", "block_size=64M"]


@pytest.mark.parametrize("opts", WRITE_OPTIONS)
def test_written_images_read_back_in_qemu_and_libvhdi(workdir, opts):
    need("qemu-img")
    size = 9 * 1000 * 1000 + 4321
    src = os.path.join(workdir, "src.raw")
    content = random_disk(src, size, seed=len(opts))
    vhd = os.path.join(workdir, "out.vhd")
    args = ["convert", "-O", "vpc"] + (["-o", opts] if opts else []) + [src, vhd]
    code, _, err = cli(*args)
    assert code == 0, err
    theirs = qemu_raw(vhd)
    mode = "on" if "force_size" in opts and "=off" not in opts else \
        "off" if "force_size=off" in opts else "auto"
    expect_size, _ = geo.plan_size(size, mode)
    assert len(theirs) == expect_size >= size
    assert theirs == content + bytes(expect_size - size)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vpc", src, vhd,
               check=False).returncode == 0
    assert read_all(vhd) == theirs
    if have_pyvhdi():
        assert pyvhdi_sha256(vhd) == (expect_size, sha256(theirs))
    assert dissect_oracle.read("vpc", vhd) == theirs      # a third reader


@pytest.mark.parametrize("size", ["1M", "1000000", "10M", "3G", "127G", "200G"])
def test_created_sizes_follow_the_rules(workdir, size):
    """auto: whole MiB; on: exact; off: qemu-img create's own CHS rounding."""
    need("qemu-img")
    from diskforge.options import parse_size
    n = parse_size(size)
    for mode in ("auto", "on", "off"):
        ours = os.path.join(workdir, f"{mode}.vhd")
        code, _, err = cli("create", "-q", "-f", "vpc", "-o", f"force_size={mode}", ours,
                           size)
        assert code == 0, err
        got = qemu_img_json("info", "-f", "vpc", ours)["virtual-size"]
        if mode == "auto":
            assert got == -(-n // (1 << 20)) << 20
        elif mode == "on":
            assert got == -(-n // 512) * 512
        else:
            theirs = os.path.join(workdir, "qemu.vhd")
            run("qemu-img", "create", "-q", "-f", "vpc", theirs, size)
            assert got == qemu_img_json("info", theirs)["virtual-size"]
        with diskforge.open(ours) as dev:
            assert dev.size == got
        os.unlink(ours)


def test_geometry_matches_the_specification_on_windows_files():
    assert geo.chs_geometry(10 << 20 >> 9) == (301, 4, 17)      # node-vhd 10 MiB
    assert geo.chs_geometry(512 << 20 >> 9) == (1040, 16, 63)   # node-vhd 512 MiB
    assert geo.chs_geometry(4 << 20 >> 9) == (120, 4, 17)       # diskpart 4 MiB
    assert geo.chs_geometry(1 << 40 >> 9) == geo.MAX_GEOMETRY


def test_azure_default_is_fixed_whole_mib(workdir):
    src = make_sparse(os.path.join(workdir, "s.raw"), 20_000_000, [(0, b"boot")])
    vhd = os.path.join(workdir, "azure.vhd")
    code, _, err = cli("convert", "-O", "vpc", "-o", "subformat=fixed", src, vhd)
    assert code == 0, err
    st = os.stat(vhd)
    assert (st.st_size - 512) % (1 << 20) == 0  # Azure's upload rule
    with diskforge.open(vhd) as dev:
        assert dev.size == st.st_size - 512 and dev.info().details["disk-type"] == "fixed"


def test_empty_and_tiny_disks(workdir):
    need("qemu-img")
    for size in ("512", "4k", "2M"):
        vhd = os.path.join(workdir, f"{size}.vhd")
        code, _, err = cli("create", "-q", "-o", "force_size=on", vhd, size)
        assert code == 0, err
        assert read_all(vhd) == qemu_raw(vhd)
    code, _, _ = cli("create", "-q", "-o", "force_size=on", os.path.join(workdir, "z.vhd"),
                     "0")
    assert code == 0
    assert read_all(os.path.join(workdir, "z.vhd")) == b""


def test_too_large_is_refused(workdir):
    code, _, err = cli("create", "-q", os.path.join(workdir, "big.vhd"), "3T")
    assert code == 1 and "2040 GiB" in err
    assert not os.path.exists(os.path.join(workdir, "big.vhd"))


def test_measure(workdir):
    src = make_sparse(os.path.join(workdir, "s.raw"), 10 << 20,
                      [(0, b"x" * 4096), (5 << 20, b"y")])
    vhd = os.path.join(workdir, "o.vhd")
    assert cli("convert", "-O", "vpc", src, vhd)[0] == 0
    code, out, _ = cli("measure", "-O", "vpc", "--output", "json", src)
    m = json.loads(out)
    assert code == 0 and m["required"] >= os.path.getsize(vhd)
    assert m["fully-allocated"] > m["required"]
    code, out, _ = cli("measure", "-O", "vpc", "-o", "subformat=fixed", "--size", "10M")
    assert code == 0 and "required size: 10486272" in out


# -- writing in place ------------------------------------------------------------------------

def _random_writes(dev, model: bytearray, seed: int, count: int = 60):
    import random
    rng = random.Random(seed)
    for _ in range(count):
        off = rng.randrange(dev.size)
        n = min(dev.size - off, rng.choice([1, 100, 512, 4096, 10000, 1 << 20, 3 << 20]))
        if rng.random() < 0.25:
            dev.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            dev.write(off, data)
            model[off:off + n] = data


@pytest.mark.parametrize("opts", ["force_size=on", "subformat=fixed", "block_size=64K"])
def test_writable_open_random_writes(workdir, opts):
    need("qemu-img")
    vhd = os.path.join(workdir, "w.vhd")
    assert cli("create", "-q", "-o", opts, vhd, "13M")[0] == 0
    with diskforge.open(vhd, writable=True) as dev:
        model = bytearray(dev.size)
        _random_writes(dev, model, seed=len(opts))
        dev.flush()
    assert read_all(vhd) == model
    assert qemu_raw(vhd) == model
    code, out, _ = cli_merged("check", "--format-checks", vhd)
    assert code == 0, out


def test_writable_open_of_a_windows_dynamic_disk(workdir):
    """Random writes into a Hyper-V-made dynamic disk, mirrored into a raw copy of it:
    qemu-img then finds the two identical."""
    need("qemu-img")
    vhd = gunzip(os.path.join(FIXTURES, "node-vhd_win_dynamic_512M.vhd.gz"),
                 os.path.join(workdir, "win.vhd"))
    model = os.path.join(workdir, "model.raw")
    assert cli("convert", "-O", "raw", vhd, model)[0] == 0
    import random
    rng = random.Random(3)
    with diskforge.open(vhd, writable=True) as dev, \
            diskforge.open(model, writable=True) as raw:
        for _ in range(40):
            off = rng.randrange(dev.size)
            n = min(dev.size - off, rng.choice([1, 700, 4096, 1 << 20, 3 << 20]))
            if rng.random() < 0.25:
                dev.write_zeroes(off, n)
                raw.write_zeroes(off, n)
            else:
                data = rng.randbytes(n)
                dev.write(off, data)
                raw.write(off, data)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vpc", model, vhd,
               check=False).returncode == 0
    assert cli("compare", model, vhd)[0] == 0
    assert cli_merged("check", "--format-checks", vhd)[0] == 0


def test_qemu_writes_into_our_image(workdir):
    need("qemu-img")
    vhd = os.path.join(workdir, "o.vhd")
    assert cli("create", "-q", vhd, "8M")[0] == 0
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x33 3M 1M", vhd)
    with diskforge.open(vhd) as dev:
        assert dev.read(3 << 20, 1 << 20) == b"\x33" * (1 << 20)
        assert dev.read(0, 3 << 20) == bytes(3 << 20)


def test_read_only_open_refuses_writes(workdir):
    vhd = os.path.join(workdir, "o.vhd")
    assert cli("create", "-q", vhd, "1M")[0] == 0
    with diskforge.open(vhd) as dev:
        with pytest.raises(diskforge.DiskforgeError, match="read-only"):
            dev.write(0, b"x")


# -- check -----------------------------------------------------------------------------------

def test_check_clean_and_stale_footer_copy(workdir):
    vhd = os.path.join(workdir, "o.vhd")
    src = make_sparse(os.path.join(workdir, "s.raw"), 6 << 20, [(1 << 20, b"z" * 9000)])
    assert cli("convert", "-O", "vpc", src, vhd)[0] == 0
    code, out, _ = cli_merged("check", "--format-checks", vhd)
    assert code == 0 and "No errors" in out
    from vhd_helpers import patch_footer
    patch_footer(vhd, where=[os.path.getsize(vhd) - 512], fix_checksum=False,
                 time_stamp=12345)
    code, out, _ = cli("check", "--format-checks", "--output", "json", vhd)
    assert code == 2 and json.loads(out)["corruptions"] == 1
    assert read_all(vhd)[1 << 20:(1 << 20) + 9000] == b"z" * 9000  # the copy at 0 serves
    code, out, _ = cli_merged("check", "--format-checks", "-r", "all", vhd)
    assert code == 0 and "Repaired" in out
    assert cli_merged("check", "--format-checks", vhd)[0] == 0


def test_probe_of_an_old_511_byte_footer(workdir):
    src = make_sparse(os.path.join(workdir, "s.raw"), 1 << 20, [(0, b"old disk")])
    vhd = os.path.join(workdir, "fixed.vhd")
    assert cli("convert", "-O", "vpc", "-o", "subformat=fixed", src, vhd)[0] == 0
    with open(vhd, "r+b") as f:  # Virtual PC before 2004: the last reserved byte absent
        f.truncate(os.path.getsize(vhd) - 1)
    assert probe(vhd).name == "vpc"
    with diskforge.open(vhd) as dev:
        assert dev.size == 1 << 20 and dev.read(0, 8) == b"old disk"


def test_info_json_names(workdir):
    vhd = os.path.join(workdir, "o.vhd")
    assert cli("create", "-q", "-o", "block_size=512K", vhd, "3M")[0] == 0
    code, out, _ = cli("info", "--details", "--output", "json", vhd)
    d = json.loads(out)
    assert d["format"] == "vpc" and d["cluster-size"] == 512 << 10
    assert d["virtual-size"] == 3 << 20
    assert d["diskforge"]["creator-application"] == "dskf"


def test_copy_to_and_from_other_tools_byte_for_byte(workdir):
    """qemu-img reads a diskforge VHD and writes one diskforge reads: raw → ours →
    qemu vpc → ours raw."""
    need("qemu-img")
    src = os.path.join(workdir, "s.raw")
    content = random_disk(src, 7 << 20, seed=99)
    a = os.path.join(workdir, "a.vhd")
    assert cli("convert", "-O", "vpc", src, a)[0] == 0
    b = os.path.join(workdir, "b.vhd")
    run("qemu-img", "convert", "-f", "vpc", "-O", "vpc", "-o", "force_size=on", a, b)
    assert read_all(b) == content


def test_probe_sees_the_footer_of_a_fixed_disk_between_64_and_128_kib(workdir):
    """The probe window's tail must be the file's last bytes (it once came from the
    64 KiB head for files under 128 KiB)."""
    src = make_sparse(os.path.join(workdir, "s.raw"), 34817, [(0, b"small")])
    vhd = os.path.join(workdir, "small.vhd")
    assert cli("convert", "-O", "vpc", "-o", "subformat=fixed,force_size=off", src,
               vhd)[0] == 0
    assert 64 << 10 < os.path.getsize(vhd) < 128 << 10
    assert probe(vhd).name == "vpc"


def test_map_reports_whole_blocks_as_qemu_while_convert_skips_holes(tmp_path):
    """qemu's vpc driver calls an allocated block data as a whole; ``map`` prints the
    same, byte for byte. ``extents`` (what convert and compare walk) still knows the
    host file's holes inside the block, so the raw copy stays sparse there."""
    need("qemu-img")
    need("qemu-io")
    vpc = str(tmp_path / "d.vpc")
    run("qemu-img", "create", "-q", "-f", "vpc", vpc, "8M")
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x5a 64k 4k", vpc)
    for argv in (["map"], ["map", "--output", "json"]):
        theirs = run("qemu-img", *argv, vpc).stdout
        code, ours, err = cli(*argv, vpc)
        assert code == 0 and ours == theirs, err
    with diskforge.open(vpc) as dev:
        data = [e for e in dev.extents() if e.kind is ExtentKind.DATA]
        assert sum(e.length for e in data) < 1 << 20  # the block's holes are known
        mapped = [e for e in dev.map_extents() if e.kind is ExtentKind.DATA]
        assert [(e.offset, e.length) for e in mapped] == [(0, 2 << 20)]
    raw = str(tmp_path / "d.raw")
    code, _, err = cli("convert", "-O", "raw", vpc, raw)
    assert code == 0, err
    assert run("qemu-img", "compare", "-f", "vpc", "-F", "raw", vpc, raw).returncode == 0
    assert os.stat(raw).st_blocks * 512 < 1 << 20  # not the whole 2 MiB block written
