"""The libvirt domain XML for one exported disk: what ``virt-install --import`` would
define (https://libvirt.org/formatdomain.html): name, UUID, memory, vCPUs, firmware
(BIOS, or UEFI with ``<os firmware="efi">``, which libvirt resolves to the host's
OVMF), the machine type, the disk (driver, source, target, bus), one NIC on libvirt's
``default`` network, a serial console.

Built with ElementTree so every value is escaped; the result is what
``virt-xml-validate FILE domain`` accepts (tests/test_export_libvirt.py).
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass


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


_TARGET_DEV = {"virtio": "vda", "scsi": "sda", "sata": "sda"}


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
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    driver = {"name": "qemu", "type": m.disk_format}
    if m.cache:
        driver["cache"] = m.cache
    ET.SubElement(disk, "driver", **driver)
    ET.SubElement(disk, "source", file=m.disk_path)
    ET.SubElement(disk, "target", dev=_TARGET_DEV[m.bus], bus=m.bus)
    if m.bus == "scsi":
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network="default")
    ET.SubElement(nic, "model", type=m.nic_model)
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
