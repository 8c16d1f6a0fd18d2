"""diskforge's NBD server, checked with QEMU's NBD client (qemu-img, qemu-io) and with a
small hand-written client for the protocol corners and for hostile clients.

Formats: every entry of FORMATS is built from the same sparse raw disk — with qemu-img
where it writes the format, with ``diskforge convert`` otherwise — served, and read back
through ``qemu-img`` over ``nbd+unix://``: the contents must be the raw disk's, and the
holes ``qemu-img map`` sees through ``base:allocation`` must be the format's own extents.
Writable entries are also written through NBD, then checked with ``qemu-img check``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import cli, cli_process, make_sparse, need, run, sha256_file

import diskforge
from diskforge.blockdev import BlockDevice, Extent, ExtentKind
from diskforge.hypervisor import nbd as N
from diskforge import nbd_protocol as P
from diskforge.hypervisor.nbd import NBDServer, flat_extents

MiB = 1 << 20
SIZE = 24 * MiB
# (offset, bytes) written into the test disk; everything else is a hole
LAYOUT = [(0, b"\xeb\x3c\x90" + os.urandom(509)), (1 * MiB, os.urandom(3 * MiB)),
          (8 * MiB + 4096, b"text " * 3000), (SIZE - 64 * 1024, os.urandom(64 * 1024))]


def build_raw(raw: str, workdir: str) -> tuple[str, str]:
    return raw, "raw"


def qemu_img_convert(fmt: str, *opts: str):
    def build(raw: str, workdir: str) -> tuple[str, str]:
        need("qemu-img")
        out = os.path.join(workdir, f"disk.{fmt}")
        run("qemu-img", "convert", "-O", fmt, *opts, raw, out)
        return out, fmt
    return build


def build_qcow2_chain(raw: str, workdir: str) -> tuple[str, str]:
    """An overlay over a qcow2 base that holds half of the disk plus data the overlay
    zeroes again: qemu-img convert -B writes only what differs from the base."""
    need("qemu-img")
    base_raw = make_sparse(os.path.join(workdir, "base.raw"), SIZE,
                           LAYOUT[:2] + [(12 * MiB, b"\xaa" * (256 << 10))])
    base = os.path.join(workdir, "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", base_raw, base)
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", raw, top,
        cwd=workdir)
    info = json.loads(run("qemu-img", "info", "--output", "json", top).stdout)
    assert info["backing-filename"] == "base.qcow2"
    return top, "qcow2"


def diskforge_convert(fmt: str, *opts: str):
    def build(raw: str, workdir: str) -> tuple[str, str]:
        out = os.path.join(workdir, f"disk.{fmt}")
        code, _, err = cli("convert", "-O", fmt, *opts, raw, out)
        assert code == 0, err
        return out, fmt
    return build


# Each entry: (builder(raw_path, workdir) -> (image path, format name), writable).
# A writable entry's image is also written through NBD and checked afterwards.
FORMATS = [
    pytest.param(build_raw, True, id="raw"),
    pytest.param(qemu_img_convert("qcow2"), True, id="qcow2"),
    pytest.param(build_qcow2_chain, True, id="qcow2-backing-chain"),
    pytest.param(qemu_img_convert("vhdx", "-o", "block_size=1M"), True, id="vhdx"),
    pytest.param(qemu_img_convert("vpc", "-o", "force_size=on"), True, id="vpc"),
    # QEMU writes no DMG; ULFO is one QEMU cannot read itself (no LZFSE in Debian's)
    pytest.param(diskforge_convert("dmg", "-o", "format=UDZO"), False, id="dmg-UDZO"),
    pytest.param(diskforge_convert("dmg", "-o", "format=ULFO"), False, id="dmg-ULFO"),
]
WRITABLE = [p for p in FORMATS if p.values[1]]


def expected_bytes() -> bytearray:
    buf = bytearray(SIZE)
    for off, data in LAYOUT:
        buf[off:off + len(data)] = data
    return buf


def data_ranges(buf: bytes, gran: int = 4096) -> list[tuple[int, int]]:
    """Runs of granules that hold a non-zero byte, coalesced."""
    out: list[list[int]] = []
    zero = bytes(gran)
    for off in range(0, len(buf), gran):
        if buf[off:off + gran] != zero:
            if out and out[-1][1] == off:
                out[-1][1] = off + gran
            else:
                out.append([off, off + gran])
    return [tuple(r) for r in out]


def format_data_ranges(image: str, fmt: str) -> list[tuple[int, int]]:
    """Where the image's own extents (backing layers resolved) say data is."""
    with diskforge.open(image, fmt) as dev:
        return _merge([(e.offset, e.offset + e.length)
                       for e in flat_extents(dev, 0, dev.size)
                       if e.kind is not ExtentKind.ZERO])


