"""http:// sources (remote/http.py) against Debian's nginx on a loopback port.

Every readable format converts from ``http://127.0.0.1:PORT/...`` to the same bytes as
from the local file; names inside a remote image resolve only beside it; and each
fault (no range support, 404, a truncated body, a change mid-read, a slow or stalled
server, a dropped connection, the server killed) gives one clear error or a
successful retry. nginx produces every fault it can; a tiny socket server below
produces only the ones it cannot (a body cut short, a 503, a stall).
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import socket
import threading
import time

import pytest

from conftest import cli, need, need_real, one_line_error, run
from nginx_helpers import NGINX, Nginx

import diskforge
from diskforge.errors import DiskforgeError, ImageIOError, SafetyError
from diskforge.remote import http as rhttp
from diskforge.remote.names import resolve_reference

MiB = 1 << 20


def _disk(path: str, size: int = 12 * MiB) -> str:
    """A raw disk with random data, a pattern and holes (seeded: the same each run)."""
    rng = random.Random(18)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((0, 3 * MiB + 4096), (4 * MiB + 512, 2 * MiB),
                       (7 * MiB, 450000), (9 * MiB, MiB + 12345), (size - 70000, 70000)):
            n = min(n, size - off)
            if n > 0:
                f.seek(off)
                f.write(rng.randbytes(n) if off != 7 * MiB else b"diskforge" * (n // 9))
    assert os.path.getsize(path) == size
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """nginx serving a temp dir holding ``base.raw``; yields (root, base url)."""
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/install-tools installs nginx-light)")
    need("qemu-img")
    root = tmp_path_factory.mktemp("www")
    _disk(str(root / "base.raw"))
    server = Nginx(str(root), str(tmp_path_factory.mktemp("nginx")))
    try:
        yield str(root), server.url, server
    finally:
        server.stop()


def _same_as_local(site, tmp_path, name: str, fmt: str | None = None) -> None:
    """Converted from the URL and from the file, the outputs are the same bytes (qcow2
    outputs: small files even for the samples with a large virtual size)."""
    root, url, _ = site
    local = tmp_path / "local.qcow2"
    remote = tmp_path / "remote.qcow2"
    diskforge.convert(os.path.join(root, name), local, target_fmt="qcow2", source_fmt=fmt)
    diskforge.convert(f"{url}/{name}", remote, target_fmt="qcow2", source_fmt=fmt)
    assert local.read_bytes() == remote.read_bytes()


# -- every readable format, bit for bit --------------------------------------------------

QEMU_MADE = {
    "raw": ("raw.img", ["-O", "raw"]),
    "qcow2": ("d.qcow2", ["-O", "qcow2"]),
    "qcow2-compressed": ("c.qcow2", ["-O", "qcow2", "-c"]),
    "vpc": ("d.vhd", ["-O", "vpc"]),
    "vpc-fixed": ("fixed.vhd", ["-O", "vpc", "-o", "subformat=fixed"]),
    "vhdx": ("d.vhdx", ["-O", "vhdx"]),
    "vmdk": ("d.vmdk", ["-O", "vmdk"]),
    "vmdk-stream": ("s.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    "vdi": ("d.vdi", ["-O", "vdi"]),
    "qed": ("d.qed", ["-O", "qed"]),
    "qcow": ("d.qcow", ["-O", "qcow"]),
    "parallels": ("d.hds", ["-O", "parallels"]),
}


@pytest.mark.parametrize("kind", sorted(QEMU_MADE))
def test_qemu_made_image_over_http_equals_local(site, tmp_path, kind):
    root = site[0]
    name, args = QEMU_MADE[kind]
    run("qemu-img", "convert", "-f", "raw", *args, os.path.join(root, "base.raw"),
        os.path.join(root, name))
    _same_as_local(site, tmp_path, name)


REAL_SAMPLES = [
    "dmg/keramics_hfsplus_zlib_UDZO.dmg", "dmg/dmgwiz_input_lzfse.dmg",
    "dmg/keramics_hfsplus_bzip2_UDBZ.dmg", "dmg/dmgwiz_input_adc.dmg",
    "iso/dfvfs_genisoimage_level3.iso",
    "vmdk/cot_vmware_generated-stream_streamOptimized.vmdk",
    "vmdk/dfvfs_qemu_ext2_monolithicSparse.vmdk",
    "qcow2/dissect_basic-zstd.qcow2",
    "asif/dissect_basic.asif.gz",
    "vhd/node-vhd_win_fixed_10M.vhd.gz",
]


@pytest.mark.parametrize("relpath", REAL_SAMPLES)
def test_real_sample_over_http_equals_local(site, tmp_path, relpath):
    src = need_real(relpath)
    name = relpath.replace("/", "_")
    if name.endswith(".gz"):
        name = name[:-3]
        with gzip.open(src) as f, open(os.path.join(site[0], name), "wb") as out:
            shutil.copyfileobj(f, out)
    else:
        shutil.copyfile(src, os.path.join(site[0], name))
    _same_as_local(site, tmp_path, name)


def test_luks_over_http_with_its_key(site, tmp_path):
    root, url, _ = site
    from luks_helpers import luks2
    path = luks2(os.path.join(root, "disk.luks"))  # cryptsetup's, passphrase b"x"
    with diskforge.open(path, key=b"x") as local, \
            diskforge.open(f"{url}/disk.luks", key=b"x") as remote:
        assert remote.format == "luks" and remote.size == local.size
        for at in (0, remote.size // 2, remote.size - MiB):
            assert remote.read(at, MiB) == local.read(at, MiB)


def test_parallels_bundle_over_http_is_not_supported_yet(site):
    root, url, _ = site
    d = os.path.join(root, "pl.hdd")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "DiskDescriptor.xml"), "w") as f:
        f.write('<?xml version="1.0"?><Parallels_disk_image></Parallels_disk_image>')
    code, _, err = cli("info", f"{url}/pl.hdd/DiskDescriptor.xml")
    one_line_error(code, err)
    assert "not supported yet: a Parallels bundle read from a URL" in err


def test_cli_convert_and_info_from_url(site, tmp_path):
    root, url, _ = site
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.path.join(root, "base.raw"),
        os.path.join(root, "cli.qcow2"))
    out = tmp_path / "out.vhdx"
    code, _, err = cli("convert", "-O", "vhdx", f"{url}/cli.qcow2", str(out))
    assert code == 0, err
    assert "identical" in run("qemu-img", "compare", os.path.join(root, "base.raw"),
                              str(out)).stdout
    code, text, err = cli("info", "--output", "json", f"{url}/cli.qcow2")
    assert code == 0 and '"format": "qcow2"' in text, err
    code, text, err = cli("compare", f"{url}/cli.qcow2", os.path.join(root, "base.raw"))
    assert code == 0, err
    code, text, err = cli("map", "--output", "json", f"{url}/cli.qcow2")
    assert code == 0 and '"data": false' in text  # holes known from the qcow2's tables
    code, text, err = cli("check", f"{url}/cli.qcow2")
    assert code == 0 and "No errors" in text, err
    code, text, err = cli("measure", "-O", "qcow2", f"{url}/cli.qcow2")
    assert code == 0 and "required size" in text, err
    code, _, err = cli("dd", f"if={url}/cli.qcow2", f"of={tmp_path / 'dd.raw'}", "bs=1M",
                       "count=5", "-O", "raw")
    assert code == 0, err
    assert (tmp_path / "dd.raw").read_bytes() == \
        open(os.path.join(root, "base.raw"), "rb").read(5 * MiB)


def test_image_opts_with_qemus_curl_keys(site, tmp_path):
    """``--image-opts driver=qcow2,file.driver=http,file.url=URL``, as qemu-img takes
    it (its readahead and timeout keys accepted, sslverify=off refused)."""
    root, url, _ = site
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.path.join(root, "base.raw"),
        os.path.join(root, "opts.qcow2"))
    spec = f"driver=qcow2,file.driver=http,file.url={url}/opts.qcow2,file.readahead=1M"
    out = tmp_path / "o.raw"
    code, _, err = cli("convert", "--image-opts", spec, "-O", "raw", str(out))
    assert code == 0, err
    assert out.read_bytes() == open(os.path.join(root, "base.raw"), "rb").read()
    https = url.replace("http://", "https://")
    code, _, err = cli("info", "--image-opts", f"driver=qcow2,file.driver=https,"
                       f"file.url={https}/opts.qcow2,file.sslverify=off")
    one_line_error(code, err)
    assert "not supported yet" in err


def test_serve_a_url_over_nbd(site, tmp_path):
    """``diskforge serve URL``: an NBD export of a remote image, read by qemu-img."""
    import subprocess
    import sys
    root, url, _ = site
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", os.path.join(root, "base.raw"),
        os.path.join(root, "served.vmdk"))
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", "serve", "--read-only",
                             "-q", f"{url}/served.vmdk", "--socket", sock],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "diskforge serve did not start"
            time.sleep(0.05)
        out = run("qemu-img", "compare", "-f", "raw", f"nbd+unix:///?socket={sock}",
                  "-F", "raw", os.path.join(root, "base.raw"), timeout=120)
        assert "identical" in out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_writing_to_http_is_refused(site, tmp_path):
    root, url, _ = site
    code, _, err = cli("convert", "-O", "raw", os.path.join(root, "base.raw"),
                       f"{url}/out.raw")
    one_line_error(code, err)
    assert "not supported yet: writing to http:// (use s3:// or a local file)" in err
    code, _, err = cli("resize", f"{url}/base.raw", "+1M")
    one_line_error(code, err)


# -- names inside a remote image -----------------------------------------------------------

def test_qcow2_overlay_with_relative_backing_file(site, tmp_path):
    root = site[0]
    os.makedirs(os.path.join(root, "chain"), exist_ok=True)
    base = os.path.join(root, "chain", "base.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.path.join(root, "base.raw"),
        base)
    ov = os.path.join(root, "chain", "ov.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov)
    run("qemu-io", "-c", "write -P 0x5a 1M 2M", ov)
    _same_as_local(site, tmp_path, "chain/ov.qcow2")


@pytest.mark.parametrize("fmt", ["vpc", "vhdx"])
def test_differencing_vhd_and_vhdx_find_their_parent(site, tmp_path, fmt):
    """The parent locators resolve to a URL beside the child (remote/names.py), which is
    looked for with a request and opened over HTTP."""
    root = site[0]
    d = os.path.join(root, f"diff-{fmt}")
    os.makedirs(d, exist_ok=True)
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, os.path.join(root, "base.raw"),
        os.path.join(d, "base.img"))
    child = os.path.join(d, "child.img")
    diskforge.create(child, os.path.getsize(os.path.join(root, "base.raw")), fmt,
                     backing="base.img", backing_fmt=fmt)
    with diskforge.open(child, fmt, writable=True) as dev:
        dev.write(3 * MiB, b"\xc3" * MiB)
    _same_as_local(site, tmp_path, f"diff-{fmt}/child.img", fmt)


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "monolithicFlat"])
def test_vmdk_descriptor_with_extent_files(site, tmp_path, subformat):
    root = site[0]
    d = os.path.join(root, subformat)
    os.makedirs(d, exist_ok=True)
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
        os.path.join(root, "base.raw"), os.path.join(d, "disk.vmdk"))
    assert len(os.listdir(d)) > 1  # a descriptor and its extent files
    _same_as_local(site, tmp_path, f"{subformat}/disk.vmdk")


def _overlay_naming(root: str, sub: str, backing: str) -> str:
    d = os.path.join(root, sub)
    os.makedirs(d, exist_ok=True)
    ov = os.path.join(d, "ov.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", ov,
        "12M")
    return f"{sub}/ov.qcow2"


@pytest.mark.parametrize("backing", [
    "../base.qcow2",                       # above the image's prefix
    "/etc/passwd",                         # a local file
    "http://127.0.0.1:1/base.qcow2",       # another host
    "%2e%2e/base.qcow2",                   # taken literally: a name beside it, not '..'
])
def test_backing_outside_the_prefix_is_refused(site, tmp_path, backing):
    root, url, _ = site
    shutil.copyfile(os.path.join(root, "base.raw"), os.path.join(root, "base.qcow2"))
    name = _overlay_naming(root, f"evil{abs(hash(backing)) % 1000}", backing)
    code, _, err = cli("convert", "-O", "raw", f"{url}/{name}", str(tmp_path / "o.raw"))
    one_line_error(code, err)
    if backing.startswith("%"):  # quoted, so the server looks for that very name
        assert "No such file" in err and "%252e%252e" in err
    else:
        assert "only name objects beside it" in err or "never local files" in err
    assert not (tmp_path / "o.raw").exists()


def test_overlay_naming_itself_is_a_loop(site, tmp_path):
    root, url, _ = site
    name = _overlay_naming(root, "loop", "ov.qcow2")
    code, _, err = cli("info", f"{url}/{name}")
    one_line_error(code, err)
    assert "loop" in err


def test_backing_as_absolute_url_under_the_prefix(site, tmp_path):
    root, url, _ = site
    base = os.path.join(root, "abs", "base.qcow2")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.path.join(root, "base.raw"),
        base)
    name = _overlay_naming(root, "abs", f"{url}/abs/base.qcow2")
    out = tmp_path / "o.raw"
    diskforge.convert(f"{url}/{name}", out, target_fmt="raw")
    assert out.read_bytes() == open(os.path.join(root, "base.raw"), "rb").read()


def test_resolve_reference_rules():
    ref = "http://h:8/a/b/disk.vmdk?sig=1"
    assert resolve_reference(ref, "disk-flat.vmdk") == "http://h:8/a/b/disk-flat.vmdk"
    assert resolve_reference(ref, "sub/x y.vmdk") == "http://h:8/a/b/sub/x%20y.vmdk"
    assert resolve_reference(ref, ".\\x.vhd") == "http://h:8/a/b/x.vhd"
    assert resolve_reference(ref, "http://h:8/a/b/c.qcow2") == "http://h:8/a/b/c.qcow2"
    assert resolve_reference("s3://bkt/p/d.vmdk", "e.vmdk") == "s3://bkt/p/e.vmdk"
    for bad in ("../c", "sub/../../c", "/a/b/c", "C:\\x.vhd", "\\\\srv\\x",
                "http://h:9/a/b/c", "https://h:8/a/b/c", "http://h:8/a/c",
                "http://h:8/a/b/../c", "file:///etc/passwd"):
        with pytest.raises(SafetyError):
            resolve_reference(ref, bad)
    with pytest.raises(SafetyError):
        resolve_reference("nbd://h/x", "y")


def test_reading_pattern_random_and_sequential(site):
    """Reads at random offsets and lengths, runs of sequential ones, backward jumps,
    reads across window edges: every byte as in the file, with small windows so the
    stream turns over many times, and never more windows held than the cap."""
    root, url, _ = site
    data = open(os.path.join(root, "base.raw"), "rb").read()
    rng = random.Random(7)
    with rhttp.HttpBackend(f"{url}/base.raw", connections=3, window=256 << 10) as b:
        assert b.size == len(data)
        pos = 0
        for i in range(400):
            if i % 50 == 0:
                pos = rng.randrange(len(data))            # a jump
            n = rng.choice((512, 4096, 65536, 200000, 1 << 20))
            if rng.random() < 0.15:                       # a small random read
                at = rng.randrange(len(data))
                assert b.pread(at, 4096) == data[at:at + 4096]
            got = b.pread(pos, n)
            assert got == data[pos:pos + n]
            assert len(b._windows) <= b.connections + 1
            pos = (pos + n) % len(data)
        assert b.pread(len(data) - 10, 100) == data[-10:]
        assert b.pread(len(data), 10) == b""


def test_empty_object(site):
    root, url, _ = site
    open(os.path.join(root, "empty.img"), "wb").close()
    with rhttp.HttpBackend(f"{url}/empty.img") as b:
        assert b.size == 0
    code, _, err = cli("info", f"{url}/empty.img")
    one_line_error(code, err)


# -- faults ------------------------------------------------------------------------------

def test_server_without_range_support(site):
    url = site[1]
    code, _, err = cli("info", f"{url}/norange/base.raw")
    one_line_error(code, err)
    assert "does not support range requests" in err


def test_not_found(site):
    code, _, err = cli("convert", "-O", "raw", f"{site[1]}/nothing.qcow2", "/nonexistent")
    one_line_error(code, err)
    assert "Could not open" in err and "No such file" in err and "404" in err


def test_dropped_connection_is_one_error(site):
    t = time.monotonic()
    code, _, err = cli("info", f"{site[1]}/drop/base.raw")
    one_line_error(code, err)
    assert "Could not open" in err and "tries" in err
    assert time.monotonic() - t < 60


def test_slow_server_still_reads_right(site, tmp_path):
    """nginx's limit_rate (256 KiB/s per connection): slower, same bytes."""
    root, url, _ = site
    small = os.path.join(root, "small.raw")
    _disk(small, MiB + 65536)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", small,
        os.path.join(root, "small.qcow2"))
    out = tmp_path / "o.raw"
    diskforge.convert(f"{url}/slow/small.qcow2", out, target_fmt="raw")
    assert out.read_bytes() == open(small, "rb").read()


