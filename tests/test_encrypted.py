"""Encrypted images opened without a key are recognised and refused plainly (saying how
to give the key), never read as raw ciphertext: raw LUKS1 (qemu-img's luks format),
LUKS2 (cryptsetup; by its primary or its secondary header) and qcow2 with the old AES
encryption, which is not read at all (qcow2 with LUKS: test_qcow2_malformed; reading
with a key: test_luks). ``-f raw`` still reads the bytes on purpose."""

import os
import struct
import subprocess

import pytest
from conftest import cli, need, one_line_error, run
from luks_helpers import SECRET, luks1, luks2


def refused(path: str, kind: str, workdir: str) -> None:
    """convert, compare and map all refuse ``path`` with one line naming it (info
    shows its header, as qemu-img's: tests/test_luks.py)."""
    line = f"{path}: encrypted ({kind}); give its passphrase: --object secret"
    out = os.path.join(workdir, "out.raw")
    for argv, status in ((["convert", "-O", "raw", path, out], 1),
                         (["compare", path, path], 2), (["map", path], 1)):
        code, stdout, err = cli(*argv)
        one_line_error(code, err)
        assert code == status and line in err and not stdout, (argv, err)
    assert not os.path.exists(out)


def test_raw_luks1_is_refused_but_readable_as_raw_on_purpose(workdir):
    path = luks1(os.path.join(workdir, "disk.luks"))
    refused(path, "LUKS1", workdir)
    code, out, err = cli("info", "-f", "raw", path)
    assert code == 0 and "file format: raw" in out, err
    out_path = os.path.join(workdir, "ciphertext.raw")
    assert cli("convert", "-f", "raw", "-O", "raw", path, out_path)[0] == 0
    with open(path, "rb") as a, open(out_path, "rb") as b:
        assert a.read() == b.read()


def test_luks2_is_refused(workdir):
    path = luks2(os.path.join(workdir, "disk.img"))
    with open(path, "rb") as f:
        assert f.read(8) == b"LUKS\xba\xbe\x00\x02"
    refused(path, "LUKS2", workdir)
    assert cli("info", "-f", "raw", path)[0] == 0


@pytest.mark.parametrize("metadata", ["16k", "64k", "1m"])
def test_luks2_with_a_wiped_primary_header_is_refused_by_its_secondary(workdir, metadata):
    """The secondary header sits at hdr_size (16 KiB by default; 64 KiB and 1 MiB are
    past the 64 KiB probe window)."""
    path = luks2(os.path.join(workdir, "disk.img"), "--luks2-metadata-size", metadata)
    with open(path, "r+b") as f:
        f.write(bytes(4096))  # the primary binary header gone
    refused(path, "LUKS2", workdir)  # found by its secondary header


def test_qcow2_with_the_old_aes_encryption_needs_its_key(workdir):
    """Read with its passphrase since issue 16 (test_qcow2_aes.py); without one,
    what reads data fails naming encrypt.key-secret, never copying ciphertext."""
    need("qemu-img")
    path = os.path.join(workdir, "aes.qcow2")
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *SECRET, "-o",
                           "encrypt.format=aes,encrypt.key-secret=s0", path, "4M"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:  # QEMU builds without AES writing: set the field instead
        run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M", timeout=60)
        with open(path, "r+b") as f:
            f.seek(32)  # QCowHeader.crypt_method
            f.write(struct.pack(">I", 1))
    else:  # something stored to decipher
        run("qemu-io", *SECRET, "--image-opts", "-c", "write -P 7 0 64k",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=s0", timeout=60)
    with open(path, "rb") as f:
        f.seek(32)
        assert struct.unpack(">I", f.read(4))[0] == 1
    code, out, err = cli("info", path)
    assert code == 0 and "encrypted: yes" in out, err
    for argv in (["compare", path, path],
                 ["convert", "-O", "raw", path, os.path.join(workdir, "o.raw")]):
        if proc.returncode != 0:  # the field set by hand: nothing stored to decipher
            break
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert f"{path}: encrypted (qcow2 AES); give its passphrase" in err
        assert "encrypt.key-secret" in err
    assert not os.path.exists(os.path.join(workdir, "o.raw"))
