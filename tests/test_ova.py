"""OVAs read in place (issue 14, "OVA in place"): info, convert, map, compare and
verify of packages built by GNU tar from real OVF descriptors (fixtures/ova: VMware
ovftool and VirtualBox exports from COT's test data), with disks made by qemu-img.
Every converted disk is compared by ``qemu-img compare`` with the member GNU tar
extracts."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import cli, need, one_line_error, run
from ova_helpers import MIB, build_ova, extract, fixture, make_disk, two_disk_ovf

from diskforge.formats.ova import manifest as mf
from diskforge.formats.ova import ovf, tar

UBUNTU_DISK = "ubuntu.2.0-disk1.vmdk"


def _text(name: str) -> str:
    with open(fixture(name), encoding="utf-8") as f:
        return f.read()


def ubuntu_ova(d: str, disk_fmt: str, **kw) -> tuple[str, str]:
    """VirtualBox's ubuntu.2.0 package with its disk replaced by a qemu-img image of
    the same name (the real disk is a VMDK)."""
    disk = make_disk(os.path.join(d, "disk." + disk_fmt), disk_fmt)
    out = build_ova(os.path.join(d, f"vbox-{disk_fmt}.ova"), _text("ubuntu.2.0.ovf"),
                    "ubuntu.2.0.ovf", {UBUNTU_DISK: disk}, **kw)
    return out, disk


# -- the descriptor, the manifest and the tar index, on their own ------------------------

def test_virtualbox_ovf2_descriptor():
    env = ovf.parse(open(fixture("ubuntu.2.0.ovf"), "rb").read(), "ubuntu.2.0.ovf")
    assert env.version == "2.0"
    assert [(d.disk_id, d.file.href, d.capacity) for d in env.disks] == \
        [("vmdisk1", UBUNTU_DISK, 8 << 30)]
    assert env.disks[0].format_name == "vmdk (streamOptimized)"
    vs = env.system
    assert (vs.name, vs.os_id, vs.os_type, vs.cpus, vs.memory) == \
        ("ubuntu", 94, "Ubuntu_64", 1, 512 * MIB)
    assert [c["type"] for c in vs.controllers] == ["ide", "ide", "sata", "usb"]
    assert vs.disks == [{"disk-id": "vmdisk1", "controller": "sataController0",
                         "address": "0", "name": "disk1"}]
    assert vs.nics == [{"network": "NAT", "model": "E1000",
                        "name": "Ethernet adapter on 'NAT'"}]
    assert vs.cdroms == 1 and env.networks == ["NAT"]


def test_vmware_ovftool_descriptor():
    env = ovf.parse(open(fixture("vmware.ovf"), "rb").read(), "vmware.ovf")
    assert env.version == "1.x"
    d = env.disks[0]
    assert (d.capacity, d.capacity_text, d.populated_size) == (1 << 30, "1", 293011456)
    vs = env.system
    assert (vs.cpus, vs.memory, vs.firmware, vs.os_type) == (2, 1536 * MIB, "bios",
                                                            "rhel6_64Guest")
    assert [c["type"] for c in vs.controllers] == ["scsi", "ide", "ide"]
    assert len(vs.nics) == 4 and vs.disks[0]["disk-id"] == "vmdisk1"


def test_vmware_ovf_0_9_sections():
    """Before DSP0243 1.0, VMware wrote ``Section xsi:type="ovf:DiskSection_Type"``."""
    env = ovf.parse(open(fixture("v0.9.ovf"), "rb").read(), "v0.9.ovf")
    assert env.version == "0.9"
    d = env.disks[0]
    assert (d.disk_id, d.file.href, d.capacity, d.format_name) == \
        ("vmdisk1", "input.vmdk", 1 << 30, "vmdk (monolithicSparse)")
    vs = env.system                      # ovf:Content xsi:type="ovf:VirtualSystem_Type"
    assert (vs.id, vs.os_id, vs.os_type, vs.cpus, vs.memory) == \
        ("v0.9", 107, "other26xLinux64Guest", 1, 8192 * MIB)
    assert [n["network"] for n in vs.nics] == ["bridged"]


def test_deployment_options_pick_the_default_configuration():
    """input.ovf has three configurations; the default is 4 CPUs, 4 GiB, 3 NICs."""
    env = ovf.parse(open(fixture("input.ovf"), "rb").read(), "input.ovf")
    assert (env.system.cpus, env.system.memory, len(env.system.nics)) == (4, 4 << 30, 3)
    assert [f.href for f in env.files] == ["input.vmdk", "input.iso", "sample_cfg.txt"]


def test_manifest_spellings():
    text = ("SHA1(a.ovf)= " + "ab" * 20 + "\n"
            "SHA256 (b.vmdk) = " + "CD" * 32 + "\r\n"
            "SHA2-256(c d.iso)= " + "ef" * 32 + "\n"
            "SHA512(e)= " + "01" * 64 + "\n"
            + "23" * 32 + "  f.txt\n"
            "\n"
            "MD4(g)= 00\n"
            "SHA256(h)= 123\n"
            "garbage\n")
    entries, problems = mf.parse(text.encode(), "x.mf")
    assert [(e.algorithm, e.name, e.digest[:4]) for e in entries] == [
        ("SHA1", "a.ovf", "abab"), ("SHA256", "b.vmdk", "cdcd"),
        ("SHA256", "c d.iso", "efef"), ("SHA512", "e", "0101"), ("SHA256", "f.txt", "2323")]
    assert len(problems) == 3
    assert "unknown digest algorithm 'MD4'" in problems[0]
    assert "64 hex digits" in problems[1] and "not a digest line" in problems[2]


def test_real_manifests_name_their_files():
    entries, problems = mf.parse(open(fixture("input.mf"), "rb").read(), "input.mf")
    assert not problems
    assert [(e.algorithm, e.name) for e in entries][:2] == [("SHA1", "input.ovf"),
                                                           ("SHA1", "input.vmdk")]
    import hashlib
    assert entries[0].digest == hashlib.sha1(open(fixture("input.ovf"), "rb").read()
                                             ).hexdigest()


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax", "v7"])
def test_tar_index_matches_gnu_tar(workdir, fmt):
    """Long names (GNU ``L``, pax ``path``), the ustar prefix, odd sizes and
    directories, indexed exactly where GNU tar put each member's bytes."""
    need("tar")
    src = os.path.join(workdir, "src")
    deep = "d" * 60 + "/" + "e" * 60 if fmt != "v7" else "short"
    os.makedirs(os.path.join(src, deep))
    names = {"a.ovf": b"<Envelope/>", f"{deep}/f.bin": bytes(range(250)) * 4,
             "empty": b""}
    if fmt in ("gnu", "pax"):
        names["n" * 150 + ".img"] = b"x" * 513
    for n, data in names.items():
        with open(os.path.join(src, n), "wb") as f:
            f.write(data)
    out = os.path.join(workdir, "t.tar")
    run("tar", "-c", "-f", out, f"--format={fmt}", "-C", src,
        *(names if fmt != "ustar" else ["./" + n for n in names]))
    from diskforge.blockdev import FileBackend
    with FileBackend(out) as b:
        members = {m.name: m for m in tar.index(b, out)}
        for n, data in names.items():
            m = members[n]
            assert m.is_file and m.size == len(data)
            assert b.pread(m.offset, m.size) == data
    assert tar.first_member_name(open(out, "rb").read(65536)) == "a.ovf"


