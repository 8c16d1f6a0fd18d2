"""Reading the file tree of an ISO: ISO 9660, Joliet, Rock Ridge and UDF namespaces.

An ISO holds up to four views of one set of files: the ISO 9660 tree (short, upper-case
names), Rock Ridge (the same tree with POSIX names, modes, owners, symlinks and deep
directories), Joliet (a second tree with UCS-2 names) and UDF (a third, with long names
and >4 GiB files). ``open_filesystem`` picks the richest one present — Rock Ridge, then
UDF, then Joliet, then plain ISO 9660 — or the one asked for.

The reader is our own rather than pycdlib's: it works over any BlockDevice (an ISO
inside a qcow2 lists too), reads one directory at a time (memory follows the listing,
never the image), and validates everything it follows: extents must lie inside the
image, records inside their sectors, directories may not be entered twice (a loop),
nesting and entry counts are capped. Each failure is a one-line FormatError naming the
structure and the path inside the ISO.

File data is described by ``Entry.extents``: byte ranges of the image (``None`` for a
range that reads as zeros), so extraction can copy them without reading them into
Python when the image is a plain file.
"""

from __future__ import annotations

from ..blockdev import BlockDevice
from ..errors import FormatError, UnsupportedError, UsageError
from . import rockridge
from .records import iter_directory, parse_record, record_date
from .structs import FLAG_ASSOCIATED, FLAG_DIRECTORY, FLAG_MULTI_EXTENT
from .tree import KINDS, S_IFMT, Entry, Tree
from .udf import UdfTree
from .volume import VolumeSet, has_rock_ridge, read_volume_set

NAMESPACES = ("auto", "rock-ridge", "udf", "joliet", "iso9660")
# sections of one multi-extent file: 4 GiB each at most, so 65536 reach 256 TiB
MAX_FILE_SECTIONS = 65536


