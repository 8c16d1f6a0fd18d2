"""import vm.ova: OVAs built by GNU tar from real OVF descriptors (COT's samples from
VMware ovftool and VirtualBox, fixtures/ova) and disks made by qemu-img; each output
disk compared by qemu-img with the member GNU tar extracts, the domain XML checked by
virt-xml-validate and parsed; hostile descriptors; an interrupted import leaves
nothing."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest
from conftest import cli, need, one_line_error, qemu_img_json, run
from ova_helpers import MIB, build_ova, extract, fixture, make_disk, two_disk_ovf

import diskforge
from diskforge.errors import DiskforgeError


def validate(xml_path: str) -> ET.Element:
    need("virt-xml-validate")
    run("virt-xml-validate", xml_path, "domain")
    return ET.parse(xml_path).getroot()


def machine(dom: ET.Element) -> dict:
    """What the domain says, in the terms the tests check."""
    disks = dom.findall("devices/disk")
    return {"cpus": int(dom.findtext("vcpu")),
            "memory": (dom.find("memory").get("unit"), int(dom.findtext("memory"))),
            "firmware": dom.find("os").get("firmware", "bios"),
            "buses": [d.find("target").get("bus") for d in disks],
            "files": [os.path.basename(d.find("source").get("file")) for d in disks],
            "formats": [d.find("driver").get("type") for d in disks],
            "scsi": [c.get("model") for c in dom.findall("devices/controller")
                     if c.get("type") == "scsi"],
            "nics": [n.find("model").get("type") for n in dom.findall("devices/interface")]}


def same_disk(out: str, ova: str, member: str, tmp_path) -> None:
    """``out`` holds what GNU tar extracts for ``member`` (qemu-img compare, which takes
    a larger image's tail as equal when it reads as zeros)."""
    ref = extract(ova, member, str(tmp_path / "ref"))
    run("qemu-img", "compare", "-q", ref, out)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Our two-disk OVA (a qcow2 and a VHD on an LSI Logic SCSI controller, EFI)."""
    d = tmp_path_factory.mktemp("two")
    a = make_disk(str(d / "a.qcow2"), "qcow2")
    b = make_disk(str(d / "b.vhd"), "vpc", 2 * MIB, seed=2)
    return build_ova(str(d / "two.ova"), two_disk_ovf("sys.qcow2", "data.vhd"), "two.ovf",
                     {"sys.qcow2": a, "data.vhd": b})


def test_two_disks_converted_and_described(two, tmp_path):
    out = tmp_path / "vms"
    code, stdout, err = cli("import", two, str(out))
    assert code == 0, err
    written = stdout.split()
    assert written == [str(out / "sys.qcow2"), str(out / "data.qcow2"),
                       str(out / "two-disks.xml")]
    assert sorted(os.listdir(out)) == ["data.qcow2", "sys.qcow2", "two-disks.xml"]
    for name, member in (("sys.qcow2", "sys.qcow2"), ("data.qcow2", "data.vhd")):
        assert qemu_img_json("info", str(out / name))["format"] == "qcow2"
        run("qemu-img", "check", "-q", str(out / name))
        same_disk(str(out / name), two, member, tmp_path)
    m = machine(validate(str(out / "two-disks.xml")))
    assert m == {"cpus": 2, "memory": ("MiB", 2048), "firmware": "efi",
                 "buses": ["scsi", "scsi"], "files": ["sys.qcow2", "data.qcow2"],
                 "formats": ["qcow2", "qcow2"], "scsi": ["lsilogic"], "nics": []}


def test_output_format_options_and_overrides(two, tmp_path):
    out = tmp_path / "o"
    code, _, err = cli("import", "-O", "vpc", "-o", "subformat=fixed", "--cpus", "3",
                       "--memory", "512", "--bus", "virtio", "--firmware", "bios",
                       "--name", "web", "-q", two, str(out))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["data.vhd", "sys.vhd", "web.xml"]
    # qemu-img probes a fixed VHD (a footer only) as raw: name the format
    info = qemu_img_json("info", "-f", "vpc", str(out / "sys.vhd"))
    assert os.path.getsize(out / "sys.vhd") == info["virtual-size"] + 512
    ref = extract(two, "sys.qcow2", str(tmp_path / "ref"))
    run("qemu-img", "compare", "-q", "-F", "vpc", ref, str(out / "sys.vhd"))
    m = machine(validate(str(out / "web.xml")))
    assert (m["cpus"], m["memory"], m["firmware"], m["buses"], m["formats"]) == \
        (3, ("MiB", 512), "bios", ["virtio", "virtio"], ["vpc", "vpc"])


def test_dry_run_and_json_write_nothing(two, tmp_path):
    out = tmp_path / "dry"
    code, stdout, err = cli("import", "--dry-run", two, str(out))
    assert code == 0, err
    assert not out.exists()
    assert stdout.splitlines()[0] == ("VM 'two-disks': 2 CPUs, 2048 MiB, firmware efi,"
                                      " machine q35")
    assert "bus scsi (lsilogic)" in stdout
    code, stdout, err = cli("import", "--dry-run", "--output", "json", two, str(out))
    assert code == 0, err
    report = json.loads(stdout)
    assert not out.exists()
    assert report["dry-run"] is True and report["cpus"] == 2
    assert [(d["disk-id"], d["source-format"], d["bus"]) for d in report["disks"]] == \
        [("system", "qcow2", "scsi"), ("data", "vpc", "scsi")]
    # qemu-img's VHD size is rounded to its CHS geometry, past the OVF's 2 MiB capacity
    assert report["disks"][1]["virtual-size"] == qemu_img_json(
        "info", extract(two, "data.vhd", str(tmp_path / "x")))["virtual-size"]
    assert any("ovf:capacity 2097152" in n for n in report["notes"])


def test_python_api(two, tmp_path):
    plan = diskforge.import_ova(two, tmp_path / "api", fmt="raw", nic_model="e1000e")
    assert [os.path.basename(d.output) for d in plan.disks] == ["sys.raw", "data.raw"]
    same_disk(str(tmp_path / "api" / "sys.raw"), two, "sys.qcow2", tmp_path)
    assert machine(validate(plan.xml))["formats"] == ["raw", "raw"]
    with pytest.raises(DiskforgeError, match="unknown import option"):
        diskforge.import_ova(two, tmp_path / "api2", colour="blue")


# -- real descriptors ------------------------------------------------------------------------

REAL = {
    # descriptor: (cpus, MiB, firmware, buses, SCSI models, NIC models)
    "vmware.ovf": (2, 1536, "bios", ["scsi"], ["virtio-scsi"], ["e1000"] * 4),
    "ubuntu.2.0.ovf": (1, 512, "bios", ["sata"], [], ["e1000"]),
    "input.ovf": (4, 4096, "bios", ["scsi"], ["lsilogic"], ["virtio"] * 3),
    "v0.9.ovf": (1, 8192, "bios", ["virtio"], [], ["pcnet"]),
}


@pytest.mark.parametrize("descriptor, disk_format",
                         [(d, "qcow2") for d in sorted(REAL)] +
                         [("vmware.ovf", "vmdk-stream"), ("input.ovf", "raw"),
                          ("ubuntu.2.0.ovf", "vpc")])
def test_real_descriptors(descriptor, disk_format, tmp_path):
    """COT's descriptors, each with a disk made by qemu-img (qcow2, raw, VHD, stream
    VMDK) under the file name the descriptor references (the disk's format is probed,
    never taken from the descriptor)."""
    from diskforge.formats.ova.ovf import parse
    with open(fixture(descriptor), "rb") as f:
        text = f.read()
    env = parse(text, descriptor)
    disk = make_disk(str(tmp_path / "d.img"), disk_format)
    href = env.disks[0].file.href
    extra = {f.href: b"not a disk\n" for f in env.files if f.href != href}
    ova = build_ova(str(tmp_path / "vm.ova"), text, descriptor, {href: disk},
                    manifest=None, extra=extra)
    out = tmp_path / "out"
    code, stdout, err = cli("import", ova, str(out))
    assert code == 0, err
    name = os.path.splitext(href)[0] + ".qcow2"
    xml = [p for p in stdout.split() if p.endswith(".xml")][0]
    assert sorted(os.listdir(out)) == sorted([name, os.path.basename(xml)])
    same_disk(str(out / name), ova, href, tmp_path)
    assert qemu_img_json("info", str(out / name))["virtual-size"] == \
        env.disks[0].capacity        # the VM was given the descriptor's capacity
    m = machine(validate(xml))
    cpus, mib, firmware, buses, scsi, nics = REAL[descriptor]
    assert (m["cpus"], m["memory"], m["firmware"], m["buses"], m["scsi"], m["nics"]) == \
        (cpus, ("MiB", mib), firmware, buses, scsi, nics)
    assert m["files"] == [name]


def test_real_virtualbox_package_with_stream_vmdk(tmp_path):
    """VirtualBox's own export (descriptor, manifest, stream VMDK) as COT ships it."""
    ova = build_ova(str(tmp_path / "ubuntu.ova"), open(fixture("ubuntu.2.0.ovf"),
                                                       "rb").read(),
                    "ubuntu.2.0.ovf", {"ubuntu.2.0-disk1.vmdk":
                                       fixture("ubuntu.2.0-disk1.vmdk")})
    code, _, err = cli("import", ova, str(tmp_path / "out"))
    assert code == 0, err
    same_disk(str(tmp_path / "out" / "ubuntu.2.0-disk1.qcow2"), ova,
              "ubuntu.2.0-disk1.vmdk", tmp_path)