def test_tar_base256_size():
    assert tar.number(bytes([0x80]) + (12 << 30).to_bytes(11, "big"), "x", "size", 0) \
        == 12 << 30
    assert tar.number(b"00000001750\0", "x", "size", 0) == 1000


# -- the CLI over packages -------------------------------------------------------------

@pytest.mark.parametrize("disk_fmt", ["qcow2", "raw", "vpc"])
def test_convert_reads_the_disk_in_place(workdir, disk_fmt):
    ova, disk = ubuntu_ova(workdir, disk_fmt)
    out = os.path.join(workdir, "out.qcow2")
    code, _, err = cli("convert", ova, out)
    assert code == 0, err
    ref = extract(ova, UBUNTU_DISK, os.path.join(workdir, "x"))
    run("qemu-img", "compare", "-f", "qcow2", out, ref)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, disk + ".src")
    run("qemu-img", "check", out)
    code, out_text, _ = cli("compare", ova, ref)
    assert code == 0, out_text


def test_info_shows_the_machine_and_the_disk(workdir):
    ova, _ = ubuntu_ova(workdir, "qcow2")
    code, out, err = cli("info", "--details", "--output", "json", ova)
    assert code == 0, err
    info = json.loads(out)
    assert (info["format"], info["virtual-size"]) == ("ova", 4 * MIB)
    data = info["format-specific"]["data"]
    assert data["package"] == "ova" and data["manifest"] == "ubuntu.2.0.mf"
    assert data["virtual-system"]["name"] == "ubuntu"
    assert data["virtual-system"]["memory"] == 512 * MIB
    assert data["disks"][0]["capacity"] == 8 << 30
    assert data["disk"] == {"number": 1, "disk-id": "vmdisk1", "file": UBUNTU_DISK,
                            "format": "qcow2"}
    assert info["diskforge"]["disk-info"]["format"] == "qcow2"
    code, out, _ = cli("info", ova)
    assert code == 0 and "file format: ova" in out and "cpus: 1" in out
    assert "format: qcow2" in out


