"""qcow version 1 (read-only): files made by qemu-img (plain, compressed, overlays) and
the real samples, read bit for bit as qemu-img reads them (it is the only other reader
of the format); hostile headers and tables give one line."""

import os
import zlib

import pytest
from conftest import cli, need, one_line_error, run
from roformat_helpers import (expected, flat_sha256, patch, pattern_disk, refused,
                              same_as_qemu, unpacked)

import diskforge
from diskforge.errors import SafetyError, UnsupportedError
from diskforge.policy import OpenPolicy
from diskforge.registry import get


@pytest.mark.parametrize("name", ["qemu72_v1.qcow.gz", "qemu72_v1_compressed.qcow.gz"])
def test_real_samples_read_as_expected(tmp_path, name):
    rel = f"generated-local/{name}"
    img = unpacked(rel, str(tmp_path))
    assert flat_sha256(img) == expected(rel)
    with diskforge.open(img) as dev:
        assert dev.format == "qcow" and get("qcow").qemu_driver(dev) == "qcow"
        assert dev.info().to_json()["cluster-size"] == 4096


@pytest.mark.parametrize("args", [(), ("-c",)], ids=["plain", "compressed"])
def test_qemu_img_convert_output_reads_as_qemu_reads_it(tmp_path, args):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"))
    img = str(tmp_path / "a.qcow")
    # qemu-img 7.2 exits 1 after writing a compressed qcow (the image is complete)
    run("qemu-img", "convert", *args, "-O", "qcow", src, img, check=not args)
    same_as_qemu(img, str(tmp_path))
    assert flat_sha256(img)[1] == flat_sha256(src, "raw")[1]


def test_info_matches_qemu_img(tmp_path):
    need("qemu-img")
    img = str(tmp_path / "a.qcow")
    run("qemu-img", "create", "-q", "-f", "qcow", img, "1000")   # rounded up to 1024
    import json
    ours = json.loads(cli("info", "--output", "json", img)[1])
    theirs = json.loads(run("qemu-img", "info", "--output", "json", img).stdout)
    for key in ("virtual-size", "cluster-size", "format", "dirty-flag"):
        assert ours[key] == theirs[key]


def test_overlay_reads_through_its_backing_file(tmp_path):
    need("qemu-io")
    pattern_disk(str(tmp_path / "base.raw"))
    img = str(tmp_path / "ov.qcow")
    run("qemu-img", "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", img)
    run("qemu-io", "-c", "write -P 0x77 1M 64k", img)
    same_as_qemu(img, str(tmp_path))
    info = diskforge.info(img)
    assert info.backing_filename == "base.raw" and info.cluster_size == 512
    # qcow records no backing format: untrusted mode refuses to probe one
    with pytest.raises(SafetyError, match="refuses to probe"):
        diskforge.open(img, policy=OpenPolicy.untrusted())


def test_probe_keeps_qcow2_and_qcow_apart(tmp_path):
    need("qemu-img")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    run("qemu-img", "create", "-q", "-f", "qcow", a, "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", b, "1M")
    assert diskforge.info(a).format == "qcow" and diskforge.info(b).format == "qcow2"


def test_writing_is_not_supported_yet(tmp_path):
    need("qemu-img")
    img = str(tmp_path / "a.qcow")
    run("qemu-img", "create", "-q", "-f", "qcow", img, "1M")
    with pytest.raises(UnsupportedError, match="not supported yet: writing qcow"):
        get("qcow").open(img, writable=True)
    code, _, err = cli("convert", "-O", "qcow", img, str(tmp_path / "b.qcow"))
    assert code == 1 and "not supported yet: writing qcow images" in err


# -- hostile inputs: one line naming the structure and field ---------------------------

