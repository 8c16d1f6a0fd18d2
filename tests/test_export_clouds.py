"""export --to azure / gcp / aws: what the vendors' rules ask, read back by reference
tools (qemu-img, libvhdi, GNU tar, gunzip), and --check on files other tools made."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import (cli, libvhdi_sha256, need, need_real, qemu_img_json, run,
                      sha256_file)
from export_helpers import MiB, gunzip_to, need_vmdk_writer, source_disk
from export_helpers import qemu_img_vmdk  # noqa: F401  (a fixture)

import diskforge

GiB = 1 << 30


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return source_disk(str(tmp_path_factory.mktemp("src") / "disk.raw"))


def padded_sha256(path: str, size: int, tmp) -> str:
    """sha256 of ``path``'s bytes zero-extended to ``size`` (what the export holds)."""
    padded = str(tmp / "padded.raw")
    with open(path, "rb") as a, open(padded, "wb") as b:
        b.write(a.read())
        b.truncate(size)
    return sha256_file(padded)


# -- azure ---------------------------------------------------------------------------------

def test_azure_fixed_vhd_whole_mib_read_by_qemu_img_and_libvhdi(src, tmp_path):
    out = str(tmp_path / "disk.vhd")
    code, stdout, err = cli("export", "--to", "azure", src, out)
    assert code == 0, err
    assert stdout.split() == [out]
    size = 31 * MiB                                   # 30 MiB + 4 KiB rounded up
    assert os.path.getsize(out) == size + 512
    info = qemu_img_json("info", "-f", "vpc", out)
    assert info["virtual-size"] == size
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vpc", src, out).returncode == 0
    assert libvhdi_sha256(out) == (size, padded_sha256(src, size, tmp_path))
    with diskforge.open(out) as dev:
        d = dev.info().details
    assert d["disk-type"] == "fixed" and d["current-size"] == d["original-size"] == size
    # sparse locally: the 20 MiB of holes are not allocated
    assert os.stat(out).st_blocks * 512 < 12 * MiB
    assert cli("export", "--check", "azure", out)[0] == 0


def test_azure_small_disk_grows_to_azure_minimum(tmp_path):
    small = str(tmp_path / "small.raw")
    with open(small, "wb") as f:
        f.write(b"\x01" * 4096)
    out = str(tmp_path / "small.vhd")
    diskforge.export(small, "azure", out)
    assert qemu_img_json("info", "-f", "vpc", out)["virtual-size"] == 20 * MiB
    assert diskforge.export.check("azure", out) == []


def test_check_azure_vhd_not_whole_mib(tmp_path):
    need("qemu-img")
    vhd = str(tmp_path / "odd.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on",
        vhd, str(30 * MiB + 3 * 512))
    code, out, _ = cli("export", "--check", "azure", vhd)
    assert code == 2
    assert "not a whole number of MiB" in out and len(out.splitlines()) == 1


def test_check_azure_dynamic_vhd(tmp_path):
    need("qemu-img")
    vhd = str(tmp_path / "dyn.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", vhd, "30M")
    code, out, _ = cli("export", "--check", "azure", vhd)
    assert code == 2
    assert out.splitlines() == [f"{vhd}: is a dynamic VHD: Azure takes fixed VHDs only"
                                " (convert with -o subformat=fixed)"]


def test_check_azure_on_windows_made_fixed_vhd(tmp_path):
    """A real Hyper-V/Windows fixed VHD of 10 MiB: whole MiB, but under Azure's 20 MiB."""
    gz = need_real("vhd/node-vhd_win_fixed_10M.vhd.gz")
    vhd = gunzip_to(gz, str(tmp_path / "win.vhd"))
    problems = diskforge.export.check("azure", vhd)
    assert len(problems) == 1 and "outside Azure's limits" in problems[0]


def test_check_azure_on_windows_made_dynamic_vhd(tmp_path):
    gz = need_real("vhd/node-vhd_win_dynamic_512M.vhd.gz")
    vhd = gunzip_to(gz, str(tmp_path / "win.vhd"))
    assert diskforge.export.check("azure", vhd) == [
        "is a dynamic VHD: Azure takes fixed VHDs only (convert with -o subformat=fixed)"]


def test_check_azure_refuses_other_formats(tmp_path):
    need("qemu-img")
    q = str(tmp_path / "d.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", q, "30M")
    assert diskforge.export.check("azure", q) == ["is qcow2, not a VHD: Azure takes fixed"
                                                  " VHDs only"]


# -- gcp -----------------------------------------------------------------------------------