def covers(ranges, inner) -> bool:
    return all(any(a <= x and y <= b for a, b in ranges) for x, y in inner)


@pytest.fixture
def source(tmp_path):
    raw = make_sparse(str(tmp_path / "disk.raw"), SIZE, LAYOUT)
    return raw


@pytest.fixture
def serve(tmp_path):
    """serve(path, fmt, read_only=...) -> NBDServer listening on a Unix socket; every
    server and device is closed (and its threads joined) when the test ends."""
    opened = []

    def start(path, fmt="raw", *, read_only=False, **kw):
        dev = diskforge.open(path, fmt, writable=not read_only)
        sock = str(tmp_path / f"nbd{len(opened)}.sock")
        srv = NBDServer(dev, socket_path=sock, read_only=read_only, **kw).start()
        opened.append((srv, dev))
        return srv

    yield start
    for srv, dev in opened:
        srv.close()
        dev.close()
    for srv, _ in opened:
        assert srv.active_clients == 0


def map_json(uri: str) -> list[dict]:
    return json.loads(run("qemu-img", "map", "-f", "raw", "--output", "json", uri).stdout)


# -- with QEMU's client --------------------------------------------------------------

@pytest.mark.parametrize("build,writable", FORMATS)
def test_qemu_img_reads_contents_and_holes(tmp_path, source, serve, build, writable):
    need("qemu-img")
    image, name = build(source, str(tmp_path))
    srv = serve(image, name, read_only=True)
    info = json.loads(run("qemu-img", "info", "--output", "json", srv.uri).stdout)
    assert info["virtual-size"] == SIZE
    out = str(tmp_path / "copy.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out)
    assert open(out, "rb").read() == bytes(expected_bytes())
    # qemu-img map over NBD: data exactly where the format's extents say, holes elsewhere
    entries = map_json(srv.uri)
    mapped = _merge([(e["start"], e["start"] + e["length"]) for e in entries if e["data"]])
    assert mapped == format_data_ranges(image, name)
    assert covers(mapped, data_ranges(expected_bytes()))  # every byte of data is in one
    if name in ("raw", "qcow2"):
        # and where QEMU's own driver reports allocation, as QEMU maps the file itself
        # (its vhdx and dmg drivers report everything as data; its vpc driver whole
        # blocks, where diskforge also sees the holes of the file inside them)
        direct = json.loads(run("qemu-img", "map", "-f", name, "--output", "json",
                                image).stdout)
        assert mapped == _merge([(e["start"], e["start"] + e["length"])
                                 for e in direct if e["data"]])
    holes = [e for e in entries if not e["data"]]
    assert sum(e["length"] for e in holes) >= SIZE // 2 and all(e["zero"] for e in holes)


def _merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@pytest.mark.parametrize("build,writable", WRITABLE)
def test_writes_through_nbd_land(tmp_path, source, serve, build, writable):
    need("qemu-io")
    image, name = build(source, str(tmp_path))
    srv = serve(image, name)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 2M 1M", "-c", "write -z 1M 64k",
        "-c", "discard 3M 512k", "-c", "write -f -P 0x33 5M 4k",  # -f: FUA
        "-c", "flush", srv.uri)
    want = expected_bytes()
    want[2 * MiB:3 * MiB] = b"\x5a" * MiB
    want[1 * MiB:1 * MiB + 65536] = bytes(65536)
    want[3 * MiB:3 * MiB + 512 * 1024] = bytes(512 * 1024)
    want[5 * MiB:5 * MiB + 4096] = b"\x33" * 4096
    copy = str(tmp_path / "after.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, copy)
    assert open(copy, "rb").read() == bytes(want)
    srv.close()
    srv.device.close()  # a VHDX keeps its log until closed, as Hyper-V does
    if name in ("qcow2", "vhdx"):  # the image must stay valid for its reference tool
        run("qemu-img", "check", "-f", name, image)  # (qemu-img checks no vpc or raw)
    run("qemu-img", "convert", "-f", name, "-O", "raw", image, copy)
    assert open(copy, "rb").read() == bytes(want)


def test_read_only_export_refuses_writes(source, serve):
    need("qemu-io")
    before = sha256_file(source)
    srv = serve(source, read_only=True)
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri, check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    assert sha256_file(source) == before


def test_several_clients_at_once(tmp_path, source, serve):
    need("qemu-img")
    srv = serve(source, read_only=True)
    outs = [str(tmp_path / f"c{i}.raw") for i in range(3)]
    procs = [subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, o],
                              stderr=subprocess.PIPE) for o in outs]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()
    want = sha256_file(source)
    assert all(sha256_file(o) == want for o in outs)
    assert srv.connections >= 3


