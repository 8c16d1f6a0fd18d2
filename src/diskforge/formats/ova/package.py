"""An OVF package as files by name: an OVA (a tar, read in place) or a descriptor
with its files beside it (a folder as ovftool and VirtualBox export it).

Both answer the same questions (the descriptor, the manifest and certificate names,
a reader for any file of the package), so the device and the manifest check do not
care which one they hold. In a tar a file is a member found by exact name (nothing
is opened on disk by a member's name); beside an ``.ovf`` it is a file resolved
through the open policy, like a backing file, but confined to the descriptor's
directory in every mode unless the user allowed more (``--allow-root``): an OVF names
its files relative to itself, and a package comes from someone else. A chunked file (``ovf:chunkSize``) is its
chunks read as one (``Joined``).
"""

from __future__ import annotations

import bisect
import os

from ...blockdev import FileBackend, WindowBackend
from ...readbytes import ReadsBytes
from ...devices import is_block_device
from ...errors import FormatError, SafetyError, UnsupportedError
from ...limits import check_alloc
from . import ovf, tar

MAX_CHUNKS = 100_000        # ovftool splits at 1 GiB or more: 100 TB of disk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ...policy import OpenPolicy


class Package:
    """What the OVA and OVF-folder forms share."""

    kind = ""
    path: str
    backend: FileBackend            # the .ova or the .ovf, held open (and locked)
    descriptor: str                 # the descriptor's name in the package
    manifest: str | None
    certificate: str | None
    envelope: ovf.Envelope

    def reader(self, name: str) -> "FileBackend | WindowBackend":
        """A backend reading the package's file ``name``, to close after use."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        """True when the package holds a file ``name``."""
        raise NotImplementedError

    def file_names(self, f: ovf.FileRef) -> list[str]:
        """The names a References entry stands for: its href, or with ovf:chunkSize
        its chunks (DSP0243 "File references": ``href.000000000``, ``.000000001``...,
        nine digits), as many as are there, at most ``MAX_CHUNKS``."""
        if not f.chunk_size:
            return [f.href]
        names = []
        while len(names) < MAX_CHUNKS and self.has(f"{f.href}.{len(names):09d}"):
            names.append(f"{f.href}.{len(names):09d}")
        return names

    def file_reader(self, f: ovf.FileRef) -> "FileBackend | WindowBackend | Joined":
        """A reader of the whole file a References entry names: its chunks joined
        when it has them, each chunkSize bytes but the last, adding up to ovf:size
        (which a chunked file must state: a missing last chunk is caught so)."""
        if not f.chunk_size:
            return self.reader(f.href)
        if f.size is None:
            raise FormatError(f"'{f.href}' is chunked (ovf:chunkSize) but has no"
                              " ovf:size to check its chunks against", self.path,
                              structure="References", field="File.size")
        names = self.file_names(f)
        parts = []
        try:
            for i, name in enumerate(names):
                parts.append(self.reader(name))
                n = parts[-1].size
                if n > f.chunk_size or (n != f.chunk_size and i < len(names) - 1) or n == 0:
                    raise FormatError(f"chunk '{name}' holds {n} bytes; ovf:chunkSize is"
                                      f" {f.chunk_size}", self.path,
                                      structure="References", field="File.chunkSize")
            total = sum(p.size for p in parts)
            if total != f.size:
                raise FormatError(f"the {len(names)} chunks of '{f.href}' hold {total}"
                                  f" bytes; ovf:size says {f.size}", self.path,
                                  structure="References", field="File.size")
        except BaseException:
            for p in parts:
                p.close()
            raise
        return Joined(parts, self.reader_name(f.href))

    def reader_name(self, name: str) -> str:
        """How a file of the package is named in messages."""
        return f"{self.path}:{name}"

    def read_small(self, name: str, limit: int, what: str) -> bytes:
        """The whole of a small file (descriptor, manifest), checked against ``limit``
        before anything is read."""
        with self.reader(name) as r:
            check_alloc(r.size, self.path, what, "size", budget=limit)
            return r.read_exact(0, r.size, what)

    def close(self) -> None:
        self.backend.close()


class TarPackage(Package):
    """An ``.ova``: the descriptor must be the archive's first member (DSP0243)."""

    kind = "ova"

    def __init__(self, path: str, backend: FileBackend) -> None:
        self.path, self.backend = path, backend
        self.members = {m.name: m for m in tar.index(backend, path)}
        first = next(iter(self.members.values()), None)
        if first is None or not first.is_file or not first.name.lower().endswith(".ovf"):
            shown = "no member" if first is None else f"'{first.name}'"
            raise FormatError(f"the first member is {shown}, not an OVF descriptor (.ovf)"
                              " as an OVA starts", path, structure="tar",
                              field="first member")
        self.descriptor = first.name
        base = first.name[:-4]
        self.manifest = self._companion(base, ".mf")
        self.certificate = self._companion(base, ".cert")
        self.envelope = ovf.parse(self.read_small(first.name, ovf.MAX_OVF,
                                                  "OVF descriptor"),
                                  f"{path}:{first.name}")

    def _companion(self, base: str, ext: str) -> str | None:
        """``base.mf`` (the name DSP0243 gives it), else the one member ending so."""
        if base + ext in self.members:
            return base + ext
        found = [n for n, m in self.members.items() if m.is_file and
                 n.lower().endswith(ext)]
        return found[0] if len(found) == 1 else None

    def member(self, name: str, why: str) -> tar.Member:
        ovf.check_href(name, self.path, in_tar=True)
        m = self.members.get(name)
        if m is None:
            raise FormatError(f"{why} '{name}' is not in the archive", self.path,
                              structure="References", field="File.href")
        if not m.is_file:
            raise FormatError(f"{why} '{name}' is a {m.kind}, not a file", self.path,
                              structure="References", field="File.href")
        return m

    def reader(self, name: str) -> WindowBackend:
        m = self.member(name, "file")
        return WindowBackend(self.backend, m.offset, m.size, f"{self.path}:{name}")

    def has(self, name: str) -> bool:
        m = self.members.get(name)
        return m is not None and m.is_file


