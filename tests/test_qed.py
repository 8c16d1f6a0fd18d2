"""QED (read-only): files made by qemu-img (plain, overlays with zero clusters, raw and
probed backing files) and the real sample, read bit for bit as qemu-img reads them (the
only other reader of the format); check as qemu-img checks; hostile headers and tables
give one line."""

import json
import os

import pytest
from conftest import cli, need, run
from roformat_helpers import (expected, flat_sha256, patch, pattern_disk, refused,
                              same_as_qemu, unpacked)

import diskforge
from diskforge.errors import SafetyError, UnsupportedError
from diskforge.policy import OpenPolicy
from diskforge.registry import get


def test_real_sample_reads_as_expected(tmp_path):
    rel = "generated-local/qemu72_basic.qed.gz"
    img = unpacked(rel, str(tmp_path))
    assert flat_sha256(img) == expected(rel)
    with diskforge.open(img) as dev:
        assert dev.format == "qed" and get("qed").qemu_driver(dev) == "qed"


def test_qemu_img_convert_output_reads_as_qemu_reads_it(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"))
    img = str(tmp_path / "a.qed")
    run("qemu-img", "convert", "-O", "qed", "-o", "cluster_size=4096", src, img)
    same_as_qemu(img, str(tmp_path))
    assert flat_sha256(img)[1] == flat_sha256(src, "raw")[1]


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_overlay_with_zero_clusters(tmp_path, base_fmt):
    need("qemu-io")
    src = pattern_disk(str(tmp_path / "src.raw"))
    base = str(tmp_path / f"base.{base_fmt}")
    run("qemu-img", "convert", "-O", base_fmt, src, base)
    img = str(tmp_path / "ov.qed")
    run("qemu-img", "create", "-q", "-f", "qed", "-b", os.path.basename(base), "-F",
        base_fmt, img)
    run("qemu-io", "-c", "write -P 0x77 1M 64k", "-c", "write -z 2M 192k", img)
    same_as_qemu(img, str(tmp_path))
    ours = json.loads(cli("info", "--output", "json", img)[1])
    theirs = json.loads(run("qemu-img", "info", "--output", "json", img).stdout)
    for key in ("virtual-size", "cluster-size", "backing-filename", "dirty-flag"):
        assert ours[key] == theirs[key]
    # QED names a raw backing file by a feature bit, any other by nothing (probed)
    assert ours.get("backing-filename-format") == theirs.get("backing-filename-format")
    with pytest.raises(SafetyError):
        diskforge.open(img, policy=OpenPolicy.untrusted())


def test_check_matches_qemu_img(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"))
    img = str(tmp_path / "a.qed")
    run("qemu-img", "convert", "-O", "qed", src, img)

    def both():
        q = run("qemu-img", "check", "--output", "json", img, check=False)
        code, out, _ = cli("check", "--output", "json", img)
        assert code == q.returncode
        ours, theirs = json.loads(out), json.loads(q.stdout)
        for key in ("total-clusters", "allocated-clusters", "fragmented-clusters",
                    "corruptions", "leaks"):
            assert ours.get(key) == theirs.get(key), key
        return code
    assert both() == 0
    with open(img, "ab") as f:           # two clusters nothing uses: leaks
        f.write(b"\1" * (2 * 65536))
    assert both() == 3
    with diskforge.open(img) as dev:
        l2 = dev.l1[0]
        n = 0
        while dev._l2(0)[n] == 0:
            n += 1
    patch(img, l2 + 8 * n, "<Q", 3 << 16 | 4096)   # a data offset not cluster-aligned
    assert both() == 2


def test_need_check_bit_opens_read_only(tmp_path):
    """Read as qemu reads it read-only; qemu-img 7.2's info shows a clear dirty-flag
    for it, and so does ours (the bit is in the diskforge details)."""
    need("qemu-img")
    img = str(tmp_path / "a.qed")
    run("qemu-img", "create", "-q", "-f", "qed", img, "1M")
    patch(img, 16, "<Q", 2)
    info = diskforge.info(img)
    assert info.details["need-check"] is True
    theirs = json.loads(run("qemu-img", "info", "--output", "json", img).stdout)
    assert info.to_json()["dirty-flag"] is theirs["dirty-flag"] is False
    with diskforge.open(img) as dev:
        assert get("qed").qemu_driver(dev) is None   # a writable qemu would repair it


def test_writing_is_not_supported_yet(tmp_path):
    need("qemu-img")
    img = str(tmp_path / "a.qed")
    run("qemu-img", "create", "-q", "-f", "qed", img, "1M")
    with pytest.raises(UnsupportedError, match="not supported yet: writing qed"):
        get("qed").open(img, writable=True)
    code, _, err = cli("convert", "-O", "qed", img, str(tmp_path / "b.qed"))
    assert code == 1 and "not supported yet: writing qed images" in err


# -- hostile inputs --------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"), 2 << 20)
    img = str(tmp_path / "h.qed")
    run("qemu-img", "convert", "-O", "qed", src, img)
    return img


def test_truncated_header(small):
    os.truncate(small, 60)
    refused(small, "too small for a QED header")


def test_unknown_feature_is_not_supported_yet(small):
    patch(small, 16, "<Q", 0x10)
    refused(small, "not supported yet: QED feature bits 0x10")


@pytest.mark.parametrize("offset,fmt,value,field", [
    (4, "<I", 0, "QEDHeader.cluster_size"),
    (4, "<I", 65537, "QEDHeader.cluster_size"),
    (4, "<I", 1 << 30, "QEDHeader.cluster_size"),
    (8, "<I", 0, "QEDHeader.table_size"),
    (8, "<I", 3, "QEDHeader.table_size"),
    (12, "<I", 0, "QEDHeader.header_size"),
    (40, "<Q", 1 << 40, "QEDHeader.l1_table_offset"),
    (40, "<Q", 65537, "QEDHeader.l1_table_offset"),
    (48, "<Q", 1 << 62, "QEDHeader.image_size"),
    (48, "<Q", 1000, "QEDHeader.image_size"),
])
def test_bad_header_fields(small, offset, fmt, value, field):
    patch(small, offset, fmt, value)
    refused(small, field)


def test_bad_backing_name(small):
    patch(small, 16, "<Q", 1)                     # QED_F_BACKING_FILE
    patch(small, 56, "<II", 65530, 100)           # past the one header cluster
    refused(small, "QEDHeader.backing_filename_offset")
    patch(small, 56, "<II", 100, 0)
    refused(small, "QEDHeader.backing_filename_offset")


def test_tables_sized_past_the_budget(small):
    """64 MiB clusters and 16-cluster tables: a 1 GiB L1 table in a sparse file."""
    patch(small, 4, "<II", 1 << 26, 16)
    patch(small, 40, "<Q", 1 << 26)
    os.truncate(small, 3 << 30)
    refused(small, "QEDHeader.table_size", "256 MiB")


def test_l2_table_and_cluster_past_the_end(small, tmp_path):
    with diskforge.open(small) as dev:
        l1_offset, l2 = dev.header.l1_table_offset, dev.l1[0]
        n = 0
        while dev._l2(0)[n] == 0:
            n += 1
    patch(small, l1_offset, "<Q", 1 << 40)
    refused(small, "L1 table.0", "past the end", cmd="map")
    patch(small, l1_offset, "<Q", l2)
    patch(small, l2 + 8 * n, "<Q", 1 << 40)
    code, _, err = cli("convert", "-O", "raw", small, str(tmp_path / "o.raw"))
    assert code == 1 and f"L2 table.{n}" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(str(tmp_path / "o.raw"))


def test_backing_loop_is_refused(tmp_path):
    need("qemu-img")
    d = str(tmp_path)
    run("qemu-img", "create", "-q", "-f", "qed", os.path.join(d, "bbbb.qed"), "1M")
    for name, base in (("aaaa", "bbbb"), ("cccc", "aaaa")):
        run("qemu-img", "create", "-q", "-f", "qed", "-b", f"{base}.qed", "-F", "qed",
            os.path.join(d, f"{name}.qed"))
    a = os.path.join(d, "aaaa.qed")
    data = open(a, "rb").read().replace(b"bbbb.qed", b"cccc.qed", 1)
    open(a, "wb").write(data)
    # plain info names the backing file without opening it, as qemu-img's does
    refused(os.path.join(d, "cccc.qed"), "loop", cmd="map")
