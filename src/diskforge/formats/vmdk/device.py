"""Reading, checking and writing in place an existing VMDK.

A VMDK opens one of three ways, as qemu's ``vmdk_open`` tells them apart by the
first bytes:

- a hosted sparse extent (``KDMV``): the file is the disk's only extent; its embedded
  descriptor (if any) gives the CIDs, the parent and the disk database, and its
  extent lines are ignored (they name the file itself, often under an old name). A
  ``KDMV`` header with capacity 0 and a descriptor offset is a descriptor holder
  and opens like a descriptor file. A ``COWD`` or seSparse file opens as a lone
  extent with no descriptor.
- a descriptor file: every extent line is opened, in order, as its type says.

Extent and parent file names are attacker input: each goes through the open policy
(``OpenPolicy.resolve``: anywhere by default, as qemu-img follows them; confined to
the image's directory and the allowed roots in untrusted mode) and must be a regular
file outside /proc, /sys and /dev; the parent (``parentFileNameHint``) opens through
``registry.open_image`` with the descended policy, so chains are depth-limited and
loop-checked as qcow2 backing files are.

Decisions where tools differ (``formats/vmdk.md`` says why):

- ``parentCID`` that does not match the parent's ``CID``: the image opens (``info``,
  ``check``, ``rebase -u`` work) but a read that reaches the parent fails, as in
  qemu (VMware refuses to open such a disk).
- RDONLY extents read normally; NOACCESS and ZERO extents read as zeros. (qemu skips
  every extent line that is not RW, which shortens the disk; such images are not
  handed to QEMU's driver.)
- A sparse extent's size is its header's capacity, as qemu (not the extent line).
- Writing in place changes the CID on the first write, as qemu and VMware do, so
  snapshots made on top of this disk notice it changed.
"""

from __future__ import annotations

import bisect
import os
import re
import stat

from ...blockdev import (Extent, ExtentKind, FileBackend, FileDevice, ImageInfo, coalesce,
                         fill_zero)
from ...checks import CheckResult, ProblemKind, Repair
from ...errors import (CorruptImage, FormatError, ImageIOError, SafetyError,
                       UnsupportedError)
from ...policy import OpenPolicy, beside
from ...registry import open_image
from ...remote import is_remote
from . import descriptor as dsc
from .extents import DATA, ZERO, FlatExtent, VmdkExtent, ZeroExtent
from .sesparse import SeSparseExtent
from .sparse import MAX_CAPACITY, SparseExtent, open_cowd, open_hosted
from .structs import (COWD_MAGIC, SECTOR, SESPARSE_MAGIC, SPARSE_HEADER_SIZE, SPARSE_MAGIC,
                      SparseExtentHeader)

# createTypes qemu opens from a descriptor file (vmdk_open_desc_file)
QEMU_DESCRIPTOR_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
                         "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
QEMU_EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")
CHECK_MESSAGES = 100        # problems printed one by one; the rest are counted


# qemu's order of an extent's keys in info's format-specific data
_EXTENT_KEYS = ("compressed", "virtual-size", "filename", "cluster-size", "format")


