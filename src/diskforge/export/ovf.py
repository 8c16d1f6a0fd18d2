"""The OVF 1.0 envelope: writing one for a single-disk VM, and reading what the
checkers need from one.

Structure from DMTF DSP0243 1.0 ("Open Virtualization Format Specification"):
``Envelope`` holds ``References`` (one ``File`` per file of the package), then the
sections (``DiskSection``: one ``Disk`` per disk, with ``ovf:capacity``,
``ovf:fileRef`` and ``ovf:format``; ``NetworkSection``), then the ``VirtualSystem``
with its ``OperatingSystemSection`` and ``VirtualHardwareSection``; every section
starts with an ``Info``. Hardware items are CIM ``RASD`` records whose elements come
in the schema's (alphabetical) order, which strict readers (ovftool) enforce:
ResourceType 3 processor, 4 memory, 6 SCSI controller, 10 Ethernet adapter, 17 disk
drive (DSP0243 and CIM_ResourceAllocationSettingData).

The disk format URI must be exact: VMware's stream-optimized VMDK is
``http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized``;
vSphere and VirtualBox refuse a disk whose ``ovf:format`` differs by a character.

Written as text (not by a serializer) so elements use the default namespace and only
attributes carry the ``ovf:`` prefix, as VMware's and VirtualBox's exports do; every
value is escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
RASD_NS = CIM + "CIM_ResourceAllocationSettingData"
VSSD_NS = CIM + "CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
VMDK_STREAM_URI = ("http://www.vmware.com/interfaces/specifications/vmdk.html"
                   "#streamOptimized")
NETWORK = "VM Network"
# OperatingSystemSection ovf:id (CIM_OperatingSystem.OsType): 101 "Linux 64-Bit"
OS_ID, VMW_OS_TYPE = 101, "otherLinux64Guest"
VIRTUAL_SYSTEM_TYPE = "vmx-10"   # ESXi 5.5 and later, Workstation 10 and later


@dataclass
class Vm:
    """The virtual machine an OVF descriptor is written for."""
    name: str
    disk_file: str
    disk_file_size: int
    capacity: int                 # bytes
    cpus: int = 1
    memory_mib: int = 1024
    firmware: str = "bios"


def _item(fields: list[tuple[str, str]]) -> str:
    """A hardware ``Item``: RASD elements sorted by name, as the CIM schema orders them."""
    inner = "".join(f"        <rasd:{k}>{escape(v)}</rasd:{k}>\n"
                    for k, v in sorted(fields))
    return f"      <Item>\n{inner}      </Item>\n"


def envelope(vm: Vm) -> bytes:
    """The ``.ovf`` descriptor of a one-disk VM, UTF-8."""
    name = escape(vm.name)
    items = [
        _item([("AllocationUnits", "hertz * 10^6"),
               ("Description", "Number of Virtual CPUs"),
               ("ElementName", f"{vm.cpus} virtual CPU(s)"), ("InstanceID", "1"),
               ("ResourceType", "3"), ("VirtualQuantity", str(vm.cpus))]),
        _item([("AllocationUnits", "byte * 2^20"), ("Description", "Memory Size"),
               ("ElementName", f"{vm.memory_mib}MB of memory"), ("InstanceID", "2"),
               ("ResourceType", "4"), ("VirtualQuantity", str(vm.memory_mib))]),
        _item([("Address", "0"), ("Description", "SCSI Controller"),
               ("ElementName", "SCSI Controller 0"), ("InstanceID", "3"),
               ("ResourceSubType", "lsilogic"), ("ResourceType", "6")]),
        _item([("AddressOnParent", "0"), ("ElementName", "Hard Disk 1"),
               ("HostResource", "ovf:/disk/vmdisk1"), ("InstanceID", "4"),
               ("Parent", "3"), ("ResourceType", "17")]),
        _item([("AddressOnParent", "7"), ("AutomaticAllocation", "true"),
               ("Connection", NETWORK), ("Description", f"VmxNet3 ethernet adapter on"
                                                        f" \"{NETWORK}\""),
               ("ElementName", "Network adapter 1"), ("InstanceID", "5"),
               ("ResourceSubType", "VmxNet3"), ("ResourceType", "10")]),
    ]
    firmware = ('      <vmw:Config ovf:required="false" vmw:key="firmware"'
                ' vmw:value="efi"/>\n' if vm.firmware == "efi" else "")
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}" xmlns:rasd="{RASD_NS}"'
        f' xmlns:vssd="{VSSD_NS}" xmlns:vmw="{VMW_NS}"'
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
        '  <References>\n'
        f'    <File ovf:href={quoteattr(vm.disk_file)} ovf:id="file1"'
        f' ovf:size="{vm.disk_file_size}"/>\n'
        '  </References>\n'
        '  <DiskSection>\n'
        '    <Info>Virtual disk information</Info>\n'
        f'    <Disk ovf:capacity="{vm.capacity}" ovf:capacityAllocationUnits="byte"'
        f' ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="{VMDK_STREAM_URI}"/>\n'
        '  </DiskSection>\n'
        '  <NetworkSection>\n'
        '    <Info>The list of logical networks</Info>\n'
        f'    <Network ovf:name="{NETWORK}">\n'
        f'      <Description>The {NETWORK} network</Description>\n'
        '    </Network>\n'
        '  </NetworkSection>\n'
        f'  <VirtualSystem ovf:id={quoteattr(vm.name)}>\n'
        '    <Info>A virtual machine</Info>\n'
        f'    <Name>{name}</Name>\n'
        f'    <OperatingSystemSection ovf:id="{OS_ID}" vmw:osType="{VMW_OS_TYPE}">\n'
        '      <Info>The kind of installed guest operating system</Info>\n'
        '    </OperatingSystemSection>\n'
        '    <VirtualHardwareSection>\n'
        '      <Info>Virtual hardware requirements</Info>\n'
        '      <System>\n'
        '        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n'
        '        <vssd:InstanceID>0</vssd:InstanceID>\n'
        f'        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>\n'
        f'        <vssd:VirtualSystemType>{VIRTUAL_SYSTEM_TYPE}</vssd:VirtualSystemType>\n'
        '      </System>\n'
        + "".join(items) + firmware +
        '    </VirtualHardwareSection>\n'
        '  </VirtualSystem>\n'
        '</Envelope>\n')
    return text.encode("utf-8")


# -- reading (for the checkers) ------------------------------------------------------------

@dataclass
class DiskRef:
    """A disk as an OVF descriptor names it, for the checkers."""
    disk_id: str
    file: str | None        # the href of the File it names
    format: str | None
    capacity: int | None    # bytes, when the units are understood


def read_envelope(data: bytes) -> tuple[list[tuple[str, str, int | None]], list[DiskRef]]:
    """``(files, disks)`` of a descriptor: each File's ``(id, href, size)`` and each
    Disk. No DTD or entity is allowed (refused before parsing, so none expands);
    raises ValueError for anything that is not an OVF 1.x envelope."""
    import xml.etree.ElementTree as ET
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError("the descriptor declares a DTD or entities")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"the descriptor is not well-formed XML ({e})") from None
    if root.tag != f"{{{OVF_NS}}}Envelope":
        raise ValueError(f"the root element is {root.tag}, not an OVF 1.x Envelope"
                         f" ({{{OVF_NS}}}Envelope)")
    q = f"{{{OVF_NS}}}"
    files = []
    for f in root.iter(f"{q}File"):
        size = f.get(f"{q}size")
        files.append((f.get(f"{q}id") or "", f.get(f"{q}href") or "",
                      int(size) if size and size.isdigit() else None))
    by_id = {fid: href for fid, href, _ in files}
    disks = []
    for d in root.iter(f"{q}Disk"):
        cap = d.get(f"{q}capacity")
        units = d.get(f"{q}capacityAllocationUnits") or "byte"
        capacity = None
        if cap and cap.isdigit():
            scale = _UNITS.get(units.replace(" ", ""))
            capacity = int(cap) * scale if scale else None
        ref = d.get(f"{q}fileRef")
        disks.append(DiskRef(d.get(f"{q}diskId") or "", by_id.get(ref) if ref else None,
                             d.get(f"{q}format"), capacity))
    return files, disks


_UNITS = {"byte": 1, "byte*2^10": 1 << 10, "byte*2^20": 1 << 20, "byte*2^30": 1 << 30,
          "byte*2^40": 1 << 40}
