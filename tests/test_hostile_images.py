"""Hostile qcow2, VHD, VHDX, VDI, VMDK, LUKS2 and ASIF images (issue 12, item 4; issues 14
and 16), and the read-only qcow version 1, QED and Parallels images (issue 16):
decompression bombs, KDF costs, tables sized by headers that a sparse file satisfies, a
pending VHDX log that extends the file, and huge-but-empty disks (as large as each format
allows) through map, check, convert, compare and serve.

Every case runs the real CLI in a child process with a time limit and measures its peak
RSS (GNU time's %M): it must end in success (for ``check``, its report) or in one line
naming the file, structure and field, within seconds and well under the 256 MiB
budget. Images are made by qemu-img and then damaged; large files are sparse, so tiny
on disk.
"""

import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest
from conftest import need, one_line_error, run

MIB = 1 << 20
TIB = 1 << 40
RSS_LIMIT = 200 * MIB     # well under the 256 MiB budget
TIME_LIMIT = 20           # seconds; each command takes one or two on a busy machine


def measured(*argv: str, timeout: float = TIME_LIMIT) -> tuple[int, str, str, int]:
    """Run ``diskforge ARGV`` in a child; (exit status, stdout, stderr, peak RSS bytes).
    The peak is /usr/bin/time's (%M): Linux carries the forking process's high-water
    mark across exec, so wait4 on a child forked from this big test process would
    report the test's own memory. A child still running at ``timeout`` is killed (its
    whole session) and the test fails."""
    import tempfile
    time_bin = need("time")
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = os.path.join(tmp, "rss")
        with open(os.path.join(tmp, "out"), "w+") as out, \
                open(os.path.join(tmp, "err"), "w+") as err:
            proc = subprocess.Popen([time_bin, "-f", "%M", "-o", rss_file, sys.executable,
                                     "-m", "diskforge", *argv], stdout=out, stderr=err,
                                    text=True, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"diskforge {' '.join(argv)} ran more than {timeout} s")
            out.seek(0)
            err.seek(0)
            with open(rss_file) as f:
                rss = int(f.read().split()[-1]) * 1024
            return code, out.read(), err.read(), rss


def ok_or_one_line(code: int, err: str, rss: int, *fields: str,
                   report: bool = False) -> None:
    """Small and clean: success, or one line on stderr naming one of ``fields``.
    ``report``: a ``check``, whose exit 2 or 3 with findings on stderr (as qemu-img
    prints them) is a result, and exit 63 a format qemu-img cannot check either."""
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    assert "Traceback" not in err and "internal error" not in err, err
    findings = report and code in (2, 3) and not any(
        line.startswith("diskforge:") for line in err.splitlines())
    if report and code == 63:
        one_line_error(code, err)
        assert "does not support checks" in err
    elif code != 0 and not findings:
        one_line_error(code, err)
        if fields:
            assert any(f in err for f in fields), err


# -- qcow2: a zstd bomb in a compressed cluster ----------------------------------------

def _compressed_qcow2(path: str, ctype: str) -> None:
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.write(bytes(range(256)) * 256)         # one 64 KiB cluster that compresses
    run("qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o",
        f"compression_type={ctype}", raw, path)


