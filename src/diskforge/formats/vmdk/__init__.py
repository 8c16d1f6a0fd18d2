"""vmdk: VMware's virtual disks, as Workstation, Fusion, ESXi, VirtualBox and qemu use them.

Named ``vmdk`` as qemu-img names it. A VMDK is a text descriptor naming one or more
extents (hosted sparse ``KDMV`` files, flat files, ESX ``COWD`` and ``seSparse`` deltas,
zero extents), either in a file of its own or embedded in a monolithic sparse extent.
The layout as implemented, what each createType means and the quirks of real files are
in ``formats/vmdk.md``; the modules here:

- ``structs``: the sparse extent header, markers, COWD header, constants (the leaf);
- ``descriptor``: the text descriptor, parsed, validated and written;
- ``device``: the BlockDevice (every extent kind, snapshot chains, check, writing in
  place);
- ``layout``: where the writers put things (sparse-extent layout, extent names, the
  descriptor written), and ``measure``;
- ``parent``: a delta disk's parent CID, read from the parent's descriptor;
- ``writer``: the ImageWriter for the hosted kinds (monolithic/split, sparse/flat,
  delta disks);
- ``stream``: the ImageWriter for streamOptimized, as ESXi and AWS accept it.

Imports go one way: structs <- descriptor <- device, layout, parent <- writer <- stream.

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

import dataclasses

from ...errors import UsageError
from ...options import Options, option
from ...registry import Format, Measurement

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")


@dataclasses.dataclass
class VmdkOptions(Options):
    """qemu-img's vmdk options, with its defaults (``qemu-img create -f vmdk -o help``)."""
    subformat: str = option("monolithicSparse", "VMDK flat extent format",
                            choices=SUBFORMATS)
    adapter_type: str = option("ide", "virtual adapter type (ddb.adapterType)",
                               choices=ADAPTER_TYPES)
    hwversion: str = option("", "VMDK hardware version (ddb.virtualHWVersion; qemu's"
                            " default 4, or 6 with compat6)")
    toolsversion: str = option("", "VMware guest tools version (ddb.toolsVersion)")
    compat6: bool = option(False, "VMDK version 6 image (hwversion 6)")
    zeroed_grain: bool = option(False, "enable efficient zero writes using the"
                                " zeroed-grain GTE feature")
    backing_file: str = option("", "file name of a base image (also -b/-B)")
    backing_fmt: str = option("", "must be 'vmdk' if present (also -F)")

    def validate(self) -> None:
        if self.compat6 and self.hwversion not in ("", "6"):
            raise UsageError("compat6 cannot be enabled with hwversion set")
        if self.hwversion and not self.hwversion.isdigit():
            raise UsageError(f"hwversion '{self.hwversion}' is not a number")
        if self.backing_fmt not in ("", "vmdk"):
            raise UsageError("backing_fmt must be 'vmdk' if present")
        if self.backing_fmt and not self.backing_file:
            raise UsageError("backing_fmt requires backing_file")


class VmdkFormat(Format):
    name = "vmdk"
    extensions = ("vmdk",)
    description = "VMware virtual disk: monolithic/split sparse and flat, streamOptimized," \
                  " ESX vmfs, snapshots"
    options = VmdkOptions

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        from .structs import COWD_MAGIC, SESPARSE_MAGIC, SPARSE_MAGIC
        if head[:4] in (SPARSE_MAGIC, COWD_MAGIC) or head[:8] == SESPARSE_MAGIC:
            return 100
        from .descriptor import looks_like_descriptor
        return 100 if looks_like_descriptor(head) else 0

    def writer(self, path: str, size: int, options: Options, *, backing=None,
               seed: int | None = None):
        """A new image of ``options.subformat``. ``seed`` fixes the random CID (and a
        stream's longContentID) so that tests and reproducible builds get the same
        bytes; by default they are random, as VMware's and qemu's."""
        if not isinstance(options, VmdkOptions):
            raise UsageError("internal: vmdk writer given foreign options", path)
        if backing is None and options.backing_file:
            backing = _backing_from_options(options)
        if options.subformat == "streamOptimized":
            from .stream import StreamWriter
            return StreamWriter(path, size, options, backing, seed=seed)
        from .writer import VmdkWriter
        return VmdkWriter(path, size, options, backing, seed=seed)

    def compressed(self, options: Options) -> Options:
        """``convert -c`` as qemu-img: a streamOptimized image is compressed anyway;
        the other subformats have no compressed grains, and qemu-img writes them
        uncompressed without complaint, so do we."""
        return options

    def measure(self, size: int, options: Options, allocated) -> Measurement:
        from .layout import measure
        required, full = measure(size, options, allocated)
        return Measurement(required=required, fully_allocated=full)


def _backing_from_options(options: VmdkOptions):
    """``-o backing_file=NAME`` from the Python API: the parent is read for its CID
    when the writer starts (relative to the new image, as qemu resolves it)."""
    from ...blockdev import Backing
    return Backing(name=options.backing_file, format=options.backing_fmt or "vmdk")


FORMAT = VmdkFormat()