def test_disk_by_number_by_name_and_by_id(workdir):
    d1 = make_disk(os.path.join(workdir, "one.qcow2"), "qcow2", 4 * MIB, seed=1)
    d2 = make_disk(os.path.join(workdir, "two.qcow2"), "qcow2", 2 * MIB, seed=2)
    ova = build_ova(os.path.join(workdir, "two.ova"),
                    two_disk_ovf("sys.qcow2", "data.qcow2"), "two.ovf",
                    {"sys.qcow2": d1, "data.qcow2": d2})
    for how in (["--disk", "2", ova], [ova + ":data.qcow2"], [ova + ":data"]):
        out = os.path.join(workdir, "o.raw")
        code, _, err = cli("convert", "-O", "raw", *how, out)
        assert code == 0, (how, err)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", out, d2 + ".src")
        os.remove(out)
    code, out, _ = cli("info", "--output", "json", ova)
    data = json.loads(out)["format-specific"]["data"]
    assert data["disk"]["disk-id"] == "system"
    assert [d["capacity"] for d in data["disks"]] == [4 * MIB, 2 * MIB]
    assert data["virtual-system"]["firmware"] == "efi"
    assert data["virtual-system"]["cpus"] == 2
    code, out, _ = cli("map", "--output", "json", "--disk", "2", ova)
    assert code == 0 and json.loads(out)[0]["start"] == 0
    code, out, _ = cli("compare", "--disk", "2", "--disk2", "2", ova, ova)
    assert code == 0
    code, out, err = cli("compare", "--disk", "2", ova, d2)     # --disk is image1's only
    assert code == 0, err
    code, out, _ = cli("compare", ova, d2)
    assert code == 1
    code, _, err = cli("info", "--disk", "3", ova)
    one_line_error(code, err)
    assert "has 2 disks" in err
    code, _, err = cli("info", ova + ":nothing")
    one_line_error(code, err)
    assert "no disk 'nothing'" in err and "sys.qcow2, data.qcow2" in err
    code, _, err = cli("info", "--disk", "1", d1)
    one_line_error(code, err)
    assert "hold one disk" in err


@pytest.mark.parametrize("alg,spelling", [("SHA256", "openssl"), ("SHA1", "openssl"),
                                          ("SHA512", "openssl"), ("SHA256", "tagged"),
                                          ("SHA256", "openssl3"), ("SHA256", "sums")])
def test_verify_checks_every_spelling(workdir, alg, spelling):
    ova, _ = ubuntu_ova(workdir, "qcow2", manifest=alg, spelling=spelling)
    code, out, err = cli("verify", ova)
    assert code == 0, out + err
    assert "verify passed" in out


def test_verify_reports_each_mismatch(workdir):
    ova, _ = ubuntu_ova(workdir, "raw", extra={"ubuntu.2.0.cert": b"SHA256(x)= 00\n"})
    code, out, err = cli("verify", ova)
    assert code == 0 and "not checked yet" in out, out + err
    # change one byte of the disk member's data, in the archive
    from diskforge.blockdev import FileBackend
    with FileBackend(ova) as b:
        m = {m.name: m for m in tar.index(b, ova)}[UBUNTU_DISK]
    with open(ova, "r+b") as f:
        f.seek(m.offset + 5)
        f.write(b"\xff")
    code, out, err = cli("verify", ova)
    assert code == 2, out + err
    assert f"SHA256({UBUNTU_DISK}) does not match" in out
    code, out, _ = cli("verify", "--output", "json", ova)
    report = json.loads(out)
    assert code == 2 and not report["verified"] and len(report["problems"]) == 1
    assert report["notes"] == ["certificate 'ubuntu.2.0.cert' present: not checked yet"]


