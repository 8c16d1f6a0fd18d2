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

import dataclasses
import os

from ...errors import UsageError
from ...options import Options, option
from ...registry import Format, Measurement
from .structs import QCOW_MAGIC


@dataclasses.dataclass
class Qcow2Options(Options):
    """``-o`` options of qcow2 output, qemu-img's names and defaults."""
    compat: str = option("1.1", "compatibility level: 1.1 (v3) or 0.10 (v2)",
                         choices=("1.1", "0.10", "v3", "v2"))
    cluster_size: int = option(65536, "cluster size in bytes (512 B to 2 MiB, a power"
                               " of two)", kind="size", minimum=512, maximum=2 << 20,
                               power_of_two=True)
    preallocation: str = option("off", "off, metadata (tables for the whole disk),"
                                " falloc (and reserve the space), full (and write"
                                " zeros)", choices=("off", "metadata", "falloc", "full"))
    lazy_refcounts: bool = option(False, "set the lazy refcounts bit (compat 1.1)")
    refcount_bits: int = option(16, "width of a reference count: 1, 2, 4, 8, 16, 32"
                                " or 64 (compat 0.10 needs 16)", minimum=1, maximum=64,
                                power_of_two=True)
    compression_type: str = option("zlib", "codec of compressed clusters (-c)",
                                   choices=("zlib", "zstd"))
    extended_l2: bool = option(False, "extended L2 entries: 32 subclusters per cluster"
                               " (compat 1.1, clusters of 16 KiB or more)")
    backing_file: str = option("", "backing file (also -b/-B)")
    backing_fmt: str = option("", "format of the backing file (also -F)")
    data_file: str = option("", "external data file holding the guest clusters"
                            " (relative to the image)")
    data_file_raw: bool = option(False, "keep the external data file a valid raw image")
    compress: bool = option(False, "write compressed clusters (what convert -c sets)")

    @property
    def version(self) -> int:
        return 2 if self.compat in ("0.10", "v2") else 3

    def validate(self) -> None:
        v2 = self.version == 2
        if v2:
            if self.lazy_refcounts:
                raise UsageError("lazy refcounts only supported with compatibility level"
                                 " 1.1 and above (use compat=1.1)")
            if self.refcount_bits != 16:
                raise UsageError("different refcount widths than 16 bits require"
                                 " compatibility level 1.1 or above (use compat=1.1)")
            if self.extended_l2:
                raise UsageError("extended L2 entries are only supported with"
                                 " compatibility level 1.1 and above")
            if self.compression_type != "zlib":
                raise UsageError("compression_type requires compatibility level 1.1"
                                 " or above")
            if self.data_file:
                raise UsageError("external data files are only supported with"
                                 " compatibility level 1.1 and above")
        if self.extended_l2 and self.cluster_size < 16384:
            raise UsageError("extended L2 entries are only supported with cluster sizes"
                             " of at least 16384 bytes")
        if self.data_file_raw and not self.data_file:
            raise UsageError("data_file_raw requires data_file")
        if self.data_file_raw and self.backing_file:
            raise UsageError("a raw external data file excludes a backing file")
        if self.compress and self.data_file:
            raise UsageError("compressed clusters cannot be written to an external data"
                             " file")
        if self.compress and self.preallocation != "off":
            raise UsageError("compression and preallocation cannot be used together")
        if self.backing_fmt and not self.backing_file:
            raise UsageError("backing_fmt requires backing_file")


class Qcow2Format(Format):
    name = "qcow2"
    extensions = ("qcow2",)
    description = ("QEMU copy-on-write v2/v3: compressed (zlib/zstd), extended L2,"
                   " backing chains, snapshots, external data files")
    options = Qcow2Options
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
        if not isinstance(options, Qcow2Options):
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
        if not isinstance(options, Qcow2Options) or options.version < 3:
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

__all__ = ["FORMAT", "Qcow2Format", "Qcow2Options", "UnsupportedError"]
