"""An OVA (or an ``.ovf`` with its files) opened as one of its disks.

The device is a FilterDevice over the chosen disk, which the disk's own format plugin
reads (probed through the registry, then ``Format.open(name, backend=...)``; a tar
member through a window onto the archive, so nothing is extracted). What it adds:
``info`` (the disk's own info plus the virtual system and the disk list from the
descriptor), ``verify`` (the manifest's digests of every file, streamed in bounded
memory, and the disk's own checksums where its format has them), ``files``.

Which disk: the first ``DiskSection`` disk that has a file, or the one named by file
name or ``ovf:diskId`` (``vm.ova:NAME``), or the N-th (``--disk N``, 1-based, in
``DiskSection`` order). Read-only: a package is never written in place.

Refused: a disk that is itself an OVA or OVF (no nesting), a disk that names other
files (a backing file, an extent, a data file: an OVA is self-contained, and those
would be looked for beside the package, not in it; not supported yet), compressed
(``ovf:compression``) files (not supported yet). Chunked files (``ovf:chunkSize``, as
ovftool splits large disks) are read joined (``package.Joined``).
"""

from __future__ import annotations

from ...blockdev import (BlockDevice, Extent, FileBackend, FilterDevice, ImageInfo,
                         WindowBackend)
from ...checks import CheckResult, Repair
from ...errors import DiskforgeError, UnsupportedError, UsageError
from ...registry import open_image, probe, probe_backend
from . import manifest as mf
from .ovf import Disk
from .package import FolderPackage, Package, open_package

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ...policy import OpenPolicy
    from ...registry import Format

CHUNK = 1 << 20             # bytes hashed per read when verifying


def choose_disk(pkg: Package, member: "str | int | None") -> tuple[Disk, int]:
    """The disk asked for and its 1-based number (module docstring)."""
    disks = pkg.envelope.disks
    if not disks:
        raise UnsupportedError("the OVF descriptor lists no disks (DiskSection)",
                               pkg.path)
    if member is None:
        for i, d in enumerate(disks, 1):
            if d.file is not None:
                return d, i
        raise UnsupportedError("no disk of the OVF descriptor has a file (all are empty"
                               " disks created on import)", pkg.path)
    if isinstance(member, int) or (isinstance(member, str) and member.isdigit()
                                   and not any(member in (d.disk_id, d.file and
                                                          d.file.href) for d in disks)):
        n = int(member)
        if not 1 <= n <= len(disks):
            raise UsageError(f"--disk {n}: the package has {len(disks)} disk"
                             f"{'s' if len(disks) > 1 else ''}", pkg.path)
        return disks[n - 1], n
    for i, d in enumerate(disks, 1):
        if member == d.disk_id or (d.file is not None and member == d.file.href):
            return d, i
    known = ", ".join(d.file.href if d.file else d.disk_id for d in disks)
    raise UsageError(f"no disk '{member}' in the package (its disks: {known})", pkg.path)


def open_disk(pkg: Package, disk: Disk, policy: "OpenPolicy") -> BlockDevice:
    """The disk's device, read by its own format's plugin."""
    if disk.file is None:
        raise UnsupportedError(f"disk '{disk.disk_id}' has no file: an empty disk of"
                               f" {disk.capacity} bytes the importer creates", pkg.path)
    f = disk.file
    if f.compression:
        raise UnsupportedError(f"not supported yet: compressed OVF files ('{f.href}' has"
                               f" ovf:compression={f.compression})", pkg.path)
    if disk.parent_ref:
        raise UnsupportedError(f"not supported yet: OVF differencing disks ('{disk.disk_id}'"
                               f" has ovf:parentRef={disk.parent_ref})", pkg.path)
    if isinstance(pkg, FolderPackage) and not f.chunk_size:
        path = pkg.resolve(f.href)
        _refuse_nesting(probe(path), path)
        dev = open_image(path, policy=policy)
        name = path
    else:                       # a tar member, or chunks: read through a backend
        reader = pkg.file_reader(f)
        name = reader.path
        try:
            plugin = probe_backend(reader, name)
            _refuse_nesting(plugin, name)
            if not plugin.can_read:
                raise UnsupportedError(f"not supported yet: reading {plugin.name} images",
                                       name)
        except BaseException:
            reader.close()
            raise
        dev = plugin.open(name, policy=policy, backend=reader)
    extra = [p for p in dev.files() if p != name]
    if dev.backing is not None or extra:
        dev.close()
        raise UnsupportedError(f"not supported yet: a disk inside an OVF package that names"
                               f" other files ({', '.join(extra) or 'a backing file'})",
                               name)
    return dev


