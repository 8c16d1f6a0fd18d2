"""Helpers for the ISO tests: a representative source tree, tree snapshots to compare
extractions with, a tiny UEFI application and EFI system partition image, a QEMU boot
runner that watches the serial port, and byte patching for crafted (hostile) ISOs."""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import stat
import struct
import subprocess
import time

import pytest
from conftest import cli, need, run

MTIME = 1_600_000_000   # 2020-09-13: every file of the sample tree has this mtime


def make_tree(root: str, *, deep: bool = True, symlinks: bool = True,
              long_names: bool = True) -> str:
    """A tree with what ISO options must carry: long and non-ASCII names, an empty
    file and directory, modes, relative symlinks (to a file, a directory, dangling),
    nesting deeper than ISO 9660's 8 levels, and a file a few sectors long."""
    os.makedirs(root)
    files = {
        "README": b"read me\n",
        "hello.txt": b"hello, world\n",
        "empty": b"",
        "docs/guide.md": b"# guide\n" * 100,
        "docs/notes/2020.txt": b"notes\n",
        "bin/tool.sh": b"#!/bin/sh\necho tool\n",
        "data/blob.bin": bytes(range(256)) * 40 + b"tail",
    }
    if long_names:
        files["A long file name with spaces and ünïcödé - more than thirty-one.txt"] = b"L\n"
        files["Ελληνικά/κείμενο.txt"] = b"greek\n"
    if deep:
        files["d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/deep.txt"] = b"deep\n"
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.chmod(os.path.join(root, "bin/tool.sh"), 0o755)
    os.chmod(os.path.join(root, "data/blob.bin"), 0o600)
    os.makedirs(os.path.join(root, "emptydir"))
    if symlinks:
        os.symlink("hello.txt", os.path.join(root, "link-to-file"))
        os.symlink("docs/notes", os.path.join(root, "link-to-dir"))
        os.symlink("../hello.txt", os.path.join(root, "docs/up-link"))
        os.symlink("nowhere", os.path.join(root, "dangling"))
    set_mtimes(root, MTIME)
    return root