class FolderPackage(Package):
    """An ``.ovf`` with its files beside it."""

    kind = "ovf"

    def __init__(self, path: str, backend: FileBackend, policy: "OpenPolicy") -> None:
        self.path, self.backend, self.policy = path, backend, policy
        self.descriptor = os.path.basename(path)
        check_alloc(backend.size, path, "OVF descriptor", "size", budget=ovf.MAX_OVF)
        self.envelope = ovf.parse(backend.read_exact(0, backend.size, "OVF descriptor"),
                                  path)
        base = os.path.splitext(path)[0]
        self.manifest = os.path.basename(base + ".mf") \
            if os.path.isfile(base + ".mf") else None
        self.certificate = os.path.basename(base + ".cert") \
            if os.path.isfile(base + ".cert") else None

    def resolve(self, name: str) -> str:
        """Where the file ``name`` is, allowed by the open policy; a regular file, as
        every file an image names must be (DESIGN.md): never a device."""
        if name == self.descriptor:
            return self.path
        ovf.check_href(name, self.path, in_tar=False)
        # confined in every mode: an OVF names its files relative to itself
        # (DSP0243), and a package is someone else's, like an upload
        path = self.policy.resolve(self.path, name, "OVF file", confine=True)
        if is_block_device(path):
            raise SafetyError(f"OVF file '{name}' is a block device; files a descriptor"
                              " names are opened only when they are regular files",
                              self.path)
        return path

    def reader(self, name: str) -> FileBackend:
        return FileBackend(self.resolve(name), lock=True, referenced=True)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.resolve(name))

    def reader_name(self, name: str) -> str:
        return self.resolve(name)


class Joined(ReadsBytes):
    """Chunks read as one file (FileBackend's reading interface, as WindowBackend
    offers it): a chunked disk is read in place, each read split at chunk ends.
    Owns its parts."""

    is_block_device = False
    writable = False

    def __init__(self, parts: list, name: str) -> None:
        self.parts = parts
        self.path = name
        self.starts = []
        pos = 0
        for p in parts:
            self.starts.append(pos)
            pos += p.size
        self.length = pos

    @property
    def size(self) -> int:
        return self.length

    def allocated_bytes(self) -> int:
        return sum(p.allocated_bytes() for p in self.parts)

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv) and 0 <= offset + done < self.length:
            pos = offset + done
            i = bisect.bisect_right(self.starts, pos) - 1
            part = self.parts[i]
            n = min(len(mv) - done, part.size - (pos - self.starts[i]))
            got = part.readinto(pos - self.starts[i], mv[done:done + n])
            done += got
            if got < n:
                break
        return done

    def data_ranges(self, offset: int, end: int):
        end = min(end, self.length)
        for start, p in zip(self.starts, self.parts):
            lo, hi = max(offset, start), min(end, start + p.size)
            if lo < hi:
                for pos, n, data in p.data_ranges(lo - start, hi - start):
                    yield pos + start, n, data

    def _refuse(self, *args, **kwargs):
        raise UnsupportedError("is read-only here (chunks of an OVF package)", self.path)

    pwrite = write_zeroes = truncate = punch_hole = _refuse

    def flush(self, *, durable: bool = True) -> None:
        pass

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_package(path: str, backend: FileBackend, policy: "OpenPolicy") -> Package:
    """The package in the open file ``path``: a tar (an OVA) or an OVF descriptor."""
    head = backend.pread(0, tar.BLOCK)
    if tar.starts_a_tar(head):
        return TarPackage(path, backend)
    if b"<" in head[:512]:
        if "://" in path:
            raise UnsupportedError("not supported yet: an OVF descriptor read from a URL"
                                   " (its disks are separate files; an .ova works)", path)
        return FolderPackage(path, backend, policy)
    raise UnsupportedError("neither a tar (OVA) nor an OVF descriptor", path)
