"""VHDX: what qemu-img and Windows make reads right; what diskforge writes, qemu-img,
libvhdi and dissect.hypervisor read back; differencing chains; random-access writes; a round-trip property."""

import json
import os
import shutil
import subprocess

import dissect_oracle
import pytest
from conftest import cli, cli_merged, make_sparse, need, need_real, one_line_error, qemu_img_json
from conftest import run, sha256_device, sha256_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhdx_helpers import MiB, headers, libvhdi_sha, padded_sha, random_disk

import diskforge
from diskforge.blockdev import ExtentKind
from diskforge.formats.vhdx.crc32c import crc32c


def test_crc32c_known_vectors():
    # RFC 3720 B.4 and the usual check value
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    data = os.urandom(3000) + bytes(70000) + b"x"
    assert crc32c(data[1000:], crc32c(data[:1000])) == crc32c(data)


# -- reading what others make -------------------------------------------------------------

QEMU_CASES = {
    "dynamic": ("subformat=dynamic", 40 * MiB),
    "fixed": ("subformat=fixed", 24 * MiB),
    "block1M": ("block_size=1M", 40 * MiB),
    "block32M": ("block_size=32M", 70 * MiB),
    "odd-size": ("block_size=1M", 30 * MiB + 12345),
    "no-zero-state": ("block_state_zero=off,log_size=2M", 20 * MiB),
}


@pytest.mark.parametrize("case", QEMU_CASES)
def test_reads_what_qemu_img_makes(workdir, case):
    need("qemu-img")
    opts, size = QEMU_CASES[case]
    src = random_disk(os.path.join(workdir, "src.raw"), size, seed=len(case))
    img = os.path.join(workdir, "q.vhdx")
    run("qemu-img", "convert", "-O", "vhdx", "-o", opts, src, img)
    theirs = os.path.join(workdir, "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", img, theirs)
    ours = os.path.join(workdir, "ours.raw")
    code, _, err = cli("convert", "-O", "raw", img, ours)
    assert code == 0, err
    assert sha256_file(ours) == sha256_file(theirs)
    with diskforge.open(img) as dev:
        assert dev.format == "vhdx" and dev.size == qemu_img_json("info", img)["virtual-size"]
        # nothing the extent map calls zero holds data
        for e in dev.extents():
            if e.kind is ExtentKind.ZERO:
                assert dev.read(e.offset, min(e.length, MiB)) == bytes(min(e.length, MiB))


def _expected(relpath):
    with open(os.path.join(os.path.dirname(need_real(relpath)), "..", "EXPECTED.tsv")) as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if cols[0] == relpath:
                return int(cols[1]), cols[2]
    pytest.skip(f"{relpath} has no row in EXPECTED.tsv")


def _gunzip(relpath, workdir):
    import gzip
    out = os.path.join(workdir, os.path.basename(relpath)[:-3])
    with gzip.open(need_real(relpath)) as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


@pytest.mark.parametrize("name", ["dissect_win10_fixed.vhdx",
                                  "dissect_win10_dynamic_32MiBblock.vhdx"])
def test_reads_windows_made_samples(workdir, name):
    rel = f"vhdx/{name}.gz"
    size, sha = _expected(rel)
    img = _gunzip(rel, workdir)
    with diskforge.open(img) as dev:
        assert dev.size == size and sha256_device(dev) == sha
        info = dev.info()
        assert info.details["creator"].startswith("Microsoft Windows")
        assert info.details["subformat"] == ("fixed" if "fixed" in name else "dynamic")
    code, out, _ = cli_merged("check", img)
    assert code == 0, out


def test_hyperv_differencing_sample_names_its_missing_parent(workdir):
    img = _gunzip("vhdx/dissect_hyperv_differencing.avhdx.gz", workdir)
    name = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"
    code, _, err = cli("info", "--backing-chain", img)
    one_line_error(code, err)
    assert "Could not open backing file: Could not open '" in err
    assert f"{name}': No such file or directory" in err
    assert "not found" in err
    # plain info names the missing parent, as qemu-img names a qcow2's missing backing
    code, out, err = cli("info", "--output", "json", img)
    assert code == 0, err
    assert json.loads(out)["backing-filename"].endswith(name)