def test_gcp_sparse_oldgnu_targz_extracts_bit_exact(src, tmp_path):
    need("tar")
    out = str(tmp_path / "image.tar.gz")
    assert cli("export", "--to", "gcp", "-q", src, out)[0] == 0
    assert os.path.getsize(out) < 4 * MiB             # holes and zeros are not stored
    run("gzip", "-t", out)
    listing = run("tar", "--list", "--verbose", "-f", out).stdout.split()
    assert listing[0] == "-rw-r--r--" and listing[1] == "root/root"
    assert listing[2] == str(GiB) and listing[-1] == "disk.raw"
    head = subprocess.run(["gzip", "-dc", out], capture_output=True).stdout[:512]
    assert head[156:157] == b"S" and head[257:265] == b"ustar  \x00"   # oldgnu sparse
    dest = tmp_path / "x"
    dest.mkdir()
    run("tar", "-xzf", out, "-C", str(dest))
    disk = str(dest / "disk.raw")
    assert os.path.getsize(disk) == GiB
    assert os.stat(disk).st_blocks * 512 < 64 * MiB     # GNU tar recreated the holes
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, disk).returncode == 0
    assert diskforge.export.check("gcp", out) == []


def test_gcp_parallel_gzip_matches_python_gzip(src, tmp_path, monkeypatch):
    """The pigz-style stream decodes to the same tar as Python's own gunzip reads, with
    one worker or several (times pinned: the two archives are compared byte for byte)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    import gzip
    import tarfile

    from diskforge.export.gcp import write_sparse_targz
    outs = []
    for workers in (1, 3):
        out = str(tmp_path / f"w{workers}.tar.gz")
        with diskforge.open(src) as dev:
            write_sparse_targz(dev, out, GiB, "disk.raw", workers=workers)
        outs.append(gzip.open(out).read())
        with tarfile.open(out, "r:gz") as t:
            (m,) = t.getmembers()
            assert m.name == "disk.raw" and m.size == GiB and m.issparse()
    assert outs[0] == outs[1]


@pytest.mark.parametrize("layout", ["empty", "data-at-the-end", "fifty-regions"])
def test_gcp_sparse_maps_gnu_tar_extracts(tmp_path, layout):
    """No data at all (the map is one empty region at the end), data up to the last
    byte (no trailing hole), and 50 regions (the header's 4 and two extension blocks
    of 21): GNU tar extracts each bit for bit."""
    need("tar")
    src = str(tmp_path / "d.raw")
    with open(src, "wb") as f:
        f.truncate(GiB)
        if layout == "data-at-the-end":
            f.seek(GiB - 8192)
            f.write(b"E" * 8192)
        elif layout == "fifty-regions":
            for i in range(50):
                f.seek(i * 3 * MiB)
                f.write(bytes([i + 1]) * 70000)
    out = str(tmp_path / "d.tar.gz")
    diskforge.export(src, "gcp", out)
    dest = tmp_path / "x"
    dest.mkdir()
    run("tar", "-xzf", out, "-C", str(dest))
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", src,
               str(dest / "disk.raw")).returncode == 0
    assert os.path.getsize(dest / "disk.raw") == GiB


def test_gcp_disk_past_8_gib_uses_base256_sizes(tmp_path):
    """9 GiB is past ustar's 11 octal digits: the sizes are written in GNU base-256,
    which GNU tar reads back."""
    need("tar")
    src = str(tmp_path / "big.raw")
    with open(src, "wb") as f:
        f.truncate(9 * GiB - 512)
        f.seek(8 * GiB + 4096)
        f.write(b"past eight GiB" * 100)
    out = str(tmp_path / "big.tar.gz")
    diskforge.export(src, "gcp", out)
    listing = run("tar", "--list", "--verbose", "-f", out).stdout.split()
    assert listing[2] == str(9 * GiB) and listing[-1] == "disk.raw"
    dest = tmp_path / "x"
    dest.mkdir()
    run("tar", "-xzf", out, "-C", str(dest))
    with open(dest / "disk.raw", "rb") as f:
        f.seek(8 * GiB + 4096)
        assert f.read(1400) == b"past eight GiB" * 100
    assert os.path.getsize(dest / "disk.raw") == 9 * GiB


def _tar(tmp_path, name: str, size: int, *args) -> str:
    need("tar")
    folder = tmp_path / "t"
    folder.mkdir(exist_ok=True)
    with open(folder / name, "wb") as f:
        f.truncate(size)
        f.write(b"boot")
    out = str(tmp_path / f"{name}.tar.gz")
    run("tar", *args, "-Sczf", out, "-C", str(folder), name)
    return out


def test_check_gcp_disk_raw_not_whole_gib(tmp_path):
    out = _tar(tmp_path, "disk.raw", GiB + MiB, "--format=oldgnu")
    code, text, _ = cli("export", "--check", "gcp", out)
    assert code == 2
    assert text.splitlines() == [f"{out}: disk.raw is {GiB + MiB} bytes (1025 MiB), not a"
                                 f" whole number of GiB: round it up to {2 * GiB}"]


def test_check_gcp_member_not_named_disk_raw(tmp_path):
    out = _tar(tmp_path, "disk.img", GiB, "--format=oldgnu")
    problems = diskforge.export.check("gcp", out)
    assert problems == ["no member named disk.raw (the archive holds disk.img): the import"
                        " reads only disk.raw"]


def test_check_gcp_posix_tar_and_plain_file(tmp_path):
    out = _tar(tmp_path, "disk.raw", GiB, "--format=posix")
    assert any("not GNU oldgnu" in p for p in diskforge.export.check("gcp", out))
    plain = str(tmp_path / "disk.raw")
    with open(plain, "wb") as f:
        f.truncate(GiB)
    assert diskforge.export.check("gcp", plain)[0].startswith("not gzip-compressed")


def test_check_gcp_gnu_tar_made_archive_passes(tmp_path):
    """The vendors' own recipe (tar --format=oldgnu -Sczf) passes the check."""
    out = _tar(tmp_path, "disk.raw", 2 * GiB, "--format=oldgnu")
    assert diskforge.export.check("gcp", out) == []