def test_name_with_a_space(site, tmp_path):
    root, url, _ = site
    shutil.copyfile(os.path.join(root, "base.raw"), os.path.join(root, "my disk.raw"))
    with rhttp.HttpBackend(f"{url}/my disk.raw") as a, \
            rhttp.HttpBackend(f"{url}/my%20disk.raw") as b:
        assert a.pread(MiB, 4096) == b.pread(MiB, 4096) != bytes(4096)


def test_redirect_is_followed(site, tmp_path):
    root, url, _ = site
    data = open(os.path.join(root, "base.raw"), "rb").read()
    with rhttp.HttpBackend(f"{url}/moved/base.raw") as b:
        assert b.size == len(data)
        assert b.pread(0, len(data)) == data


def test_server_closes_idle_connections(site):
    """A kept-alive connection the server closed while idle is opened again, and the
    bytes are right (remote/http.py's _send)."""
    root, url, _ = site
    data = open(os.path.join(root, "base.raw"), "rb").read()
    with rhttp.HttpBackend(f"{url}/idle/base.raw", tries=1) as b:  # no retries to spare
        for at in (MiB, 5 * MiB, 8 * MiB):
            assert b.pread(at, 4096) == data[at:at + 4096]
            time.sleep(1.5)


def test_file_changed_while_being_read(site):
    root, url, _ = site
    path = os.path.join(root, "changing.raw")
    _disk(path, 4 * MiB)
    with rhttp.HttpBackend(f"{url}/changing.raw") as b:
        first = b.pread(0, 4096)
        assert first == open(path, "rb").read(4096)
        # replaced on disk, as a re-upload would: other bytes, another mtime
        tmp = path + ".new"
        with open(tmp, "wb") as f:
            f.write(b"\x01" * (4 * MiB))
        os.utime(tmp, (time.time() + 100, time.time() + 100))
        os.replace(tmp, path)
        with pytest.raises(ImageIOError, match="changed while being read"):
            b.pread(2 * MiB, 4096)