class Iso9660Tree(Tree):
    """The ISO 9660 tree of the primary descriptor (optionally with Rock Ridge), or the
    Joliet tree of a supplementary descriptor."""

    def __init__(self, dev: BlockDevice, vs: VolumeSet, namespace: str):
        self.dev = dev
        self.vs = vs
        self.namespace = namespace
        self.bs = vs.block_size
        self.rr = namespace == "rock-ridge"
        vd = vs.joliet if namespace == "joliet" else vs.primary
        if vd is None:
            raise UsageError(f"this ISO has no {namespace} tree", dev.path)
        root = parse_record(vd.root_directory_record, 0, dev.path)
        if root is None or not root.is_dir:
            raise FormatError("the root directory record is empty or not a directory",
                              dev.path, structure="VolumeDescriptor",
                              field="root_directory_record")
        self.skip = 0
        if self.rr:
            first = next(iter_directory(dev, root.location, root.data_length, self.bs,
                                        dev.path), None)
            if first is not None:
                info = rockridge.parse(first.system_use, dev, self.bs, 0, dev.path)
                self.skip = info.skip or 0
        self._root = Entry("", "dir", size=root.data_length, mtime=record_date(root.date),
                           node=(root.location, root.data_length))

    def root(self) -> Entry:
        return self._root

    def _where(self, entry: Entry) -> str:
        return f"block {entry.node[0]}"

    def key(self, entry: Entry) -> object:
        return entry.node[0]

    def children(self, entry: Entry) -> list[Entry]:
        location, length = entry.node
        out: list[Entry] = []
        pending: Entry | None = None
        pending_name = b""
        sections: list = []   # the pending file's extents, joined once at the end
        for rec in iter_directory(self.dev, location, length, self.bs, self.dev.path):
            if rec.name in (b"\x00", b"\x01") or rec.flags & FLAG_ASSOCIATED:
                continue
            if pending is not None and rec.name == pending_name:
                # the next section of a multi-extent file (ECMA-119 §6.5.1)
                if len(sections) >= MAX_FILE_SECTIONS:
                    raise FormatError(f"file '{pending.name}' in the directory at block"
                                      f" {location} has more than {MAX_FILE_SECTIONS}"
                                      " sections", self.dev.path,
                                      structure="DirectoryRecord", field="file_flags")
                sections.extend(self._data_extent(rec))
                pending.size += rec.data_length
                if not rec.flags & FLAG_MULTI_EXTENT:
                    pending.extents, pending, sections = tuple(sections), None, []
                continue
            if pending is not None:
                pending.extents, pending, sections = tuple(sections), None, []
            e = self._entry(rec)
            if e is None:
                continue
            out.append(e)
            if rec.flags & FLAG_MULTI_EXTENT and e.kind == "file":
                pending, pending_name, sections = e, rec.name, list(e.extents)
        if pending is not None:
            pending.extents = tuple(sections)
        if self.rr and entry is self._root:
            out = [e for e in out if not self._is_empty_relocation_dir(e)]
        out.sort(key=lambda e: e.name)
        return out

    def _data_extent(self, rec) -> tuple:
        if rec.data_length == 0:
            return ()
        return (((rec.location + rec.ext_attr_length) * self.bs, rec.data_length),)

    def _entry(self, rec) -> Entry | None:
        raw = rec.name
        if self.namespace == "joliet":
            name = _strip_version(raw.decode("utf-16-be", "replace"))
        else:
            name = _iso_name(raw)
        iso_name = name
        kind = "dir" if rec.flags & FLAG_DIRECTORY else "file"
        e = Entry(name, kind, size=rec.data_length, mtime=record_date(rec.date),
                  interleaved=bool(rec.file_unit_size or rec.interleave_gap))
        node_loc = rec.location
        if self.rr:
            info = rockridge.parse(rec.system_use, self.dev, self.bs, self.skip,
                                   self.dev.path)
            if info.relocated:
                return None  # shown where its CL entry stands
            if info.name is not None:
                if info.name_flags & 0x02:
                    e.name = "."
                elif info.name_flags & 0x04:
                    e.name = ".."
                else:
                    e.name = rockridge.decode_name(info.name)
                e.iso_name = iso_name
            if info.mode is not None:
                e.mode = info.mode & 0o7777
                kind_from_mode = KINDS.get(info.mode & S_IFMT)
                if kind_from_mode and kind != "dir" and kind_from_mode != "dir":
                    e.kind = kind_from_mode
            e.uid, e.gid, e.nlink = info.uid, info.gid, info.nlink
            if info.target is not None and kind != "dir":
                e.kind = "symlink"
                e.target = rockridge.decode_name(info.target)
            if info.mtime is not None:
                e.mtime = info.mtime
            if info.child_link is not None:
                kind = e.kind = "dir"
                node_loc = info.child_link
        if e.kind == "dir":
            length = rec.data_length
            if node_loc != rec.location:
                length = self._dir_length(node_loc)
            e.node = (node_loc, length)
            e.size = length
        elif e.kind == "file":
            e.extents = self._data_extent(rec)
        else:
            e.size = 0 if e.kind != "symlink" else len(e.target or "")
        return e

    def _dir_length(self, location: int) -> int:
        """The data length of a relocated directory, from its own "." record."""
        off = location * self.bs
        if location <= 0 or off + 34 > self.dev.size:
            raise FormatError(f"Rock Ridge child link to block {location} is outside the"
                              " image", self.dev.path, structure="RRIP", field="CL")
        dot = parse_record(self.dev.read(off, 255), 0, self.dev.path, where=off)
        if dot is None:
            raise FormatError(f"Rock Ridge child link to block {location} finds no"
                              " directory there", self.dev.path, structure="RRIP",
                              field="CL")
        return dot.data_length

    def _is_empty_relocation_dir(self, e: Entry) -> bool:
        """mkisofs' "rr_moved" (xorriso's ".rr_moved") holds only relocated directories,
        which appear at their real places; once they are hidden it is empty."""
        if e.kind != "dir" or e.name.lower() not in ("rr_moved", ".rr_moved"):
            return False
        return not self.children(e)


def _strip_version(name: str) -> str:
    base, sep, ver = name.rpartition(";")
    return base if sep and ver.isdigit() else name


def _iso_name(raw: bytes) -> str:
    """An ISO 9660 identifier as readers show it: without the ";1" version and without
    the dot of an empty extension."""
    name = _strip_version(raw.decode("utf-8", "surrogateescape"))
    if name.endswith(".") and name not in (".", ".."):
        name = name[:-1]
    return name


def open_filesystem(dev: BlockDevice, namespace: str = "auto") -> Tree:
    """The tree of ``namespace`` (``auto``: the richest one the ISO has)."""
    if namespace not in NAMESPACES:
        raise UsageError(f"unknown namespace '{namespace}' (use one of"
                         f" {', '.join(NAMESPACES)})")
    vs = read_volume_set(dev)
    if namespace == "auto":
        if vs.primary is not None and has_rock_ridge(dev, vs):
            return Iso9660Tree(dev, vs, "rock-ridge")
        if vs.udf:
            try:
                return UdfTree(dev)
            except UnsupportedError:
                if vs.primary is None:
                    raise
        namespace = "joliet" if vs.joliet is not None else "iso9660"
    if namespace == "udf":
        if not vs.udf:
            raise UsageError("this ISO has no UDF file system", dev.path)
        return UdfTree(dev)
    if namespace == "rock-ridge" and not has_rock_ridge(dev, vs):
        raise UsageError("this ISO has no Rock Ridge extensions", dev.path)
    if vs.primary is None:
        raise UsageError(f"this ISO has no {namespace} tree (it is UDF only)", dev.path)
    return Iso9660Tree(dev, vs, namespace)