# -- aws -----------------------------------------------------------------------------------

def test_check_aws_non_stream_vmdk(tmp_path):
    need("qemu-img")
    vmdk = str(tmp_path / "sparse.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", vmdk, "30M")
    code, out, _ = cli("export", "--check", "aws", vmdk)
    assert code == 2
    assert out.splitlines() == [f"{vmdk}: is a monolithicSparse VMDK: AWS takes only"
                                " stream-optimized VMDKs (convert with -o"
                                " subformat=streamOptimized)"]


@pytest.mark.parametrize("name", ["vmdk/vmdkrs_streamOptimized.vmdk",
                                  "vmdk/cot_virtualbox_ova_export_streamOptimized.vmdk",
                                  "vmdk/cot_vmware_generated-stream_streamOptimized.vmdk"])
def test_check_aws_accepts_real_stream_vmdks(name):
    """VMware's, VirtualBox's and the stream converter's stream-optimized VMDKs."""
    assert diskforge.export.check("aws", need_real(name)) == []


def test_check_aws_real_monolithic_sparse(tmp_path):
    gz = need_real("vmdk/vmdkrs_monolithicSparse.vmdk.gz")
    vmdk = gunzip_to(gz, str(tmp_path / "m.vmdk"))
    assert "monolithicSparse VMDK" in diskforge.export.check("aws", vmdk)[0]


def test_check_aws_differencing_vhd(tmp_path):
    need("qemu-img")
    base, top = str(tmp_path / "b.vhd"), str(tmp_path / "t.vhd")
    diskforge.create(base, 30 * MiB, "vpc")
    diskforge.create(top, 30 * MiB, "vpc", backing="b.vhd", backing_fmt="vpc")
    assert diskforge.export.check("aws", top) == ["is a differencing disk: AWS needs a"
                                                  " standalone disk"]
    assert diskforge.export.check("aws", base) == []


def _stream_vmdk_read_back(vmdk: str, src: str) -> None:
    need("qemu-img")
    assert qemu_img_json("info", vmdk)["format-specific"]["data"]["create-type"] \
        == "streamOptimized"
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, vmdk).returncode == 0
    run("qemu-img", "check", "-f", "vmdk", vmdk)


def test_aws_stream_vmdk(src, tmp_path):
    need_vmdk_writer()
    out = str(tmp_path / "disk.vmdk")
    diskforge.export(src, "aws", out)
    _stream_vmdk_read_back(out, src)
    assert diskforge.export.check("aws", out) == []


def test_aws_stream_vmdk_with_qemu_img_standing_in(src, tmp_path, qemu_img_vmdk):
    out = str(tmp_path / "disk.vmdk")
    assert diskforge.export(src, "aws", out) == [out]
    _stream_vmdk_read_back(out, src)
    assert diskforge.export.check("aws", out) == []


def test_aws_too_large(tmp_path):
    huge = str(tmp_path / "huge.qcow2")
    diskforge.create(huge, 16 * (1 << 40) + (1 << 20), "qcow2")
    code, _, err = cli("export", "--to", "aws", huge, str(tmp_path / "h.vmdk"))
    assert code == 1 and "at most 16 TiB" in err and not os.path.exists(tmp_path / "h.vmdk")