def test_folder_ovf(tmp_path):
    """A folder export: the .ovf with its disks beside it."""
    folder = tmp_path / "export"
    folder.mkdir()
    make_disk(str(folder / "sys.qcow2"), "qcow2")
    make_disk(str(folder / "data.vhd"), "vpc", 2 * MIB, seed=2)
    (folder / "two.ovf").write_text(two_disk_ovf("sys.qcow2", "data.vhd"))
    code, _, err = cli("import", str(folder / "two.ovf"), str(tmp_path / "out"))
    assert code == 0, err
    run("qemu-img", "compare", "-q", str(folder / "sys.qcow2"),
        str(tmp_path / "out" / "sys.qcow2"))
    run("qemu-img", "compare", "-q", str(folder / "data.vhd"),
        str(tmp_path / "out" / "data.qcow2"))
    assert machine(validate(str(tmp_path / "out" / "two-disks.xml")))["buses"] == \
        ["scsi", "scsi"]


def test_round_trip_export_then_import(tmp_path):
    """export --to ova, then import: the disk comes back bit for bit, CPUs, memory and
    firmware survive."""
    src = make_disk(str(tmp_path / "src.qcow2"), "qcow2", 6 * MIB)
    ova = str(tmp_path / "web.ova")
    code, _, err = cli("export", "--to", "ova", "--cpus", "3", "--memory", "768",
                       "--firmware", "efi", "--name", "web", src, ova)
    assert code == 0, err
    code, stdout, err = cli("import", ova, str(tmp_path / "back"))
    assert code == 0, err
    disk = [p for p in stdout.split() if not p.endswith(".xml")]
    assert len(disk) == 1
    run("qemu-img", "compare", "-q", src, disk[0])
    m = machine(validate(str(tmp_path / "back" / "web.xml")))
    assert (m["cpus"], m["memory"], m["firmware"]) == (3, ("MiB", 768), "efi")


