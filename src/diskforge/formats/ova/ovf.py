"""The OVF descriptor: what an OVA says about its virtual machine and its disks.

Parsed from DMTF DSP0243 (Open Virtualization Format Specification) versions 1.x
(namespace ``http://schemas.dmtf.org/ovf/envelope/1``) and 2.x (``.../envelope/2``),
and VMware's pre-standard 0.9 (``Section xsi:type="ovf:DiskSection_Type"``,
``Content xsi:type="ovf:VirtualSystem_Type"``), in the
spellings VMware ovftool, VirtualBox and others write. Elements are matched by local
name (writers disagree on prefixes: ``ovf:Disk`` or a default namespace; ``rasd:``,
``sasd:`` and ``epasd:`` items carry the same fields).

What is read: ``References/File`` (href, size, compression, chunkSize), ``DiskSection/
Disk`` (diskId, fileRef, capacity with ``capacityAllocationUnits``, format URI,
populatedSize, parentRef), ``NetworkSection``, and the first ``VirtualSystem`` (also
inside a ``VirtualSystemCollection``): its id and name, ``OperatingSystemSection``
(CIM id, ``vmw:osType``, description), the ``VirtualHardwareSection`` items (CPUs,
memory, controllers, disk drives and the controller each hangs on, NICs), items of
the default ``DeploymentOptionSection`` configuration only, and the firmware (VMware's
``vmw:Config firmware``, VirtualBox's ``Firmware type``).

The XML is untrusted: stdlib expat, the input at most ``MAX_OVF`` bytes (checked
before it is read), DOCTYPE, entity declarations and external entities refused (so no
billion laughs, no external fetch), at most ``MAX_ELEMENTS`` elements and ``MAX_DEPTH``
levels. Anything malformed is one FormatError naming the structure.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass, field

from ...errors import FormatError, LimitError, UnsupportedError

MAX_OVF = 8 << 20          # real descriptors are 5-100 KiB
MAX_ELEMENTS = 100_000
MAX_DEPTH = 64

# CIM_ResourceAllocationSettingData.ResourceType values used in OVF hardware sections
CPU, MEMORY = 3, 4
CONTROLLERS = {5: "ide", 6: "scsi", 7: "fc", 8: "iscsi", 9: "infiniband", 20: "sata",
               23: "usb"}
DISK_DRIVE, CD_DRIVE, DVD_DRIVE, FLOPPY = 17, 15, 16, 14
NICS = (10, 11)
# ResourceSubType of "other storage" (20) controllers, which are not all SATA
STORAGE_SUBTYPES = {"ahci": "sata", "vmware.sata.ahci": "sata", "nvme": "nvme",
                    "vmware.nvme.controller": "nvme"}

# ovf:format URIs as writers spell them (DSP0243 leaves them to the disk format's owner)
FORMAT_URIS = {
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamoptimized":
        "vmdk (streamOptimized)",
    "http://www.vmware.com/interfaces/specifications/vmdk.html#sparse":
        "vmdk (monolithicSparse)",
    "http://www.vmware.com/specifications/vmdk.html#sparse": "vmdk (monolithicSparse)",
    "http://www.vmware.com/specifications/vmdk.html#compressed": "vmdk (compressed)",
    "http://www.virtualbox.org/virtualbox/documentation/vdi.html": "vdi",
    "http://go.microsoft.com/fwlink/?linkid=137171": "vhd",
    "http://technet.microsoft.com/en-us/library/bb676673.aspx": "vhd",
    "http://www.microsoft.com/technet/virtualserver/downloads/vhdspec.mspx": "vhd",
    "http://www.gnome.org/~markmc/qcow-image-format.html": "qcow2",
    "http://people.gnome.org/~markmc/qcow-image-format.html": "qcow2",
}


class Node:
    """One element: local name, attributes by local name, children, text."""
    __slots__ = ("tag", "ns", "attrs", "children", "text")

    def __init__(self, tag: str, attrs: dict[str, str], ns: str = "") -> None:
        self.tag = tag
        self.ns = ns
        self.attrs = attrs
        self.children: list[Node] = []
        self.text = ""

    def find(self, tag: str) -> "Node | None":
        for c in self.children:
            if c.tag == tag:
                return c
        return None

    def findall(self, tag: str) -> list["Node"]:
        return [c for c in self.children if c.tag == tag]

    def child_text(self, tag: str) -> str | None:
        c = self.find(tag)
        return c.text.strip() if c is not None else None

    def walk(self):
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children))


def _local(name: str) -> str:
    return name.rsplit(" ", 1)[-1]


def _is_ovf_ns(ns: str) -> bool:
    return "schemas.dmtf.org/ovf/envelope" in ns or "vmware.com/schema/ovf/1/envelope" in ns


def _attrs(raw: dict[str, str]) -> dict[str, str]:
    """Attributes by local name (an OVF-namespace attribute wins over another
    namespace's of the same local name: ``ovf:id`` over ``vbox:id``), and by their
    qualified ``"uri name"`` too."""
    out: dict[str, str] = {}
    rank: dict[str, int] = {}
    for k, v in raw.items():
        ns, _, local = k.rpartition(" ")
        r = 2 if _is_ovf_ns(ns) else 1 if not ns else 0
        if r >= rank.get(local, -1):
            out[local], rank[local] = v, r
        if ns:
            out[k] = v
    return out


def parse_xml(data: bytes, path: str) -> Node:
    """The element tree of ``data``, parsed safely (see the module docstring)."""
    if len(data) > MAX_OVF:
        raise LimitError(f"OVF descriptor: {len(data)} bytes, more than the"
                         f" {MAX_OVF >> 20} MiB a descriptor may have", path)
    p = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    p.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[Node] = []
    root: list[Node] = []
    count = [0]

    def refuse(what: str):
        def handler(*args):
            raise FormatError(f"{what} refused (an OVF descriptor needs none; they are how"
                              " entity-expansion attacks work)", path,
                              structure="OVF descriptor", field="DOCTYPE")
        return handler

    def start(name, attrs):
        count[0] += 1
        if count[0] > MAX_ELEMENTS or len(stack) >= MAX_DEPTH:
            raise LimitError(f"OVF descriptor: more than {MAX_ELEMENTS} elements or"
                             f" {MAX_DEPTH} levels", path)
        node = Node(_local(name), _attrs(attrs), name.rpartition(" ")[0])
        if stack:
            stack[-1].children.append(node)
        else:
            root.append(node)
        stack.append(node)

    def end(name):
        stack.pop()

    def chars(text):
        if stack:
            stack[-1].text += text

    p.StartDoctypeDeclHandler = refuse("a DOCTYPE declaration")
    p.EntityDeclHandler = refuse("an entity declaration")
    p.ExternalEntityRefHandler = refuse("an external entity")
    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    try:
        p.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise FormatError(f"not well-formed XML: {xml.parsers.expat.ErrorString(e.code)}"
                          f" at line {e.lineno}, column {e.offset}", path,
                          structure="OVF descriptor") from None
    except (LookupError, ValueError) as e:     # an unknown encoding= in the declaration
        raise FormatError(f"not readable XML: {e}", path, structure="OVF descriptor",
                          field="encoding") from None
    if not root or root[0].tag != "Envelope":
        raise FormatError("the root element is not an OVF Envelope", path,
                          structure="OVF descriptor", field="Envelope")
    return root[0]


def allocation_units(text: str | None, path: str, where: str) -> int:
    """Bytes per unit of a DSP0004 programmatic unit ("byte", "byte * 2^30",
    "byte * 1024^2", "byte*10^9"), or of the names VirtualBox and older writers use
    ("MegaBytes", "KB", "GiB")."""
    if not text:
        return 1
    t = text.strip()
    named = {"b": 1, "byte": 1, "bytes": 1, "kb": 1 << 10, "kilobytes": 1 << 10,
             "kib": 1 << 10, "mb": 1 << 20, "megabytes": 1 << 20, "mib": 1 << 20,
             "gb": 1 << 30, "gigabytes": 1 << 30, "gib": 1 << 30, "tb": 1 << 40,
             "terabytes": 1 << 40, "tib": 1 << 40}
    if t.lower() in named:
        return named[t.lower()]
    parts = [x.strip() for x in t.split("*")]
    if parts[0].lower() not in ("byte", "bytes") or len(parts) > 4:
        raise FormatError(f"unknown allocation unit {t!r}", path, structure=where,
                          field="AllocationUnits")
    value = 1
    for part in parts[1:]:
        m = re.fullmatch(r"(\d{1,4})(?:\^(\d{1,2}))?", part)
        if not m:
            raise FormatError(f"unknown allocation unit {t!r}", path, structure=where,
                              field="AllocationUnits")
        value *= int(m.group(1)) ** int(m.group(2) or 1)
    if value > 1 << 60:
        raise FormatError(f"allocation unit {t!r} is too large", path, structure=where,
                          field="AllocationUnits")
    return value


def _int(text: str | None, path: str, where: str, fld: str) -> int | None:
    """A whole number, None when absent or a ``${property}`` reference."""
    if text is None or text.strip() == "" or text.strip().startswith("${"):
        return None
    t = text.strip()
    if not t.isdigit() or len(t) > 20:
        raise FormatError(f"{t[:40]!r} is not a whole number", path, structure=where,
                          field=fld)
    return int(t)


@dataclass
class FileRef:
    """``References/File``."""
    id: str
    href: str
    size: int | None = None
    compression: str | None = None
    chunk_size: int | None = None


@dataclass
class Disk:
    """``DiskSection/Disk`` and the File it names."""
    disk_id: str
    file_ref: str | None
    capacity: int | None            # bytes, None when a property decides it
    capacity_text: str
    format_uri: str
    populated_size: int | None = None
    parent_ref: str | None = None
    file: FileRef | None = None

    @property
    def format_name(self) -> str | None:
        return FORMAT_URIS.get(self.format_uri.strip().lower())

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"disk-id": self.disk_id,
                                  "file": self.file.href if self.file else None,
                                  "capacity": self.capacity,
                                  "format-uri": self.format_uri}
        if self.capacity is None:
            out["capacity-text"] = self.capacity_text
        if self.format_name:
            out["format-named"] = self.format_name
        if self.populated_size is not None:
            out["populated-size"] = self.populated_size
        if self.file and self.file.size is not None:
            out["file-size"] = self.file.size
        if self.parent_ref:
            out["parent"] = self.parent_ref
        return out


@dataclass
class VirtualSystem:
    """An OVF VirtualSystem: the machine the disks belong to."""
    id: str
    name: str
    os_id: int | None = None
    os_type: str | None = None
    os_description: str | None = None
    cpus: int | None = None
    memory: int | None = None       # bytes
    firmware: str | None = None
    controllers: list[dict[str, object]] = field(default_factory=list)
    disks: list[dict[str, object]] = field(default_factory=list)
    nics: list[dict[str, object]] = field(default_factory=list)
    cdroms: int = 0

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name,
                "os": {"cim-id": self.os_id, "type": self.os_type,
                       "description": self.os_description},
                "cpus": self.cpus, "memory": self.memory, "firmware": self.firmware,
                "controllers": self.controllers, "disks": self.disks, "nics": self.nics,
                "cd-drives": self.cdroms}


@dataclass
class Envelope:
    """An OVF descriptor, parsed: files, disks, networks, systems."""
    version: str
    files: list[FileRef]
    disks: list[Disk]
    networks: list[str]
    system: VirtualSystem | None
    systems: int = 0

    def to_json(self) -> dict[str, object]:
        return {"ovf-version": self.version,
                "virtual-system": self.system.to_json() if self.system else None,
                "virtual-systems": self.systems,
                "disks": [d.to_json() for d in self.disks],
                "files": [f.href for f in self.files],
                "networks": self.networks}


def _sections(parent: Node, name: str) -> list[Node]:
    """``name`` sections of ``parent``: OVF 1/2 elements, or 0.9's ``Section
    xsi:type="ovf:NAME_Type"``."""
    out = parent.findall(name)
    for s in parent.findall("Section"):
        t = s.attrs.get("type", "")
        if t.rsplit(":", 1)[-1] == name + "_Type":
            out.append(s)
    return out


def _version(env: Node) -> str:
    """``ovf:version`` when the envelope states it, else what its namespace says."""
    v = env.attrs.get("version")
    if v:
        return v
    if "envelope/2" in env.ns:
        return "2.x"
    return "0.9" if "vmware.com/schema/ovf/1/envelope" in env.ns else "1.x"


def parse(data: bytes, path: str) -> Envelope:
    """The descriptor's facts (module docstring); ``path`` names it in messages."""
    env = parse_xml(data, path)
    files: dict[str, FileRef] = {}
    refs = env.find("References")
    for f in refs.findall("File") if refs is not None else ():
        fid, href = f.attrs.get("id"), f.attrs.get("href")
        if not fid or not href:
            raise FormatError("a File without ovf:id or ovf:href", path,
                              structure="References", field="File")
        if fid in files:
            raise FormatError(f"File id '{fid}' appears twice", path,
                              structure="References", field="File.id")
        files[fid] = FileRef(fid, href, _int(f.attrs.get("size"), path, "References.File",
                                            "size"),
                             f.attrs.get("compression") or None,
                             _int(f.attrs.get("chunkSize"), path, "References.File",
                                  "chunkSize"))
    disks: list[Disk] = []
    for section in _sections(env, "DiskSection"):
        for d in section.findall("Disk"):
            did = d.attrs.get("diskId")
            if not did:
                raise FormatError("a Disk without ovf:diskId", path,
                                  structure="DiskSection", field="Disk.diskId")
            cap_text = d.attrs.get("capacity", "")
            cap = _int(cap_text, path, "DiskSection.Disk", "capacity")
            if cap is not None:
                cap *= allocation_units(d.attrs.get("capacityAllocationUnits"), path,
                                        "DiskSection.Disk")
            ref = d.attrs.get("fileRef") or None
            if ref is not None and ref not in files:
                raise FormatError(f"Disk '{did}' names file '{ref}', which References"
                                  " does not list", path, structure="DiskSection",
                                  field="Disk.fileRef")
            disks.append(Disk(did, ref, cap, cap_text, d.attrs.get("format", ""),
                              _int(d.attrs.get("populatedSize"), path, "DiskSection.Disk",
                                   "populatedSize"),
                              d.attrs.get("parentRef") or None,
                              files.get(ref) if ref else None))
    networks = [n.attrs.get("name", "") for s in _sections(env, "NetworkSection")
                for n in s.findall("Network")]
    systems = [n for n in env.walk() if n.tag == "VirtualSystem" or (
        n.tag == "Content" and n.attrs.get("type", "").endswith("VirtualSystem_Type"))]
    system = _system(env, systems[0], path) if systems else None
    return Envelope(_version(env), list(files.values()), disks, networks, system,
                    len(systems))


def _default_configuration(env: Node) -> str | None:
    for section in _sections(env, "DeploymentOptionSection"):
        configs = section.findall("Configuration")
        for c in configs:
            if c.attrs.get("default", "").lower() == "true":
                return c.attrs.get("id")
        if configs:
            return configs[0].attrs.get("id")
    return None


def _system(env: Node, vs: Node, path: str) -> VirtualSystem:
    name = vs.child_text("Name") or vs.attrs.get("id", "")
    out = VirtualSystem(vs.attrs.get("id", ""), name)
    for os_section in _sections(vs, "OperatingSystemSection"):
        out.os_id = _int(os_section.attrs.get("id"), path, "OperatingSystemSection", "id")
        out.os_type = os_section.attrs.get("osType") or \
            os_section.child_text("OSType") or None
        out.os_description = os_section.child_text("Description")
        break
    config = _default_configuration(env)
    items: list[dict[str, str]] = []
    for hw in _sections(vs, "VirtualHardwareSection")[:1]:
        for it in hw.children:
            if it.tag not in ("Item", "StorageItem", "EthernetPortItem"):
                if it.tag == "Config" and it.attrs.get("key") == "firmware":
                    out.firmware = it.attrs.get("value")
                continue
            cfg = it.attrs.get("configuration")
            if cfg and config and config not in cfg.split():
                continue
            items.append({c.tag: c.text.strip() for c in it.children})
    by_id = {i.get("InstanceID"): i for i in items}
    for i in items:
        rtype = _int(i.get("ResourceType"), path, "VirtualHardwareSection.Item",
                     "ResourceType")
        label = i.get("ElementName") or i.get("Caption") or ""
        if rtype == CPU:
            out.cpus = _int(i.get("VirtualQuantity"), path, "VirtualHardwareSection.Item",
                            "VirtualQuantity")
        elif rtype == MEMORY:
            q = _int(i.get("VirtualQuantity"), path, "VirtualHardwareSection.Item",
                     "VirtualQuantity")
            unit = i.get("AllocationUnits") or "byte * 2^20"   # MiB when unstated
            out.memory = None if q is None else \
                q * allocation_units(unit, path, "VirtualHardwareSection.Item")
        elif rtype in CONTROLLERS:
            sub = i.get("ResourceSubType") or ""
            kind = STORAGE_SUBTYPES.get(sub.lower(), CONTROLLERS[rtype]) if rtype == 20 \
                else CONTROLLERS[rtype]
            out.controllers.append({"id": i.get("InstanceID"), "type": kind,
                                    "model": sub or None, "name": label})
        elif rtype == DISK_DRIVE:
            host = i.get("HostResource") or ""
            m = re.fullmatch(r"(?:ovf:)?/+disk/(.+)", host.strip())
            parent = by_id.get(i.get("Parent"), {})
            out.disks.append({"disk-id": m.group(1) if m else None,
                              "controller": parent.get("ElementName") or
                              parent.get("Caption") or i.get("Parent"),
                              "address": i.get("AddressOnParent"), "name": label})
        elif rtype in NICS:
            out.nics.append({"network": i.get("Connection"),
                             "model": i.get("ResourceSubType") or None, "name": label})
        elif rtype in (CD_DRIVE, DVD_DRIVE):
            out.cdroms += 1
    if out.firmware is None:
        for n in vs.walk():     # VirtualBox: vbox:Machine/Hardware/Firmware type="EFI"
            if n.tag == "Firmware" and n.attrs.get("type"):
                out.firmware = n.attrs["type"].lower()
                break
    if out.firmware is not None:
        out.firmware = out.firmware.lower()
    return out


def check_href(href: str, path: str, *, in_tar: bool) -> None:
    """Refuse what cannot be read in place: URLs (``http:``, ``file:``), and in an OVA
    absolute names and ``..`` (its files are members named relative to the package,
    DSP0243 "File references"). Beside an ``.ovf`` the open policy decides instead,
    (confined to the descriptor's directory in every mode, ``package.FolderPackage``)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", href):
        raise UnsupportedError(f"not supported yet: OVF files referenced by URL"
                               f" ('{href}')", path)
    if not in_tar:
        return
    parts = href.replace("\\", "/").split("/")
    if href.startswith(("/", "\\")) or ".." in parts or "\0" in href:
        raise FormatError(f"'{href}' leaves the package (absolute or '..'); an OVF names"
                          " its files relative to itself", path, structure="References",
                          field="File.href")
