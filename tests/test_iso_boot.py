"""Booting, for real: one ISO with a BIOS (isolinux) and a UEFI El Torito entry and a
hybrid MBR boots in qemu-system-x86_64 (TCG, -nographic) four ways — as a CD-ROM and
as a hard disk, under SeaBIOS and under OVMF — and each time the marker its boot
loader prints on the serial port is seen."""

from __future__ import annotations

import uuid

import pytest
from conftest import need
from isotools import boot_iso, ovmf, qemu_boot


@pytest.fixture(scope="module")
def bootable(tmp_path_factory):
    need("qemu-system-x86_64")
    token = uuid.uuid4().hex[:8]
    bios_marker, uefi_marker = f"DISKFORGE-BIOS-{token}", f"DISKFORGE-UEFI-{token}"
    iso = boot_iso(str(tmp_path_factory.mktemp("boot")), bios_marker, uefi_marker)
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
