"""A Parallels disk bundle's ``DiskDescriptor.xml``, parsed safely.

The descriptor names the disk's size (``Disk_Parameters/Disk_size``, in sectors), its
extents (``StorageData/Storage``: ``Start`` and ``End`` in sectors, one ``Image`` per
snapshot, each with its ``GUID``, ``Type`` — ``Plain`` for raw bytes, ``Compressed``
for an expandable image — and ``File``) and its snapshots (``Snapshots/Shot``, each
with its ``GUID`` and ``ParentGUID``; ``TopGUID`` the current one when present).

Safety: the file is read only up to ``MAX_DESCRIPTOR`` bytes, it must be UTF-8 without
NUL bytes, and a document type declaration (and so any entity) is refused before
parsing, so no entity expansion or external reference can happen. Every number is checked before it is used; the walk up
the snapshot tree is bounded by the number of snapshots and refuses loops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import FormatError, LimitError, UnsupportedError

MAX_DESCRIPTOR = 1 << 20      # far above a real descriptor (a few KiB)
NULL_GUID = "{00000000-0000-0000-0000-000000000000}"
# the GUID Parallels gives the first (base) image of every disk
DEFAULT_TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
IMAGE_TYPES = ("Plain", "Compressed")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\}?$")
_DTD = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRef:
    """One image file of a storage, by GUID."""
    guid: str
    type: str
    file: str


@dataclass
class Storage:
    """A range of the disk and the image files (one per snapshot) that hold it."""
    start: int          # in sectors
    end: int
    images: dict[str, ImageRef] = field(default_factory=dict)   # by GUID


@dataclass
class Descriptor:
    """A bundle's DiskDescriptor.xml: storages and the snapshot tree."""
    disk_size: int      # in sectors
    storages: list[Storage]
    shots: dict[str, str]          # GUID -> parent GUID
    top_guid: str | None
    name: str
    uid: str
    encryption_engine: str

    def chain(self, path: str) -> list[str]:
        """The GUIDs from the current snapshot down to the base image: ``TopGUID``
        when the descriptor names it, else the one snapshot nothing descends from."""
        top = self.top_guid
        if top is None:
            if not self.shots:
                guids = {g for s in self.storages for g in s.images}
                if len(guids) != 1:
                    raise FormatError("no Snapshots and several images per Storage: the"
                                      " current one is unknown", path,
                                      structure="DiskDescriptor.Snapshots")
                return [guids.pop()]
            parents = set(self.shots.values())
            leaves = sorted(g for g in self.shots if g not in parents)
            if not leaves:
                raise FormatError("every snapshot is another's parent (a loop)", path,
                                  structure="DiskDescriptor.Snapshots.Shot",
                                  field="ParentGUID")
            if len(leaves) == 1:
                top = leaves[0]
            elif DEFAULT_TOP_GUID in leaves:
                top = DEFAULT_TOP_GUID
            else:
                raise UnsupportedError("not supported yet: Parallels disks with several"
                                       " snapshot branches and no TopGUID", path)
        chain = [top]
        while True:
            parent = self.shots.get(chain[-1], NULL_GUID)
            if parent == NULL_GUID:
                return chain
            if parent in chain or parent not in self.shots:
                raise FormatError(f"snapshot {chain[-1]}: ParentGUID {parent} is "
                                  + ("already in the chain (a loop)" if parent in chain
                                     else "not a listed snapshot"), path,
                                  structure="DiskDescriptor.Snapshots.Shot",
                                  field="ParentGUID")
            chain.append(parent)


def _guid(text: str | None, path: str, where: str) -> str:
    text = (text or "").strip()
    if not _GUID.match(text):
        raise FormatError(f"'{text}' is not a GUID", path, structure=where)
    return "{" + text.strip("{}").lower() + "}"


def _int(text: str | None, path: str, where: str) -> int:
    text = (text or "").strip()
    if not text.isdigit() or len(text) > 20:
        raise FormatError(f"'{text}' is not a non-negative number", path, structure=where)
    return int(text)


def parse(data: bytes, path: str) -> Descriptor:
    """Parse the bytes of a DiskDescriptor.xml (at most MAX_DESCRIPTOR of them)."""
    import xml.etree.ElementTree as ET
    if len(data) > MAX_DESCRIPTOR:
        raise LimitError(f"DiskDescriptor.xml is more than {MAX_DESCRIPTOR} bytes", path)
    # UTF-8 only and no NUL: a UTF-16 document could hide a declaration from the test
    # below (Parallels writes UTF-8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("not UTF-8 text", path, structure="DiskDescriptor") from None
    if b"\0" in data:
        raise FormatError("holds a NUL byte", path, structure="DiskDescriptor")
    if _DTD.search(data):
        raise FormatError("a document type declaration is not allowed (entities are"
                          " refused)", path, structure="DiskDescriptor")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, ValueError) as e:
        raise FormatError(f"not well-formed XML ({e})", path,
                          structure="DiskDescriptor") from None
    if root.tag != "Parallels_disk_image":
        raise FormatError(f"root element is <{root.tag}>, not <Parallels_disk_image>",
                          path, structure="DiskDescriptor")
    params = root.find("Disk_Parameters")
    if params is None:
        raise FormatError("no Disk_Parameters", path, structure="DiskDescriptor")
    disk_size = _int(params.findtext("Disk_size"), path, "Disk_Parameters.Disk_size")
    engine = (params.findtext("Encryption/Engine") or NULL_GUID).strip()
    storages = []
    for i, st in enumerate(root.findall("StorageData/Storage")):
        where = f"StorageData.Storage[{i}]"
        s = Storage(_int(st.findtext("Start"), path, where + ".Start"),
                    _int(st.findtext("End"), path, where + ".End"))
        for j, im in enumerate(st.findall("Image")):
            iw = f"{where}.Image[{j}]"
            ref = ImageRef(_guid(im.findtext("GUID"), path, iw + ".GUID"),
                           (im.findtext("Type") or "").strip(),
                           (im.findtext("File") or "").strip())
            if not ref.file:
                raise FormatError("no File", path, structure=iw)
            s.images[ref.guid] = ref
        storages.append(s)
    if not storages:
        raise FormatError("no Storage", path, structure="DiskDescriptor.StorageData")
    shots: dict[str, str] = {}
    for i, shot in enumerate(root.findall("Snapshots/Shot")):
        where = f"Snapshots.Shot[{i}]"
        shots[_guid(shot.findtext("GUID"), path, where + ".GUID")] = \
            _guid(shot.findtext("ParentGUID") or NULL_GUID, path, where + ".ParentGUID")
    top_text = root.findtext("Snapshots/TopGUID")
    top = _guid(top_text, path, "Snapshots.TopGUID") if top_text else None
    return Descriptor(disk_size, storages, shots, top, params.findtext("Name") or "",
                      (params.findtext("UID") or "").strip(), engine)
