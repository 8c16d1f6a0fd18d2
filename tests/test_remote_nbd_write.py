"""Writing to an NBD export: ``convert [-n] -O raw SRC nbd://...``, ``dd of=nbd://...``
and ``diskforge.open(url, writable=True)``, against writable qemu-nbd and nbdkit exports.

Oracles: qemu-img (``compare`` of the source with what the export holds, ``map`` of
the qcow2 qemu-nbd served, where zero runs that arrived as ``NBD_CMD_WRITE_ZEROES``
with ``NBD_CMD_FLAG_NO_HOLE`` unset are zero clusters, not data), and nbdkit's ``log``
filter, which records every request as the server received it (writes only where the
source has data, zeroes with ``trim=1``, a flush, nothing above the maximum block size
the ``blocksize-policy`` filter enforces)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import cli, need, one_line_error, run
from nbd_helpers import Servers, make_credentials, nbdkit, qemu_nbd

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def servers():
    with Servers() as start:
        yield start


@pytest.fixture
def source(tmp_path):
    """8 MiB raw: 200 KiB of data, 1 MiB of *written* zeros (data in the file's map,
    zeros in its bytes), 100 KiB of data at 4 MiB, holes elsewhere."""
    need("qemu-img")
    path = str(tmp_path / "src.raw")
    run("qemu-img", "create", "-f", "raw", path, "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 200k", "-c", "write -P 0 1M 1M",
        "-c", "write -P 0x5c 4M 100k", path)
    return path


def log_requests(log: str) -> list[tuple[str, int, int, str]]:
    """``(command, offset, count, rest)`` of each request in an nbdkit log file."""
    found = []
    with open(log) as f:
        for line in f:
            m = re.search(r"connection=\d+ (Write|Zero|Trim|Flush) id=\d+"
                          r"(?: offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+))?(.*)", line)
            if m:  # a request, not its "...Write id=N return=0"
                found.append((m[1], int(m[2] or "0", 16), int(m[3] or "0", 16), m[4]))
    return found


def test_convert_n_into_nbdkit_memory(tmp_path, servers, source):
    """Data as NBD_CMD_WRITE in pieces of at most the 64 KiB maximum, every zero run
    (the holes and the written zeros) as NBD_CMD_WRITE_ZEROES that may punch holes,
    then a flush; the export then holds the source bit for bit."""
    log = str(tmp_path / "nbdkit.log")
    url = nbdkit(servers, str(tmp_path / "m.sock"), "--filter=log",
                 "--filter=blocksize-policy", "memory", "8M", f"logfile={log}",
                 "blocksize-maximum=65536", "blocksize-error-policy=error",
                 writable=True)
    code, _, err = cli("convert", "-n", "-O", "raw", source, url)
    assert code == 0, err
    assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", source,
                              url).stdout
    requests = log_requests(log)
    writes = [r for r in requests if r[0] == "Write"]
    zeroes = [r for r in requests if r[0] == "Zero"]
    assert sum(r[2] for r in writes) <= 300 * KiB + 8 * KiB  # data only, 4 KiB grain
    assert all(r[2] <= 64 * KiB for r in writes + zeroes)
    assert zeroes and all("trim=1" in r[3] for r in zeroes)
    assert sum(r[2] for r in writes + zeroes) == 8 * MiB  # every byte, once
    assert requests[-1][0] == "Flush"
    code, _, err = cli("convert", "-n", source, url)  # raw, qemu-img's default
    assert code == 0, err


def test_convert_n_into_qemu_nbd_qcow2_makes_zero_clusters(tmp_path, servers, source):
    """A qcow2 full of old data, served writable by qemu-nbd: after ``convert -n`` it
    compares equal to the source, and where the source reads as zeros (holes and the
    written zeros) qemu-img's map shows zeros, not data: they came as WRITE_ZEROES."""
    target = str(tmp_path / "target.qcow2")
    run("qemu-img", "create", "-f", "qcow2", target, "8M")
    run("qemu-io", "-c", "write -P 0x77 0 8M", target)
    sock = str(tmp_path / "q.sock")
    url = qemu_nbd(servers, target, "qcow2", sock, writable=True)
    code, _, err = cli("convert", "-n", "-O", "raw", source, url)
    assert code == 0, err
    assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", source,
                              url).stdout
    servers.started[-1].stop()
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, target)
    extents = json.loads(run("qemu-img", "map", "--output", "json", target).stdout)
    data = sum(e["length"] for e in extents if e["data"])
    assert data <= 300 * KiB + 128 * KiB  # the 64 KiB clusters holding the data
    zero_run = [e for e in extents if e["start"] <= 1 * MiB < e["start"] + e["length"]]
    assert zero_run[0]["zero"] and not zero_run[0]["data"]


