"""qcow: QEMU's original copy-on-write format (version 1), read-only.

qemu-img still reads and writes it (``-O qcow``); nothing else does. Read: every
cluster and L2 size qemu accepts, compressed (deflate) clusters, backing files (probed,
through the OpenPolicy), AES-encrypted images with their passphrase (``--object
secret``; the ``cryptography`` package, extra ``diskforge[luks]``). Refused with "not
supported yet": writing. The layout as implemented and the quirks are in ``formats/qcow1.md``; the
modules: ``structs`` (the header, constants) <- ``device`` (the BlockDevice).

This module stays light: probing imports nothing else. The probe looks at the version
field, so qcow2's (versions 2 and 3) and this one never both claim a file.
"""

from __future__ import annotations

from ...errors import UnsupportedError
from ...registry import Format

_MAGIC_V1 = b"QFI\xfb\x00\x00\x00\x01"


class Qcow1Format(Format):
    name = "qcow"
    aliases = ("qcow1",)
    extensions = ("qcow",)
    description = "QEMU copy-on-write version 1 (read-only): compressed clusters, backing files"

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[:8] == _MAGIC_V1 else 0

    takes_key = True  # AES-encrypted images: the passphrase (--object secret)

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None,
             key: bytes | None = None):
        if writable:
            raise UnsupportedError("not supported yet: writing qcow images", path)
        from .device import Qcow1Device
        return Qcow1Device(path, policy=policy, backend=backend, key=key)

    def qemu_driver(self, device) -> str | None:
        """QEMU's qcow driver reads every file this reader opens, the same way; an
        encrypted one needs the passphrase QEMU is not given, so diskforge serves it."""
        return None if getattr(device, "encrypted", False) else "qcow"


FORMAT = Qcow1Format()
