"""asif: Apple's Sparse Image Format (macOS 26 "Tahoe": Disk Utility, the
Virtualization framework), read-only.

Apple publishes no specification; the layout as implemented, where each fact comes
from and how the reader was checked are in ``formats/asif.md``. Modules: ``structs``
(the header and the table geometry derived from it) and ``device`` (the BlockDevice).

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

from ...registry import Format

_SIGNATURE = b"shdw"  # followed by a big-endian header version (1 is read)


class AsifFormat(Format):
    name = "asif"
    extensions = ("asif",)
    description = "Apple Sparse Image Format (macOS 26), read-only"

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        # any version: a later one is refused by open() ("not supported yet"), not
        # taken for a raw disk
        return 100 if head[:4] == _SIGNATURE and head[4:8] != bytes(4) else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .device import AsifDevice
        return AsifDevice(path, writable=writable, policy=policy, backend=backend)


FORMAT = AsifFormat()