def test_verify_without_a_manifest_is_an_error(workdir):
    ova, _ = ubuntu_ova(workdir, "qcow2", manifest=None)
    code, _, err = cli("verify", ova)
    assert code == 1
    one_line_error(code, err)
    assert "nothing to verify" in err


def test_ovf_folder_opens_its_disks_through_the_policy(workdir):
    """An .ovf with its disks beside it (ovftool's and VirtualBox's folder export)."""
    folder = os.path.join(workdir, "vm")
    os.makedirs(folder)
    disk = make_disk(os.path.join(folder, UBUNTU_DISK), "qcow2")
    shutil.copy(fixture("ubuntu.2.0.ovf"), folder)
    from ova_helpers import write_manifest
    write_manifest(folder, "ubuntu.2.0.mf", ["ubuntu.2.0.ovf", UBUNTU_DISK])
    ovf_path = os.path.join(folder, "ubuntu.2.0.ovf")
    out = os.path.join(workdir, "out.vhdx")
    code, _, err = cli("convert", ovf_path, out)
    assert code == 0, err
    run("qemu-img", "compare", out, disk)
    code, text, err = cli("verify", ovf_path)
    assert code == 0, text + err
    code, text, _ = cli("info", "--output", "json", ovf_path)
    assert json.loads(text)["format-specific"]["data"]["package"] == "ovf"
    code, text, _ = cli("map", "--output", "json", ovf_path)   # offsets of another file
    assert code == 0 and not any("offset" in e for e in json.loads(text))
    # the same descriptor naming a disk outside its folder: refused, unless allowed
    outside = make_disk(os.path.join(workdir, "outside.qcow2"), "qcow2")
    with open(ovf_path, "w") as f:
        f.write(_text("ubuntu.2.0.ovf").replace(UBUNTU_DISK, "../outside.qcow2"))
    code, _, err = cli("info", ovf_path)
    one_line_error(code, err)
    assert "outside the image's directory" in err
    code, _, err = cli("info", "--allow-root", workdir, ovf_path)
    assert code == 0, err
    assert os.path.exists(outside)


