"""The hybrid MBR that lets an ISO boot from a USB stick as well as from a CD.

A hybrid ISO is an ordinary ISO whose first 512 bytes (the unused system area) are a
master boot record, so that the same bytes written to a disk boot by BIOS and UEFI:

- the boot code is syslinux's ``isohdpfx.bin`` (432 bytes); it loads the El Torito BIOS
  image (``isolinux.bin``) from the 512-byte LBA stored at offset 432 and enters it
  through the hybrid entry point isolinux keeps at offset 0x40;
- partition 1 (active) spans the image from sector 0, padded to a whole 1 MiB
  cylinder (64 heads, 32 sectors), so partitioning tools see a sane disk;
- with a UEFI image, partition 2 (type 0xEF) covers the EFI system partition image
  inside the ISO, and partition 1's type becomes 0x00: UEFI firmware skips type-0
  entries, so it sees no overlapping partitions and mounts the ESP (the layout of
  ``isohybrid --uefi`` and xorriso's ``-isohybrid-mbr``).

References: syslinux utils/isohybrid.c and doc/isolinux.txt; UEFI 2.10 §5.2.1 (legacy
MBR); EDK2 MdeModulePkg/Universal/Disk/PartitionDxe/Mbr.c (overlap rule).
"""

from __future__ import annotations

import os
import struct

HEADS, SECTORS = 64, 32
CYLINDER = HEADS * SECTORS * 512      # 1 MiB: hybrid images are padded to a multiple
ISOHDPFX_PATHS = (
    "/usr/lib/ISOLINUX/isohdpfx.bin",          # Debian, Ubuntu (isolinux)
    "/usr/lib/syslinux/mbr/isohdpfx.bin",
    "/usr/lib/syslinux/bios/isohdpfx.bin",     # Arch
    "/usr/share/syslinux/isohdpfx.bin",        # Fedora
    "/usr/lib/syslinux/isohdpfx.bin",
)
ISOLINUX_HYBRID_SIGNATURE = b"\xfb\xc0\x78\x70"   # at offset 0x40 of isolinux.bin


def default_mbr() -> str | None:
    """syslinux's isohdpfx.bin when it is installed."""
    return next((p for p in ISOHDPFX_PATHS if os.path.isfile(p)), None)


def _chs(lba: int) -> bytes:
    c = lba // (HEADS * SECTORS)
    if c > 1023:
        c, h, s = 1023, HEADS - 1, SECTORS
    else:
        h, s = (lba // SECTORS) % HEADS, lba % SECTORS + 1
    return bytes((h, ((c >> 2) & 0xC0) | s, c & 0xFF))


def _entry(active: bool, ptype: int, start: int, count: int) -> bytes:
    """UEFI 2.10 Table 5-2: one legacy MBR partition record."""
    return (bytes((0x80 if active else 0,)) + _chs(start) + bytes((ptype,))
            + _chs(start + count - 1) + struct.pack("<LL", start, count))


def padded_size(iso_size: int) -> int:
    return -(-iso_size // CYLINDER) * CYLINDER


def mbr(boot_code: bytes, image_size: int, disk_id: int, bios_rba: int | None,
        efi: tuple[int, int] | None) -> bytes:
    """The 512-byte MBR for an image of ``image_size`` bytes (already padded):
    ``bios_rba`` is the 2048-byte sector of isolinux.bin, ``efi`` the sector and size
    in bytes of the EFI system partition image."""
    out = bytearray(512)
    out[:len(boot_code[:432])] = boot_code[:432]
    struct.pack_into("<LLL", out, 432, (bios_rba or 0) * 4, 0, disk_id)
    sectors = image_size // 512
    out[446:462] = _entry(True, 0x00 if efi else 0x17, 0, sectors)
    if efi is not None:
        rba, size = efi
        out[462:478] = _entry(False, 0xEF, rba * 4, max(1, -(-size // 512)))
    out[510:512] = b"\x55\xaa"
    return bytes(out)