def set_mtimes(root: str, when: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def snapshot(root: str, *, modes: bool = False, mtimes: bool = False,
             ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """relative path → (kind, size, sha256 | symlink target[, mode][, mtime])."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, root)
            if rel in ignore or rel.split("/")[0] in ignore:
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                row = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                row = ("dir", 0, "")
            else:
                with open(path, "rb") as f:
                    row = ("file", st.st_size, hashlib.sha256(f.read()).hexdigest())
            if modes and not stat.S_ISLNK(st.st_mode):
                row += (stat.S_IMODE(st.st_mode),)
            if mtimes and not stat.S_ISLNK(st.st_mode):
                row += (int(st.st_mtime),)
            out[rel] = row
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


# -- UEFI ------------------------------------------------------------------------------

def efi_app(marker: str) -> bytes:
    """A minimal x86-64 PE32+ EFI application that prints ``marker`` with
    ConOut->OutputString and returns EFI_SUCCESS: 1 KiB, no toolchain needed."""
    msg = (marker + "\r\n").encode("utf-16-le") + b"\0\0"
    code = bytearray()
    code += bytes.fromhex("4883EC28")               # sub rsp, 0x28
    code += bytes.fromhex("488B4A40")               # mov rcx, [rdx+0x40]: ConOut
    lea_at = len(code)
    code += bytes.fromhex("488D15") + b"\0\0\0\0"   # lea rdx, [rip+msg]
    code += bytes.fromhex("FF5108")                 # call [rcx+8]: OutputString
    code += bytes.fromhex("4883C428")               # add rsp, 0x28
    code += bytes.fromhex("31C0C3")                 # xor eax, eax; ret
    struct.pack_into("<i", code, lea_at + 3, len(code) - (lea_at + 7))
    code += msg
    while len(code) % 8:
        code += b"\0"
    reloc_at = len(code)
    code += struct.pack("<LL", 0x1000, 8)           # an empty base relocation block
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<L", dos, 0x3C, 0x40)
    coff = struct.pack("<HHLLLHH", 0x8664, 1, 0, 0, 0, 240, 0x0022)
    dirs = [(0, 0)] * 16
    dirs[5] = (0x1000 + reloc_at, 8)
    opt = struct.pack("<HBBLLLLLQLLHHHHHHLLLLHHQQQQLL", 0x20B, 1, 0, 0x200, 0, 0, 0x1000,
                      0x1000, 0x400000, 0x1000, 0x200, 0, 0, 0, 0, 0, 0, 0, 0x2000, 0x200,
                      0, 10, 0, 0x10000, 0x1000, 0x10000, 0x1000, 0, 16)
    opt += b"".join(struct.pack("<LL", *d) for d in dirs)
    sect = struct.pack("<8sLLLLLLHHL", b".text", 0x1000, 0x1000, 0x200, 0x200, 0, 0, 0, 0,
                       0x60000020)
    return (bytes(dos) + b"PE\0\0" + coff + opt + sect).ljust(0x200, b"\0") \
        + bytes(code).ljust(0x200, b"\0")


def esp_image(path: str, app: bytes) -> str:
    """A 1 MiB FAT EFI system partition image with \\EFI\\BOOT\\BOOTX64.EFI."""
    app_path = path + ".efi"
    with open(app_path, "wb") as f:
        f.write(app)
    run("mkfs.vfat", "-C", "-i", "0d15f0f0", path, "1024")
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run("mmd", "-i", path, "::/EFI", "::/EFI/BOOT", env=env)
    run("mcopy", "-i", path, app_path, "::/EFI/BOOT/BOOTX64.EFI", env=env)
    os.unlink(app_path)
    return path


# -- QEMU -------------------------------------------------------------------------------

def qemu_boot(drive_args: list[str], marker: str, *, timeout: float = 60,
              firmware: str | None = None) -> tuple[bool, str]:
    """Boot qemu-system-x86_64 (TCG, -nographic) and watch the serial port for
    ``marker``; stops the VM as soon as it appears or when ``timeout`` passes."""
    argv = ["qemu-system-x86_64", "-nographic", "-no-user-config", "-nodefaults",
            "-serial", "stdio", "-m", "128", "-accel", "tcg", "-no-reboot"]
    if firmware:
        argv += ["-bios", firmware]
    proc = subprocess.Popen(argv + drive_args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and marker.encode() not in serial_text(out):
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    text = serial_text(out).decode("latin-1")
    return marker in text, text[-2000:]


def serial_text(out: bytes) -> bytes:
    """Serial output without ANSI control sequences: SeaBIOS's serial console moves the
    cursor with them, even in the middle of text a boot loader prints."""
    return re.sub(rb"\x1b(\[[0-9;?=]*[A-Za-z]|c)", b"", out)


def ovmf() -> str | None:
    for p in ("/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd",
              "/usr/share/OVMF/OVMF.fd"):
        if os.path.exists(p):
            return p
    return None


# -- crafted images -----------------------------------------------------------------------

def patch(path: str, old: bytes, new: bytes, *, count: int = 1) -> None:
    """Replace ``old`` by ``new`` (same length) where it occurs, exactly ``count`` times."""
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        data = f.read()
        assert data.count(old) == count, (old, data.count(old))
        pos = -1
        for _ in range(count):
            pos = data.index(old, pos + 1)
            f.seek(pos)
            f.write(new)


def copy_isolinux(dest_dir: str) -> None:
    """isolinux.bin and ldlinux.c32 from the syslinux packages."""
    os.makedirs(dest_dir, exist_ok=True)
    shutil.copy("/usr/lib/ISOLINUX/isolinux.bin", dest_dir)
    shutil.copy("/usr/lib/syslinux/modules/bios/ldlinux.c32", dest_dir)


def boot_iso(workdir: str, bios_marker: str, uefi_marker: str | None = None) -> str:
    """A hybrid ISO made with ``diskforge iso build``: isolinux, whose configuration
    prints ``bios_marker`` on the serial port, and with ``uefi_marker`` also a UEFI El
    Torito image whose application prints that. Skips when syslinux (or, for UEFI,
    dosfstools and mtools) is missing."""
    if not os.path.exists("/usr/lib/ISOLINUX/isolinux.bin"):
        pytest.skip("isolinux is not installed (.ci/run installs it)")
    src = make_tree(os.path.join(workdir, "src"), deep=False)
    copy_isolinux(os.path.join(src, "isolinux"))
    with open(os.path.join(src, "isolinux", "isolinux.cfg"), "w") as f:
        # isolinux prints on the serial port itself (and not on the BIOS console, which
        # SeaBIOS would mirror there too, interleaved)
        f.write(f"SERIAL 0 115200\nCONSOLE 0\nSAY {bios_marker}\n")
    argv = ["iso", "build", "-q", "-V", "BOOTTEST", "--boot", "isolinux/isolinux.bin"]
    if uefi_marker is not None:
        need("mkfs.vfat")
        need("mcopy")
        os.makedirs(os.path.join(src, "boot"))
        esp_image(os.path.join(src, "boot", "efi.img"), efi_app(uefi_marker))
        argv += ["--efi-boot", "boot/efi.img"]
    iso = os.path.join(workdir, "boot.iso")
    code, _, err = cli(*argv, "--hybrid", src, iso)
    assert code == 0, err
    return iso
