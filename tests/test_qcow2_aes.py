"""qcow2's old AES encryption (``crypt_method`` 1, ``encrypt.format=aes``), images made
by qemu-img and written by qemu-io, read with ``--object secret`` (and ``--image-opts
… encrypt.key-secret=``): the bytes must be what qemu-img converts them to, for the
right passphrase, a long one (qemu keeps its first 16 bytes) and a wrong one (no key
check exists: both tools read the same garbage); ``info`` as qemu-img prints it;
writing refused as "not supported yet"."""

import json
import os
import subprocess

import pytest
from conftest import cli, need, one_line_error, run

pytest.importorskip("cryptography")
MiB = 1 << 20


def _qemu(*argv: str, secret: str, cwd: str) -> subprocess.CompletedProcess:
    """qemu-img SUBCOMMAND or qemu-io, with the secret s0 defined."""
    head = 2 if argv[0] == "qemu-img" else 1
    return run(*argv[:head], "--object", f"secret,id=s0,data={secret}", *argv[head:],
               cwd=cwd)


def _opts(name: str) -> str:
    return f"driver=qcow2,file.filename={name},encrypt.key-secret=s0"


def _ours(workdir: str, *argv: str) -> tuple[int, str, str]:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return cli(*argv)
    finally:
        os.chdir(cwd)


@pytest.fixture
def image(workdir):
    """A 8 MiB AES qcow2 (``compat`` as asked) with data at unaligned offsets, across
    a cluster boundary and in the last cluster."""
    need("qemu-img")
    need("qemu-io")

    def make(secret: str, compat: str = "1.1") -> str:
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o",
              f"compat={compat},encrypt.format=aes,encrypt.key-secret=s0", "aes.qcow2",
              "8M", secret=secret, cwd=workdir)
        _qemu("qemu-io", "--image-opts", _opts("aes.qcow2"),
              "-c", "write -P 0x61 1000 70000", "-c", "write -P 0x62 3M 4096",
              "-c", "write -P 0x63 8355840 32768", secret=secret, cwd=workdir)
        return os.path.join(workdir, "aes.qcow2")
    return make


def _their_plaintext(workdir: str, secret: str) -> bytes:
    out = os.path.join(workdir, f"q-{len(secret)}.raw")
    _qemu("qemu-img", "convert", "--image-opts", _opts("aes.qcow2"), "-O", "raw", out,
          secret=secret, cwd=workdir)
    with open(out, "rb") as f:
        return f.read()


def _our_plaintext(workdir: str, secret: str, *via: str) -> bytes:
    out = os.path.join(workdir, f"d-{len(secret)}.raw")
    code, _, err = _ours(workdir, "convert", "--object", f"secret,id=s0,data={secret}",
                         *via, "-O", "raw", out)
    assert code == 0, err
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


@pytest.mark.parametrize("secret,compat", [("sesame", "1.1"), ("sesame", "0.10"),
                                           ("a passphrase longer than sixteen", "1.1")])
def test_reads_what_qemu_img_reads(image, workdir, secret, compat):
    image(secret, compat)
    want = _their_plaintext(workdir, secret)
    assert want[1000:71000] == b"a" * 70000 and want[3 * MiB:3 * MiB + 4096] == b"b" * 4096
    assert _our_plaintext(workdir, secret, "--image-opts", _opts("aes.qcow2")) == want
    assert _our_plaintext(workdir, secret, "aes.qcow2") == want  # the only secret given


def test_wrong_passphrase_reads_as_qemu_reads_it(image, workdir):
    image("sesame")
    want = _their_plaintext(workdir, "open")
    assert want[1000:71000] != b"a" * 70000  # garbage, not the data
    assert _our_plaintext(workdir, "open", "aes.qcow2") == want


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_info_and_map_as_qemu_img(image, workdir, compat):
    image("sesame", compat)
    q = run("qemu-img", "info", "aes.qcow2", cwd=workdir)
    code, out, err = _ours(workdir, "info", "aes.qcow2")
    assert code == 0, err
    assert out == q.stdout and "encrypted: yes\n" in out and "        format: aes\n" in out
    q = run("qemu-img", "info", "--output", "json", "aes.qcow2", cwd=workdir)
    code, out, err = _ours(workdir, "info", "--output", "json", "aes.qcow2")
    assert code == 0, err
    assert json.loads(out) == json.loads(q.stdout)
    assert json.loads(out)["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    argv = ("map", "--output", "json", "--image-opts", _opts("aes.qcow2"))
    q = _qemu("qemu-img", *argv, secret="sesame", cwd=workdir)
    code, out, err = _ours(workdir, argv[0], "--object", "secret,id=s0,data=sesame",
                           *argv[1:])
    assert code == 0, err
    assert json.loads(out) == json.loads(q.stdout)


def test_without_a_passphrase_and_writing(image, workdir):
    path = image("sesame")
    target = os.path.join(workdir, "x.raw")
    code, _, err = cli("convert", "-O", "raw", path, target)
    one_line_error(code, err)
    assert "encrypt.key-secret" in err and not os.path.exists(target)
    code, _, err = cli("convert", "-C", "--object", "secret,id=s0,data=sesame", "-O",
                       "raw", path, target)  # ciphertext is never copied as it is
    assert code == 0, err
    with open(target, "rb") as f:
        assert f.read() == _their_plaintext(workdir, "sesame")
    before = open(path, "rb").read()
    for argv in (("resize", path, "16M"), ("snapshot", "-c", "s1", path),
                 ("create", "-q", "-f", "qcow2", "-o", "encrypt.format=aes",
                  os.path.join(workdir, "new.qcow2"), "1M")):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert "not supported" in err, (argv, err)
    assert open(path, "rb").read() == before