def test_open_writable_from_python(tmp_path, servers):
    """``diskforge.open(url, writable=True)``: writes and zeroing land, a write past
    the export's end is refused before anything is sent, and the export keeps its
    size."""
    import diskforge
    from diskforge.errors import DiskforgeError
    url = nbdkit(servers, str(tmp_path / "m.sock"), "memory", "4M", writable=True)
    with diskforge.open(url, "raw", writable=True) as dev:
        assert dev.size == 4 * MiB
        dev.write(1 * MiB, b"\xa5" * 70000)
        dev.write_zeroes(1 * MiB + 4096, 8192)
        with pytest.raises(DiskforgeError, match="outside the disk"):
            dev.write(4 * MiB - 10, b"x" * 20)
        dev.flush()
    out = str(tmp_path / "back.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, out)
    with open(out, "rb") as f:
        back = f.read()
    want = bytearray(4 * MiB)
    want[MiB:MiB + 70000] = b"\xa5" * 70000
    want[MiB + 4096:MiB + 4096 + 8192] = bytes(8192)
    assert back == want


def test_writing_over_tls(tmp_path, servers):
    """``convert -n`` into an nbdkit export that requires TLS."""
    creds = make_credentials(str(tmp_path / "creds"))
    src = str(tmp_path / "src.raw")
    run("qemu-img", "create", "-f", "raw", src, "2M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 64k 300k", src)
    sock = str(tmp_path / "t.sock")
    nbdkit(servers, sock, "--tls=require", f"--tls-certificates={creds['server']}",
           "memory", "2M", writable=True)
    url = f"nbds+unix:///?socket={sock}&tls-certificates={creds['client']}"
    code, _, err = cli("convert", "-n", "-O", "raw", src, url)
    assert code == 0, err
    out = str(tmp_path / "back.raw")
    code, _, err = cli("convert", "-O", "raw", url, out)
    assert code == 0, err
    assert open(out, "rb").read() == open(src, "rb").read()


def test_refusals_are_one_line(tmp_path, servers, source):
    """A read-only export, an export smaller than the source (with -n, and without:
    qemu-img's "Cannot grow NBD nodes"), and a format other than raw written in place
    or created inside an export."""
    ro = qemu_nbd(servers, source, "raw", str(tmp_path / "ro.sock"))
    code, _, err = cli("convert", "-n", "-O", "raw", source, ro)
    one_line_error(code, err)
    assert "read-only" in err
    url = nbdkit(servers, str(tmp_path / "m.sock"), "memory", "8M", writable=True)
    small = nbdkit(servers, str(tmp_path / "s.sock"), "memory", "4M", writable=True)
    code, _, err = cli("convert", "-n", "-O", "raw", source, small)
    one_line_error(code, err)
    assert "smaller" in err
    code, _, err = cli("convert", "-O", "raw", source, small)
    one_line_error(code, err)
    assert "error while converting raw: Cannot grow NBD nodes" in err
    code, _, err = cli("convert", "-n", "-O", "qcow2", source, url)
    one_line_error(code, err)
    code, _, err = cli("convert", "-O", "qcow2", source, url)
    one_line_error(code, err)
    assert "not supported yet: creating a qcow2 image inside an NBD export" in err


def test_without_n_and_dd_write_into_the_export_as_qemu_img(tmp_path, servers, source):
    """qemu-img convert without -n and qemu-img dd write into an existing export large
    enough for the disk (its create step opens the export; nothing can be made), and
    so does diskforge; qemu-img compare is the judge."""
    for argv in (["convert", "-O", "raw", source],
                 ["dd", "bs=64k", "if=" + source]):
        sock = str(tmp_path / f"{argv[0]}.sock")
        url = nbdkit(servers, sock, "memory", "12M", writable=True)
        target = url if argv[0] == "convert" else "of=" + url
        code, _, err = cli(*argv, target)
        assert code == 0, (argv, err)
        back = str(tmp_path / f"{argv[0]}.raw")
        code, _, err = cli("dd", "bs=1M", "count=8", "if=" + url, "of=" + back)
        assert code == 0, err
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, back)


def test_server_write_errors_are_one_line(tmp_path, servers, source):
    """nbdkit's error filter fails every write with ENOSPC: one line with the
    server's error, after every reply in flight was read."""
    url = nbdkit(servers, str(tmp_path / "e.sock"), "--filter=error", "memory", "8M",
                 "error-pwrite=ENOSPC", "error-pwrite-rate=100%", writable=True)
    code, _, err = cli("convert", "-n", "-O", "raw", source, url)
    one_line_error(code, err)
    assert "failed a write at 0" in err and "No space left on device" in err, err
