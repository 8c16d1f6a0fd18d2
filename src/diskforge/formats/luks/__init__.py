"""luks: a raw LUKS1 or LUKS2 container (qemu-img's ``luks`` format, cryptsetup's
``luksFormat`` on a file), read with its passphrase.

The header parsing, key-slot unlocking and sector decryption live in the core package
``diskforge.crypto`` (qcow2's ``encrypt.format=luks`` uses them too); this plugin only
maps the virtual disk onto the payload. Layout, what is read, and what is refused are
in ``formats/luks.md``. Writing LUKS is not supported yet.

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

from ...registry import Format


class LuksFormat(Format):
    name = "luks"
    extensions = ("luks",)
    description = "LUKS1/LUKS2 encrypted container (read with --object secret)"
    takes_key = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:6] == b"LUKS\xba\xbe" and head[6:8] in (b"\x00\x01", b"\x00\x02"):
            return 100
        return 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None,
             key: bytes | None = None):
        from .device import LuksDevice
        return LuksDevice(path, writable=writable, policy=policy, backend=backend, key=key)


FORMAT = LuksFormat()