def test_hyperv_differencing_sample_over_a_stand_in_parent(workdir):
    """The Hyper-V checkpoint's own sectors (PARTIALLY_PRESENT blocks and their sector
    bitmaps, as Windows wrote them) read as libvhdi reads them, over an empty parent
    that carries the DataWriteGuid its parent_linkage names."""
    pyvhdi = pytest.importorskip("pyvhdi", reason="libvhdi-python (the [test] extra)")
    from vhdx_helpers import rewrite_headers

    from diskforge.formats.vhdx.structs import guid
    child = _gunzip("vhdx/dissect_hyperv_differencing.avhdx.gz", workdir)
    parent = os.path.join(workdir, "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx")
    assert cli("create", "-q", "-f", "vhdx", parent, "8G")[0] == 0
    rewrite_headers(parent, DataWriteGuid=guid("ff34003b-11ed-4cf8-a166-b2be05e20b80"))
    theirs, their_parent = pyvhdi.file(), pyvhdi.file()
    theirs.open(child)
    their_parent.open(parent)
    theirs.set_parent(their_parent)
    with diskforge.open(child) as dev:
        assert dev.info().details["subformat"] == "differencing"
        states = {e & 7 for e in dev.bat}
        assert 7 in states   # PARTIALLY_PRESENT blocks with sector bitmaps
        data = 0
        for e in dev.extents():
            n = e.length if e.kind is ExtentKind.DATA else min(e.length, MiB)
            assert dev.read(e.offset, n) == theirs.read_buffer_at_offset(n, e.offset), e
            data += e.length if e.kind is ExtentKind.DATA else 0
        assert data > MiB
    theirs.close()
    their_parent.close()


# -- what diskforge writes ----------------------------------------------------------------

WRITE_CASES = ["subformat=dynamic", "subformat=fixed", "block_size=1M", "block_size=32M",
               "block_size=256M", "log_size=4M,physical_sector_size=512",
               "logical_sector_size=4096", "subformat=fixed,logical_sector_size=4096"]


@pytest.mark.parametrize("opts", WRITE_CASES)
def test_qemu_img_and_libvhdi_read_what_diskforge_writes(workdir, opts):
    size = 50 * MiB + 4096 * 3
    src = random_disk(os.path.join(workdir, "src.raw"), size, seed=7)
    img = os.path.join(workdir, "out.vhdx")
    code, _, err = cli("convert", "-O", "vhdx", "-o", opts, src, img)
    assert code == 0, err
    n, sha = libvhdi_sha(img)
    assert (n, sha) == (size, sha256_file(src))
    with diskforge.open(img) as dev:
        assert sha256_device(dev) == sha
    with open(src, "rb") as f:                         # a third reader, 4K sectors too
        assert dissect_oracle.read("vhdx", img) == f.read()
    if "4096" in opts:
        # qemu's vhdx driver only opens 512-byte logical sectors ("Operation not
        # supported"), so libvhdi above is the independent reader here
        return
    need("qemu-img")
    run("qemu-img", "check", img)
    run("qemu-img", "compare", "-f", "raw", "-F", "vhdx", src, img)
    info = qemu_img_json("info", img)
    assert info["format"] == "vhdx" and info["virtual-size"] == size


def test_odd_size_is_rounded_up_to_a_sector_like_qemu(workdir):
    need("qemu-img")
    src = make_sparse(os.path.join(workdir, "s.raw"), 12345678, [(12345000, b"end!")])
    ours, theirs = os.path.join(workdir, "d.vhdx"), os.path.join(workdir, "q.vhdx")
    assert cli("convert", "-O", "vhdx", src, ours)[0] == 0
    run("qemu-img", "convert", "-O", "vhdx", src, theirs)
    assert qemu_img_json("info", ours)["virtual-size"] == \
        qemu_img_json("info", theirs)["virtual-size"] == 12345856
    run("qemu-img", "compare", ours, theirs)
    run("qemu-img", "check", ours)


def test_create_empty_and_measure(workdir):
    need("qemu-img")
    img = os.path.join(workdir, "e.vhdx")
    code, _, err = cli("create", "-f", "vhdx", "-o", "subformat=fixed,block_size=1M", img,
                       "10M")
    assert code == 0, err
    run("qemu-img", "check", img)
    assert os.path.getsize(img) == 4 * MiB + 10 * MiB   # header, log, metadata, BAT, data
    with diskforge.open(img) as dev:
        assert dev.info().details["subformat"] == "fixed"
    code, out, _ = cli("measure", "-O", "vhdx", "--size", "10M", "-o",
                        "subformat=fixed,block_size=1M")
    assert code == 0 and f"required size: {14 * MiB}" in out


def test_dynamic_output_is_sparse_and_zero_blocks_stay_unallocated(workdir):
    src = make_sparse(os.path.join(workdir, "s.raw"), 200 * MiB,
                      [(100 * MiB, b"x" * 4096), (150 * MiB, bytes(4 * MiB))])
    img = os.path.join(workdir, "d.vhdx")
    assert cli("convert", "-O", "vhdx", "-o", "block_size=1M", src, img)[0] == 0
    assert os.path.getsize(img) == 5 * MiB   # 4 MiB of structures + one 1 MiB block
    with diskforge.open(img) as dev:
        data = [e for e in dev.extents() if e.kind is ExtentKind.DATA]
        assert [(e.offset, e.length) for e in data] == [(100 * MiB, 4096)]