def _replace_first_cluster(path: str, payload: bytes) -> None:
    """Point guest cluster 0 at ``payload`` (appended to the file) as a compressed
    cluster, with a descriptor covering all of it."""
    import diskforge
    with diskforge.open(path) as dev:
        l2off = dev.l1[0] & 0x00FF_FFFF_FFFF_FE00
        geo = dev.geo
    host = -(-os.path.getsize(path) // 512) * 512
    with open(path, "r+b") as f:
        f.seek(host)
        f.write(payload + bytes(-len(payload) % 512))
        f.seek(l2off)
        f.write(struct.pack(">Q", geo.compressed_entry(host, len(payload))))


def test_zstd_bomb_stops_at_the_cluster(workdir):
    need("qemu-img")
    zstandard = pytest.importorskip("zstandard")
    img = os.path.join(workdir, "bomb.qcow2")
    _compressed_qcow2(img, "zstd")
    # 8 KiB that declares (and expands to) 1 GiB
    c = zstandard.ZstdCompressor(level=19)
    bomb = c.compress(bytes(1 << 30))     # (zero pages: nothing is really allocated)
    assert len(bomb) < 60000
    _replace_first_cluster(img, bomb)
    code, _, err, rss = measured("convert", "-O", "raw", img,
                                 os.path.join(workdir, "out.raw"))
    ok_or_one_line(code, err, rss, "L2 entry")
    assert code == 1 and "is corrupt: the zstd frame declares 1073741824 bytes" in err
    assert not os.path.exists(os.path.join(workdir, "out.raw"))


def test_zstd_frame_without_a_size_is_stopped_at_the_cluster(workdir):
    """A streamed frame (no declared size, as qemu writes them) that expands far past
    the cluster: decoding stops at 64 KiB and the cluster is corrupt, as qemu says
    (qemu-img reports an I/O error for it)."""
    need("qemu-img")
    zstandard = pytest.importorskip("zstandard")
    img = os.path.join(workdir, "stream.qcow2")
    _compressed_qcow2(img, "zstd")
    c = zstandard.ZstdCompressor(level=19).compressobj()
    chunk = b"\x5a" * MIB
    bomb = b"".join(c.compress(chunk) for _ in range(256)) + c.flush()
    _replace_first_cluster(img, bomb)
    out = os.path.join(workdir, "out.raw")
    code, _, err, rss = measured("convert", "-O", "raw", img, out)
    ok_or_one_line(code, err, rss, "L2 entry")
    assert code == 1 and "decodes to more than the 65536-byte cluster" in err, err
    assert run("qemu-img", "convert", "-O", "raw", img, out, check=False).returncode != 0


def test_zlib_bomb_stops_at_the_cluster(workdir):
    need("qemu-img")
    import zlib
    img = os.path.join(workdir, "zbomb.qcow2")
    _compressed_qcow2(img, "zlib")
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    chunk = b"\x33" * MIB
    bomb = b"".join(c.compress(chunk) for _ in range(48)) + c.flush()
    assert len(bomb) < 65535
    _replace_first_cluster(img, bomb)
    out = os.path.join(workdir, "out.raw")
    code, _, err, rss = measured("convert", "-O", "raw", img, out)
    ok_or_one_line(code, err, rss)
    assert code == 0
    with open(out, "rb") as f:
        assert f.read(65536) == b"\x33" * 65536


# -- tables sized by headers, checked only against a sparse file -----------------------

def test_vhd_bat_larger_than_the_budget(workdir):
    need("qemu-img")
    from diskforge.formats.vhd.structs import HEADER_CHECKSUM_AT, checksum
    img = os.path.join(workdir, "bat.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", img, "2040G")
    with open(img, "r+b") as f:
        hoff = struct.unpack(">Q", f.read(24)[16:24])[0]
        f.seek(hoff)
        hd = bytearray(f.read(1024))
        struct.pack_into(">II", hd, 28, 0xFFFFFFFF, 512)  # max_table_entries, block_size
        struct.pack_into(">I", hd, HEADER_CHECKSUM_AT, 0)
        struct.pack_into(">I", hd, HEADER_CHECKSUM_AT,
                         checksum(bytes(hd), HEADER_CHECKSUM_AT))
        f.seek(hoff)
        f.write(hd)
        f.truncate(20 << 30)          # sparse: "the BAT fits in the file" holds
    for cmd in ("info", "map", "check"):
        code, _, err, rss = measured(cmd, img)
        ok_or_one_line(code, err, rss)
        assert code == 1 and "VhdDynamicDiskHeader.max_table_entries" in err, err
        assert "256 MiB" in err


def test_vdi_block_map_larger_than_the_budget(workdir):
    """A VDI whose header claims 2^28 blocks (a 1 GiB map) in a sparse file that holds
    it: refused before the map is read."""
    need("qemu-img")
    img = os.path.join(workdir, "map.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", img, "1G")
    with open(img, "r+b") as f:
        f.seek(72 + 272)
        f.write(struct.pack("<I", 0xFFFFFE00))          # offData
        f.seek(72 + 312)
        f.write(struct.pack("<I", 1 << 28))             # cBlocks
        f.truncate(5 << 30)
    for cmd in ("info", "map", "check"):
        code, _, err, rss = measured(cmd, img)
        ok_or_one_line(code, err, rss)
        assert code == 1 and ".cBlocks" in err and "256 MiB" in err, err


def test_qcow2_check_counters_of_a_huge_sparse_file(workdir):
    """512-byte clusters and a 1 TiB sparse file: 2^31 clusters to count."""
    need("qemu-img")
    img = os.path.join(workdir, "sparse.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1G")
    os.truncate(img, TIB)
    code, _, err, rss = measured("check", img)
    ok_or_one_line(code, err, rss)
    assert code == 1 and "check.reference counts" in err and "256 MiB" in err, err
    code, out, err, rss = measured("map", img)   # what does not need them still works
    ok_or_one_line(code, err, rss)
    assert code == 0


def test_qcow2_bitmap_table_larger_than_the_disk_needs(workdir):
    need("qemu-img")
    img = os.path.join(workdir, "bm.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    run("qemu-img", "bitmap", "--add", img, "b0")
    import diskforge
    from diskforge.formats.qcow2.bitmaps import read_directory
    with diskforge.open(img) as dev:
        (bm,) = read_directory(dev)
    with open(img, "r+b") as f:      # bitmap_table_size: qemu's maximum, 128 Mi entries
        f.seek(bm.entry_offset + 8)
        f.write(struct.pack(">I", 0x8000000))
    os.truncate(img, 2 << 30)
    code, out, err, rss = measured("check", img)
    ok_or_one_line(code, err, rss, report=True)
    assert code == 2 and "bitmap_table_size" in err, out + err


def test_qcow2_check_with_qemus_maximum_of_snapshots(workdir):
    """65536 snapshots (qemu's QCOW_MAX_SNAPSHOTS) sharing one L1 and one L2 table:
    check reads the table a MiB at a time and walks the shared tables once with a
    weight, not once per snapshot."""
    need("qemu-img")
    import diskforge
    img = os.path.join(workdir, "snaps.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    run("qemu-io", "-c", "write -P 1 0 64k", img)
    run("qemu-img", "snapshot", "-c", "s0", img)
    with diskforge.open(img) as dev:
        (snap,) = dev.snapshots
    extra = struct.pack(">QQQ", 0, 64 * MIB, (1 << 64) - 1)
    table = bytearray()
    for i in range(65536):      # qcow2.txt "Snapshot table entry", as qemu writes it
        sid, name = str(i + 1).encode(), f"s{i}".encode()
        e = struct.pack(">QIHHIIQII", snap.l1_table_offset, snap.l1_size, len(sid),
                        len(name), 0, 0, 0, 0, len(extra)) + extra + sid + name
        table += e + bytes(-len(e) % 8)
    end = -(-os.path.getsize(img) // 65536) * 65536
    with open(img, "r+b") as f:
        f.seek(end)
        f.write(table)
        f.seek(60)
        f.write(struct.pack(">IQ", 65536, end))    # nb_snapshots, snapshots_offset
    code, out, err, rss = measured("check", img)
    ok_or_one_line(code, err, rss, report=True)
    # the shared L2 table now has 65537 references and a refcount of 2: corruption,
    # counted as qemu counts it
    assert code == 2 and "refcount=2 reference=65537" in err, out + err[:500]
    code, out, err, rss = measured("snapshot", "-l", img)
    ok_or_one_line(code, err, rss)
    assert code == 0 and out.count("\n") > 65536


def test_qcow2_check_with_l1_entries_naming_one_l2_table(workdir):
    """4096 L1 entries naming the same full L2 table (2 MiB clusters: 262144 entries):
    the table is walked twice (once, then once weighted), not 4096 times."""
    need("qemu-img")
    import diskforge
    img = os.path.join(workdir, "alias.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "2048P")
    run("qemu-io", "-c", "write -P 7 0 2M", img)
    with diskforge.open(img) as dev:
        l1_offset, first = dev.l1_offset, dev.l1[0]
    with open(img, "r+b") as f:
        f.seek(l1_offset + 8)
        f.write(struct.pack(">Q", first) * 4096)
    code, out, err, rss = measured("check", img)
    ok_or_one_line(code, err, rss, report=True)
    assert code == 2 and "refcount=1 reference=4097" in err, out + err[:500]


# -- VHDX ------------------------------------------------------------------------------

def _vhdx_regions(path, change: dict):
    from diskforge.formats.vhdx.structs import REGION_TABLE_OFFSETS
    from diskforge.formats.vhdx.tables import Region, build_region_table
    from vhdx_helpers import regions
    regs = dict(regions(path))
    for guid, (off, length) in change.items():
        regs[guid] = Region(guid, off, length, True)
    table = build_region_table(list(regs.values()))
    with open(path, "r+b") as f:
        for off in REGION_TABLE_OFFSETS:
            f.seek(off)
            f.write(table)


def test_vhdx_bat_larger_than_the_budget_is_read_in_pieces(workdir):
    """64 TiB in 1 MiB blocks needs a 520 MiB BAT (qemu-img makes such files); here the
    region says so and a sparse file holds it. The BAT is read in pieces as used: every
    command works, quickly and small."""
    need("qemu-img")
    from vhdx_helpers import metadata_item
    from diskforge.formats.vhdx.structs import BAT_GUID, FILE_PARAMETERS_GUID
    img = os.path.join(workdir, "bat.vhdx")
    run("qemu-img", "create", "-q", "-f", "vhdx", img, "64T")
    with open(img, "r+b") as f:
        f.seek(metadata_item(img, FILE_PARAMETERS_GUID))
        f.write(struct.pack("<I", MIB))
    _vhdx_regions(img, {BAT_GUID: (64 * MIB, 1 << 30)})
    os.truncate(img, 64 * MIB + (1 << 30))
    out_img = os.path.join(workdir, "out.qcow2")
    for argv in (("info", img), ("map", "--output", "json", img), ("check", img),
                 ("convert", "-O", "qcow2", img, out_img), ("compare", img, img)):
        code, out, err, rss = measured(*argv)
        ok_or_one_line(code, err, rss)
        assert code == 0, (argv, err)
        if argv[0] == "map":
            assert '"data": true' not in out
    assert run("qemu-img", "info", out_img).returncode == 0


def test_vhdx_pending_log_that_extends_the_file_to_64_tib(workdir):
    """A 16 MiB file whose pending log says the file is 64 TiB and maps 25k blocks
    (800 GiB) into that replayed-only space: they read as zeros, and nothing reads
    them (before, convert and compare read all 800 GiB)."""
    need("qemu-img")
    import diskforge
    from vhdx_helpers import bat_offset, headers, rewrite_headers
    from diskforge.formats.vhdx.structs import LOG_SECTOR
    from diskforge.formats.vhdx.log import build_entry
    img = os.path.join(workdir, "log.vhdx")
    run("qemu-img", "create", "-q", "-f", "vhdx", img, "64T")
    with diskforge.open(img) as dev:
        ratio, bs = dev.ratio, dev.block_size
    h = headers(img)[0]
    base = bat_offset(img)
    sectors, idx, block = [], 0, 0
    for s in range(50):
        entries = []
        for _ in range(512):
            if (idx + 1) % (ratio + 1) == 0:
                entries.append(0)
            else:
                entries.append(((TIB + block * bs) >> 20) << 20 | 6)   # FULLY_PRESENT
                block += 1
            idx += 1
        sectors.append((base + s * LOG_SECTOR, struct.pack("<512Q", *entries)))
    guid = uuid.uuid4().bytes_le
    entry = build_entry(sequence=1, tail=0, log_guid=guid,
                        flushed_file_offset=os.path.getsize(img),
                        last_file_offset=64 * TIB, data=sectors)
    assert len(entry) <= h.LogLength
    with open(img, "r+b") as f:
        f.seek(h.LogOffset)
        f.write(entry)
    rewrite_headers(img, LogGuid=guid)
    code, out, err, rss = measured("map", "--output", "json", img)
    ok_or_one_line(code, err, rss)
    assert code == 0, err
    assert '"data": true' not in out
    out_img = os.path.join(workdir, "out.qcow2")
    for argv in (("convert", "-O", "qcow2", img, out_img), ("compare", img, img),
                 ("check", img)):
        code, _, err, rss = measured(*argv)
        ok_or_one_line(code, err, rss, report=argv[0] == "check")
        assert code == 0, (argv, err)
    assert os.path.getsize(out_img) < 64 * MIB


# -- OVA: packages whose headers and descriptors ask for too much ---------------------

def _ova(workdir: str, name: str, ovf_text: bytes, disk: str | None = None,
         pax: dict | None = None) -> str:
    """An OVA (descriptor first, then the disk) written by Python's tarfile, which
    writes pax headers as asked."""
    import io
    import tarfile
    path = os.path.join(workdir, name)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("vm.ovf")
        info.size = len(ovf_text)
        info.pax_headers = pax or {}
        t.addfile(info, io.BytesIO(ovf_text))
        if disk:
            t.add(disk, "disk.vhd")
    return path


def _ovf_text(extra: str = "") -> bytes:
    return ('<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/'
            'envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>'
            '<File ovf:href="disk.vhd" ovf:id="f"/></References><DiskSection><Disk '
            'ovf:diskId="d" ovf:fileRef="f" ovf:capacity="1"/></DiskSection>'
            f'<VirtualSystem ovf:id="vm">{extra}</VirtualSystem></Envelope>').encode()


def test_hostile_ova_packages_stay_small(workdir):
    """150,000 elements (the limit is 100,000), a pax header claiming 8 GiB in a small
    file, a real 1.5 MiB pax header (the limit is 1 MiB): one line each, quickly, in
    little memory. And a 2040 GiB empty VHD inside an OVA converts through the window
    without reading what its extents call empty."""
    need("qemu-img")
    elements = _ova(workdir, "elements.ova", _ovf_text("<a/>" * 150_000))
    claimed = _ova(workdir, "claimed.ova", _ovf_text(), pax={"comment": "x"})
    with open(claimed, "r+b") as f:
        block = bytearray(f.read(512))
        block[124:136] = b"77777777777\0"
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        f.seek(0)
        f.write(block)
    big = _ova(workdir, "bigpax.ova", _ovf_text(), pax={"comment": "x" * (3 << 19)})
    for path, field in ((elements, "100000 elements"), (claimed, "tar header.size"),
                        (big, "pax extended header.size")):
        code, _, err, rss = measured("info", "-f", "ova", path)
        ok_or_one_line(code, err, rss, field)
        assert code != 0
    vhd = os.path.join(workdir, "huge.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", vhd, "2040G")
    ova = _ova(workdir, "huge.ova", _ovf_text(), disk=vhd)
    out = os.path.join(workdir, "out.qcow2")
    code, _, err, rss = measured("convert", ova, out)
    ok_or_one_line(code, err, rss)
    assert code == 0 and os.path.getsize(out) < 64 * MIB


# -- huge but empty: as large as each format allows ------------------------------------

def _huge_images(workdir):
    """(format, path) of the largest empty image each format allows, made by qemu-img:
    qcow2 2 EiB (2 MiB clusters, the 32 MiB L1 limit), VHD 2040 GiB, VHDX 64 TiB; VDI
    4 TiB (qemu writes its whole block map, 16 MiB here); VMDK 2 TiB, VMware's limit
    for a sparse extent (32-bit grain sectors), with every grain table qemu allocates
    (and leaves as holes)."""
    made = []
    for name, args in (("qcow2", ["-f", "qcow2", "-o", "cluster_size=2M", "2048P"]),
                       ("vpc", ["-f", "vpc", "2040G"]),
                       ("vhdx", ["-f", "vhdx", "64T"]),
                       ("vdi", ["-f", "vdi", "4T"]),
                       ("vmdk", ["-f", "vmdk", "2T"])):
        path = os.path.join(workdir, f"huge-{name}.img")
        run("qemu-img", "create", "-q", *args[:-1], path, args[-1])
        made.append((name, path))
    return made


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    need("qemu-img")
    return dict(_huge_images(str(tmp_path_factory.mktemp("huge"))))


@pytest.mark.parametrize("fmt", ["qcow2", "vpc", "vhdx", "vdi", "vmdk"])
@pytest.mark.parametrize("cmd", ["map", "check", "convert", "compare"])
def test_huge_empty_images(huge, fmt, cmd, tmp_path):
    img = huge[fmt]
    other = huge["vhdx" if fmt != "vhdx" else "vpc"]
    argv = {"map": ("map", "--output", "json", img),
            "check": ("check", "--format-checks", img),  # VHD too (qemu-img: 63)
            "convert": ("convert", "-O", "qcow2", img, str(tmp_path / "out.qcow2")),
            "compare": ("compare", img, other)}[cmd]
    code, out, err, rss = measured(*argv)
    ok_or_one_line(code, err, rss, "cluster_size", report=cmd == "check")
    if cmd == "convert" and fmt == "qcow2":
        # 2 EiB needs an L1 table past qemu's limit at the default cluster size
        assert code == 1 and "cluster_size" in err
    elif cmd == "compare":
        assert code == 0 and "identical" in out     # (sizes differ: a warning)
    else:
        assert code == 0, err
    if cmd == "map":
        assert '"data": true' not in out


@pytest.mark.parametrize("fmt", ["qcow2", "vpc", "vhdx", "vmdk"])
def test_huge_empty_images_served_over_nbd(huge, fmt, tmp_path):
    """``diskforge serve`` on a Unix socket; qemu-img info and map through it (the first
    and the last 64 GiB, block status asked in pieces); then SIGTERM. Its peak RSS is
    /usr/bin/time's (see ``measured``)."""
    need("qemu-img")
    sock = str(tmp_path / "nbd.sock")
    rss_file = str(tmp_path / "rss")
    proc = subprocess.Popen([need("time"), "-f", "%M", "-o", rss_file, sys.executable,
                             "-m", "diskforge", "serve", huge[fmt], "--socket", sock,
                             "--read-only"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not listen"
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        info = run("qemu-img", "info", "--output", "json", uri, timeout=TIME_LIMIT)
        size = int(info.stdout.split('"virtual-size":')[1].split(",")[0])
        for start in (0, size - (64 << 30)):
            m = run("qemu-img", "map", "--output", "json", "--start-offset", str(start),
                    "--max-length", str(64 << 30), uri, timeout=TIME_LIMIT)
            assert '"data": false' in m.stdout and '"data": true' not in m.stdout
    finally:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        for pid in children:           # the server, so that time reports its peak
            os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=TIME_LIMIT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    with open(rss_file) as f:
        assert int(f.read().split()[-1]) * 1024 < RSS_LIMIT


# -- the read-only formats: qcow version 1, QED, Parallels ----------------------------

@pytest.fixture(scope="module")
def huge_readonly(tmp_path_factory):
    """The largest empty images qemu-img makes quickly: qcow 8 TiB (a 32 MiB L1 table),
    QED 64 TiB (its limit with 64 KiB clusters), Parallels 16 TiB (a 64 MiB BAT)."""
    need("qemu-img")
    d = str(tmp_path_factory.mktemp("huge-ro"))
    made = {}
    for fmt, size in (("qcow", "8T"), ("qed", "64T"), ("parallels", "16T")):
        made[fmt] = os.path.join(d, f"huge.{fmt}")
        run("qemu-img", "create", "-q", "-f", fmt, made[fmt], size)
    return made


@pytest.mark.parametrize("fmt", ["qcow", "qed", "parallels"])
@pytest.mark.parametrize("cmd", ["map", "check", "convert"])
def test_huge_empty_read_only_images(huge_readonly, fmt, cmd, tmp_path):
    img = huge_readonly[fmt]
    argv = {"map": ("map", "--output", "json", img), "check": ("check", img),
            "convert": ("convert", "-O", "qcow2", img, str(tmp_path / "out.qcow2"))}[cmd]
    code, out, err, rss = measured(*argv)
    if cmd == "check" and fmt == "qcow":          # qemu-img has no qcow check either
        assert code == 63 and "does not support checks" in err
        return
    ok_or_one_line(code, err, rss)
    assert code == 0, err
    if cmd == "map":
        assert '"data": true' not in out


def _sparse_header_case(fmt: str, path: str) -> str:
    """An image whose header sizes a table past the memory budget, in a sparse file
    that holds it; returns the field the error must name."""
    if fmt == "qcow":      # an 8 PiB disk: a 4 GiB L1 table
        run("qemu-img", "create", "-q", "-f", "qcow", path, "1M")
        with open(path, "r+b") as f:
            f.seek(24)
            f.write(struct.pack(">Q", 8 << 50))
        os.truncate(path, 5 << 30)
        return "QCowHeader.size"
    if fmt == "qed":       # 64 MiB clusters, 16-cluster tables: a 1 GiB L1 table
        run("qemu-img", "create", "-q", "-f", "qed", path, "1M")
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<II", 1 << 26, 16))
            f.seek(40)
            f.write(struct.pack("<Q", 1 << 26))
        os.truncate(path, 3 << 30)
        return "QEDHeader.table_size"
    run("qemu-img", "create", "-q", "-f", "parallels", path, "1M")
    with open(path, "r+b") as f:   # 2^28 BAT entries: 1 GiB
        f.seek(32)
        f.write(struct.pack("<I", 1 << 28))
    os.truncate(path, 3 << 30)
    return "ParallelsHeader.bat_entries"


@pytest.mark.parametrize("fmt", ["qcow", "qed", "parallels"])
def test_read_only_formats_tables_larger_than_the_budget(workdir, fmt):
    need("qemu-img")
    img = os.path.join(workdir, f"big.{fmt}")
    field = _sparse_header_case(fmt, img)
    for cmd in ("info", "map"):
        code, _, err, rss = measured(cmd, img)
        ok_or_one_line(code, err, rss, field)
        assert code == 1 and "256 MiB" in err, err


def test_luks2_header_asking_for_argon2_memory_beyond_the_cap(workdir):
    """A LUKS2 key slot whose Argon2 would take 4 GiB (cryptsetup accepts that much)
    is refused before the KDF runs: quickly, and without allocating it."""
    pytest.importorskip("cryptography")
    import base64
    from luks_helpers import luks2, rewrite_luks2
    path = luks2(os.path.join(workdir, "h.img"))

    def greedy(meta):
        meta["keyslots"]["0"]["kdf"] = {"type": "argon2id", "time": 4, "memory": 4 << 20,
                                        "cpus": 4,
                                        "salt": base64.b64encode(bytes(32)).decode()}
        return meta
    rewrite_luks2(path, greedy)
    # convert unlocks (info, as qemu-img's, reads the header only)
    code, out, err, rss = measured("convert", "--object", "secret,id=s,data=x", "-O", "raw",
                                   path, os.path.join(workdir, "o.raw"))
    ok_or_one_line(code, err, rss, "keyslot 0 kdf.memory")
    assert code == 1


def test_asif_directory_naming_one_table_many_times(workdir):
    """Every entry of a huge ASIF's directory names the same allocated table: map and
    convert do the table's work once, and stay small."""
    chunk = 64 << 10
    n = 4096
    buf = bytearray(4 * chunk)
    size = n * 6144 * chunk  # 6144 data chunks per table at 64 KiB chunks
    struct.pack_into(">4sIII QQ 16s QQ IHH Q", buf, 0, b"shdw", 1, 512, 0, 4 * chunk,
                     4 * chunk, bytes(16), size // 512, size // 512, chunk, 512, 0, 0)
    struct.pack_into(">Q", buf, chunk, 2)
    path = os.path.join(workdir, "h.asif")
    with open(path, "wb") as f:
        f.write(buf + struct.pack(">Q", 1) + struct.pack(">Q", 1) * n)
    code, out, err, rss = measured("map", "--output", "json", path)
    ok_or_one_line(code, err, rss)
    assert code == 0 and out.count("\n") == 2 * n