# -- hostile descriptors, missing disks, interruptions -------------------------------------------

def _variant(tmp_path, ovf_text: str, disks: dict[str, str] | None = None) -> str:
    a = make_disk(str(tmp_path / "a.qcow2"), "qcow2")
    b = make_disk(str(tmp_path / "b.qcow2"), "qcow2", 2 * MIB, seed=2)
    if disks is None:
        disks = {"sys.qcow2": a, "data.qcow2": b}
    return build_ova(str(tmp_path / "bad.ova"), ovf_text, "bad.ovf", disks, manifest=None)


BASE = two_disk_ovf("sys.qcow2", "data.qcow2")


@pytest.mark.parametrize("case, text, field", [
    ("cpus", BASE.replace("<rasd:VirtualQuantity>2</", "<rasd:VirtualQuantity>100000</"),
     "VirtualQuantity"),
    ("memory", BASE.replace(">2048<", ">99999999999999<"), "VirtualQuantity"),
    ("zero-cpus", BASE.replace("<rasd:VirtualQuantity>2</", "<rasd:VirtualQuantity>0</"),
     "VirtualQuantity"),
    ("href", BASE.replace('ovf:href="data.qcow2"', 'ovf:href="../data.qcow2"'),
     "File.href"),
    ("missing", BASE.replace('ovf:href="data.qcow2"', 'ovf:href="gone.qcow2"'), "gone"),
    ("nics", BASE.replace("<vmw:Config", "<Item><rasd:InstanceID>9</rasd:InstanceID>"
                          "<rasd:ResourceType>10</rasd:ResourceType></Item>" * 65
                          + "<vmw:Config"), "ResourceType=10"),
])
def test_hostile_descriptor_one_line_nothing_written(case, text, field, tmp_path):
    ova = _variant(tmp_path, text)
    out = tmp_path / "out"
    code, stdout, err = cli("import", ova, str(out))
    one_line_error(code, err)
    assert field in err and "bad.ova" in err
    assert not out.exists()


