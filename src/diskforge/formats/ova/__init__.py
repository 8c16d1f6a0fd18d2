"""ova: OVF packages (``.ova`` tars and ``.ovf`` descriptors with their files beside
them), opened in place as one of their disks.

Read-only. A disk is read by its own format's plugin, straight out of the tar; the
descriptor gives ``info`` its virtual system and disk list, and the manifest gives
``verify`` its digests. The layout as implemented, what is not supported yet and the
quirks of real packages are in ``formats/ova.md``; the modules here:

- ``tar``: indexing the archive in place (ustar, GNU, pax);
- ``ovf``: the descriptor, parsed safely (expat, bounded, no DTDs);
- ``manifest``: the ``.mf`` in every spelling tools write;
- ``package``: the two forms (tar, folder) as files by name, chunked files joined;
- ``device``: the BlockDevice over the chosen disk, ``info``, ``verify``.

Imports go one way: tar, ovf, manifest <- package <- device. Probing imports only
``tar``.
"""

from __future__ import annotations

import re

from ...registry import Format

# an OVF descriptor: an XML document whose root is an Envelope (any prefix)
_ENVELOPE = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?Envelope[\s>]")


class OvaFormat(Format):
    name = "ova"
    aliases = ("ovf",)
    extensions = ("ova", "ovf")
    description = "OVF packages (OVA tar or OVF folder), read in place: one disk at a time"
    members = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        lower = head.lower()
        if b"ovf" not in lower:     # neither an OVA's first name nor an OVF namespace:
            return 0                # answered without importing the tar reader
        start = head[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
        if start.startswith(b"<"):
            return 90 if _ENVELOPE.search(head[:16384]) and b"ovf" in lower[:16384] else 0
        from .tar import first_member_name
        name = first_member_name(head)
        return 100 if name is not None and name.lower().endswith(".ovf") else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None,
             member: "str | int | None" = None):
        from ...errors import UnsupportedError
        from ...policy import OpenPolicy
        if writable:
            raise UnsupportedError("OVA packages are read-only (convert the disk out)",
                                   path)
        from ...remote import is_remote
        if backend is not None and not is_remote(path):
            raise UnsupportedError("an OVF package inside another file: nested packages"
                                   " are refused", path)
        from .device import open_ova
        return open_ova(path, policy=policy or OpenPolicy.from_environment(),
                        member=member, backend=backend)


FORMAT = OvaFormat()
