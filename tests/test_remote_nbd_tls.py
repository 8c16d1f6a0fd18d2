"""``nbds://`` and ``nbds+unix://``: diskforge's NBD client over TLS against qemu-nbd
(``--object tls-creds-x509,...,endpoint=server --tls-creds``, which also asks for a
client certificate) and nbdkit (``--tls=require --tls-certificates=DIR``), with a CA,
server and client certificates made here by ``openssl``.

The oracle is qemu-img reading the same export through TLS (``--object
tls-creds-x509`` + ``--image-opts driver=nbd,...``): contents equal bit for bit and
``map --output json`` equal byte for byte. Refusals (an untrusted server, TLS asked of
a plain server, a TLS-only server asked in plain) are one line each."""

from __future__ import annotations

import os

import pytest

from conftest import cli, need, one_line_error, run, sha256_file
from nbd_helpers import Servers, make_credentials, nbdkit, qemu_nbd, tcp_server

MiB = 1 << 20


@pytest.fixture
def servers():
    with Servers() as start:
        yield start


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return make_credentials(str(tmp_path_factory.mktemp("creds")))


@pytest.fixture
def sparse_qcow2(tmp_path):
    need("qemu-img")
    path = str(tmp_path / "disk.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "32M")
    run("qemu-io", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0xcd 20M 64k", path)
    return path


def tls_qemu_nbd(servers, creds, image: str, sock: str, *extra: str) -> None:
    qemu_nbd(servers, image, "qcow2", sock, "--object",
             f"tls-creds-x509,id=tls0,dir={creds['server']},endpoint=server",
             "--tls-creds", "tls0", *extra)


def client_object(creds, which: str = "client") -> str:
    return f"tls-creds-x509,id=tls0,dir={creds[which]},endpoint=client"


def test_qemu_nbd_over_tls_reads_bit_exact_and_sparse(tmp_path, servers, creds,
                                                      sparse_qcow2):
    """A Unix socket (only the chain is checked, as qemu does without a host name):
    the URI form, and qemu-img's --object/--image-opts form, read the same bytes and
    map as qemu-img through TLS."""
    sock = str(tmp_path / "t.sock")
    tls_qemu_nbd(servers, creds, sparse_qcow2, sock)
    url = f"nbds+unix:///?socket={sock}&tls-certificates={creds['client']}"
    ours = str(tmp_path / "ours.raw")
    code, _, err = cli("convert", "-O", "raw", url, ours)
    assert code == 0, err
    theirs = str(tmp_path / "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", sparse_qcow2, theirs)
    assert sha256_file(ours) == sha256_file(theirs)
    assert os.stat(ours).st_blocks * 512 <= 4 * MiB + 64 * 1024 + 64 * 1024
    opts = (f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,"
            "tls-hostname=localhost")
    qemu_map = run("qemu-img", "map", "--output", "json", "--object",
                   client_object(creds), "--image-opts", opts).stdout
    code, out, err = cli("map", "--output", "json", url)
    assert code == 0, err
    assert out == qemu_map
    for spec in (opts, f"driver=raw,file.driver=nbd,file.filename=nbd+unix:///?"
                 f"socket={sock},file.tls-creds=tls0"):
        code, out, err = cli("map", "--output", "json", "--object", client_object(creds),
                             "--image-opts", spec)
        assert code == 0, err
        assert out == qemu_map


def test_nbdkit_tls_over_tcp_checks_the_address(tmp_path, servers, creds, sparse_qcow2):
    """nbdkit --tls=require on 127.0.0.1: the certificate's IP SAN is checked; the
    single --object tls-creds-x509 serves a plain nbds:// name; a name the
    certificate does not carry is refused."""
    need("nbdkit")
    port = tcp_server(servers, lambda p: [
        "nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(p), "--tls=require",
        f"--tls-certificates={creds['server']}", "file", f"file={sparse_qcow2}"])
    url = f"nbds://127.0.0.1:{port}/"
    out = str(tmp_path / "ours.raw")
    code, _, err = cli("convert", "--object", client_object(creds), "-O", "raw", url, out)
    assert code == 0, err
    theirs = str(tmp_path / "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", sparse_qcow2, theirs)
    assert sha256_file(out) == sha256_file(theirs)  # probed as qcow2 through TLS
    assert "DISKFORGE_NBD_TLS_CERTIFICATES" not in os.environ  # the command's own
    code, _, err = cli("info", f"{url}?tls-certificates={creds['client']}"
                       "&tls-hostname=elsewhere.example")
    one_line_error(code, err)
    assert "not valid for 'elsewhere.example'" in err
    code, _, err = cli("info", f"{url}?tls-verify-peer=false")  # as libnbd allows
    assert code == 0, err
    code, _, err = cli("info", url)  # the system's CAs do not know ours
    one_line_error(code, err)
    assert "not trusted" in err


def test_an_untrusted_server_is_one_line(tmp_path, servers, creds, sparse_qcow2):
    sock = str(tmp_path / "t.sock")
    tls_qemu_nbd(servers, creds, sparse_qcow2, sock)
    code, _, err = cli("info", f"nbds+unix:///?socket={sock}"
                       f"&tls-certificates={creds['wrong']}")
    one_line_error(code, err)
    assert "certificate is not trusted" in err


def test_no_client_certificate_for_qemu_nbd_is_one_line(tmp_path, servers, creds,
                                                       sparse_qcow2):
    """qemu-nbd checks its clients (verify-peer is on for servers): without a client
    certificate the connection ends, and the line says what is probably missing."""
    sock = str(tmp_path / "t.sock")
    tls_qemu_nbd(servers, creds, sparse_qcow2, sock)
    code, _, err = cli("info", f"nbds+unix:///?socket={sock}"
                       f"&tls-certificates={creds['server']}")  # a CA, no client cert
    one_line_error(code, err)
    assert "client certificate" in err


def test_plain_nbd_against_a_tls_only_server_is_one_line(tmp_path, servers, creds,
                                                         sparse_qcow2):
    sock = str(tmp_path / "t.sock")
    tls_qemu_nbd(servers, creds, sparse_qcow2, sock)
    code, _, err = cli("convert", "-O", "raw", f"nbd+unix:///?socket={sock}",
                       str(tmp_path / "out.raw"))
    one_line_error(code, err)
    assert "requires TLS" in err
    assert not os.path.exists(tmp_path / "out.raw")
    ksock = str(tmp_path / "k.sock")
    url = nbdkit(servers, ksock, "--tls=require", f"--tls-certificates={creds['server']}",
                 "memory", "1M")
    code, _, err = cli("info", url)
    one_line_error(code, err)
    assert "requires TLS" in err


def test_tls_asked_of_a_plain_server_is_one_line(tmp_path, servers, creds, sparse_qcow2):
    sock = str(tmp_path / "p.sock")
    qemu_nbd(servers, sparse_qcow2, "qcow2", sock)
    code, _, err = cli("info", f"nbds+unix:///?socket={sock}"
                       f"&tls-certificates={creds['client']}")
    one_line_error(code, err)
    assert "refused TLS" in err


def test_bad_credentials_are_one_line(tmp_path, creds):
    """Checked before anything is opened: a missing directory, a directory without
    ca-cert.pem, a server endpoint, an unknown id."""
    url = f"nbds+unix:///?socket={tmp_path}/none.sock"
    for argv in (
            ("info", "--object", f"tls-creds-x509,id=t,dir={tmp_path}/none,endpoint=client",
             url),
            ("info", "--object", f"tls-creds-x509,id=t,dir={creds['server']},"
             "endpoint=server", url),
            ("info", f"{url}&tls-certificates={tmp_path}"),
            ("info", "--object", client_object(creds), "--image-opts",
             f"driver=nbd,server.type=unix,server.path={tmp_path}/s,tls-creds=other")):
        code, _, err = cli(*argv)
        one_line_error(code, err)
