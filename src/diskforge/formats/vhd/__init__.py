"""vpc: Microsoft's Virtual Hard Disk (VHD), as Virtual PC, Hyper-V, Azure and qemu use it.

Named ``vpc`` as qemu-img names it, ``vhd`` accepted too. Reads and writes fixed,
dynamic and differencing disks; opens dynamic and differencing disks for writing in
place. The layout as implemented, the size rules and the quirks of real files are in
``formats/vhd.md``; the modules here:

- ``structs``: the footer, dynamic disk header and parent locator entries, the
  constants, checksums, the sector bitmap's bit order and alignment (the leaf: it
  imports no sibling);
- ``geometry``: CHS geometry and which size a reader believes (qemu's rules);
- ``locators``: parent locators, how a parent is found and the entries written;
- ``device``: the BlockDevice (reading, extents, check, writing in place);
- ``maintenance``: resize (grow, shrink), a parent for a dynamic disk, emptying and
  re-linking for commit (used by ``device``, which imports it when asked);
- ``writer``: the ImageWriter (new fixed, dynamic and differencing disks).

Imports go one way: structs <- geometry, locators <- maintenance <- device <- writer.

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

from ...errors import UsageError
from ...registry import Format, Measurement, OptionsFrom

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options

_COOKIE = b"conectix"


class VhdFormat(Format):
    name = "vpc"
    aliases = ("vhd",)
    extensions = ("vhd", "vpc", "avhd")
    description = "Virtual Hard Disk (Virtual PC, Hyper-V, Azure): fixed, dynamic," \
                  " differencing"
    options = OptionsFrom("diskforge.formats.vhd.options:VhdOptions")
    random_write = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:8] == _COOKIE:
            return 100
        # a fixed disk has its footer only at the end (qemu does not probe these); the
        # 511-byte footer is Virtual PC's before 2004
        if tail[-512:-504] == _COOKIE or tail[-511:-503] == _COOKIE:
            return 90
        return 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .device import VhdDevice
        return VhdDevice(path, writable=writable, policy=policy, backend=backend)

    def qemu_driver(self, device) -> str | None:
        """QEMU's vpc driver reads fixed and dynamic disks as diskforge does (the size
        rules are the same, see geometry.py; a 511-byte footer too), but not a
        differencing disk (it reads the parent's sectors as zeros) nor a dynamic disk
        whose footer copy at offset 0 is damaged (QEMU reads only that copy and
        refuses the file; diskforge uses the footer at the end)."""
        from .structs import DIFFERENCING, FOOTER_SIZE
        if device.disk_type == DIFFERENCING:
            return None
        if device.footer_copy_at is not None and \
                device.backend.pread(0, FOOTER_SIZE) != device.footer_raw:
            return None
        return "vpc"

    def writer(self, path: str, size: int, options: Options, *, backing=None):
        from .writer import VhdWriter
        if not isinstance(options, self.options):
            raise UsageError("internal: vpc writer given foreign options", path)
        return VhdWriter(path, size, options, backing)

    def measure(self, size: int, options: Options, allocated) -> Measurement:
        from .geometry import plan_size
        from .structs import bitmap_size
        current, _ = plan_size(size, options.force_size)
        if options.subformat == "fixed":
            return Measurement(required=current + 512, fully_allocated=current + 512)
        bs = options.block_size
        nblocks = -(-current // bs)
        meta = 512 + 1024 + -(-nblocks * 4 // 512) * 512 + 512
        per_block = -(-bitmap_size(bs) // min(4096, bs)) * min(4096, bs) + bs
        blocks: set[int] = set()
        for e in allocated or ():
            blocks.update(range(e.offset // bs, -(-(e.offset + e.length) // bs)))
        return Measurement(required=meta + len(blocks) * per_block,
                           fully_allocated=meta + nblocks * per_block)


FORMAT = VhdFormat()
