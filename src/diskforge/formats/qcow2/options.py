"""The ``-o`` options of qcow2 output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...errors import UsageError
from ...options import Options, option


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