def _compact(value):
    """``value`` without the None entries of its dicts (facts the descriptor leaves
    out are left out, not printed as None)."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def _refuse_nesting(plugin: "Format", name: str) -> None:
    if getattr(plugin, "members", False):
        raise UnsupportedError(f"the disk is itself an {plugin.name.upper()} package;"
                               " nested packages are refused", name)


class OvaDevice(FilterDevice):
    """One disk of an OVF package (``package``), ``number`` of its DiskSection."""

    def __init__(self, inner, package: Package, disk: Disk, number: int) -> None:
        super().__init__(inner)
        self.package = package
        self.disk = disk
        self.number = number
        self.format = "ova"
        self.path = package.path
        self.verify_notes: list[str] = []
        backend = getattr(inner, "backend", None)
        # where the disk's bytes are in the file ``map`` names (the package's): a
        # member's offset in the archive; beside an .ovf they are in another file
        self.host_shift = backend.offset if isinstance(backend, WindowBackend) else None

    def extents(self, offset: int = 0, length: int | None = None):
        """The disk's extents, with host offsets moved from the disk member to the
        archive (``map`` names the .ova, so its offsets are the .ova's); a disk
        beside an .ovf is another file, so there ``map`` shows no offsets."""
        shift = self.host_shift
        return (e if e.host_offset is None else
                Extent(e.offset, e.length, e.kind, e.allocated,
                       None if shift is None else e.host_offset + shift)
                for e in self.inner.extents(offset, length))

    def info(self) -> ImageInfo:
        inner = self.inner.info()
        pkg = self.package
        data: dict[str, object] = {"package": pkg.kind, "descriptor": pkg.descriptor,
                                   "manifest": pkg.manifest,
                                   "certificate": pkg.certificate}
        data.update(pkg.envelope.to_json())
        data["disk"] = {"number": self.number, "disk-id": self.disk.disk_id,
                        "file": self.disk.file.href if self.disk.file else None,
                        "format": self.inner.format}
        out = ImageInfo(filename=self.path, format="ova", virtual_size=self.size,
                        actual_size=pkg.backend.allocated_bytes())
        out.format_specific = _compact(data)
        out.details = {"disk-info": inner.to_json()}
        return out

    def check(self, repair: Repair = Repair.NONE) -> "CheckResult":
        """The disk's own consistency check (the package has none of its own)."""
        if repair is not Repair.NONE:
            raise UnsupportedError("OVA packages are read-only; convert the disk out to"
                                   " repair it", self.path)
        return self.inner.check(repair)

    def verify(self) -> list[str]:
        """Every manifest digest against the file it names (each streamed once, in
        CHUNK reads), ``ovf:size`` against each referenced file, files the descriptor
        references that the manifest leaves out, and the disk's own checksums."""
        pkg = self.package
        problems: list[str] = []
        self.verify_notes = []
        if pkg.certificate:
            self.verify_notes.append(f"certificate '{pkg.certificate}' present: not"
                                     " checked yet")
        for f in pkg.envelope.files:
            if f.size is None:
                continue
            try:
                with pkg.file_reader(f) as r:
                    if r.size != f.size:
                        problems.append(f"'{f.href}': References says ovf:size={f.size},"
                                        f" the file holds {r.size} bytes")
            except DiskforgeError as e:
                problems.append(f"'{f.href}': {e.message}")
        if pkg.manifest is None:
            if not problems:
                raise UnsupportedError("no manifest (.mf) in the package", self.path)
        else:
            problems += self._check_manifest()
        try:
            problems += [f"disk: {p}" for p in self.inner.verify()]
        except UnsupportedError:
            pass
        return problems

    def _check_manifest(self) -> list[str]:
        pkg = self.package
        entries, problems = mf.parse(pkg.read_small(pkg.manifest, mf.MAX_MANIFEST,
                                                    "manifest"), self.path)
        by_file: dict[str, list[mf.Entry]] = {}
        for e in entries:
            by_file.setdefault(e.name, []).append(e)
        for name, group in by_file.items():
            try:
                reader = pkg.reader(name)
            except DiskforgeError as e:
                problems.append(f"manifest line {group[0].line}: '{name}': {e.message}")
                continue
            with reader:
                hashers = [mf.hasher(e) for e in group]
                buf = bytearray(min(CHUNK, reader.size))
                pos = 0
                while pos < reader.size:
                    n = reader.readinto(pos, buf)
                    if n <= 0:
                        break
                    view = memoryview(buf)[:n]
                    for h in hashers:
                        h.update(view)
                    pos += n
            for e, h in zip(group, hashers):
                got = h.hexdigest()
                if got != e.digest:
                    problems.append(f"manifest line {e.line}: {e.spelling}({name}) does"
                                    f" not match: the file's is {got}, the manifest"
                                    f" says {e.digest}")
        listed = set(by_file)
        for name in [pkg.descriptor] + [n for f in pkg.envelope.files
                                        for n in pkg.file_names(f)]:
            if name not in listed:
                problems.append(f"'{name}' is not in the manifest (DSP0243: every file"
                                " of the package has a digest there)")
        return problems

    def files(self) -> list[str]:
        own = [self.package.path]
        if isinstance(self.package, FolderPackage):
            own += [p for p in self.inner.files() if p not in own]
        return own

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        finally:
            self.package.close()


def open_ova(path: str, *, policy: "OpenPolicy",
             member: "str | int | None" = None, backend=None) -> OvaDevice:
    """The package at ``path`` opened as the disk ``member`` picks (module docstring).
    ``backend``: the package's bytes when they are not the file ``path`` (a remote
    object, read through remote/); the device then owns it."""
    if backend is None:
        backend = FileBackend(path, lock=True)
    try:
        pkg = open_package(path, backend, policy)
        disk, number = choose_disk(pkg, member)
        inner = open_disk(pkg, disk, policy)
    except BaseException:
        backend.close()
        raise
    return OvaDevice(inner, pkg, disk, number)