def test_file_changed_under_the_readahead_stream(site):
    """The change is seen by a readahead window's GET (a fetching thread), and the
    reader gets the error, never bytes of the new file."""
    root, url, _ = site
    path = os.path.join(root, "streamed.raw")
    with open(path, "wb") as f:
        f.truncate(48 * MiB)
    with rhttp.HttpBackend(f"{url}/streamed.raw") as b:
        assert b.pread(0, 2 * MiB) == bytes(2 * MiB)
        tmp = path + ".new"
        with open(tmp, "wb") as f:
            f.truncate(48 * MiB)
            f.write(b"\x01" * MiB)
        os.utime(tmp, (time.time() + 100, time.time() + 100))
        os.replace(tmp, path)
        with pytest.raises(ImageIOError, match="changed while being read"):
            for at in range(2 * MiB, 48 * MiB, MiB):
                assert b.pread(at, MiB) == bytes(MiB)


def test_file_truncated_while_being_read(site):
    root, url, _ = site
    path = os.path.join(root, "shrinking.raw")
    _disk(path, 4 * MiB)
    with rhttp.HttpBackend(f"{url}/shrinking.raw") as b:
        b.pread(0, 4096)
        os.truncate(path, MiB)
        with pytest.raises(ImageIOError, match="changed while being read"):
            b.pread(3 * MiB, 4096)


