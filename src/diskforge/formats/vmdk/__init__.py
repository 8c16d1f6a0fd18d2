"""vmdk: VMware's virtual disks, as Workstation, Fusion, ESXi, VirtualBox and qemu use them.

Named ``vmdk`` as qemu-img names it. A VMDK is a text descriptor naming one or more
extents (hosted sparse ``KDMV`` files, flat files, ESX ``COWD`` and ``seSparse`` deltas,
zero extents), either in a file of its own or embedded in a monolithic sparse extent.
The layout as implemented, what each createType means and the quirks of real files are
in ``formats/vmdk.md``; the modules here:

- ``structs``: the sparse extent header, markers, COWD header, constants (the leaf);
- ``descriptor``: the text descriptor, parsed, validated and written;
- ``extents``: the extent interface, FLAT/VMFS, ZERO and NOACCESS extents;
- ``sparse``: hosted sparse (KDMV, streamOptimized) and ESX COWD extents: grain
  directories, compressed grains, writing in place;
- ``sesparse``: ESXi seSparse extents (read only);
- ``check``: grain directories and tables against the file;
- ``device``: the BlockDevice (descriptor and extents opened through the policy,
  snapshot chains, info, writing in place);
- ``layout``: where the writers put things (sparse-extent layout, extent names, the
  descriptor written), and ``measure``;
- ``parent``: a delta disk's parent CID, read from the parent's descriptor;
- ``writer``: the ImageWriter for the hosted kinds (monolithic/split, sparse/flat,
  delta disks);
- ``stream``: the ImageWriter for streamOptimized, as ESXi and AWS accept it.

Imports go one way: structs <- descriptor, extents <- sparse, sesparse <- check <-
device; structs <- descriptor <- layout, parent <- writer <- stream.

This module stays light: probing imports nothing else.
"""

from __future__ import annotations

from ...errors import UsageError
from ...registry import Format, Measurement, OptionsFrom

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options
    from .options import VmdkOptions


class VmdkFormat(Format):
    name = "vmdk"
    extensions = ("vmdk",)
    description = "VMware virtual disk: monolithic/split sparse and flat, streamOptimized," \
                  " ESX vmfs, snapshots"
    options = OptionsFrom("diskforge.formats.vmdk.options:VmdkOptions")
    random_write = True     # hosted sparse and flat kinds; the device refuses the rest

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        from .structs import COWD_MAGIC, SESPARSE_MAGIC, SPARSE_MAGIC
        if head[:4] in (SPARSE_MAGIC, COWD_MAGIC) or head[:8] == SESPARSE_MAGIC:
            return 100
        from .descriptor import looks_like_descriptor
        return 100 if looks_like_descriptor(head) else 0

    def open(self, path: str, *, writable: bool = False, policy=None, backend=None):
        from .device import VmdkDevice
        return VmdkDevice(path, writable=writable, policy=policy, backend=backend,
                          window=backend is not None)

    def qemu_driver(self, device) -> str | None:
        """QEMU's vmdk driver reads monolithic files and the descriptor kinds it
        opens (monolithicFlat, vmfs, vmfsSparse, seSparse, twoGbMaxExtent*) as
        diskforge does, but skips extent lines that are not RW (and ZERO extents),
        which shortens the disk, and refuses reads through a parent whose CID does not
        match: those are served over NBD (``VmdkDevice.qemu_readable``)."""
        return "vmdk" if device.qemu_readable() else None

    def writer(self, path: str, size: int, options: Options, *, backing=None,
               seed: int | None = None):
        """A new image of ``options.subformat``. ``seed`` fixes the random CID (and a
        stream's longContentID) so that tests and reproducible builds get the same
        bytes; by default they are random, as VMware's and qemu's."""
        if not isinstance(options, self.options):
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
