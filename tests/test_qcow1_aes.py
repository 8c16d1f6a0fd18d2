"""AES-encrypted qcow version 1 images, made by qemu-img (``-o encrypt.format=aes``)
and written by qemu-io, read with ``--object secret``: the bytes must be what qemu-img
itself converts them to, for the right passphrase, a long one (qemu keeps its first 16
bytes) and a wrong one (there is no key check: both tools read the same garbage)."""

import os

import pytest
from conftest import cli, need, one_line_error, run

pytest.importorskip("cryptography")
MiB = 1 << 20


def _qemu(*argv: str, secret: str, cwd: str) -> None:
    """qemu-img SUBCOMMAND or qemu-io, with the secret s0 defined."""
    head = 2 if argv[0] == "qemu-img" else 1
    run(*argv[:head], "--object", f"secret,id=s0,data={secret}", *argv[head:], cwd=cwd)


def _opts(name: str) -> str:
    return f"driver=qcow,file.filename={name},encrypt.key-secret=s0"


@pytest.fixture
def image(workdir):
    """An 8 MiB AES qcow image with data at unaligned offsets, and qemu-img's plaintext
    of it."""
    need("qemu-img")
    need("qemu-io")

    def make(secret: str) -> str:
        _qemu("qemu-img", "create", "-q", "-f", "qcow", "-o",
              "encrypt.format=aes,encrypt.key-secret=s0", "aes.qcow", "8M",
              secret=secret, cwd=workdir)
        _qemu("qemu-io", "--image-opts", _opts("aes.qcow"), "-c", "write -P 0x61 1000 5000",
              "-c", "write -P 0x62 3M 64k", "-c", "write -P 0x63 8355840 32768",
              secret=secret, cwd=workdir)
        return os.path.join(workdir, "aes.qcow")
    return make


def _their_plaintext(workdir: str, secret: str) -> bytes:
    out = os.path.join(workdir, f"q-{len(secret)}.raw")
    _qemu("qemu-img", "convert", "--image-opts", _opts("aes.qcow"), "-O", "raw", out,
          secret=secret, cwd=workdir)
    with open(out, "rb") as f:
        return f.read()


def _ours(workdir: str, secret: str, *via: str) -> bytes:
    out = os.path.join(workdir, f"d-{len(secret)}.raw")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        code, _, err = cli("convert", "--object", f"secret,id=s0,data={secret}", *via,
                           "-O", "raw", out)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


@pytest.mark.parametrize("secret", ["sesame", "a passphrase longer than sixteen"])
def test_reads_what_qemu_img_reads(image, workdir, secret):
    image(secret)
    want = _their_plaintext(workdir, secret)
    assert want[1000:6000] == b"a" * 5000 and want[3 * MiB:3 * MiB + 65536] == b"b" * 65536
    assert _ours(workdir, secret, "--image-opts", _opts("aes.qcow")) == want
    assert _ours(workdir, secret, "aes.qcow") == want  # the only secret given


def test_wrong_passphrase_reads_as_qemu_reads_it(image, workdir):
    image("sesame")
    want = _their_plaintext(workdir, "open")
    assert want[1000:6000] != b"a" * 5000  # garbage, not the data
    assert _ours(workdir, "open", "aes.qcow") == want


def test_without_a_passphrase(image, workdir):
    path = image("sesame")
    code, out, _ = cli("info", "--output", "json", path)
    assert code == 0 and '"encrypted": true' in out
    target = os.path.join(workdir, "x.raw")
    code, _, err = cli("convert", "-O", "raw", path, target)
    one_line_error(code, err)
    assert "encrypt.key-secret" in err and not os.path.exists(target)
    code, _, err = cli("convert", "-C", "--object", "secret,id=s0,data=sesame", "-O", "raw",
                       path, target)  # ciphertext is never copied as it is
    assert code == 0
    with open(target, "rb") as f:
        assert f.read() == _their_plaintext(workdir, "sesame")
