"""Shared by the export tests: a small source disk, a boot sector that prints a marker on
the serial port, and a stand-in VMDK writer (qemu-img) for exercising the OVA and AWS
packaging before diskforge's own stream-optimized writer is registered."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess

import pytest

from diskforge.blockdev import ImageWriter
from diskforge.options import Options, option

MiB = 1 << 20


def boot_sector(marker: str) -> bytes:
    """An MBR whose code writes ``marker`` to COM1 (port 0x3F8) and halts: 16-bit code
    loaded at 0:7C00 (cli; xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8;
    loop: lodsb; test al,al; jz done; out dx,al; jmp loop; done: hlt; jmp done)."""
    code = bytes.fromhex("fa31c08ed8be167cbaf803ac84c07403eeebf8f4ebfd")
    assert len(code) == 0x16
    sector = bytearray(512)
    msg = marker.encode() + b"\r\n\x00"
    sector[:len(code)] = code
    sector[len(code):len(code) + len(msg)] = msg
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def source_disk(path: str, size: int = 30 * MiB + 4096, *, marker: str | None = None,
                seed: int = 7) -> str:
    """A sparse raw disk with random data, text and written zeros at fixed places (and a
    boot sector printing ``marker`` when given); its size is on purpose not a whole MiB."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        if marker:
            f.write(boot_sector(marker))
        f.seek(MiB)
        f.write(rng.randbytes(3 * MiB))
        f.seek(9 * MiB)
        f.write(bytes(MiB))                       # written zeros: not data
        f.seek(12 * MiB + 512)
        f.write(b"diskforge export test line\n" * 20000)
        f.seek(size - 4096)
        f.write(rng.randbytes(4096))              # the last, partial MiB holds data
    return path


def gunzip_to(gz: str, out: str) -> str:
    with open(out, "wb") as f:
        subprocess.run(["gzip", "-dc", gz], stdout=f, check=True)
    return out


# -- a stand-in stream-optimized VMDK writer -----------------------------------------------

@dataclasses.dataclass
class _VmdkOptions(Options):
    subformat: str = option("streamOptimized", "VMDK kind", choices=("streamOptimized",))


class _QemuImgVmdkWriter(ImageWriter):
    """Collects the disk in a sparse raw file, then has qemu-img write the VMDK."""

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size
        self.raw = path + ".standin.raw"
        self.f = open(self.raw, "wb")
        self.f.truncate(size)

    def write_prepared(self, offset, data) -> None:
        self.f.seek(offset)
        self.f.write(data)

    def zero(self, offset, length) -> None:
        pass

    def _finish(self) -> None:
        self.f.close()
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                        "subformat=streamOptimized", self.raw, self.path], check=True,
                       capture_output=True)
        os.unlink(self.raw)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if os.path.exists(self.raw):
            os.unlink(self.raw)


class QemuImgVmdk:
    """Looks like the registry's vmdk plugin to ``export.base.write_disk``."""
    name = "vmdk"
    can_write = True
    options = _VmdkOptions

    def writer(self, path, size, options, *, backing=None):
        return _QemuImgVmdkWriter(path, size)


@pytest.fixture
def qemu_img_vmdk(monkeypatch):
    """Make ``registry.get("vmdk")`` the qemu-img stand-in for one test."""
    if shutil.which("qemu-img") is None:
        pytest.skip("reference tool 'qemu-img' is not installed (.ci/run installs it)")
    import diskforge.registry as registry
    real = registry.get

    def get(name):
        return QemuImgVmdk() if name.strip().lower() == "vmdk" else real(name)
    monkeypatch.setattr(registry, "get", get)
    return QemuImgVmdk


def need_vmdk_writer() -> None:
    """Skip unless diskforge's own VMDK writer is registered."""
    from diskforge.export.ova import vmdk_writable
    if not vmdk_writable():
        pytest.skip("no VMDK writer registered yet (registry.get('vmdk').can_write is"
                    " false): the stream-optimized writer lands with the VMDK issue")