def test_several_writers_at_once(tmp_path, source, serve):
    need("qemu-io")
    srv = serve(source)
    procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c",
                               f"write -P {0x10 + i} {(12 + 2 * i) * MiB} {MiB}",
                               "-c", "flush", srv.uri], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(4)]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()
    srv.close()
    want = expected_bytes()
    for i in range(4):
        want[(12 + 2 * i) * MiB:(13 + 2 * i) * MiB] = bytes([0x10 + i]) * MiB
    assert open(source, "rb").read() == bytes(want)


# -- a minimal client of our own -----------------------------------------------------

class Client:
    """Just enough NBD to negotiate and issue requests (or misbehave on purpose)."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            k = self.s.recv(n - len(buf))
            if not k:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += k
        return buf

    def closed_by_server(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        assert flags & P.NBD_FLAG_FIXED_NEWSTYLE
        self.s.sendall(struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, n = struct.unpack(">QIII", self.recv(20))
            assert magic == P.NBD_REP_MAGIC and o == opt
            replies.append((rtype, self.recv(n)))
            if rtype == P.NBD_REP_ACK or rtype & (1 << 31):
                return replies

    def go(self, name: str = "", structured: bool = True, meta: bool = True) -> None:
        self.greet()
        if structured:
            assert self.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ACK
        if meta:
            q = P.BASE_ALLOCATION.encode()
            self.option(P.NBD_OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">I", 1)
                        + struct.pack(">I", len(q)) + q)
        replies = self.option(P.NBD_OPT_GO, struct.pack(">I", len(name)) + name.encode()
                              + struct.pack(">HH", 1, P.NBD_INFO_BLOCK_SIZE))
        assert replies[-1][0] == P.NBD_REP_ACK, replies

    def request(self, cmd: int, offset: int, length: int, flags: int = 0,
                payload: bytes = b"", cookie: int = 7) -> None:
        self.s.sendall(struct.pack(">IHHQQI", P.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset,
                                   length) + payload)

    def chunks(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", self.recv(20))
            assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
            out.append((rtype, self.recv(n)))
            if flags & P.NBD_REPLY_FLAG_DONE:
                return out


def test_structured_read_sends_holes_and_block_status(source, serve):
    srv = serve(source, read_only=True)
    c = Client(srv.socket_path)
    c.go()
    c.request(P.NBD_CMD_READ, 4 * MiB - 4096, 8192)  # 4 KiB of data, then 4 KiB of hole
    chunks = c.chunks()
    kinds = [t for t, _ in chunks]
    assert kinds == [P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_TYPE_OFFSET_HOLE]
    off = struct.unpack(">Q", chunks[0][1][:8])[0]
    assert off == 4 * MiB - 4096 and chunks[0][1][8:] == bytes(expected_bytes()[off:off + 4096])
    assert struct.unpack(">QI", chunks[1][1]) == (4 * MiB, 4096)
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 8 * MiB)
    [(t, payload)] = c.chunks()
    assert t == P.NBD_REPLY_TYPE_BLOCK_STATUS
    ctx, *desc = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)
    pairs = list(zip(desc[::2], desc[1::2]))
    assert ctx == N.BASE_ALLOCATION_ID
    assert sum(n for n, _ in pairs) == 8 * MiB
    assert pairs[0] == (4096, 0) and pairs[1][1] == P.NBD_STATE_HOLE | P.NBD_STATE_ZERO
    c.request(P.NBD_CMD_BLOCK_STATUS, 0, 8 * MiB, flags=P.NBD_CMD_FLAG_REQ_ONE)
    [(t, payload)] = c.chunks()
    assert len(payload) == 12
    c.request(P.NBD_CMD_DISC, 0, 0)
    assert c.closed_by_server()


def test_protocol_errors_keep_the_session(source, serve):
    srv = serve(source, read_only=True)
    c = Client(srv.socket_path)
    c.greet()
    assert c.option(P.NBD_OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)
                    )[-1][0] == P.NBD_REP_ERR_UNKNOWN
    assert c.option(P.NBD_OPT_INFO, b"\0\0")[-1][0] == P.NBD_REP_ERR_INVALID  # truncated
    assert c.option(P.NBD_OPT_STARTTLS)[-1][0] == P.NBD_REP_ERR_UNSUP
    assert c.option(99)[-1][0] == P.NBD_REP_ERR_UNSUP
    listed = c.option(P.NBD_OPT_LIST)
    assert listed[0][0] == P.NBD_REP_SERVER and listed[-1][0] == P.NBD_REP_ACK
    # the same connection can still negotiate after all those errors
    assert c.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ACK
    assert c.option(P.NBD_OPT_GO, struct.pack(">IH", 0, 0))[-1][0] == P.NBD_REP_ACK
    c.request(P.NBD_CMD_READ, SIZE - 512, 1024)  # past the end
    [(t, payload)] = c.chunks()
    assert t == P.NBD_REPLY_TYPE_ERROR and struct.unpack_from(">I", payload)[0] == P.NBD_EINVAL
    c.request(P.NBD_CMD_WRITE, 0, 4, payload=b"abcd")  # read-only export
    [(t, payload)] = c.chunks()
    assert t == P.NBD_REPLY_TYPE_ERROR and struct.unpack_from(">I", payload)[0] == P.NBD_EPERM
    c.request(P.NBD_CMD_READ, 0, N.MAX_PAYLOAD + 1)  # over the advertised maximum
    [(t, payload)] = c.chunks()
    assert t == P.NBD_REPLY_TYPE_ERROR
    c.request(42, 0, 512)  # unknown command
    [(t, _)] = c.chunks()
    assert t == P.NBD_REPLY_TYPE_ERROR
    c.request(P.NBD_CMD_READ, 0, 512)  # and the session still works
    [(t, payload)] = c.chunks()
    assert t == P.NBD_REPLY_TYPE_OFFSET_DATA and payload[8:] == bytes(expected_bytes()[:512])


def test_garbage_clients_are_dropped_and_others_carry_on(tmp_path, source, serve):
    need("qemu-img")
    before = sha256_file(source)
    srv = serve(source, handshake_timeout=2.0)
    # a client idling in the middle of the handshake holds nobody up
    idle = Client(srv.socket_path)
    # garbage instead of client flags
    g1 = Client(srv.socket_path)
    g1.recv(18)
    g1.s.sendall(b"\xff" * 64)
    assert g1.closed_by_server()
    # garbage instead of a request, after a proper negotiation
    g2 = Client(srv.socket_path)
    g2.go()
    g2.s.sendall(os.urandom(28))
    assert g2.closed_by_server()
    # an option claiming a huge length
    g3 = Client(srv.socket_path)
    g3.greet()
    g3.s.sendall(struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, 1 << 30))
    assert g3.closed_by_server()
    # a write announcing more than the maximum payload
    g4 = Client(srv.socket_path)
    g4.go()
    g4.request(P.NBD_CMD_WRITE, 0, 1 << 30, payload=b"\x01" * 4096)
    chunks = g4.chunks()
    assert chunks[-1][0] == P.NBD_REPLY_TYPE_ERROR
    assert g4.closed_by_server()
    # a client vanishing half-way through a write payload: nothing is written
    g5 = Client(srv.socket_path)
    g5.go()
    g5.request(P.NBD_CMD_WRITE, 0, 65536, payload=b"\x77" * 1000)
    g5.s.close()
    # meanwhile a well-behaved client reads everything correctly
    out = str(tmp_path / "good.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out)
    assert sha256_file(out) == before
    idle.recv(18)  # the greeting, then nothing: the handshake time limit ends it
    assert idle.closed_by_server()
    deadline = time.monotonic() + 5
    while srv.active_clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.active_clients == 0
    assert srv.dropped >= 4
    srv.close()
    assert sha256_file(source) == before


def test_max_clients(source, serve):
    srv = serve(source, read_only=True, max_clients=2)
    a, b = Client(srv.socket_path), Client(srv.socket_path)
    a.recv(18), b.recv(18)
    c = Client(srv.socket_path)
    assert c.closed_by_server()
    a.s.close()
    deadline = time.monotonic() + 5
    while srv.active_clients > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    d = Client(srv.socket_path)
    d.go()


def test_session_buffer_is_page_aligned_and_reused(source, serve):
    """Reads land in (and writes arrive into) one page-aligned buffer per client,
    grown when a request needs more: the copy from the page cache into it is several
    times faster than into a bytearray at malloc's offset (bench/cases_nbd.py)."""
    import ctypes
    srv = serve(source, read_only=True)
    session = N._Session(srv, None, 0)

    def address(view):
        return ctypes.addressof(ctypes.c_char.from_buffer(view))

    small = session.buffer(5000)
    assert len(small) == 5000 and address(small) % 4096 == 0
    assert address(session.buffer(1 << 20)) == address(small)  # reused
    big = session.buffer(3 << 20)
    assert len(big) == 3 << 20 and address(big) % 4096 == 0
    assert address(session.buffer(512)) == address(big)