def test_hostile_names_stay_in_outdir(tmp_path):
    """Names from the descriptor never become paths: a VM name and file names with
    ../ and slashes give plain names inside OUTDIR."""
    a = make_disk(str(tmp_path / "a.qcow2"), "qcow2")
    out = tmp_path / "out"
    text = BASE.replace("<Name>two-disks</Name>", "<Name>../../etc/evil</Name>") \
        .replace('"sys.qcow2"', '"sub/x.qcow2"')
    ova = build_ova(str(tmp_path / "names.ova"), text, "names.ovf",
                    {"data.qcow2": a}, manifest=None)
    # GNU tar cannot take the member sub/x.qcow2 from a flat stage: add it by itself
    os.makedirs(tmp_path / "t" / "sub")
    os.link(a, tmp_path / "t" / "sub" / "x.qcow2")
    run("tar", "-r", "-f", ova, "-C", str(tmp_path / "t"), "sub/x.qcow2")
    code, stdout, err = cli("import", ova, str(out))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["data.qcow2", "evil.xml", "x.qcow2"]
    assert not (tmp_path / "etc").exists()
    assert machine(validate(str(out / "evil.xml")))["files"] == ["x.qcow2", "data.qcow2"]
    assert ET.parse(out / "evil.xml").getroot().findtext("name") == "evil"


def test_safe_names():
    from diskforge.export.importer import safe_name
    assert safe_name("../../etc/passwd", "d") == "passwd"
    assert safe_name("C:\\vms\\disk 1.vmdk", "d") == "disk_1.vmdk"
    assert safe_name("..", "d") == "d" and safe_name(".bashrc", "d") == "bashrc"
    assert safe_name("a\x00b\nc", "d") == "a_b_c"
    assert len(safe_name("x" * 500, "d")) == 100