def test_chunked_disk(workdir):
    """ovftool's --chunkSize: the disk split into NAME.000000000, .000000001...
    (here by coreutils split), each chunk in the manifest, read joined in place."""
    need("split")
    disk = make_disk(os.path.join(workdir, "d.qcow2"), "qcow2", 8 * MIB)
    size = os.path.getsize(disk)
    chunk = 50000          # not a multiple of anything qcow2 aligns to: reads cross
    assert size > 2 * chunk
    run("split", "-b", str(chunk), "-d", "-a", "9", disk, disk + ".")
    chunks = {f"{UBUNTU_DISK}.{i:09d}": f"{disk}.{i:09d}" for i in range(-(-size // chunk))}
    text = _text("ubuntu.2.0.ovf").replace(
        'ovf:id="file1"', f'ovf:id="file1" ovf:size="{size}" ovf:chunkSize="{chunk}"')
    ova = build_ova(os.path.join(workdir, "chunks.ova"), text, "ubuntu.2.0.ovf", chunks)
    out = os.path.join(workdir, "out.raw")
    code, _, err = cli("convert", "-O", "raw", ova, out)
    assert code == 0, err
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, disk)
    code, text_out, err = cli("verify", ova)
    assert code == 0, text_out + err
    code, text_out, _ = cli("map", "--output", "json", ova)   # chunks: no one offset
    assert code == 0 and not any("offset" in e for e in json.loads(text_out))


def test_convert_refuses_writing_onto_the_package(workdir):
    ova, _ = ubuntu_ova(workdir, "raw")
    before = open(ova, "rb").read()
    code, _, err = cli("convert", "-O", "raw", ova, ova)
    one_line_error(code, err)
    assert open(ova, "rb").read() == before


# -- stream VMDK disks: the OVAs VMware and VirtualBox write --------------------------

def test_stream_vmdk_disk_converts(workdir):
    disk = make_disk(os.path.join(workdir, "d.vmdk"), "vmdk-stream")
    # ovftool's descriptor with qemu-img's stream VMDK in place of its own (ovf:size
    # follows the file: verify compares them)
    text = _text("vmware.ovf").replace('ovf:size="152576"',
                                       f'ovf:size="{os.path.getsize(disk)}"')
    ova = build_ova(os.path.join(workdir, "s.ova"), text, "vmware.ovf",
                    {"input.vmdk": disk})
    out = os.path.join(workdir, "out.qcow2")
    code, _, err = cli("convert", ova, out)
    assert code == 0, err
    run("qemu-img", "compare", out, extract(ova, "input.vmdk", os.path.join(workdir, "x")))
    code, text, err = cli("verify", ova)
    assert code == 0, text + err


def test_real_virtualbox_package(workdir):
    """COT's VirtualBox export as it was made: its own descriptor, manifest (SHA256) and
    streamOptimized disk, put in a tar in DSP0243's order."""
    stage = os.path.join(workdir, "stage")
    os.makedirs(stage)
    names = ["ubuntu.2.0.ovf", "ubuntu.2.0.mf", UBUNTU_DISK]
    for n in names:
        shutil.copy(fixture(n), stage)
    ova = os.path.join(workdir, "ubuntu.ova")
    run("tar", "-c", "-f", ova, "--format=ustar", "-C", stage, *names)
    code, text, err = cli("verify", ova)
    assert code == 0, text + err
    out = os.path.join(workdir, "out.raw")
    code, _, err = cli("convert", "-O", "raw", ova, out)
    assert code == 0, err
    assert os.path.getsize(out) == 8 << 30
    run("qemu-img", "compare", "-F", "vmdk", out, os.path.join(stage, UBUNTU_DISK))


def test_map_offsets_are_the_archives(workdir):
    """``map`` names the .ova, so "Mapped to" is where the bytes are in the .ova."""
    ova, disk = ubuntu_ova(workdir, "raw")
    code, out, err = cli("map", "--output", "json", ova)
    assert code == 0, err
    data = [e for e in json.loads(out) if e["data"]]
    assert data and all("offset" in e for e in data)
    src = open(disk + ".src", "rb").read()
    with open(ova, "rb") as f:
        for e in data:
            f.seek(e["offset"])
            assert f.read(e["length"]) == src[e["start"]:e["start"] + e["length"]]


def test_a_path_with_a_colon_that_exists_is_itself(workdir):
    ova, _ = ubuntu_ova(workdir, "qcow2")
    odd = ova + ":" + UBUNTU_DISK
    shutil.copy(ova, odd)
    code, out, err = cli("info", "--output", "json", odd)
    assert code == 0, err
    assert json.loads(out)["filename"] == odd


def test_untrusted_mode_reads_packages(workdir):
    ova, disk = ubuntu_ova(workdir, "qcow2")
    out = os.path.join(workdir, "u.raw")
    code, _, err = cli("--untrusted", "convert", "-O", "raw", ova, out)
    assert code == 0, err
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", out, disk + ".src")


def test_verify_compares_ovf_size_with_the_file(workdir):
    """ovftool's descriptor says ovf:size="152576" for input.vmdk; a raw disk of 1 MiB
    under that name is reported (the disk itself reads fine)."""
    disk = make_disk(os.path.join(workdir, "d.raw"), "raw", MIB)
    ova = build_ova(os.path.join(workdir, "s.ova"), _text("vmware.ovf"), "vmware.ovf",
                    {"input.vmdk": disk})
    code, out, err = cli("verify", ova)
    assert code == 2, out + err
    assert "'input.vmdk': References says ovf:size=152576, the file holds 1048576" in out
    code, out, err = cli("info", "--output", "json", ova)
    data = json.loads(out)["format-specific"]["data"]
    assert code == 0 and data["virtual-system"]["cpus"] == 2
    assert data["disks"][0]["capacity"] == 1 << 30 and data["disk"]["format"] == "raw"


def test_joined_chunks_read_as_one_file(workdir):
    import random

    from diskforge.blockdev import FileBackend
    from diskforge.formats.ova.package import Joined
    data = bytes((i * 7 + 3) % 256 for i in range(300000))
    parts = []
    for i, (a, b) in enumerate([(0, 100000), (100000, 200000), (200000, 300000)]):
        p = os.path.join(workdir, str(i))
        with open(p, "wb") as f:
            f.write(data[a:b])
        parts.append(FileBackend(p))
    with Joined(parts, "j") as j:
        rng = random.Random(1)
        for _ in range(500):
            o, n = rng.randrange(0, 310000), rng.randrange(0, 150000)
            assert j.pread(o, n) == data[o:o + n]
        assert sum(n for _, n, _ in j.data_ranges(50000, 10 ** 9)) == 250000
        with pytest.raises(Exception, match="read-only"):
            j.pwrite(0, b"x")
