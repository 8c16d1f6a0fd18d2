"""Shared by the export tests: a small source disk, a boot sector that prints a marker on
the serial port, and a stand-in VMDK writer (qemu-img) for exercising the OVA and AWS
packaging before diskforge's own stream-optimized writer is registered."""

from __future__ import annotations

import random
import subprocess



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
