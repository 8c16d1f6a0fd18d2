"""Building OVF packages for the tests: real descriptors from fixtures/ova (COT's
samples from VMware ovftool and VirtualBox), disks made by qemu-img, manifests in the
spellings tools write, and the archive made by GNU tar."""

from __future__ import annotations

import hashlib
import os
import shutil

from conftest import FIXTURES, need, run

OVA_FIXTURES = os.path.join(FIXTURES, "ova")
MIB = 1 << 20

SPELLINGS = {
    "openssl": lambda alg, name, hexd: f"{alg}({name})= {hexd}",          # DSP0243, ovftool
    "tagged": lambda alg, name, hexd: f"{alg} ({name}) = {hexd}",         # coreutils --tag
    "openssl3": lambda alg, name, hexd: f"{alg.replace('SHA', 'SHA2-')}({name})= {hexd}",
    "sums": lambda alg, name, hexd: f"{hexd}  {name}",                    # sha256sum
}


def fixture(name: str) -> str:
    return os.path.join(OVA_FIXTURES, name)


def make_disk(path: str, fmt: str, size: int = 4 * MIB, seed: int = 1) -> str:
    """A disk of ``size`` bytes with a few data runs (not all zeros, not all data), in
    ``fmt`` as qemu-img writes it; the raw contents are at ``path + '.src'``."""
    need("qemu-img")
    src = path + ".src"
    with open(src, "wb") as f:
        f.truncate(size)
        for i, off in enumerate((0, size // 3, size - 70000)):
            f.seek(off)
            f.write(bytes([(seed * 31 + i * 7 + j) % 251 + 1 for j in range(256)]) * 256)
    extra = ["-o", "subformat=streamOptimized"] if fmt == "vmdk-stream" else []
    run("qemu-img", "convert", "-q", "-f", "raw", "-O",
        "vmdk" if fmt == "vmdk-stream" else fmt, *extra, src, path)
    return path


def write_manifest(folder: str, name: str, files: list[str], alg: str = "SHA256",
                   spelling: str = "openssl") -> str:
    lines = []
    for f in files:
        h = hashlib.new(alg.lower().replace("-", ""))
        with open(os.path.join(folder, f), "rb") as fh:
            h.update(fh.read())
        lines.append(SPELLINGS[spelling](alg, f, h.hexdigest()))
    with open(os.path.join(folder, name), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return name


def build_ova(out: str, ovf_text: "str | bytes", ovf_name: str, disks: dict[str, str], *,
              manifest: str | None = "SHA256", spelling: str = "openssl",
              tar_format: str = "ustar", extra: dict[str, bytes] | None = None) -> str:
    """``out`` made by GNU tar: the descriptor first, then its manifest (over the
    descriptor and every disk), then the disks (``name -> file to copy``) and
    ``extra`` members, in that order (DSP0243's)."""
    need("tar")
    stage = out + ".stage"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    data = ovf_text.encode() if isinstance(ovf_text, str) else ovf_text
    with open(os.path.join(stage, ovf_name), "wb") as f:
        f.write(data)
    for name, src in disks.items():
        shutil.copy(src, os.path.join(stage, name))
    for name, content in (extra or {}).items():
        with open(os.path.join(stage, name), "wb") as f:
            f.write(content)
    names = [ovf_name]
    if manifest:
        names.append(write_manifest(stage, ovf_name[:-4] + ".mf", [ovf_name, *disks],
                                    manifest, spelling))
    names += list(disks) + list(extra or {})
    run("tar", "-c", "-f", out, f"--format={tar_format}", "--owner=0", "--group=0",
        "-C", stage, *names)
    return out


def extract(ova: str, name: str, dest: str) -> str:
    """One member extracted by GNU tar: the reference the converted disk is compared
    with."""
    os.makedirs(dest, exist_ok=True)
    run("tar", "-x", "-f", ova, "-C", dest, name)
    return os.path.join(dest, name)


def two_disk_ovf(disk1: str, disk2: str, fmt_uri: str = "http://www.gnome.org/~markmc/"
                 "qcow-image-format.html", cap1: int = 4 * MIB, cap2: int = 2 * MIB) -> str:
    """A small OVF 1.0 descriptor of our own with two disks (the COT samples have one
    disk each)."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="{disk1}" ovf:id="file1"/>
    <File ovf:href="{disk2}" ovf:id="file2"/>
  </References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{cap1}" ovf:diskId="system" ovf:fileRef="file1" ovf:format="{fmt_uri}"/>
    <Disk ovf:capacity="{cap2 // MIB}" ovf:capacityAllocationUnits="byte * 2^20"
          ovf:diskId="data" ovf:fileRef="file2" ovf:format="{fmt_uri}"/>
  </DiskSection>
  <VirtualSystem ovf:id="two">
    <Info>a machine</Info><Name>two-disks</Name>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:ElementName>2 CPUs</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>mem</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>SCSI 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:ElementName>disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/system</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:ElementName>disk 2</rasd:ElementName><rasd:HostResource>ovf:/disk/data</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def vmdk_readable() -> bool:
    """True once a vmdk plugin that reads is installed (the reader is another branch)."""
    from diskforge import registry
    from diskforge.errors import UnknownFormatError
    try:
        return registry.get("vmdk").can_read
    except UnknownFormatError:
        return False
