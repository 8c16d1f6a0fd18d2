"""vdi: VirtualBox's Virtual Disk Image, as VirtualBox and qemu use it.

Reads VDI 1.1 and 0.x headers: dynamic, static and differencing images, any block
size VirtualBox allows, per-block extra data; writes VDI 1.1 dynamic, static
(``-o static=on``, qemu-img's name) and differencing (``-B``) images as VirtualBox
lays them out; opens them for writing in place. The layout as implemented, how a
parent is found and the quirks of real files are in ``formats/vdi.md``; the modules:

- ``structs``: VDICore.h's structures and constants (the leaf: imports no sibling);
- ``parent``: how a differencing image's parent is found (by UUID);
- ``device``: the BlockDevice (reading, extents, check, writing in place);
- ``writer``: the ImageWriter (new images).

Imports go one way: structs <- parent <- device <- writer (``device`` imports
``parent`` only when it opens a differencing image).

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

from ...errors import UsageError
from ...registry import Format, Measurement, OptionsFrom

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options

_SIGNATURE = b"\x7f\x10\xda\xbe"      # VDI_IMAGE_SIGNATURE, little-endian, at 64


class VdiFormat(Format):
    name = "vdi"
    extensions = ("vdi",)
    description = "VirtualBox Virtual Disk Image: dynamic, static, differencing"
    options = OptionsFrom("diskforge.formats.vdi.options:VdiOptions")
    random_write = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[64:68] == _SIGNATURE else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .device import VdiDevice
        return VdiDevice(path, writable=writable, policy=policy, backend=backend)

    def qemu_driver(self, device) -> str | None:
        """QEMU's vdi driver reads only some VDIs as diskforge does (no parents, 1 MiB
        blocks, no per-block extra data...: ``VdiDevice.qemu_reads_alike``)."""
        return "vdi" if device.qemu_reads_alike() else None

    def writer(self, path: str, size: int, options: Options, *, backing=None):
        from .writer import VdiWriter
        if not isinstance(options, self.options):
            raise UsageError("internal: vdi writer given foreign options", path)
        return VdiWriter(path, size, options, backing)

    def measure(self, size: int, options: Options, allocated) -> Measurement:
        from .structs import SECTOR, layout
        size = -(-size // SECTOR) * SECTOR
        bs = options.block_size
        nblocks, _, off_data = layout(max(size, SECTOR), bs)
        full = off_data + nblocks * bs
        if options.static:
            return Measurement(required=full, fully_allocated=full)
        blocks: set[int] = set()
        for e in allocated or ():
            blocks.update(range(e.offset // bs, -(-(e.offset + e.length) // bs)))
        return Measurement(required=off_data + len(blocks) * bs, fully_allocated=full)


FORMAT = VdiFormat()