@pytest.fixture
def small(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"), 2 << 20)
    img = str(tmp_path / "h.qcow")
    run("qemu-img", "convert", "-O", "qcow", src, img)
    return img


def test_truncated_header(small):
    os.truncate(small, 40)
    refused(small, "too small for a qcow header")


def test_aes_encryption_needs_the_passphrase(small):
    """(AES images with their passphrase: test_qcow1_aes.py)"""
    patch(small, 36, ">I", 1)
    code, out, _ = cli("info", small)  # as qemu-img info: no key needed
    assert code == 0 and "encrypted: yes" in out
    code, _, err = cli("compare", small, small)
    one_line_error(code, err)
    assert "encrypt.key-secret" in err


@pytest.mark.parametrize("offset,fmt,values,field", [
    (36, ">I", (2,), "QCowHeader.crypt_method"),
    (32, ">B", (0,), "QCowHeader.cluster_bits"),
    (32, ">B", (30,), "QCowHeader.cluster_bits"),
    (33, ">B", (40,), "QCowHeader.l2_bits"),
    (40, ">Q", (1 << 40,), "QCowHeader.l1_table_offset"),
    (24, ">Q", (1 << 62,), "QCowHeader.size"),          # a 16 GiB L1 table
    (24, ">Q", ((1 << 64) - 1,), "QCowHeader.size"),
    (24, ">Q", (1,), "QCowHeader.size"),
    (8, ">QI", (1 << 40, 10), "QCowHeader.backing_file_offset"),
    (8, ">QI", (48, 5000), "QCowHeader.backing_file_size"),
])
def test_bad_header_fields(small, offset, fmt, values, field):
    patch(small, offset, fmt, *values)
    refused(small, field)


def _l1(img):
    with diskforge.open(img) as dev:
        return dev.l1_offset, dev.l1[0], dev.cluster_bits


def test_l2_table_and_cluster_past_the_end(small, tmp_path):
    l1_offset, l2, _ = _l1(small)
    with open(small, "rb") as f:
        f.seek(l2)
        first = f.read(8)
    patch(small, l1_offset, ">Q", 1 << 40)
    refused(small, "L1 table.0", "past the end", cmd="map")
    patch(small, l1_offset, ">Q", l2)
    for entry in (1 << 40, int.from_bytes(first, "big") | (1 << 63)):
        patch(small, l2, ">Q", entry)
        code, _, err = cli("convert", "-O", "raw", small, str(tmp_path / "o.raw"))
        assert code == 1 and "L2 table.0" in err and len(err.splitlines()) == 1, err


def test_compressed_bomb_stops_at_one_cluster(small, tmp_path):
    """A deflate stream of 3 MiB in one compressed cluster: inflating stops at the
    cluster size (the output limit), which is what qemu reads too: the first cluster's
    worth, no error. A stream that ends short of a cluster is corrupt."""
    _, l2, bits = _l1(small)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = c.compress(bytes(3 << 20)) + c.flush()
    assert len(bomb) < (1 << bits)
    host = os.path.getsize(small)
    with open(small, "ab") as f:
        f.write(bomb)
    patch(small, l2, ">Q", (1 << 63) | (len(bomb) << (63 - bits)) | host)
    code, _, err = cli("convert", "-O", "raw", small, str(tmp_path / "o.raw"))
    assert code == 0, err
    theirs = str(tmp_path / "q.raw")
    run("qemu-img", "convert", "-O", "raw", small, theirs)
    assert open(str(tmp_path / "o.raw"), "rb").read() == open(theirs, "rb").read()
    short = zlib.compressobj(9, zlib.DEFLATED, -12)
    short = short.compress(b"x" * 100) + short.flush()
    with open(small, "r+b") as f:
        f.seek(host)
        f.write(short)
    patch(small, l2, ">Q", (1 << 63) | (len(short) << (63 - bits)) | host)
    code, _, err = cli("convert", "-O", "raw", small, str(tmp_path / "o2.raw"))
    assert code == 1 and "L2 table.0" in err and "inflates to 100 bytes" in err, err
    assert len(err.splitlines()) == 1


def test_backing_loop_is_refused(tmp_path):
    """cccc.qcow -> aaaa.qcow -> cccc.qcow: the chain is cut at the loop."""
    need("qemu-img")
    d = str(tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow", os.path.join(d, "bbbb.qcow"), "1M")
    for name, base in (("aaaa", "bbbb"), ("cccc", "aaaa")):
        run("qemu-img", "create", "-q", "-f", "qcow", "-b", f"{base}.qcow", "-F", "qcow",
            os.path.join(d, f"{name}.qcow"))
    a = os.path.join(d, "aaaa.qcow")
    data = open(a, "rb").read().replace(b"bbbb.qcow", b"cccc.qcow", 1)
    open(a, "wb").write(data)
    # plain info names the backing file without opening it, as qemu-img's does
    refused(os.path.join(d, "cccc.qcow"), "loop", cmd="map")
