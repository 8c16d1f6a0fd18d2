"""Booting, for real: one ISO with a BIOS (isolinux) and a UEFI El Torito entry and a
hybrid MBR boots in qemu-system-x86_64 (TCG, -nographic) four ways — as a CD-ROM and
as a hard disk, under SeaBIOS and under OVMF — and each time the marker its boot
loader prints on the serial port is seen."""

from __future__ import annotations

import os
import uuid

import pytest
from conftest import cli, need
from isotools import copy_isolinux, efi_app, esp_image, make_tree, ovmf, qemu_boot


@pytest.fixture(scope="module")
def bootable(tmp_path_factory):
    need("qemu-system-x86_64")
    if not os.path.exists("/usr/lib/ISOLINUX/isolinux.bin"):
        pytest.skip("isolinux is not installed (.ci/run installs it)")
    need("mkfs.vfat")
    need("mcopy")
    tmp = tmp_path_factory.mktemp("boot")
    token = uuid.uuid4().hex[:8]
    bios_marker, uefi_marker = f"DISKFORGE-BIOS-{token}", f"DISKFORGE-UEFI-{token}"
    src = make_tree(str(tmp / "src"), deep=False)
    copy_isolinux(os.path.join(src, "isolinux"))
    with open(os.path.join(src, "isolinux", "isolinux.cfg"), "w") as f:
        # isolinux prints on the serial port itself (and not on the BIOS console, which
        # SeaBIOS would mirror there too, interleaved)
        f.write(f"SERIAL 0 115200\nCONSOLE 0\nSAY {bios_marker}\n")
    os.makedirs(os.path.join(src, "boot"))
    esp_image(os.path.join(src, "boot", "efi.img"), efi_app(uefi_marker))
    iso = str(tmp / "boot.iso")
    code, _, err = cli("iso", "build", "-q", "-V", "BOOTTEST", "--boot",
                       "isolinux/isolinux.bin", "--efi-boot", "boot/efi.img", "--hybrid",
                       src, iso)
    assert code == 0, err
    return iso, bios_marker, uefi_marker


def test_bios_boot_as_cdrom(bootable):
    iso, marker, _ = bootable
    ok, tail = qemu_boot(["-drive", f"file={iso},media=cdrom,if=ide,readonly=on",
                          "-boot", "d"], marker)
    assert ok, tail


def test_bios_boot_as_hard_disk_from_the_hybrid_mbr(bootable):
    iso, marker, _ = bootable
    ok, tail = qemu_boot(["-drive", f"file={iso},format=raw,if=ide,snapshot=on",
                          "-boot", "c"], marker)
    assert ok, tail
    assert "EHDD" in tail or "Hard Disk" in tail


@pytest.mark.slow
def test_uefi_boot_as_cdrom(bootable):
    firmware = ovmf()
    if firmware is None:
        pytest.skip("OVMF is not installed (.ci/run installs ovmf)")
    iso, _, marker = bootable
    ok, tail = qemu_boot(["-drive", f"file={iso},media=cdrom,if=ide,readonly=on"], marker,
                         firmware=firmware, timeout=120)
    assert ok, tail


@pytest.mark.slow
def test_uefi_boot_as_hard_disk_from_the_esp_partition(bootable):
    firmware = ovmf()
    if firmware is None:
        pytest.skip("OVMF is not installed (.ci/run installs ovmf)")
    iso, _, marker = bootable
    ok, tail = qemu_boot(["-drive", f"file={iso},format=raw,if=ide,snapshot=on"], marker,
                         firmware=firmware, timeout=120)
    assert ok, tail
    assert "HARDDISK" in tail
