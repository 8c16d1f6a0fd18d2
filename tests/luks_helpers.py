"""Encrypted test images made by the reference tools: qemu-img for LUKS1 and qcow2
with LUKS, cryptsetup for LUKS2."""

from __future__ import annotations

import subprocess

import pytest
from conftest import need

SECRET = ["--object", "secret,id=s0,data=x"]


def qemu_img_encrypted(*argv: str) -> None:
    """``qemu-img create ARGV`` with the secret s0. QEMU first times PBKDF2 on this
    thread's CPU clock and gives up with "Unable to get accurate CPU usage" when a
    round measured 0 ms, which happens now and then on a busy machine: that one
    failure is retried (a few times, each a fresh measurement) so tests never skip
    or fail at random."""
    need("qemu-img")
    for _ in range(5):
        proc = subprocess.run(["qemu-img", "create", "-q", *SECRET, *argv],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
    raise AssertionError(f"qemu-img create {' '.join(argv)} failed: {proc.stderr}")


def luks1(path: str) -> str:
    """A raw LUKS1 container (qemu-img's ``luks`` format)."""
    qemu_img_encrypted("-f", "luks", "-o", "key-secret=s0,iter-time=10", path, "4M")
    return path


def qcow2_luks(path: str) -> str:
    """A qcow2 with ``encrypt.format=luks`` (crypt_method 2)."""
    qemu_img_encrypted("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                       "encrypt.iter-time=10", path, "1M")
    return path


def luks2(path: str, *extra: str) -> str:
    """A LUKS2 container made by cryptsetup (a fast PBKDF: only the header matters)."""
    need("cryptsetup")
    with open(path, "wb") as f:
        f.truncate(32 << 20)  # room for cryptsetup's default 16 MiB data offset
    proc = subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode",
                           "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                           "--key-file", "-", *extra, path], input=b"x",
                          capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"cryptsetup luksFormat failed: {proc.stderr.decode()}")
    return path
