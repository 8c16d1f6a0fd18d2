"""libvirt (virt-manager, virsh, KVM hosts): a qcow2 disk and the domain XML that
``virsh define`` takes, what ``virt-install --import`` would make.

Rules: libvirt's domain format (https://libvirt.org/formatdomain.html, schema
``domain.rng``, checked by ``virt-xml-validate``); a disk's ``<driver type>`` must
name the file's real format (libvirt never probes, https://libvirt.org/kbase/backing_chains.html),
and the disk must stand alone (no backing file).

``export`` writes ``OUT`` (qcow2 v3 through the registry's ``qcow2`` writer) and
``OUT`` with ``.xml`` for its extension: virtio disk and NIC, q35, ``--cpus``,
``--memory``, ``--firmware``, ``--name`` (default: OUT's name). Both appear
atomically; the XML names the disk by its absolute path. ``check`` takes either
file: the disk (then the XML beside it too, when there is one) or the XML (then
every disk it names).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from ..blockdev import BlockDevice
from .base import ExportOptions, Progress, round_up, sibling, write_disk
from .checkfile import CheckFile, open_check_file
from .domain_xml import Machine, domain_xml, read_domain

NAME = "libvirt"
SUMMARY = "libvirt/KVM: qcow2 disk plus a domain XML (virtio, q35) for virsh define"
DISK_FORMATS = ("qcow2", "raw")
XML_LIMIT = 1 << 20


def export(source: BlockDevice, out: str, opts: ExportOptions,
           progress: Progress | None = None) -> list[str]:
    return export_with(source, out, opts, progress, bus="virtio")


def export_with(source: BlockDevice, out: str, opts: ExportOptions,
                progress: Progress | None, **machine) -> list[str]:
    """The qcow2 + domain XML pair, with the target's machine settings."""
    from ..atomic import AtomicFile
    from ..remote import is_remote
    if is_remote(out):
        from ..errors import UnsupportedError
        raise UnsupportedError("not supported yet: this export to object storage (its"
                               " domain XML names the disk by its local path); export"
                               " to a local folder instead", out)
    xml_path = sibling(out, ".xml")
    if os.path.abspath(xml_path) == os.path.abspath(out):
        from ..errors import UsageError
        raise UsageError("the disk cannot be called .xml: the domain XML goes beside it"
                         " under that name", out)
    m = Machine(name=opts.vm_name(out), disk_path=os.path.abspath(out),
                memory_mib=opts.memory, cpus=opts.cpus, firmware=opts.firmware, **machine)
    xml = AtomicFile(xml_path)
    try:
        xml.pwrite(0, domain_xml(m))
        write_disk("qcow2", "", source, out, round_up(max(source.size, 1), 512), progress)
        xml.commit()
    except BaseException:
        xml.discard()
        raise
    return [out, xml_path]


# -- check ---------------------------------------------------------------------------------

def check(f: CheckFile, policy=None) -> list[str]:
    return check_pair(f, buses=("virtio", "scsi", "sata"), policy=policy)


def check_pair(f: CheckFile, *, buses: tuple[str, ...], policy=None) -> list[str]:
    """The disk (and the domain XML beside it, locally), or the XML and its disks."""
    head = f.pread(0, XML_LIMIT + 1)
    if head.lstrip()[:1] == b"<":
        if f.remote:
            from ..errors import UnsupportedError
            raise UnsupportedError("not supported yet: export --check of a remote domain"
                                   " XML (it names its disks by local paths); check a"
                                   " local copy, or the disk's URL", f.path)
        return check_xml(f.path, head, buses, policy)
    problems = check_disk(f, policy=policy)
    if f.remote:   # the XML names local paths: the URL's disk is judged alone
        return problems
    path = f.path
    xml_path = sibling(path, ".xml")
    if os.path.exists(xml_path) and os.path.abspath(xml_path) != os.path.abspath(path):
        from ..devices import open_input_file
        with open_input_file(xml_path) as x:
            problems += [f"{os.path.basename(xml_path)}: {p}"
                         for p in check_xml(xml_path, x.read(XML_LIMIT + 1), buses,
                                            policy)]
    return problems


def check_disk(f: CheckFile, declared: str | None = None, policy=None) -> list[str]:
    fmt = f.format()
    if fmt not in DISK_FORMATS:
        return [f"is {fmt}: give libvirt/Proxmox a qcow2 (or raw) disk"]
    problems = []
    if declared is not None and declared != fmt:
        problems.append(f"the XML says <driver type='{declared}'> but the file is {fmt}"
                        " (libvirt does not probe: the guest would see the container)")
    info, unreadable = f.info(fmt, policy)
    if info is None:
        return problems + [unreadable]
    if info.backing_filename:
        problems.append("has a backing file: an imported disk must stand alone (convert"
                        " it without -B)")
    if info.format_specific.get("corrupt"):
        problems.append("is marked corrupt (qemu refuses to write it): run check -r all")
    return problems


def check_xml(path: str, data: bytes, buses: tuple[str, ...],
              policy=None) -> list[str]:
    import xml.etree.ElementTree as ET
    if len(data) > XML_LIMIT:
        return ["the domain XML is over 1 MiB: not a domain definition"]
    try:
        dom = read_domain(data)
    except (ET.ParseError, ValueError) as e:
        return [f"the domain XML is not well-formed: {e}"]
    problems = []
    if dom.tag != "domain":
        return [f"root element is <{dom.tag}>, not <domain>"]
    validator = shutil.which("virt-xml-validate")
    if validator:
        proc = subprocess.run([validator, path, "domain"], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            problems.append("virt-xml-validate refuses it: " + (lines[0] if lines else
                                                                 "invalid"))
    disks = [d for d in dom.iter("disk") if d.get("device", "disk") == "disk"]
    if not disks:
        problems.append("names no disk")
    base = os.path.dirname(os.path.abspath(path))
    for d in disks:
        src = d.find("source")
        file = src.get("file") if src is not None else None
        target = d.find("target")
        bus = target.get("bus") if target is not None else None
        if bus not in buses:
            problems.append(f"disk bus '{bus}' is not one of {', '.join(buses)}")
        if not file:
            problems.append("a disk has no <source file=...>")
            continue
        full = file if os.path.isabs(file) else os.path.join(base, file)
        if not os.path.exists(full):
            problems.append(f"disk {file} does not exist")
            continue
        driver = d.find("driver")
        declared = driver.get("type") if driver is not None else None
        if declared is None:
            problems.append(f"disk {file} has no <driver type=...>: libvirt would read"
                            " it as raw")
        with open_check_file(full) as disk:
            problems += [f"{file}: {p}" for p in check_disk(disk, declared, policy)]
    return problems