def test_server_killed_mid_read(tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed")
    root = tmp_path / "www"
    root.mkdir()
    _disk(str(root / "d.raw"), 4 * MiB)
    server = Nginx(str(root), str(tmp_path))
    try:
        b = rhttp.HttpBackend(f"{server.url}/d.raw", tries=3)
        b.pread(0, 4096)
        server.stop()
        t = time.monotonic()
        with pytest.raises(ImageIOError, match=r"bytes .* failed after 3 tries"):
            b.pread(2 * MiB, MiB)
        assert time.monotonic() - t < 30
        b.close()
    finally:
        server.stop()


class Misbehaving:
    """A tiny HTTP/1.1 server for the faults nginx cannot make, serving ``data``
    correctly (206 with Content-Range, an ETag) except as ``fault`` says for the
    first ``times`` data requests (those after the first, which learns the size):
    ``cut`` (a body cut short, then the connection closed), ``drip`` (10 bytes of
    it, then closed), ``503``, ``stall`` (no answer at all)."""

    def __init__(self, data: bytes, fault: str, times: int) -> None:
        self.data, self.fault, self.left = data, fault, times
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/d.raw"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            f = conn.makefile("rb")
            while not self.stop.is_set():
                line = f.readline()
                if not line:
                    return
                headers = {}
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                a, _, b = headers["range"].split("=")[1].partition("-")
                start, end = int(a), min(int(b), len(self.data) - 1)
                self.requests += 1
                fault = None
                if self.requests > 1 and self.left > 0:
                    self.left -= 1
                    fault = self.fault
                if fault == "stall":
                    self.stop.wait(60)
                    return
                if fault == "503":
                    conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
                    continue
                body = self.data[start:end + 1]
                conn.sendall(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}"
                             f"\r\nContent-Range: bytes {start}-{end}/{len(self.data)}"
                             f"\r\nETag: \"v1\"\r\n\r\n".encode())
                if fault in ("cut", "drip"):
                    conn.sendall(body[:len(body) // 3 if fault == "cut" else 10])
                    return
                conn.sendall(body)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("fault", ["cut", "503"])
def test_transient_fault_is_retried(fault):
    data = random.Random(3).randbytes(3 * MiB)
    server = Misbehaving(data, fault, times=2)
    try:
        with rhttp.HttpBackend(server.url, window=MiB) as b:
            assert b.pread(0, len(data)) == data
    finally:
        server.close()


@pytest.mark.parametrize("fault", ["cut", "drip", "503"])
def test_persistent_fault_is_one_error(fault):
    data = random.Random(3).randbytes(MiB)
    server = Misbehaving(data, fault, times=1000)
    try:
        with rhttp.HttpBackend(server.url, tries=3) as b:
            with pytest.raises(ImageIOError, match="failed after 3 tries"):
                b.pread(200000, 300000)
    finally:
        server.close()


def test_stalled_server_times_out():
    data = bytes(MiB)
    server = Misbehaving(data, "stall", times=1000)
    try:
        t = time.monotonic()
        with rhttp.HttpBackend(server.url, tries=2, timeout=1.0) as b:
            with pytest.raises(ImageIOError, match="timed out"):
                b.pread(500000, 1000)
        assert time.monotonic() - t < 30
    finally:
        server.close()


def test_bad_urls_are_one_error():
    for url in ("http:///x", "http://127.0.0.1:notaport/x", "http://[::1/x",
                "http://127.0.0.1:1/a\r\nX-Injected: 1"):
        code, _, err = cli("info", url)
        one_line_error(code, err)
    with pytest.raises(DiskforgeError):
        rhttp.open_backend("http://127.0.0.1:1/x", tries=1)  # connection refused


def test_https_checks_the_certificate(tmp_path, monkeypatch):
    """https: a certificate the CA store does not hold is one error (no retries); the
    same server trusted through the CA store (SSL_CERT_FILE, as a system bundle
    would be) reads; sslverify=False (qemu's sslverify=off) reads without trust."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    need("openssl")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
        "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1")
    root = tmp_path / "www"
    root.mkdir()
    data = random.Random(5).randbytes(3 * MiB)
    (root / "d.raw").write_bytes(data)
    server = Nginx(str(root), str(tmp_path), tls=(cert, key))
    try:
        url = f"{server.url}/d.raw"
        assert url.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nothing.pem"))
        t = time.monotonic()
        code, _, err = cli("info", url)
        one_line_error(code, err)
        assert "certificate is not trusted" in err
        assert time.monotonic() - t < 10  # not retried
        with rhttp.HttpBackend(url, sslverify=False) as b:
            assert b.pread(0, len(data)) == data
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        with rhttp.HttpBackend(url) as b:
            assert b.pread(MiB, 2 * MiB) == data[MiB:]
    finally:
        server.stop()
