"""iso: an ISO 9660 / UDF optical image as a block device.

An ISO's bytes are the disc: the device reads the file as it is (holes as zeros, like
raw), so ``convert``, ``compare`` and ``map`` work on it, and a hybrid ISO written to a
USB stick is the same bytes. What makes it an ISO is the volume descriptor set at
byte 32768, which ``probe`` looks for and ``info`` shows (descriptors, identifiers,
sizes, Rock Ridge/Joliet/UDF, the El Torito catalog); ``ops.info`` adds the hybrid
MBR/GPT from ``diskforge.partitions``.

ISOs are read-only here: ``diskforge iso build`` makes them from a directory (a file
system is built from files, not from a block device's sectors), so there is no
writer and ``convert -O iso`` says "not supported yet".
"""

from __future__ import annotations

from ..blockdev import FileBytesDevice, ImageInfo
from ..registry import Format

VRS_IDENTIFIERS = (b"BEA01", b"NSR02", b"NSR03", b"TEA01", b"BOOT2", b"CDW02")


class IsoDevice(FileBytesDevice):
    format = "iso"

    def _open(self) -> None:
        super()._open()
        # refuse what is not an ISO (one-line error); imported here, not at the top,
        # because the registry imports this module for every image it probes and
        # iso.volume's construct structures cost tens of milliseconds to import
        from ..iso.volume import read_volume_set
        read_volume_set(self)

    def info(self) -> ImageInfo:
        from ..iso.volume import describe
        facts = describe(self)
        return ImageInfo(filename=self.path, format="iso", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(), format_specific=facts)


class IsoFormat(Format):
    name = "iso"
    aliases = ("iso9660", "udf")
    extensions = ("iso",)
    description = "ISO 9660 / Joliet / Rock Ridge / UDF optical image, El Torito, hybrid" \
                  " (read; build with 'diskforge iso build')"

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        # the identifier of the descriptor at sector 16: ISO 9660, or a UDF recognition
        # sequence (a copy of iso.structs.VRS_IDENTIFIERS rather than an import: probing
        # runs for every image opened, and that module's construct Structs cost 15 ms)
        ident = head[32769:32774]
        return 80 if ident == b"CD001" or ident in VRS_IDENTIFIERS else 0

    def open(self, path: str, *, writable: bool = False, policy=None,
             backend=None) -> IsoDevice:
        return IsoDevice(path, backend=backend)

    def qemu_driver(self, device) -> str:
        return "raw"  # the disc's bytes as they are


FORMAT = IsoFormat()
