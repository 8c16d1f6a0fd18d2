"""Which driver QEMU gets for an image (``hypervisor.drives.plan_image``, the plugins'
``qemu_driver``): QEMU's own where it reads the file exactly as diskforge does,
diskforge's NBD export otherwise.

Each choice is checked against QEMU itself: where the plan says "direct", ``qemu-img
convert -f DRIVER`` must give the bytes diskforge reads; where it says NBD, QEMU's
driver for that format must fail on the file or read other bytes (that is why NBD).
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil

import pytest
from conftest import cli, make_sparse, need, need_real, run, sha256_file
from vhdx_helpers import pending_log

import diskforge
from diskforge.hypervisor.drives import plan_image

MiB = 1 << 20
SIZE = 8 * MiB
# compressible text (so DMG chunks really are LZFSE/LZMA/bzip2), random data, a hole
LAYOUT = [(0, b"\xeb\x3c\x90" + b"diskforge drive plan " * 100_000),
          (3 * MiB, os.urandom(MiB)), (6 * MiB + 4096, b"tail " * 1000)]


def _qemu_img(fmt, *opts):
    def build(d, src):
        out = os.path.join(d, f"disk.{fmt}")
        run("qemu-img", "convert", "-O", fmt, *opts, src, out)
        return out
    return build


def _diskforge(fmt, *opts):
    def build(d, src):
        out = os.path.join(d, f"disk.{fmt}")
        code, _, err = cli("convert", "-O", fmt, *opts, src, out)
        assert code == 0, err
        return out
    return build


def _raw(d, src):
    return src


def _qcow2_overlay(d, src):
    _qemu_img("qcow2")(d, src)
    top = os.path.join(d, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", top,
        cwd=d)
    return top


def _vpc_511_footer(d, src):
    """A fixed VHD whose footer is 511 bytes, as Virtual PC wrote them before 2004."""
    path = _qemu_img("vpc", "-o", "subformat=fixed,force_size=on")(d, src)
    os.truncate(path, os.path.getsize(path) - 1)
    return path


def _vpc_damaged_copy(d, src):
    """A dynamic VHD whose footer copy at offset 0 fails its checksum (the footer at the
    end is sound): QEMU reads only the copy."""
    path = _qemu_img("vpc", "-o", "force_size=on")(d, src)
    with open(path, "r+b") as f:
        f.seek(70)  # inside the unique id, which is random: flip its bits, so the byte
        byte = f.read(1)[0]  # always changes (writing a constant left it intact 1 in 256)
        f.seek(70)
        f.write(bytes([byte ^ 0xFF]))
    return path


def _vhdx_pending_log(d, src):
    path = _qemu_img("vhdx", "-o", "block_size=1M")(d, src)
    pending_log(path, seed=3)
    return path


def _child(fmt):
    """A differencing disk made with diskforge, over a parent of the same format."""
    def build(d, src):
        parent = _diskforge(fmt, *(("-o", "force_size=on") if fmt == "vpc" else ()))(d, src)
        child = os.path.join(d, f"child.{fmt}")
        code, _, err = cli("create", "-q", "-f", fmt, "-b", os.path.basename(parent), child)
        assert code == 0, err
        return child
    return build


def _qcow2_over_ulfo(d, src):
    base = _diskforge("dmg", "-o", "format=ULFO")(d, src)
    top = os.path.join(d, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", os.path.basename(base),
        "-F", "dmg", top, str(SIZE), cwd=d)
    return top


def _iso(d, src):
    tree = os.path.join(d, "tree")
    os.makedirs(tree)
    shutil.copy(src, os.path.join(tree, "disk.img"))
    out = os.path.join(d, "disk.iso")
    code, _, err = cli("iso", "build", "-q", tree, out)
    assert code == 0, err
    return out


def _extra_modules() -> bool:
    """Debian's qemu-block-extra (bzip2 and LZFSE for QEMU's dmg driver) is installed."""
    return bool(glob.glob("/usr/lib/*/qemu/block-dmg-*.so"))


# (builder, the driver the plan must choose or None for NBD, QEMU's name of the format)
CASES = [
    pytest.param(_raw, "raw", "raw", id="raw"),
    pytest.param(_qemu_img("qcow2"), "qcow2", "qcow2", id="qcow2"),
    pytest.param(_qcow2_overlay, "qcow2", "qcow2", id="qcow2-overlay"),
    pytest.param(_qemu_img("vhdx"), "vhdx", "vhdx", id="vhdx"),
    pytest.param(_qemu_img("vpc", "-o", "force_size=on"), "vpc", "vpc", id="vpc-dynamic"),
    pytest.param(_qemu_img("vpc", "-o", "subformat=fixed"), "vpc", "vpc", id="vpc-fixed"),
    pytest.param(_vpc_511_footer, "vpc", "vpc", id="vpc-511-byte-footer"),
    pytest.param(_diskforge("dmg", "-o", "format=UDZO"), "dmg", "dmg", id="dmg-UDZO"),
    pytest.param(_diskforge("dmg", "-o", "format=UDRO"), "dmg", "dmg", id="dmg-UDRO"),
    pytest.param(_iso, "raw", "raw", id="iso"),
    pytest.param(_qemu_img("vdi"), "vdi", "vdi", id="vdi-dynamic"),
    pytest.param(_qemu_img("vdi", "-o", "static=on"), "vdi", "vdi", id="vdi-static"),
    pytest.param(_diskforge("vdi"), "vdi", "vdi", id="vdi-ours"),
    # through diskforge's NBD export
    pytest.param(_vhdx_pending_log, None, "vhdx", id="vhdx-pending-log"),
    pytest.param(_diskforge("vhdx", "-o", "logical_sector_size=4096"), None, "vhdx",
                 id="vhdx-4k-sectors"),
    pytest.param(_child("vhdx"), None, "vhdx", id="vhdx-differencing"),
    pytest.param(_child("vpc"), None, "vpc", id="vpc-differencing"),
    pytest.param(_vpc_damaged_copy, None, "vpc", id="vpc-damaged-footer-copy"),
    pytest.param(_child("vdi"), None, "vdi", id="vdi-differencing"),
    pytest.param(_diskforge("vdi", "-o", "block_size=64k"), None, "vdi", id="vdi-64k-blocks"),
    pytest.param(_diskforge("dmg", "-o", "format=ULFO"), None, "dmg", id="dmg-ULFO"),
    pytest.param(_diskforge("dmg", "-o", "format=ULMO"), None, "dmg", id="dmg-ULMO"),
    pytest.param(_diskforge("dmg", "-o", "format=UDBZ"), None, "dmg", id="dmg-UDBZ"),
    pytest.param(_qcow2_over_ulfo, None, "qcow2", id="qcow2-over-ULFO-dmg"),
]


def _qemu_reads(path: str, driver: str, out: str) -> str | None:
    """sha256 of the disk as ``qemu-img convert -f DRIVER`` reads it, None if it fails."""
    proc = run("qemu-img", "convert", "-f", driver, "-O", "raw", path, out, check=False)
    return sha256_file(out) if proc.returncode == 0 else None


@pytest.mark.parametrize("build,want,qemu_name", CASES)
def test_driver_choice_matches_what_qemu_reads(request, tmp_path, build, want, qemu_name):
    need("qemu-img")
    d = str(tmp_path)
    src = make_sparse(os.path.join(d, "src.raw"), SIZE, LAYOUT)
    image = build(d, src)
    plan = plan_image(image)
    assert plan.qemu_driver == want
    ours = os.path.join(d, "ours.raw")
    with diskforge.open(image) as dev:
        assert dev.size >= SIZE
        code, _, err = cli("convert", "-O", "raw", image, ours)
        assert code == 0, err
    theirs = _qemu_reads(image, qemu_name, os.path.join(d, "qemu.raw"))
    if want is not None:
        assert theirs == sha256_file(ours), "QEMU's driver reads other bytes"
    elif not (request.node.callspec.id in ("dmg-ULFO", "dmg-UDBZ") and _extra_modules()):
        assert theirs != sha256_file(ours), "QEMU reads this file itself: why NBD?"


def test_formats_qemu_only_reads_go_direct_when_named(tmp_path):
    """vmdk has no diskforge plugin yet: ``-f vmdk`` attaches QEMU's driver."""
    need("qemu-img")
    d = str(tmp_path)
    src = make_sparse(os.path.join(d, "src.raw"), SIZE, LAYOUT)
    image = _qemu_img("vmdk")(d, src)
    plan = plan_image(image, "vmdk")
    assert (plan.format, plan.qemu_driver) == ("vmdk", "vmdk")


def test_real_dmgs_go_direct_only_where_qemu_reads_them(tmp_path):
    """Every real DMG of the shared fixtures diskforge reads: where the plan hands it
    to QEMU's dmg driver, qemu-img reads the oracle's bytes (EXPECTED.tsv)."""
    need("qemu-img")
    expected = need_real("EXPECTED.tsv")
    root = os.path.dirname(expected)
    seen = {"dmg": 0, None: 0}
    for line in open(expected, encoding="utf-8").read().splitlines()[1:]:
        rel, size, sha = line.split("\t")[:3]
        if not rel.startswith("dmg/"):
            continue
        path = os.path.join(root, rel)
        if rel.endswith(".gz"):
            plain = str(tmp_path / os.path.basename(rel)[:-3])
            with gzip.open(path) as f, open(plain, "wb") as g:
                shutil.copyfileobj(f, g)
            path = plain
        plan = plan_image(path)
        seen[plan.qemu_driver] += 1
        if plan.qemu_driver == "dmg":
            assert _qemu_reads(path, "dmg", str(tmp_path / "q.raw")) == sha, rel
    assert seen["dmg"] >= 5 and seen[None] >= 5, seen
