"""parallels: Parallels Desktop disks, read-only (qemu-img's ``parallels``).

Read: a bare expandable image file (``.hds``/``.hdd``, headers "WithoutFreeSpace" and
"WithouFreSpacExt", as qemu's block/parallels.c and docs/interop/parallels.txt describe
them), and a disk bundle (a ``.hdd`` directory with ``DiskDescriptor.xml``: plain and
expandable extents, split disks, the current snapshot's chain). ``check`` as qemu-img
checks Parallels images. Refused with "not supported yet": writing, encrypted bundles,
reading other snapshots than the current one. The layout as implemented and the quirks
of real files are in ``formats/parallels.md``; the modules:

- ``structs``: the image header and constants (the leaf);
- ``image``: one expandable image file (reading, extents, check);
- ``descriptor``: DiskDescriptor.xml, parsed safely;
- ``bundle``: a bundle directory as one device.

Imports go one way: structs <- image <- bundle, descriptor <- bundle.
This module stays light: probing imports nothing else.
"""

from __future__ import annotations

import os

from ...errors import UnsupportedError
from ...registry import Format

_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_VERSION = b"\x02\x00\x00\x00"
_DESCRIPTOR = "DiskDescriptor.xml"


class ParallelsFormat(Format):
    name = "parallels"
    extensions = ("hdd", "hds")
    description = "Parallels Desktop (read-only): expandable images, .hdd bundles"

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:16] in _MAGICS:
            # another version is still ours to refuse by name, not a raw disk
            return 100 if head[16:20] == _VERSION else 50
        if head.lstrip()[:5] == b"<?xml" and b"<Parallels_disk_image" in head[:4096]:
            return 100          # a bundle's DiskDescriptor.xml, named directly
        return 0

    def probe_directory(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, _DESCRIPTOR))

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        if writable:
            raise UnsupportedError("not supported yet: writing parallels images", path)
        path = os.fspath(path)
        if backend is not None and os.path.basename(path) == _DESCRIPTOR:
            backend.close()
            raise UnsupportedError("not supported yet: a Parallels bundle read from a URL"
                                   " or from inside another file (a directory of files)",
                                   path)
        if backend is None and (os.path.isdir(path)
                                or os.path.basename(path) == _DESCRIPTOR):
            from .bundle import ParallelsBundle
            folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
            return ParallelsBundle(folder, policy=policy)
        from .image import ParallelsImage
        return ParallelsImage(path, policy=policy, backend=backend)

    def qemu_driver(self, device) -> str | None:
        """QEMU's parallels driver reads a bare image file as diskforge does; it does
        not read bundles (their descriptor is XML), which are served through
        diskforge's export."""
        from .image import ParallelsImage
        return "parallels" if isinstance(device, ParallelsImage) else None


FORMAT = ParallelsFormat()
