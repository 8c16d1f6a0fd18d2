"""Apple disk images: UDIF (.dmg), sparse images (.sparseimage) and sparse bundles.

Three plugins share this package because they share Apple's conventions, not code
paths: ``dmg`` reads every UDIF variant hdiutil makes (UDRO, UDRW, UDCO, UDZO, UDBZ,
ULFO, ULMO) and writes UDRO/UDRW/UDZO/UDBZ/ULFO/ULMO (writer.py); ``sparseimage``
(UDSP) and ``sparsebundle`` (UDSB, a directory of bands) are read-only block devices
(sparse.py). Encrypted images (``encrcdsa``/``cdsaencr`` wrappers, Apple Encrypted
Archives) are recognised and refused with a plain message. The layout as implemented
and the quirks met in real files are in ``formats/dmg.md``.
"""

from __future__ import annotations

import os

from ...devices import open_input_file
from ...errors import ImageIOError, UnsupportedError, UsageError
from ...registry import Format, OptionsFrom

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options


def _encrypted(head: bytes, tail: bytes) -> str | None:
    if head.startswith(b"encrcdsa"):
        return "encrcdsa v2"
    if tail[-8:] == b"cdsaencr":
        return "cdsaencr v1"
    if head.startswith(b"AEA1"):
        return "Apple Encrypted Archive"
    return None


class DmgFormat(Format):
    name = "dmg"
    extensions = ("dmg",)
    options = OptionsFrom("diskforge.formats.dmg.options:DmgOptions")
    description = ("Apple UDIF disk image (hdiutil UDRO/UDRW/UDCO/UDZO/UDBZ/ULFO/ULMO);"
                   " writes UDRO/UDRW/UDZO/UDBZ/ULFO/ULMO")

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        if file_size >= 512 and tail[-512:-508] == b"koly":
            return 100
        if _encrypted(head, tail):
            return 90
        if b"koly" in tail[-512:] and b"</plist>" in tail:
            return 50  # a trailer cut short: open() says so, rather than "raw"
        return 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        if backend is not None:  # a remote object (remote/): read through its backend
            from ...remote import is_remote
            if not is_remote(path):  # a window onto part of another file (an OVA member)
                backend.close()
                raise UnsupportedError("not supported yet: reading a DMG stored inside"
                                       " another file", path)
            size = backend.size
            head = backend.pread(0, min(size, 1 << 16))
            tail = backend.pread(max(0, size - (1 << 16)), 1 << 16)
        else:
            from ...registry import read_probe_window
            head, tail, _ = read_probe_window(path)
        kind = _encrypted(head, tail)
        if kind is not None and tail[-512:-508] != b"koly":
            if backend is not None:
                backend.close()
            raise UnsupportedError(f"encrypted DMG is not supported ({kind}); decrypt it"
                                   " first (hdiutil convert -format UDZO)", path)
        from .reader import DmgDevice
        if backend is not None:
            return DmgDevice(path, backend=backend)
        return DmgDevice(os.fspath(path))

    def qemu_driver(self, device) -> str | None:
        """QEMU's dmg driver (read-only) reads zero-fill, ignore, raw and zlib chunks;
        its bzip2 and LZFSE decoders are loadable modules Debian ships apart
        (qemu-block-extra) and it has no ADC or LZMA at all, so UDBZ, ULFO, ULMO and
        UDCO images, and any with a chunk over its 64 MiB limit or sectors no chunk
        describes, go through diskforge's NBD export."""
        from . import codecs, udif
        m = device.map
        readable = (codecs.ZERO_FILL, codecs.IGNORE, codecs.RAW, codecs.ZLIB)
        for i in range(len(m)):
            if m.kind[i] not in readable or \
                    m.start[i + 1] - m.start[i] > udif.MAX_CHUNK_BYTES:
                return None
        return "dmg"

    def writer(self, path: str, size: int, options: Options, *, backing=None):
        if backing is not None:
            raise UnsupportedError("dmg images cannot have a backing file", path)
        if not isinstance(options, self.options):
            raise UsageError("internal: dmg writer given foreign options", path)
        from .writer import DmgWriter
        return DmgWriter(os.fspath(path), size, options.format, options.zlib_level)

    def compressed(self, options: Options) -> Options:
        """``convert -c``: UDZO unless a compressed format was asked for."""
        if options.format in ("UDRO", "UDRW"):
            return options.replace(format="UDZO")
        return options


class SparseImageFormat(Format):
    name = "sparseimage"
    extensions = ("sparseimage",)
    description = "Apple sparse disk image (hdiutil UDSP), read-only"

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[:4] == b"sprs" and file_size >= 4096 else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .sparse import SparseImageDevice
        return SparseImageDevice(os.fspath(path), backend=backend)


class SparseBundleFormat(Format):
    name = "sparsebundle"
    extensions = ("sparsebundle",)
    description = "Apple sparse bundle directory (hdiutil UDSB), read-only"

    def probe_directory(self, path: str) -> bool:
        try:
            with open_input_file(os.path.join(path, "Info.plist")) as f:
                return b"com.apple.diskimage.sparsebundle" in f.read(64 << 10)
        except (OSError, ImageIOError):
            return False

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .sparse import SparseBundleDevice
        path = os.fspath(path)
        if backend is not None:
            backend.close()
            raise UnsupportedError("not supported yet: a sparse bundle read from a URL or"
                                   " from inside another file (it is a directory of band"
                                   " files)", path)
        if not os.path.isdir(path):
            raise UsageError("a sparse bundle is a directory", path)
        return SparseBundleDevice(path, policy)


FORMAT = DmgFormat()
SPARSEIMAGE = SparseImageFormat()
SPARSEBUNDLE = SparseBundleFormat()