# -- differencing -------------------------------------------------------------------------

def _modified(src: str, dst: str, seed: int) -> str:
    import random
    rnd = random.Random(seed)
    data = bytearray(open(src, "rb").read())
    for _ in range(6):
        off = rnd.randrange(0, len(data) - 70000)
        n = rnd.randrange(1, 70000)
        data[off:off + n] = rnd.randbytes(n) if rnd.random() < 0.7 else bytes(n)
    data[3 * MiB:5 * MiB] = bytes(2 * MiB)   # whole blocks zeroed over parent data
    data[100:103] = b"odd"                    # a sub-sector change
    with open(dst, "wb") as f:
        f.write(data)
    return dst


@pytest.mark.parametrize("lss", [512, 4096])
def test_differencing_chain_reads_back_composed(workdir, lss):
    size = 24 * MiB
    base_raw = random_disk(os.path.join(workdir, "base.raw"), size, seed=3, pieces=20)
    with open(base_raw, "r+b") as f:
        f.write(os.urandom(6 * MiB))   # parent data where the child writes zeros
    mid_raw = _modified(base_raw, os.path.join(workdir, "mid.raw"), 4)
    top_raw = _modified(mid_raw, os.path.join(workdir, "top.raw"), 5)
    base, mid, top = (os.path.join(workdir, n) for n in ("base.vhdx", "mid.avhdx",
                                                         "top.avhdx"))
    o = f"logical_sector_size={lss}"
    assert cli("convert", "-O", "vhdx", "-o", o, base_raw, base)[0] == 0
    code, _, err = cli("convert", "-O", "vhdx", "-B", "base.vhdx", mid_raw, mid)
    assert code == 0, err
    code, _, err = cli("convert", "-O", "vhdx", "-B", "mid.avhdx", top_raw, top)
    assert code == 0, err
    assert os.path.getsize(top) < 12 * MiB   # only the differences
    with diskforge.open(top) as dev:
        assert dev.backing is not None and dev.backing.backing is not None
        assert sha256_device(dev) == sha256_file(top_raw)
        assert dev.info().backing_filename == ".\\mid.avhdx"
        kinds = {e.kind for e in dev.extents()}
        assert ExtentKind.BACKING in kinds and ExtentKind.DATA in kinds
    # independent readers: libvhdi composes the chain; 7-Zip finds the parents itself
    assert libvhdi_sha(top, (mid, base)) == (size, sha256_file(top_raw))
    assert libvhdi_sha(mid, (base,)) == (size, sha256_file(mid_raw))
    if shutil.which("7zz"):
        out = subprocess.run(["7zz", "e", "-so", top], capture_output=True).stdout
        assert len(out) == size and __import__("hashlib").sha256(out).hexdigest() == \
            sha256_file(top_raw)
    # qemu-img cannot open differencing VHDX files at all (its driver refuses
    # HasParent): say so here, so that the day it can, this test is extended
    if shutil.which("qemu-img"):
        assert run("qemu-img", "info", top, check=False).returncode != 0


def test_create_overlay_reads_as_its_parent(workdir):
    base_raw = random_disk(os.path.join(workdir, "b.raw"), 8 * MiB, seed=9)
    base = os.path.join(workdir, "b.vhdx")
    assert cli("convert", base_raw, base)[0] == 0
    child = os.path.join(workdir, "c.avhdx")
    code, _, err = cli("create", "-q", "-b", "b.vhdx", child)
    assert code == 0, err
    with diskforge.open(child) as dev:
        assert sha256_device(dev) == sha256_file(base_raw)
        assert [e.kind for e in dev.extents()] == [ExtentKind.BACKING]
    assert libvhdi_sha(child, (base,)) == (8 * MiB, sha256_file(base_raw))


def test_differencing_needs_a_vhdx_parent(workdir):
    make_sparse(os.path.join(workdir, "b.raw"), MiB, [])
    code, _, err = cli("create", "-f", "vhdx", "-b", "b.raw", os.path.join(workdir, "c.vhdx"))
    one_line_error(code, err)
    assert "VHDX parent" in err


# -- random-access writes -----------------------------------------------------------------

def _apply(raw: bytearray, dev, ops):
    for off, data in ops:
        if data is None:
            dev.write_zeroes(off[0], off[1])
            raw[off[0]:off[0] + off[1]] = bytes(off[1])
        else:
            dev.write(off, data)
            raw[off:off + len(data)] = data


