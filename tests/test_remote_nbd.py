"""diskforge as an NBD client (``remote/nbd.py``) against real servers: qemu-nbd and
nbdkit, started here on Unix sockets (and TCP on loopback) in the test's directory.

The oracle is qemu-img reading the same export: ``convert`` output equal bit for bit,
``map --output json`` equal byte for byte (so block status makes the holes), and
faults come from nbdkit's own filters (``error``, ``blocksize-policy``), not from a
server of ours."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import cli, need, one_line_error, run, sha256_file
from nbd_helpers import Servers, nbdkit, qemu_nbd

MiB = 1 << 20


@pytest.fixture
def servers():
    with Servers() as start:
        yield start


@pytest.fixture
def sparse_qcow2(tmp_path):
    """A 64 MiB qcow2 with two data runs (and holes around them), made by qemu-io."""
    need("qemu-img")
    path = str(tmp_path / "disk.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, "64M")
    run("qemu-io", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0xcd 40M 64k",
        "-c", "write -P 0x11 63M 1M", path)
    return path


def converted(tmp_path, name: str, url: str, tool: str) -> str:
    out = str(tmp_path / name)
    if tool == "qemu-img":
        run("qemu-img", "convert", "-O", "raw", url, out)
    else:
        code, _, err = cli("convert", "-O", "raw", url, out)
        assert code == 0, err
    return out


def test_qemu_nbd_export_converts_bit_exact_and_sparse(tmp_path, servers, sparse_qcow2):
    url = qemu_nbd(servers, sparse_qcow2, "qcow2", str(tmp_path / "s.sock"))
    ours = converted(tmp_path, "ours.raw", url, "diskforge")
    theirs = converted(tmp_path, "theirs.raw", url, "qemu-img")
    assert sha256_file(ours) == sha256_file(theirs)
    # holes stay holes: only the 4 MiB + 64 KiB written are allocated
    assert os.stat(ours).st_blocks * 512 <= 5 * MiB
    code, out, err = cli("map", "--output", "json", url)
    assert code == 0, err
    assert out == run("qemu-img", "map", "--output", "json", url).stdout


def test_tcp_and_named_export(tmp_path, servers, sparse_qcow2):
    """``nbd://127.0.0.1:PORT/NAME``; a name the server does not export is one line."""
    need("qemu-nbd")
    for _ in range(20):  # a port free a moment ago may be taken: try another
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-b", "127.0.0.1",
                                 "-p", str(port), "-x", "disk", sparse_qcow2],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    try:
        url = f"nbd://127.0.0.1:{port}/disk"
        ours = converted(tmp_path, "ours.raw", url, "diskforge")
        theirs = converted(tmp_path, "theirs.raw", sparse_qcow2, "qemu-img")
        assert sha256_file(ours) == sha256_file(theirs)
        code, _, err = cli("info", f"nbd://127.0.0.1:{port}/nothere")
        one_line_error(code, err)
        assert "refused export 'nothere'" in err
    finally:
        proc.terminate()
        proc.wait(10)


def test_formats_are_probed_through_the_export(tmp_path, servers, sparse_qcow2):
    """nbdkit's file plugin exports the qcow2 *file*: diskforge finds qcow2 inside the
    export and reads it, as qemu-img does with ``-f qcow2`` over NBD."""
    url = nbdkit(servers, str(tmp_path / "k.sock"), "file", f"file={sparse_qcow2}")
    code, out, err = cli("info", "--output", "json", url)
    assert code == 0, err
    assert json.loads(out)["format"] == "qcow2"
    ours = converted(tmp_path, "ours.raw", url, "diskforge")
    theirs = converted(tmp_path, "theirs.raw", sparse_qcow2, "qemu-img")
    assert sha256_file(ours) == sha256_file(theirs)


def test_a_remote_overlay_may_not_name_a_local_backing_file(tmp_path, servers):
    need("qemu-img")
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"secret" * 1000)
    overlay = str(tmp_path / "overlay.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "raw", overlay, "1M")
    url = nbdkit(servers, str(tmp_path / "k.sock"), "file", f"file={overlay}")
    code, _, err = cli("convert", "-O", "raw", url, str(tmp_path / "out.raw"))
    one_line_error(code, err)
    assert "an image read over NBD may not name other files" in err, err
    assert not os.path.exists(tmp_path / "out.raw")


def test_sparse_random_extents_and_split_pipelined_reads(tmp_path, servers):
    """nbdkit's sparse-random plugin (data and holes, block status) behind a 64 KiB
    maximum block size: diskforge splits each batch into many pipelined requests;
    contents and map equal qemu-img's."""
    url = nbdkit(servers, str(tmp_path / "k.sock"), "--filter=blocksize-policy",
                 "sparse-random", "size=48M", "seed=7", "percent=20",
                 "blocksize-maximum=65536", "blocksize-preferred=65536")
    ours = converted(tmp_path, "ours.raw", url, "diskforge")
    theirs = converted(tmp_path, "theirs.raw", url, "qemu-img")
    assert sha256_file(ours) == sha256_file(theirs)
    code, out, err = cli("map", "--output", "json", url)
    assert code == 0, err
    assert out == run("qemu-img", "map", "--output", "json", url).stdout


def test_server_read_errors_are_one_line_and_leave_no_output(tmp_path, servers):
    url = nbdkit(servers, str(tmp_path / "k.sock"), "--filter=error", "pattern",
                 "size=16M", "error-pread=EIO", "error-pread-rate=100%")
    out = str(tmp_path / "out.raw")
    code, _, err = cli("convert", "-O", "raw", url, out)
    one_line_error(code, err)
    assert "failed a read" in err
    assert not os.path.exists(out)


def test_bad_addresses_are_one_line(tmp_path):
    for url in ("nbd+unix:///disk", f"nbd+unix:///?socket={tmp_path}/none.sock",
                "nbd://127.0.0.1:notaport/x", "nbds+unix:///x",
                f"nbds+unix:///?socket={tmp_path}/none.sock&tls-certificates={tmp_path}",
                f"nbds://127.0.0.1:1/x?tls-certificates={tmp_path}/nodir"):
        code, _, err = cli("info", url)
        one_line_error(code, err)


def test_a_server_that_is_not_nbd_is_one_line(tmp_path):
    """Something listening that speaks another protocol: refused at the greeting,
    within the socket timeout, no hang."""
    sock_path = str(tmp_path / "other.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(1)
    import threading

    def greet():
        conn, _ = listener.accept()
        try:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
            conn.recv(64)
        except OSError:  # the client hung up first: what it should do
            pass
        conn.close()
    t = threading.Thread(target=greet, daemon=True)
    t.start()
    code, _, err = cli("info", f"nbd+unix:///?socket={sock_path}")
    one_line_error(code, err)
    assert "greeting.magic" in err
    listener.close()
