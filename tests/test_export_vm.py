"""export --to ova / hyperv / libvirt / proxmox: the package and the machine around the
disk, read back by 7-Zip, GNU tar, sha256sum, qemu-img, libvhdi and virt-xml-validate;
the exported libvirt and Proxmox disks boot in QEMU; --check on bad manifests and
format URIs."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import uuid

import pytest
from conftest import (cli, libvhdi_sha256, need, need_real, qemu_img_json, run,
                      sha256_file)
from export_helpers import MiB, gunzip_to, source_disk
from isotools import qemu_boot

import diskforge
from diskforge.export import ova_package, ovf

STREAM_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return source_disk(str(tmp_path_factory.mktemp("src") / "disk.raw"))


def pyvmdk_sha256(path: str) -> tuple[int, str]:
    """(media size, sha256) of a VMDK as libvmdk reads it (pyvmdk, the [test] extra)."""
    pyvmdk = pytest.importorskip("pyvmdk", reason="libvmdk-python (the [test] extra)")
    h = pyvmdk.handle()
    h.open(path)
    try:
        h.open_extent_data_files()
        size = h.get_media_size()
        digest = hashlib.sha256()
        off = 0
        while off < size:
            n = min(1 << 20, size - off)
            digest.update(h.read_buffer_at_offset(n, off))
            off += n
        return size, digest.hexdigest()
    finally:
        h.close()


# -- ova -----------------------------------------------------------------------------------

def _read_ova_back(ova: str, src: str, tmp_path, *, manifest: str = "sha256") -> None:
    """7-Zip lists the OVA, GNU tar extracts it in the required order with owner 0 and
    mode 0644, the manifest's digests are sha256sum's, qemu-img reads the disk."""
    need("7zz")
    need("tar")
    listing = run("7zz", "l", ova).stdout   # (7-Zip 26.02 opens no stream VMDK itself)
    run("7zz", "t", ova)
    assert "web-disk1.vmdk" in listing and "web.ovf" in listing
    verbose = run("tar", "--list", "--verbose", "--numeric-owner", "-f", ova).stdout
    rows = [line.split() for line in verbose.splitlines()]
    names = [r[-1] for r in rows]
    want = ["web.ovf", "web.mf", "web-disk1.vmdk"] if manifest != "none" else \
        ["web.ovf", "web-disk1.vmdk"]
    assert names == want
    assert all(r[0] == "-rw-r--r--" and r[1] == "0/0" for r in rows)
    dest = tmp_path / "x"
    dest.mkdir()
    run("tar", "-xf", ova, "-C", str(dest))
    if manifest != "none":
        tool = {"sha256": "sha256sum", "sha1": "sha1sum"}[manifest]
        for line in (dest / "web.mf").read_text().splitlines():
            tag, rest = line.split("(", 1)
            name, digest = rest.split(")= ")
            assert tag == manifest.upper()
            assert run(tool, str(dest / name)).stdout.split()[0] == digest
    vmdk = str(dest / "web-disk1.vmdk")
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, vmdk).returncode == 0
    assert pyvmdk_sha256(vmdk) == (os.path.getsize(src), sha256_file(src))
    envelope = (dest / "web.ovf").read_bytes()
    files, disks = ovf.read_envelope(envelope)
    assert files == [("file1", "web-disk1.vmdk", os.path.getsize(vmdk))]
    assert disks[0].format == STREAM_URI and disks[0].capacity == os.path.getsize(src)


def test_ova_package(src, tmp_path):
    out = str(tmp_path / "web.ova")
    code, stdout, err = cli("export", "--to", "ova", "--cpus", "2", "--memory", "2048",
                            "--firmware", "efi", src, out)
    assert code == 0, err
    _read_ova_back(out, src, tmp_path)
    assert diskforge.export.check("ova", out) == []
    with tarfile.open(out) as t:
        text = t.extractfile("web.ovf").read().decode()
    assert "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>" in text
    assert "<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>" in text
    assert 'vmw:key="firmware" vmw:value="efi"' in text
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".web.ova")]


def test_an_interrupted_ova_export_leaves_nothing(src, tmp_path):
    def stop(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        diskforge.export(src, "ova", str(tmp_path / "web.ova"), progress=stop)
    assert os.listdir(tmp_path) == []


def test_ova_removes_a_killed_runs_work_folder(src, tmp_path, capsys):
    stale = tmp_path / ".web.ova.k1ll3d.diskforge-work"
    stale.mkdir()
    (stale / "lock").write_bytes(b"")
    (stale / "web-disk1.vmdk").write_bytes(b"partial")
    diskforge.export(src, "ova", str(tmp_path / "web.ova"))
    assert sorted(os.listdir(tmp_path)) == ["web.ova"]
    assert "a work folder left by an interrupted run" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", ["sha1", "none"])
def test_ova_manifest_choices(src, tmp_path, manifest):
    out = str(tmp_path / "web.ova")
    diskforge.export(src, "ova", out, manifest=manifest)
    _read_ova_back(out, src, tmp_path, manifest=manifest)
    assert diskforge.export.check("ova", out) == []


def test_aws_ova(src, tmp_path):
    out = str(tmp_path / "web.ova")
    diskforge.export(src, "aws", out)
    _read_ova_back(out, src, tmp_path)
    assert diskforge.export.check("aws", out) == []


def test_ova_envelope_is_schema_ordered_and_escaped():
    text = ovf.envelope(ovf.Vm(name="a<b&c", disk_file="a-disk1.vmdk", disk_file_size=10,
                               capacity=1 << 30)).decode()
    assert "<Name>a&lt;b&amp;c</Name>" in text and 'ovf:id="a&lt;b&amp;c"' in text
    import xml.etree.ElementTree as ET
    root = ET.fromstring(text)
    q = "{http://schemas.dmtf.org/ovf/envelope/1}"
    assert [c.tag for c in root] == [f"{q}References", f"{q}DiskSection",
                                     f"{q}NetworkSection", f"{q}VirtualSystem"]
    rasd = "{" + ovf.RASD_NS + "}"
    for item in root.iter(f"{q}Item"):
        tags = [c.tag[len(rasd):] for c in item]
        assert tags == sorted(tags)


# -- hand-made packages for --check --------------------------------------------------------

@pytest.fixture(scope="module")
def stream_vmdk(tmp_path_factory):
    need("qemu-img")
    folder = tmp_path_factory.mktemp("vmdk")
    raw = str(folder / "d.raw")
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(bytes(range(256)) * 4096)
    vmdk = str(folder / "vm-disk1.vmdk")
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
        raw, vmdk)
    return vmdk


def _package(tmp_path, vmdk: str, *, manifest_lines=None, uri: str = STREAM_URI,
             order=("ovf", "mf", "disk")) -> str:
    env = ovf.envelope(ovf.Vm(name="vm", disk_file="vm-disk1.vmdk",
                              disk_file_size=os.path.getsize(vmdk), capacity=8 * MiB))
    env = env.replace(STREAM_URI.encode(), uri.encode())
    if manifest_lines is None:
        digest = sha256_file(vmdk)
        manifest_lines = [f"SHA256(vm.ovf)= {hashlib.sha256(env).hexdigest()}",
                          f"SHA256(vm-disk1.vmdk)= {digest}"]
    parts = {"ovf": ("vm.ovf", env),
             "mf": ("vm.mf", ("\n".join(manifest_lines) + "\n").encode()),
             "disk": ("vm-disk1.vmdk", vmdk)}
    out = str(tmp_path / "vm.ova")
    ova_package.write_ova(out, [parts[k] for k in order])
    return out


def test_check_ova_good_hand_made_package(tmp_path, stream_vmdk):
    assert diskforge.export.check("ova", _package(tmp_path, stream_vmdk)) == []


def test_check_manifest_spelled_with_spaces(tmp_path, stream_vmdk):
    d = sha256_file(stream_vmdk)
    env_digest = "0" * 64
    ova = _package(tmp_path, stream_vmdk, manifest_lines=[
        f"SHA256 (vm.ovf) = {env_digest}", f"SHA256(vm-disk1.vmdk)= {d}"])
    code, out, _ = cli("export", "--check", "ova", ova)
    assert code == 2
    lines = out.splitlines()
    assert lines[0] == (f"{ova}: manifest line 1 is spelled"
                        f" 'SHA256 (vm.ovf) = {env_digest}' (coreutils --tag/BSD style,"
                        " with spaces): vSphere wants"
                        " 'SHA256(vm.ovf)= <hex>'")
    assert lines[1] == f"{ova}: 'vm.ovf' is not in the manifest"


def test_check_manifest_openssl3_spelling(tmp_path, stream_vmdk):
    d = sha256_file(stream_vmdk)
    ova = _package(tmp_path, stream_vmdk, manifest_lines=[f"SHA2-256(vm-disk1.vmdk)= {d}"])
    problems = diskforge.export.check("ova", ova)
    assert problems[0] == ("manifest line 1 is OpenSSL 3's spelling"
                           f" 'SHA2-256(vm-disk1.vmdk)= {d}': vSphere wants"
                           " 'SHA256(vm-disk1.vmdk)= <hex>'")


def test_check_manifest_wrong_digest_and_missing_file(tmp_path, stream_vmdk):
    ova = _package(tmp_path, stream_vmdk, manifest_lines=[
        f"SHA256(vm-disk1.vmdk)= {'ab' * 32}", f"SHA1(other.vmdk)= {'cd' * 20}"])
    problems = diskforge.export.check("ova", ova)
    assert "the manifest mixes SHA1 and SHA256: use one" in problems
    assert "the SHA256 digest of 'vm-disk1.vmdk' does not match the manifest" in problems
    assert "the manifest lists 'other.vmdk', which is not in the package" in problems


def test_check_wrong_ovf_format_uri(tmp_path, stream_vmdk):
    wrong = "http://www.vmware.com/specifications/vmdk.html#sparse"
    ova = _package(tmp_path, stream_vmdk, manifest_lines=[], uri=wrong)
    problems = diskforge.export.check("ova", ova)
    assert f"disk vm-disk1.vmdk: ovf:format is '{wrong}', not exactly '{STREAM_URI}'" \
        in problems


def test_check_ova_order(tmp_path, stream_vmdk):
    ova = _package(tmp_path, stream_vmdk, order=("disk", "ovf", "mf"))
    problems = diskforge.export.check("ova", ova)
    assert "the first file is 'vm-disk1.vmdk', not the .ovf descriptor" in problems


def test_check_ova_non_stream_disk(tmp_path):
    need("qemu-img")
    vmdk = str(tmp_path / "sparse.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", vmdk, "8M")
    problems = diskforge.export.check("ova", _package(tmp_path, vmdk))
    assert "disk vm-disk1.vmdk is not a stream-optimized VMDK"\
        " (createType=monolithicSparse)" in problems


# -- hyperv --------------------------------------------------------------------------------

def test_hyperv_dynamic_vhdx_32m_blocks(src, tmp_path):
    out = str(tmp_path / "disk.vhdx")
    diskforge.export(src, "hyperv", out)
    info = qemu_img_json("info", out)
    assert info["format"] == "vhdx" and info["virtual-size"] == 31 * MiB
    assert info["cluster-size"] == 32 * MiB
    assert run("qemu-img", "compare", "-f", "raw", "-F", "vhdx", src, out).returncode == 0
    size, digest = libvhdi_sha256(out)
    assert size == 31 * MiB
    with diskforge.open(out) as dev:
        d = dev.info().details
        assert digest == hashlib.sha256(dev.read(0, dev.size)).hexdigest()
    assert d["subformat"] == "dynamic" and d["logical-sector-size"] == 512
    assert d["log"]["offset"] % MiB == 0 and d["log"]["length"] % MiB == 0
    blocks = [e["offset"] - e["start"] % (32 * MiB)
              for e in json.loads(cli("map", "--output", "json", out)[1]) if "offset" in e]
    assert blocks and all(b % MiB == 0 for b in blocks)      # payload blocks 1 MiB aligned
    assert diskforge.export.check("hyperv", out) == []


def test_check_hyperv_on_windows_made_vhdx(tmp_path):
    """Hyper-V's own dynamic VHDX (32 MiB blocks) and fixed VHDX pass; its differencing
    .avhdx, copied without the parent it names, cannot be imported."""
    for name in ("dissect_win10_dynamic_32MiBblock.vhdx", "dissect_win10_fixed.vhdx"):
        path = gunzip_to(need_real(f"vhdx/{name}.gz"), str(tmp_path / name))
        assert diskforge.export.check("hyperv", path) == []
    avhdx = gunzip_to(need_real("vhdx/dissect_hyperv_differencing.avhdx.gz"),
                      str(tmp_path / "d.avhdx"))
    (problem,) = diskforge.export.check("hyperv", avhdx)
    assert problem.startswith("cannot be read as vhdx: Could not open ")
    assert "Could not open backing file" in problem
    assert "the parent of this differencing disk" in problem


def test_check_hyperv_vhd(tmp_path):
    vhd = str(tmp_path / "d.vhd")
    diskforge.create(vhd, 30 * MiB, "vpc")
    (problem,) = diskforge.export.check("hyperv", vhd)
    assert "generation 2 VMs boot only from VHDX" in problem


# -- libvirt and proxmox -------------------------------------------------------------------

def test_libvirt_qcow2_and_domain_xml(src, tmp_path):
    need("virt-xml-validate")
    out = str(tmp_path / "web.qcow2")
    written = diskforge.export(src, "libvirt", out, cpus=2, memory=512, firmware="efi")
    xml = str(tmp_path / "web.xml")
    assert written == [out, xml]
    assert run("virt-xml-validate", xml, "domain").returncode == 0
    assert run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out).returncode == 0
    run("qemu-img", "check", out)
    text = open(xml).read()
    for piece in ("<name>web</name>", '<memory unit="MiB">512</memory>',
                  '<vcpu placement="static">2</vcpu>', '<os firmware="efi">',
                  f'<source file="{out}" />', '<target dev="vda" bus="virtio" />',
                  '<driver name="qemu" type="qcow2" />'):
        assert piece in text
    assert diskforge.export.check("libvirt", out) == []
    assert diskforge.export.check("libvirt", xml) == []


def test_check_libvirt_wrong_driver_type(src, tmp_path):
    out = str(tmp_path / "web.qcow2")
    diskforge.export(src, "libvirt", out)
    xml = tmp_path / "web.xml"
    xml.write_text(xml.read_text().replace('type="qcow2"', 'type="raw"'))
    problems = diskforge.export.check("libvirt", str(xml))
    assert problems == [f"{out}: the XML says <driver type='raw'> but the file is qcow2"
                        " (libvirt does not probe: the guest would see the container)"]


def test_check_libvirt_xml_the_schema_refuses(src, tmp_path):
    need("virt-xml-validate")
    out = str(tmp_path / "web.qcow2")
    diskforge.export(src, "libvirt", out)
    xml = tmp_path / "web.xml"
    xml.write_text(xml.read_text().replace("<vcpu", "<vcpus"))
    xml.write_text(xml.read_text().replace("</vcpu>", "</vcpus>"))
    problems = diskforge.export.check("libvirt", str(xml))
    assert len(problems) == 1 and problems[0].startswith("virt-xml-validate refuses it: ")


@pytest.fixture(scope="module")
def bootable(tmp_path_factory):
    need("qemu-system-x86_64")
    marker = f"DISKFORGE-EXPORT-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("boot")
    return source_disk(str(folder / "boot.raw"), 4 * MiB, marker=marker), marker


def test_libvirt_export_boots(bootable, tmp_path):
    raw, marker = bootable
    out = str(tmp_path / "vm.qcow2")
    diskforge.export(raw, "libvirt", out)
    ok, tail = qemu_boot(["-drive", f"file={out},format=qcow2,if=virtio,snapshot=on"],
                         marker)
    assert ok, tail


def test_proxmox_export_boots_from_virtio_scsi(bootable, tmp_path):
    need("virt-xml-validate")
    raw, marker = bootable
    out = str(tmp_path / "vm.qcow2")
    diskforge.export(raw, "proxmox", out)
    xml = str(tmp_path / "vm.xml")
    assert run("virt-xml-validate", xml, "domain").returncode == 0
    text = open(xml).read()
    assert '<target dev="sda" bus="scsi" />' in text and 'cache="none"' in text
    ok, tail = qemu_boot(["-device", "virtio-scsi-pci,id=scsi0",
                          "-drive", f"file={out},format=qcow2,if=none,id=d0,snapshot=on",
                          "-device", "scsi-hd,drive=d0,bus=scsi0.0"], marker)
    assert ok, tail
    assert diskforge.export.check("proxmox", out) == []