def _write_ops(size):
    return [(5, b"hello"), (3 * MiB - 3, os.urandom(10)), (size - 4096, b"z" * 4096),
            (7 * MiB + 1000, os.urandom(2 * MiB)), ((2 * MiB, 3 * MiB), None),
            ((0, 2 * MiB), None), (9 * MiB, b"after zero")]


@pytest.mark.parametrize("maker", ["qemu-img", "diskforge"])
def test_writable_open_allocates_and_logs(workdir, maker):
    size = 12 * MiB
    src = random_disk(os.path.join(workdir, "s.raw"), size, seed=11)
    img = os.path.join(workdir, "w.vhdx")
    if maker == "qemu-img":
        need("qemu-img")
        run("qemu-img", "convert", "-O", "vhdx", "-o", "block_size=1M", src, img)
    else:
        assert cli("convert", "-o", "block_size=1M", src, img)[0] == 0
    raw = bytearray(open(src, "rb").read())
    before = headers(img)[0].DataWriteGuid
    with diskforge.open(img, writable=True) as dev:
        _apply(raw, dev, _write_ops(size))
        assert dev.read(0, size) == raw
    hs = headers(img)
    assert all(h.LogGuid == bytes(16) for h in hs)          # the log is empty again
    assert all(h.DataWriteGuid != before for h in hs)
    expected = os.path.join(workdir, "e.raw")
    with open(expected, "wb") as f:
        f.write(raw)
    assert libvhdi_sha(img) == (size, sha256_file(expected))
    if shutil.which("qemu-img"):
        run("qemu-img", "check", img)
        run("qemu-img", "compare", "-f", "raw", expected, img)


def test_writable_differencing_disk(workdir):
    size = 12 * MiB
    base_raw = random_disk(os.path.join(workdir, "b.raw"), size, seed=12)
    with open(base_raw, "r+b") as f:
        f.write(os.urandom(size))
    base, child = os.path.join(workdir, "b.vhdx"), os.path.join(workdir, "c.avhdx")
    assert cli("convert", base_raw, base)[0] == 0
    assert cli("create", "-q", "-b", "b.vhdx", child)[0] == 0
    raw = bytearray(open(base_raw, "rb").read())
    with diskforge.open(child, writable=True) as dev:
        _apply(raw, dev, _write_ops(size))
        assert dev.read(0, size) == raw
    expected = os.path.join(workdir, "e.raw")
    with open(expected, "wb") as f:
        f.write(raw)
    assert libvhdi_sha(child, (base,)) == (size, sha256_file(expected))
    with diskforge.open(child) as dev:
        assert sha256_device(dev) == sha256_file(expected)


def test_convert_into_existing_vhdx_with_n(workdir):
    need("qemu-img")
    src = random_disk(os.path.join(workdir, "s.raw"), 6 * MiB, seed=13)
    img = os.path.join(workdir, "t.vhdx")
    assert cli("create", "-q", img, "6M")[0] == 0
    code, _, err = cli("convert", "-n", "-O", "vhdx", src, img)
    assert code == 0, err
    run("qemu-img", "compare", "-f", "raw", src, img)
    run("qemu-img", "check", img)


# -- the round-trip property ------------------------------------------------------------

@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 5 * MiB),
       runs=st.lists(st.tuples(st.integers(0, 5 * MiB), st.integers(1, 200_000),
                               st.sampled_from([b"", b"\0", b"\xa5"])), max_size=6),
       opts=st.sampled_from(["", "subformat=fixed", "block_size=1M",
                             "logical_sector_size=4096", "block_size=2M,log_size=2M"]))
def test_round_trip_property(tmp_path, size, runs, opts):
    extents = []
    for off, n, fill in runs:
        off = off % size
        n = min(n, size - off)
        extents.append((off, os.urandom(n) if fill == b"" else fill * n))
    src = make_sparse(str(tmp_path / "s.raw"), size, extents)
    img, back = str(tmp_path / "r.vhdx"), str(tmp_path / "back.raw")
    for p in (img, back):
        if os.path.exists(p):
            os.unlink(p)
    assert cli("convert", "-O", "vhdx", "-o", opts, src, img)[0] == 0
    assert cli("convert", "-O", "raw", img, back)[0] == 0
    lss = 4096 if "4096" in opts else 512
    padded = -(-size // lss) * lss
    assert os.path.getsize(back) == padded
    assert sha256_file(back) == padded_sha(src, padded)
    assert libvhdi_sha(img) == (padded, padded_sha(src, padded))