class VmdkDevice(FileDevice):
    """A VMDK opened as a block device (module docstring)."""

    format = "vmdk"

    def _open(self, window: bool = False) -> None:
        self.window = window        # read out of another file (an OVA member)
        self.descriptor: dsc.Descriptor | None = None
        self.descriptor_raw: bytes | None = None
        self.descriptor_at: int | None = None    # embedded: byte offset in the file
        self.descriptor_room = 0                 # embedded: bytes reserved for it
        self.monolithic = False                  # the file is the (only) extent
        self.extents_: list[VmdkExtent] = []
        self.starts: list[int] = []
        self.lines: list[dsc.ExtentLine | None] = []
        self._backends: dict[str, FileBackend] = {}
        self.cid_mismatch: str | None = None
        self._cid_changed = False
        if not self.window:
            self._backends[os.path.realpath(self.path)] = self.backend
        if self.policy is None:
            self.policy = OpenPolicy().descend(self.path)
        size = self.backend.size
        head = self.backend.pread(0, min(size, SPARSE_HEADER_SIZE))
        if len(head) < 4:
            raise FormatError(f"the file is {size} bytes: not a VMDK", self.path,
                              structure="SparseExtentHeader")
        if head[:4] == SPARSE_MAGIC:
            self._open_hosted(head, size)
        elif head[:4] == COWD_MAGIC:
            self.monolithic = True
            self._add(open_cowd(self.backend), None)
        elif head[:8] == SESPARSE_MAGIC:
            self.monolithic = True
            self._add(SeSparseExtent(self.backend), None)
        else:
            if size > dsc.MAX_DESCRIPTOR_BYTES:
                raise FormatError(f"a descriptor file of {size} bytes (at most"
                                  f" {dsc.MAX_DESCRIPTOR_BYTES})", self.path,
                                  structure="descriptor")
            self._use_descriptor(self.backend.read_exact(0, size, "descriptor"), 0, 0)
            self._open_extents()
        self.size = self.starts[-1] + self.extents_[-1].size if self.extents_ else 0
        if self.size > MAX_CAPACITY * SECTOR:
            raise FormatError(f"the extents add up to {self.size} bytes, beyond any disk",
                              self.path, structure="descriptor", field="extents")
        if self.writable:
            self._check_writable()
        self._open_parent()

    def _open_hosted(self, head: bytes, size: int) -> None:
        if len(head) < SPARSE_HEADER_SIZE:
            raise FormatError(f"the file is {size} bytes, too small for the 512-byte"
                              " header: truncated", self.path,
                              structure="SparseExtentHeader")
        h = SparseExtentHeader.parse(head)
        if h.descriptorOffset and h.descriptorSize or h.capacity == 0:
            at, n = h.descriptorOffset * SECTOR, h.descriptorSize * SECTOR
            if h.capacity == 0:     # a descriptor holder: the descriptor names extents
                if not h.descriptorOffset or at >= size:
                    raise FormatError("capacity 0 and no descriptor inside the file",
                                      self.path, structure="SparseExtentHeader",
                                      field="descriptorOffset")
                n = min(size - at, dsc.MAX_DESCRIPTOR_BYTES)
            elif n > dsc.MAX_DESCRIPTOR_BYTES:
                raise FormatError(f"{h.descriptorSize} sectors, more than a descriptor"
                                  " may have (1 MiB)", self.path,
                                  structure="SparseExtentHeader", field="descriptorSize")
            elif at + n > size:
                raise FormatError(f"the embedded descriptor (sector {h.descriptorOffset},"
                                  f" {h.descriptorSize} sectors) is past the end of the"
                                  f" file ({size} bytes)", self.path,
                                  structure="SparseExtentHeader", field="descriptorOffset")
            self._use_descriptor(self.backend.read_exact(at, n, "embedded descriptor"),
                                 at, n)
            if h.capacity == 0:
                self._open_extents()
                return
        self.monolithic = True
        self._add(open_hosted(self.backend, header=head), None)

    def _use_descriptor(self, raw: bytes, at: int, room: int) -> None:
        self.descriptor = dsc.parse(raw, self.path)
        self.descriptor_raw = raw.split(b"\0", 1)[0]
        self.descriptor_at, self.descriptor_room = at, room

    def _add(self, ext: VmdkExtent, line: dsc.ExtentLine | None) -> None:
        self.starts.append(self.starts[-1] + self.extents_[-1].size if self.extents_ else 0)
        self.extents_.append(ext)
        self.lines.append(line)

    def _open_extents(self) -> None:
        for number, line in enumerate(self.descriptor.extents, 1):
            kind = line.type
            if line.access == "NOACCESS":
                ext: VmdkExtent = ZeroExtent(line.sectors, "NOACCESS", kind)
            elif kind == "ZERO":
                ext = ZeroExtent(line.sectors, line.access)
            else:
                backend = self._extent_file(line, number)
                if kind in ("FLAT", "VMFS"):
                    ext = FlatExtent(backend, line.sectors, line.offset * SECTOR, kind,
                                     line.access)
                elif kind == "SESPARSE":
                    ext = SeSparseExtent(backend, line.access)
                else:                       # SPARSE, VMFSSPARSE: KDMV or COWD by magic
                    magic = backend.pread(0, 4)
                    if magic == SPARSE_MAGIC:
                        ext = open_hosted(backend, line.access, kind)
                    elif magic == COWD_MAGIC:
                        ext = open_cowd(backend, line.access, kind)
                    else:
                        raise FormatError(f"extent file '{line.filename}' (line {number})"
                                          " is neither a KDMV nor a COWD sparse extent",
                                          self.path, structure="descriptor",
                                          field="extents")
            self._add(ext, line)

    def _extent_file(self, line: dsc.ExtentLine, number: int) -> FileBackend:
        name = line.filename
        remote = is_remote(self.path)
        if self.window and not remote:
            raise UnsupportedError("not supported yet: a VMDK descriptor naming separate"
                                   " extent files, read from inside another file",
                                   self.path)
        full = self.policy.resolve(self.path, name, "extent file")
        if remote:  # an object beside the descriptor (remote/refs.py)
            backend = self._backends.get(full)
            if backend is None:
                from ...remote.refs import open_file
                backend = self._backends[full] = open_file(full)
            return backend
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise ImageIOError(f"extent file '{name}' (descriptor line {number}) not"
                               f" found: {full}", self.path) from None
        except OSError as e:
            raise ImageIOError(f"extent file '{name}': {e.strerror}", self.path) from None
        if not stat.S_ISREG(st.st_mode):
            raise SafetyError(f"extent file '{name}' (descriptor line {number}) is not a"
                              " regular file; refused", self.path)
        real = os.path.realpath(full)
        backend = self._backends.get(real)
        if backend is None:
            backend = self._backends[real] = FileBackend(
                full, writable=self.writable and line.access == "RW", referenced=True)
        return backend

    def _check_writable(self) -> None:
        for ext in self.extents_:
            if ext.access != "RW":
                raise UnsupportedError(f"not supported yet: writing a VMDK with an"
                                       f" {ext.access} extent", self.path)
            if ext.compressed:
                raise UnsupportedError("not supported yet: writing streamOptimized"
                                       " (compressed) VMDKs in place; convert to a new"
                                       " file instead", self.path)
            if not ext.writable:
                what = "version 3 (changed-block tracking) sparse extents" \
                    if getattr(ext, "version", 0) == 3 else f"{ext.type} extents"
                raise UnsupportedError(f"not supported yet: writing {what} in place",
                                       self.path)

    def _open_parent(self) -> None:
        d = self.descriptor
        hint = d.parent_hint if d is not None else None
        if not hint or not self.policy.open_backing:
            return
        policy = self.policy
        full = policy.resolve(self.path, hint, "parent (descriptor.parentFileNameHint)")
        self.backing = open_image(full, "vmdk", policy=policy)
        self._check_parent_cid()

    def _check_parent_cid(self) -> None:
        parent = self.backing
        want = self.descriptor.parent_cid
        have = getattr(parent, "cid", None)
        self.cid_mismatch = None
        if have is not None and want != have:
            self.cid_mismatch = (f"parentCID {want:08x} does not match the parent's CID"
                                 f" {have:08x}: the parent changed after this disk was"
                                 " made")

    # -- facts used by others -----------------------------------------------------------
    @property
    def cid(self) -> int | None:
        return self.descriptor.cid if self.descriptor is not None else None

    @property
    def create_type(self) -> str:
        if self.descriptor is not None and self.descriptor.create_type:
            return self.descriptor.create_type
        ext = self.extents_[0]
        if ext.compressed:
            return "streamOptimized"
        return {"VMFSSPARSE": "vmfsSparse", "SESPARSE": "seSparse"}.get(ext.type,
                                                                        "monolithicSparse")

    def qemu_readable(self) -> bool:
        """Whether QEMU's vmdk driver reads this file as diskforge does (and opens it
        for writing too: it refuses to for seSparse and uncompressed version-3
        extents, which a VM's disk needs)."""
        if self.window or self.cid_mismatch:
            return False
        for ext in self.extents_:
            if isinstance(ext, SeSparseExtent) or (
                    getattr(ext, "version", 0) == 3 and not ext.compressed):
                return False
        if not self.monolithic:
            if self.create_type not in QEMU_DESCRIPTOR_TYPES:
                return False
            if any(ln.access != "RW" or ln.type not in QEMU_EXTENT_TYPES or ln.sectors <= 0
                   for ln in self.descriptor.extents):
                return False
        return True

    # -- reading -------------------------------------------------------------------------
    def _pieces(self, offset: int, length: int):
        """``(index, extent, offset in it, bytes, offset in the request)`` of each
        extent a range touches."""
        end = offset + length
        k = bisect.bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < end:
            ext, start = self.extents_[k], self.starts[k]
            n = min(end, start + ext.size) - pos
            if n > 0:
                yield k, ext, pos - start, n, pos - offset
                pos += n
            k += 1

    def _below(self, k: int):
        """The fill function for extent ``k``: the parent's bytes, or zeros."""
        start = self.starts[k]
        parent = self.backing

        def below(rel: int, mv, a: int, b: int) -> None:
            if parent is None:
                fill_zero(mv, a, b)
                return
            if self.cid_mismatch:
                raise CorruptImage(f"{self.cid_mismatch}; not reading through it (as"
                                   " qemu)", self.path, structure="descriptor",
                                   field="parentCID")
            off = start + rel
            inside = max(0, min(b - a, parent.size - off))
            if inside:
                parent.readinto(off, mv[a:a + inside])
            fill_zero(mv, a + inside, b)
        return below

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        for k, ext, rel, cnt, at in self._pieces(offset, n):
            ext.readinto(rel, mv[at:at + cnt], self._below(k))
        return n

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(self._extents(offset, length))

    def _extents(self, offset: int, length: int):
        unalloc = ExtentKind.BACKING if self.backing is not None else ExtentKind.ZERO
        for k, ext, rel, cnt, _ in self._pieces(offset, length):
            start = self.starts[k]
            # a separate extent file's offsets are named with its file (qemu's map)
            file = None if ext.backend is self.backend or ext.backend is None \
                else ext.backend.path
            for o, n, state, host in ext.map(rel, cnt):
                if state == DATA:
                    yield Extent(start + o, n, ExtentKind.DATA, True, host,
                                 None if host is None else file)
                elif state == ZERO:
                    yield Extent(start + o, n, ExtentKind.ZERO, True, host,
                                 None if host is None else file)
                else:
                    yield Extent(start + o, n, unalloc, False)

    def host_backend(self, extent: Extent):
        """Flat extents and uncompressed grains are stored as they are, in the file of
        the VMDK extent that holds them (``convert -C``); compressed grains have no
        host offset."""
        if extent.host_offset is None or not self.extents_:
            return None
        k = bisect.bisect_right(self.starts, extent.offset) - 1
        backend = self.extents_[max(0, k)].backend
        return backend if isinstance(backend, FileBackend) else None

    # -- writing (BlockDevice.write/write_zeroes checked writability and the range) ------
    def _write(self, offset: int, mv: memoryview) -> None:
        self._touch()
        for k, ext, rel, cnt, at in self._pieces(offset, len(mv)):
            ext.write(rel, mv[at:at + cnt], self._below(k))

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._touch()
        for k, ext, rel, cnt, _ in self._pieces(offset, length):
            ext.write_zeroes(rel, cnt, self._below(k) if self.backing is not None
                             else None)

    def _touch(self) -> None:
        """A new CID on the first write (module docstring)."""
        if self._cid_changed or self.descriptor is None:
            return
        self._cid_changed = True
        new = int.from_bytes(os.urandom(4), "little") or 1
        self._edit_descriptor({"CID": f"{new:08x}"})

    def flush(self) -> None:
        if self.writable:
            for b in self._backends.values():
                if b.writable:
                    b.flush()

    # -- the descriptor, rewritten in place ----------------------------------------------
    def _edit_descriptor(self, changes: dict[str, str | None]) -> None:
        """Set (or with None, remove) header keys in the descriptor text, keeping every
        other line as it is, and store it where it was read from."""
        text = self.descriptor_raw.decode("latin-1")
        for key, value in changes.items():
            pattern = re.compile(rf"(?m)^[ \t]*{re.escape(key)}[ \t]*=.*(\r?\n|$)")
            quoted = key not in ("version", "CID", "parentCID")
            line = None if value is None else \
                (f'{key}="{value}"' if quoted else f"{key}={value}")
            m = pattern.search(text)
            if m:
                text = text[:m.start()] + (line + m.group(1) if line else "") + \
                    text[m.end():]
            elif line:
                anchor = re.search(r"(?m)^[ \t]*(parentCID|CID)[ \t]*=.*\n", text)
                at = anchor.end() if anchor else len(text)
                text = text[:at] + line + "\n" + text[at:]
        raw = text.encode("latin-1")
        if self.descriptor_room:
            if len(raw) > self.descriptor_room:
                raise UnsupportedError("not supported yet: growing an embedded descriptor"
                                       f" past its {self.descriptor_room} bytes",
                                       self.path)
            self.backend.pwrite(self.descriptor_at, raw.ljust(self.descriptor_room,
                                                              b"\0"))
        else:
            self.backend.pwrite(0, raw)
            self.backend.truncate(len(raw))
        self.descriptor = dsc.parse(raw, self.path)
        self.descriptor_raw = raw

    def reload_cid(self) -> None:
        """Re-read this image's CID from its file (it may have been written since)."""
        if self.descriptor is None:
            return
        if self.descriptor_room:
            raw = self.backend.read_exact(self.descriptor_at, self.descriptor_room,
                                          "embedded descriptor")
        else:
            raw = self.backend.pread(0, dsc.MAX_DESCRIPTOR_BYTES + 1)
        self.descriptor = dsc.parse(raw, self.path)
        self.descriptor_raw = raw.split(b"\0", 1)[0]

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point the disk at another parent (rebase): ``parentFileNameHint`` and
        ``parentCID`` (the new parent's CID) rewritten in the descriptor."""
        if not self.writable:
            raise UnsupportedError("vmdk image is open read-only", self.path)
        if self.descriptor is None:
            raise UnsupportedError("not supported yet: giving a parent to a VMDK extent"
                                   " without a descriptor", self.path)
        if fmt not in (None, "vmdk"):
            raise UnsupportedError(f"a VMDK's parent must be a VMDK, not {fmt}", self.path)
        new = None
        if name is not None:
            new = open_image(beside(self.path, name), "vmdk",
                             policy=OpenPolicy().descend(self.path))
        try:
            changes = {"parentCID": f"{new.cid if new is not None else 0xFFFFFFFF:08x}",
                       "parentFileNameHint": name}
            self._edit_descriptor(changes)
        except BaseException:
            if new is not None:
                new.close()
            raise
        if self.backing is not None:
            self.backing.close()
        self.backing = new
        self.cid_mismatch = None

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow or shrink the disk in place (``resize.py`` says which kinds, and in
        what order it writes so an interruption leaves the old disk readable)."""
        from .resize import resize
        resize(self, size, shrink)

    def make_empty(self) -> None:
        """Unmap every grain so the disk reads through to its parent (commit), and
        record the parent's current CID (commit has just written it)."""
        if not self.writable:
            raise UnsupportedError("vmdk image is open read-only", self.path)
        for ext in self.extents_:
            if not isinstance(ext, SparseExtent):
                raise UnsupportedError(f"not supported yet: emptying {ext.type} VMDK"
                                       " extents", self.path)
        for ext in self.extents_:
            ext.clear()
        if self.backing is not None and hasattr(self.backing, "reload_cid"):
            self.backing.reload_cid()
            self._edit_descriptor({"parentCID": f"{self.backing.cid:08x}"})
            self.cid_mismatch = None
        self.flush()

    # -- checking --------------------------------------------------------------------------
    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        from .check import check_extent
        res = CheckResult(filename=self.path, format="vmdk")
        if repair:
            raise UnsupportedError("not supported yet: repairing VMDKs (qemu-img cannot"
                                   " either)", self.path)
        shown = 0
        for k, ext in enumerate(self.extents_):
            if not isinstance(ext, SparseExtent):
                continue
            stats = check_extent(ext, self.starts[k])
            for message, structure, field in stats.problems:
                shown += 1
                if shown <= CHECK_MESSAGES:
                    res.add(ProblemKind.CORRUPTION, f"ERROR {message}", structure, field)
                else:
                    res.corruptions += 1
            for note in getattr(ext, "notes", ()):
                res.note(f"Warning: {note}")
        if shown > CHECK_MESSAGES:
            res.note(f"... and {shown - CHECK_MESSAGES} more problems")
        if self.cid_mismatch:
            res.note(f"Warning: {self.cid_mismatch}")
        # like qemu's vmdk_co_check: no cluster counts, so the output is qemu-img's
        return res

    # -- facts -----------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        d = self.descriptor
        extents = []
        for ext, line in zip(self.extents_, self.lines):
            row = ext.info()
            if line is None:
                row["format"] = ""          # as qemu names the extent of a lone file
            row["filename"] = ext.path or (self.path if line is None else "")
            # in qemu's order (QAPI ImageInfo's fields), which its text output keeps
            extents.append({k: row[k] for k in _EXTENT_KEYS if k in row}
                           | {k: v for k, v in row.items() if k not in _EXTENT_KEYS})
        fs: dict[str, object] = {
            "cid": self.cid if self.cid is not None else 0xFFFFFFFF,
            "parent-cid": d.parent_cid if d is not None else 0xFFFFFFFF,
            "create-type": self.create_type,
            "extents": extents,
        }
        actual = sum(b.allocated_bytes() for b in self._backends.values()) \
            if self._backends else self.backend.allocated_bytes()
        first = self.extents_[0]
        info = ImageInfo(filename=self.path, format="vmdk", virtual_size=self.size,
                         actual_size=actual, format_specific=fs,
                         cluster_size=first.cluster_size)
        details: dict[str, object] = {}
        if d is not None:
            ddb = d.ddb
            for key, name in (("ddb.adapterType", "adapter-type"),
                              ("ddb.virtualHWVersion", "hardware-version"),
                              ("ddb.toolsVersion", "tools-version"),
                              ("ddb.longContentID", "long-content-id"),
                              ("ddb.uuid.image", "uuid")):
                if key in ddb:
                    details[name] = ddb[key]
            geo = [ddb.get(f"ddb.geometry.{k}") for k in ("cylinders", "heads", "sectors")]
            if all(geo):
                details["geometry"] = {"cylinders": geo[0], "heads": geo[1],
                                       "sectors": geo[2]}
            details["descriptor"] = "embedded" if self.descriptor_room else "file"
            details["extent-lines"] = [
                {"access": ln.access, "sectors": ln.sectors, "type": ln.type,
                 "filename": ln.filename, "offset": ln.offset} for ln in d.extents]
            if d.parent_hint:
                info.backing_filename = d.parent_hint
                info.backing_format = "vmdk"
                info.full_backing_filename = self.backing.path \
                    if self.backing is not None else beside(self.path, d.parent_hint)
        if isinstance(first, SparseExtent):
            h = first.header
            details["sparse-header"] = {
                "version": h.version, "flags": h.flags,
                "grain-size": first.grain, "gtes-per-gt": first.gtes,
                "compressed": first.compressed, "markers": first.markers,
                "zeroed-grains": first.zeroed_grains,
                "redundant-directory": first.rgd is not None,
                "footer": bool(getattr(first, "footer_used", False))}
        warnings = [n for e in self.extents_ for n in getattr(e, "notes", ())]
        if self.cid_mismatch:
            warnings.append(self.cid_mismatch)
        if warnings:
            details["warnings"] = warnings
        info.details = details
        return info

    def files(self) -> list[str]:
        own = [self.path] if self.path else []
        own += [b.path for b in self._backends.values() if b.path != self.path]
        return own + (self.backing.files() if self.backing is not None else [])

    def close(self) -> None:
        if self.closed:
            return
        try:
            for ext in getattr(self, "extents_", ()):
                ext.close()   # read-ahead in flight stops before its file closes
            super().close()
        finally:
            for b in self._backends.values():
                if b is not self.backend:
                    b.close()
