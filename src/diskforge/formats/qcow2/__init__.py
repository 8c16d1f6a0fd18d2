"""qcow2: QEMU's copy-on-write format (docs/interop/qcow2.txt), versions 2 and 3.

Read: every cluster size (512 B - 2 MiB), standard/zero/unallocated/compressed
clusters (deflate and zstd), extended L2 entries (subclusters), refcount widths 1-64,
external data files, backing chains (through the OpenPolicy), internal snapshots as
read-only views. Written: ``create``/``convert`` with qemu-img's options
(``writer.py``), and random-access writes on an image opened writable
(``device.py``). Operations: check and repair (``check.py``), snapshots
(``snapshot.py``), resize, rebase, commit, amend (``maintenance.py``), measure.

Encrypted with ``encrypt.format=luks``: read with a key (``encryption.py``), refused
without one; the old ``encrypt.format=aes``: read with a key, opened without one
(``info``), as qemu-img. Refused with a clear message: writing encrypted images,
unknown incompatible feature bits; writing to an image whose corrupt bit is set (read it, or
repair it first).
"""

from __future__ import annotations

import os

from ...errors import UsageError
from ...registry import Format, Measurement, OptionsFrom
from .structs import QCOW_MAGIC

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options
    from .options import Qcow2Options


class Qcow2Format(Format):
    name = "qcow2"
    extensions = ("qcow2",)
    description = ("QEMU copy-on-write v2/v3: compressed (zlib/zstd), extended L2,"
                   " backing chains, snapshots, external data files")
    options = OptionsFrom("diskforge.formats.qcow2.options:Qcow2Options")
    random_write = True
    snapshots = True
    takes_key = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:4] == QCOW_MAGIC and len(head) >= 8:
            version = int.from_bytes(head[4:8], "big")
            return 100 if version in (2, 3) else 0  # version 1 is "qcow", not ours
        return 0

    def open(self, path: str, *, writable: bool = False, policy=None,
             snapshot: str | None = None, backend=None, key: bytes | None = None):
        from .device import Qcow2Device
        return Qcow2Device(path, writable=writable, policy=policy, snapshot=snapshot,
                           backend=backend, key=key)

    def qemu_driver(self, device) -> str | None:
        # QEMU's own format: every file diskforge opens, QEMU reads; an encrypted one
        # would need its secret handed over too, so it is served over NBD instead
        return None if device.crypto is not None else "qcow2"

    def resume_writer(self, path: str, size: int, options: Options, *, backing=None,
                      state: dict):
        from .writer import Qcow2Writer
        writer = self.writer(path, size, options, backing=backing, _resume=state)
        assert isinstance(writer, Qcow2Writer)
        return writer

    def writer(self, path: str, size: int, options: Options, *, backing=None,
               _resume: dict | None = None):
        from .writer import Qcow2Writer
        if not isinstance(options, self.options):
            raise UsageError("internal: qcow2 writer given foreign options", path)
        path = os.fspath(path)
        if backing is None and options.backing_file:
            backing = _backing_from_options(path, options)
        elif backing is not None and options.backing_file:
            raise UsageError("give the backing file once (-b/-B or -o backing_file)")
        if backing is not None:
            if options.data_file_raw:
                raise UsageError("a raw external data file excludes a backing file", path)
            if options.preallocation != "off" and not options.extended_l2:
                raise UsageError("backing file and preallocation can only be used at the"
                                 " same time if extended_l2 is on", path)
        return Qcow2Writer(path, size, options, backing, _resume)

    def compressed(self, options: Options) -> Options:
        opts = options.replace(compress=True)
        opts.validate()
        return opts

    def measure(self, size: int, options: Options, allocated) -> Measurement:
        from .maintenance import measure
        return measure(size, options, allocated)

    def measure_bitmaps(self, options: Options, bitmaps: list) -> int | None:
        """``qemu-img measure``'s "bitmaps" bytes: what ``convert --bitmaps`` adds for a
        source's persistent bitmaps; None for a v2 target, which cannot hold them."""
        from .bitmaps import measure_bitmaps
        if not isinstance(options, self.options) or options.version < 3:
            return None
        return measure_bitmaps(bitmaps, options.cluster_size)


def _backing_from_options(path: str, options: Qcow2Options):
    """``-o backing_file=NAME``: open it (relative to the new image, as qemu does) for
    its format and for copy-on-write of partial clusters."""
    from ...blockdev import Backing
    from ...policy import beside
    from ...registry import open_image
    name = options.backing_file
    dev = open_image(beside(path, name), options.backing_fmt or None)
    fmt = options.backing_fmt or dev.format
    dev.close()
    return Backing(name=name, format=fmt, device=None)


FORMAT = Qcow2Format()

__all__ = ["FORMAT", "Qcow2Format", "UnsupportedError"]
