"""The libvirt domain XML for one exported disk: what ``virt-install --import`` would
define (https://libvirt.org/formatdomain.html): name, UUID, memory, vCPUs, firmware
(BIOS, or UEFI with ``<os firmware="efi">``, which libvirt resolves to the host's
OVMF), the machine type, the disk (driver, source, target, bus), one NIC on libvirt's
``default`` network, a serial console.

A machine with several disks (``import`` of an OVA) lists them in ``Machine.disks``
(each with its own bus, and for SCSI the controller model: one SCSI controller per
model, disks addressed to theirs) and its NIC models in ``Machine.nics``; the export
targets leave both empty and describe their one disk and NIC with the flat fields.

Built with ElementTree so every value is escaped; the result is what
``virt-xml-validate FILE domain`` accepts (tests/test_export_libvirt.py).
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass
class DiskSpec:
    """One disk of a machine with several: its file, format and bus (virtio, scsi,
    sata); ``scsi_model`` is the libvirt SCSI controller model it hangs on."""
    path: str
    format: str = "qcow2"
    bus: str = "virtio"
    scsi_model: str = "virtio-scsi"


@dataclass
class Machine:
    """What the XML says about the machine; the targets fill it in."""
    name: str
    disk_path: str
    disk_format: str = "qcow2"
    memory_mib: int = 1024
    cpus: int = 1
    firmware: str = "bios"          # or "efi"
    machine: str = "q35"
    bus: str = "virtio"             # virtio, scsi (with a virtio-scsi controller), sata
    nic_model: str = "virtio"
    cache: str | None = None        # the disk driver's cache mode, when a target sets one
    uuid: str | None = None
    disks: list[DiskSpec] = field(default_factory=list)   # empty: the one disk above
    nics: list[str] | None = None   # NIC models; None: one NIC of ``nic_model``


_DEV_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd"}


def _dev_name(prefix: str, n: int) -> str:
    """The n-th (0-based) target name as libvirt spells them: sda .. sdz, sdaa .."""
    letters = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return prefix + letters


def domain_xml(m: Machine) -> bytes:
    """The ``<domain>`` document, UTF-8, with an XML declaration."""
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = m.name
    ET.SubElement(dom, "uuid").text = m.uuid or str(uuid.uuid4())
    ET.SubElement(dom, "memory", unit="MiB").text = str(m.memory_mib)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(m.memory_mib)
    ET.SubElement(dom, "vcpu", placement="static").text = str(m.cpus)
    os_el = ET.SubElement(dom, "os", **({"firmware": "efi"} if m.firmware == "efi" else {}))
    ET.SubElement(os_el, "type", arch="x86_64", machine=m.machine).text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "cpu", mode="host-model")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    disks = m.disks or [DiskSpec(m.disk_path, m.disk_format, m.bus)]
    scsi_models = list(dict.fromkeys(d.scsi_model for d in disks if d.bus == "scsi"))
    used = {prefix: 0 for prefix in _DEV_PREFIX.values()}
    units = [0] * len(scsi_models)
    for d in disks:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        driver = {"name": "qemu", "type": d.format}
        if m.cache:
            driver["cache"] = m.cache
        ET.SubElement(disk, "driver", **driver)
        ET.SubElement(disk, "source", file=d.path)
        prefix = _DEV_PREFIX[d.bus]
        ET.SubElement(disk, "target", dev=_dev_name(prefix, used[prefix]), bus=d.bus)
        used[prefix] += 1
        if d.bus == "scsi" and len(scsi_models) > 1:
            index = scsi_models.index(d.scsi_model)
            ET.SubElement(disk, "address", type="drive", controller=str(index), bus="0",
                          target="0", unit=str(units[index]))
            units[index] += 1
    for index, model in enumerate(scsi_models):
        ET.SubElement(devices, "controller", type="scsi", index=str(index), model=model)
    for model in ([m.nic_model] if m.nics is None else m.nics):
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network="default")
        ET.SubElement(nic, "model", type=model)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.indent(dom)
    return ET.tostring(dom, encoding="utf-8", xml_declaration=True) + b"\n"


def read_domain(data: bytes) -> ET.Element:
    """Parse a domain XML for checking: no DTD, no entities (a document that declares
    them is refused before parsing, so none can expand)."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError("the XML declares a DTD or entities")
    return ET.fromstring(data)