# -- flat_extents ------------------------------------------------------------------------

class _Layer(BlockDevice):
    """A device whose extents are given, with a backing device under it."""

    def __init__(self, size, extents, backing=None):
        self.size, self._ext, self.backing = size, extents, backing

    def readinto(self, offset, buf):
        return len(buf)

    def extents(self, offset=0, length=None):
        return iter(self._ext)


def test_flat_extents_resolves_backing():
    base = _Layer(8192, [Extent(0, 4096, ExtentKind.DATA), Extent(4096, 4096, ExtentKind.ZERO)])
    top = _Layer(16384, [Extent(0, 2048, ExtentKind.DATA),
                         Extent(2048, 14336, ExtentKind.BACKING)], backing=base)
    got = [(e.offset, e.length, e.kind) for e in flat_extents(top, 1024, 15360)]
    assert got == [(1024, 1024, ExtentKind.DATA), (2048, 2048, ExtentKind.DATA),
                   (4096, 4096, ExtentKind.ZERO), (8192, 8192, ExtentKind.ZERO)]


# -- the CLI ---------------------------------------------------------------------------------

def _start_serve(*argv):
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", "serve", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line


def _stop_serve(proc, sig) -> None:
    """Signal ``serve`` and expect a clean exit; a server that does not stop is killed,
    so a failing run leaves no process behind."""
    proc.send_signal(sig)
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"serve did not exit within 20 s of {sig.name}")
    assert code == 0, proc.stderr.read()


def test_cli_serve_unix_and_tcp(tmp_path, source):
    need("qemu-img")
    sock = str(tmp_path / "s.sock")
    proc, line = _start_serve(source, "--socket", sock, "--read-only")
    try:
        assert f"nbd+unix:///?socket={sock}" in line, line + proc.stderr.read()
        out = str(tmp_path / "u.raw")
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={sock}", out)
        assert sha256_file(out) == sha256_file(source)
    finally:
        _stop_serve(proc, signal.SIGTERM)
    assert not os.path.exists(sock)

    proc, line = _start_serve(source, "--port", "0", "--read-only", "--export-name", "d")
    try:
        uri = line.split(" at ")[-1].strip()
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/d"), line
        info = json.loads(run("qemu-img", "info", "--output", "json", uri).stdout)
        assert info["virtual-size"] == SIZE
    finally:
        _stop_serve(proc, signal.SIGINT)


def test_cli_serve_refuses_to_replace_a_file(tmp_path, source):
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    proc = cli_process("serve", source, "--socket", str(victim))
    assert proc.returncode == 1 and "not a socket" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "keep me"
    proc = cli_process("serve", source)
    assert proc.returncode != 0 and "--socket" in proc.stderr
