"""qed: QEMU Enhanced Disk (docs/interop/qed_spec.txt), read-only.

Read: every cluster and table size the specification allows, zero clusters, backing
files (through the OpenPolicy; ``QED_F_BACKING_FORMAT_NO_PROBE`` names the backing file
raw), images whose need-check bit is set (read as qemu reads them read-only);
``check`` as qemu-img checks QED. Refused with "not supported yet": writing. The
layout as implemented and the quirks are in ``formats/qed.md``; the modules:
``structs`` (the header, constants) <- ``device`` (the BlockDevice and its check).

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

from ...errors import UnsupportedError
from ...registry import Format

_MAGIC = b"QED\x00"


class QedFormat(Format):
    name = "qed"
    extensions = ("qed",)
    description = "QEMU Enhanced Disk (read-only): zero clusters, backing files, check"

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[:4] == _MAGIC else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        if writable:
            raise UnsupportedError("not supported yet: writing qed images", path)
        from .device import QedDevice
        return QedDevice(path, policy=policy, backend=backend)

    def qemu_driver(self, device) -> str | None:
        """QEMU's qed driver reads these files as diskforge does, but a writable QEMU
        repairs an image whose need-check bit is set on opening: such an image is
        served through diskforge's export instead, so it stays as it is."""
        return None if device.need_check else "qed"


FORMAT = QedFormat()