def test_empty_disk_created_from_capacity(tmp_path):
    text = BASE.replace('ovf:fileRef="file2" ', "")
    ova = _variant(tmp_path, text, {"sys.qcow2": make_disk(str(tmp_path / "s.qcow2"),
                                                           "qcow2")})
    code, stdout, err = cli("import", ova, str(tmp_path / "out"))
    assert code == 0, err
    info = qemu_img_json("info", str(tmp_path / "out" / "data.qcow2"))
    assert info["virtual-size"] == 2 * MIB
    assert qemu_img_json("map", str(tmp_path / "out" / "data.qcow2"))[0]["data"] is False
    # an absurd capacity: the writer's own limit, one line naming the output and disk
    huge = text.replace('ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^20"',
                        'ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^60"')
    assert huge != text
    ova = _variant(tmp_path, huge, {"sys.qcow2": str(tmp_path / "s.qcow2")})
    code, _, err = cli("import", ova, str(tmp_path / "huge"))
    one_line_error(code, err)
    assert "data.qcow2: disk 2 'data' (1152921504606846976 bytes)" in err
    assert not (tmp_path / "huge").exists()


def test_existing_output_refused_untouched(two, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.qcow2").write_bytes(b"keep me")
    code, _, err = cli("import", two, str(out))
    one_line_error(code, err)
    assert "exists already" in err
    assert sorted(os.listdir(out)) == ["data.qcow2"]
    assert (out / "data.qcow2").read_bytes() == b"keep me"


def test_interrupted_import_leaves_nothing(two, tmp_path):
    """Ctrl-C while the second disk is being written: the first disk, already
    complete, is not left behind either; nor is the directory the import made."""
    out = tmp_path / "new" / "dir"
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if done > 4 * MIB:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        diskforge.import_ova(two, out, progress=progress)
    assert calls and not out.exists()
    assert os.listdir(tmp_path / "new") == []
    # into an existing directory: it stays, empty
    out = tmp_path / "existing"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        diskforge.import_ova(two, out, progress=progress)
    assert os.listdir(out) == []


def test_failing_second_disk_leaves_nothing(tmp_path):
    """The second disk is truncated in the package: the import fails with one line
    before anything is written."""
    a = make_disk(str(tmp_path / "a.qcow2"), "qcow2")
    short = tmp_path / "short.qcow2"
    short.write_bytes(open(a, "rb").read()[:300])
    ova = _variant(tmp_path, BASE, {"sys.qcow2": a, "data.qcow2": str(short)})
    code, _, err = cli("import", ova, str(tmp_path / "out"))
    one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_domain_xml_mixed_buses_and_scsi_models(tmp_path):
    """Two SCSI models get a controller each and the disks an address on theirs;
    target names count per prefix (vd*, sd* shared by SCSI and SATA)."""
    from diskforge.export.domain_xml import DiskSpec, Machine, domain_xml
    m = Machine(name="mixed", disk_path="", nics=["e1000", "virtio"],
                disks=[DiskSpec("/v/a.qcow2", bus="scsi", scsi_model="lsilogic"),
                       DiskSpec("/v/b.qcow2", bus="sata"),
                       DiskSpec("/v/c.qcow2", bus="scsi", scsi_model="vmpvscsi"),
                       DiskSpec("/v/d.qcow2", bus="virtio"),
                       DiskSpec("/v/e.qcow2", bus="scsi", scsi_model="lsilogic")])
    path = tmp_path / "mixed.xml"
    path.write_bytes(domain_xml(m))
    dom = validate(str(path))
    disks = dom.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["sda", "sdb", "sdc", "vda",
                                                           "sdd"]
    assert [(a.get("controller"), a.get("unit")) for a in
            (d.find("address") for d in disks) if a is not None] == \
        [("0", "0"), ("1", "0"), ("0", "1")]
    assert machine(dom)["scsi"] == ["lsilogic", "vmpvscsi"]
    assert machine(dom)["nics"] == ["e1000", "virtio"]
