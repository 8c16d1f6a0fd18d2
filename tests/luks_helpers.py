"""Encrypted test images made by the reference tools: qemu-img for LUKS1 and qcow2
with LUKS, cryptsetup for LUKS2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from conftest import need

SECRET = ["--object", "secret,id=s0,data=x"]


def qemu_img_encrypted(*argv: str) -> None:
    """``qemu-img create ARGV`` with the secret s0. QEMU first times PBKDF2 on this
    thread's CPU clock and gives up with "Unable to get accurate CPU usage" when a
    round measured 0 ms, which happens now and then on a busy machine: that one
    failure is retried (a few times, each a fresh measurement) so tests never skip
    or fail at random."""
    need("qemu-img")
    import time
    for attempt in range(20):  # five in a row failed once with four test workers busy
        proc = subprocess.run(["qemu-img", "create", "-q", *SECRET, *argv],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
        time.sleep(0.05 * attempt)  # let the other workers' burst pass
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


QEMU_SECRET = "secret,id=s0,data=x"


def qemu_io_write(path: str, driver: str, *commands: str) -> None:
    """Write known data into an encrypted image through qemu-io (QEMU encrypts it)."""
    need("qemu-io")
    key = "encrypt.key-secret" if driver == "qcow2" else "key-secret"
    argv = ["qemu-io", "--object", QEMU_SECRET, "--image-opts",
            f"driver={driver},{key}=s0,file.filename={path}"]
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def qemu_plaintext(path: str, driver: str, out: str) -> str:
    """What qemu-img reads from an encrypted image, as a raw file."""
    key = "encrypt.key-secret" if driver == "qcow2" else "key-secret"
    proc = subprocess.run(["qemu-img", "convert", "--object", QEMU_SECRET, "--image-opts",
                           f"driver={driver},{key}=s0,file.filename={path}", "-O", "raw",
                           out], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out


def cryptsetup_encrypt(plain: str, out: str, *extra: str, passphrase: bytes = b"x") -> str:
    """A LUKS2 container made by cryptsetup's own (userspace, offline) encryption of
    the raw file ``plain``: ``reencrypt --encrypt`` with ``--reduce-device-size 4M``
    puts the header in front, so the first ``size(plain) - 4 MiB`` bytes of ``plain``
    are what the container holds. No root or device-mapper needed."""
    need("cryptsetup")
    import shutil
    for _ in range(3):  # costs are forced (no benchmark), but a busy machine once
        shutil.copy(plain, out)  # failed a run with nothing on stderr: retried whole
        proc = subprocess.run(["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2",
                               "--batch-mode", "--reduce-device-size", "4M", "--key-file",
                               "-", *extra, out], input=passphrase, capture_output=True,
                               timeout=120, cwd=os.path.dirname(os.path.abspath(out)))
        if proc.returncode == 0:
            return out
    raise AssertionError(f"cryptsetup reencrypt failed ({proc.returncode}):"
                         f" {proc.stdout.decode()} {proc.stderr.decode()}")


def rewrite_luks2(path: str, mutate) -> None:
    """Rewrite both copies of a LUKS2 header's JSON with ``mutate(meta)`` (a dict, or
    the JSON text as bytes), checksums recomputed, so only the JSON is hostile."""
    with open(path, "r+b") as f:
        head = f.read(8 << 20)
        hdr_size = int.from_bytes(head[8:16], "big")
        for off in (0, hdr_size):
            area = bytearray(head[off:off + hdr_size])
            meta = json.loads(area[4096:].split(b"\0", 1)[0])
            new = mutate(meta)
            text = new if isinstance(new, bytes) else json.dumps(new).encode()
            area[4096:] = text[:hdr_size - 4096].ljust(hdr_size - 4096, b"\0")
            area[448:512] = bytes(64)
            area[448:480] = hashlib.sha256(area).digest()
            f.seek(off)
            f.write(area)
