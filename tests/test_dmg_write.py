"""DMG writing: for every format we write, on a GPT disk with two partitions, the
independent readers (libmodi's pymodi, 7-Zip, dmg2img, qemu-img) decode our image to the
same bytes, 7-Zip lists the partitions, our verify passes and catches a flipped byte;
and random sparse contents survive raw -> dmg -> raw for every codec."""

import hashlib
import os
import random
import subprocess
import sys

import pytest
from conftest import cli, make_sparse, need, one_line_error, run, sha256_file
from dmgutil import read_dmg

import diskforge
from diskforge.formats.dmg import codecs

VARIANTS = ["UDZO", "UDBZ", "ULFO", "ULMO", "UDRO", "UDRW"]
MIB = 1 << 20
DISK = 24 * MIB
TEXT = b"".join(b"%05d disk image block sector partition %d.\n" % (i, i * 7)
                for i in range(40000))


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory):
    """24 MiB: GPT (made by sgdisk), "alpha" 8 MiB at 1 MiB, "beta" 9 MiB at sector 18500,
    holding random data, text and zeros, with a partition end off the 1 MiB grid."""
    need("sgdisk")
    path = str(tmp_path_factory.mktemp("gpt") / "disk.raw")
    rng = random.Random(5)
    make_sparse(path, DISK, [
        (MIB + 4096, rng.randbytes(3 * MIB)),
        (5 * MIB, TEXT[:2 * MIB]),
        (9 * MIB + 512 * 7, rng.randbytes(MIB // 2) + TEXT[:MIB]),   # across both
        (15 * MIB, TEXT[:3 * MIB + 1536]),
    ])
    run("sgdisk", "-o", "-n", "1:2048:+8M", "-c", "1:alpha", "-t", "1:8300",
        "-a", "1", "-n", "2:18500:+9M", "-c", "2:beta", "-t", "2:0700", path)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pymodi_sha(path: str) -> str:
    import pymodi
    h = pymodi.handle()
    h.open(path)
    try:
        return _sha(h.read_buffer_at_offset(h.get_media_size(), 0))
    finally:
        h.close()


def _7z_items(path: str) -> list[dict]:
    out = run(need("7z"), "l", "-slt", "-tdmg", path).stdout
    items, cur = [], None
    for line in out.splitlines():
        if line.startswith("Path = ") and cur is not None:
            items.append(cur)
        if line.startswith("Path = "):
            cur = {"Path": line[7:]}
        elif cur is not None and " = " in line:
            k, v = line.split(" = ", 1)
            cur[k] = v
    if cur is not None:
        items.append(cur)
    return [i for i in items if i["Path"] != path]


@pytest.mark.parametrize("variant", VARIANTS)
def test_independent_readers_decode_our_dmg(variant, gpt_disk, tmp_path):
    dmg = str(tmp_path / f"out-{variant}.dmg")
    code, _, err = cli("convert", "-O", "dmg", "-o", f"format={variant}", gpt_disk, dmg)
    assert code == 0, err
    want = sha256_file(gpt_disk)

    # ours: contents, checksums, layout
    with diskforge.open(dmg) as dev:
        assert dev.format == "dmg" and dev.size == DISK
        assert _sha(dev.read(0, dev.size)) == want
        names = [e.name for e in dev.fork.blkx]
        kinds = {c[0] for e in dev.fork.blkx for c in e.chunks}
        sizes = {c[3] for e in dev.fork.blkx for c in e.chunks if c[0] in codecs.STORED}
    assert names == [
        "Protective Master Boot Record (MBR : 0)", "GPT Header (Primary GPT Header : 1)",
        "GPT Partition Data (Primary GPT Table : 2)", " (Apple_Free : 3)",
        "alpha (0FC63DAF-8483-4772-8E79-3D69D8477DE4 : 4)", " (Apple_Free : 5)",
        "beta (Microsoft Basic Data : 6)", " (Apple_Free : 7)",
        "GPT Partition Data (Backup GPT Table : 8)", "GPT Header (Backup GPT Header : 9)"]
    assert max(sizes) <= 2048
    if variant == "UDRW":
        assert kinds == {codecs.RAW, codecs.TERMINATOR}
    else:
        assert codecs.ZERO_FILL in kinds
    assert cli("verify", dmg)[0] == 0

    # 7-Zip: lists the partitions with their sizes, tests every CRC, extracts them
    items = _7z_items(dmg)
    assert [int(i["Size"]) for i in items][4:7] == [8 * MIB, 68 * 512, 9 * MIB]
    assert "Everything is Ok" in run(need("7z"), "t", "-tdmg", dmg).stdout
    out7 = tmp_path / "x7"
    run("7z", "x", "-tdmg", f"-o{out7}", dmg)
    parts = sorted(os.listdir(out7), key=lambda n: int(n.split(".")[0]))
    assert _sha(b"".join((out7 / p).read_bytes() for p in parts)) == want

    # libmodi (pymodi) reads every codec but LZMA, which it does not implement
    if variant == "ULMO":
        with pytest.raises(OSError, match="missing support for LZMA"):
            _pymodi_sha(dmg)
    else:
        assert _pymodi_sha(dmg) == want

    # dmg2img knows zlib, bzip2 and raw chunks
    if variant in ("UDRO", "UDZO", "UDBZ", "UDRW"):
        flat = str(tmp_path / "dmg2img.raw")
        run(need("dmg2img"), "-s", dmg, flat)
        assert sha256_file(flat) == want

    # Debian's qemu-img has the dmg driver's zlib and raw support built in
    if variant in ("UDRO", "UDZO", "UDRW"):
        flat = str(tmp_path / "qemu.raw")
        run(need("qemu-img"), "convert", "-f", "dmg", "-O", "raw", dmg, flat)
        assert sha256_file(flat) == want


def test_one_flipped_byte_in_our_data_fork_fails_verify(gpt_disk, tmp_path):
    dmg = str(tmp_path / "d.dmg")
    assert cli("convert", "-O", "dmg", gpt_disk, dmg)[0] == 0
    _, koly, _ = read_dmg(dmg)
    for where in (0, koly.DataForkLength // 2, koly.DataForkLength - 1):
        bad = str(tmp_path / "bad.dmg")
        data = bytearray(open(dmg, "rb").read())
        data[where] ^= 0x01
        open(bad, "wb").write(data)
        code, out, _ = cli("verify", bad)
        assert code == 2 and "data fork CRC-32" in out, (where, out)


def test_parallel_output_equals_serial_output(gpt_disk, tmp_path):
    from diskforge.ops.convert import convert
    from diskforge.registry import get
    fmt = get("dmg")
    outs = []
    for workers in (1, 2):
        path = str(tmp_path / f"w{workers}.dmg")
        with diskforge.open(gpt_disk) as src:
            convert(src, fmt.writer(path, src.size, fmt.options.parse("format=ULFO")),
                    workers=workers)
        data, koly, _ = read_dmg(path)
        outs.append(data[:koly.XMLOffset + koly.XMLLength])
    assert outs[0] == outs[1]


IMPORT_SPY = r"""
import builtins, sys, threading
from diskforge.cli.main import main
late = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if threading.current_thread() is not threading.main_thread() \
            and name not in sys.modules:
        late.append(name)
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
code = main(sys.argv[1:])
print("late imports:", sorted(set(late)))
sys.exit(code)
"""


@pytest.mark.parametrize("variant", ["UDZO", "ULFO", "UDBZ", "ULMO"])
def test_compression_workers_import_no_module(variant, gpt_disk, tmp_path):
    """Nothing is first imported in a compression worker, nor in a decoding thread when
    the image is read back: a worker importing ``typing`` (with ``zstandard``) while
    the main thread built a dataclass handed that dataclass a half-initialised
    ``typing`` module, and 2 conversions in 8 failed with "partially initialised module
    'typing' has no attribute 'ClassVar'"."""
    out, back = str(tmp_path / "out.dmg"), str(tmp_path / "back.raw")
    for argv in (["-O", "dmg", "-o", f"format={variant}", gpt_disk, out],
                 ["-O", "raw", out, back]):
        proc = subprocess.run([sys.executable, "-c", IMPORT_SPY, "convert", "-m", "2",
                               *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "late imports: []" in proc.stdout, argv


def test_random_chunks_are_stored_raw_and_a_text_extent_of_64_kib_is_compressed(tmp_path):
    """The incompressibility probe (_incompressible): a random MiB is stored raw without
    compressing it whole; a text MiB, and a random MiB holding 64 KiB of text, are
    compressed; text smaller than 64 KiB between two samples is the documented loss.
    qemu-img (its own dmg driver) decodes the image to the same bytes."""
    rng = random.Random(8)
    disk = bytearray(rng.randbytes(4 * MIB))
    disk[MIB:2 * MIB] = TEXT[:MIB]
    disk[2 * MIB + 320 * 1024:2 * MIB + 384 * 1024] = TEXT[:64 * 1024]
    disk[3 * MIB + 8 * 1024:3 * MIB + 40 * 1024] = TEXT[:32 * 1024]
    src = tmp_path / "disk.raw"
    src.write_bytes(disk)
    src, dmg = str(src), str(tmp_path / "out.dmg")
    assert cli("convert", "-O", "dmg", src, dmg)[0] == 0
    with diskforge.open(dmg) as dev:
        kinds = [c[0] for e in dev.fork.blkx for c in e.chunks if c[0] in codecs.STORED]
    assert kinds == [codecs.RAW, codecs.ZLIB, codecs.ZLIB, codecs.RAW]
    flat = str(tmp_path / "qemu.raw")
    run(need("qemu-img"), "convert", "-f", "dmg", "-O", "raw", dmg, flat)
    assert open(flat, "rb").read() == disk


def test_options_compress_flag_and_defaults(gpt_disk, tmp_path):
    code, out, _ = cli("convert", "-O", "dmg", "-o", "help", gpt_disk, "x")
    assert code == 0 and "zlib_level" in out and "UDZO" in out
    variants = {}
    for name, argv in [("default", []), ("c", ["-c", "-o", "format=UDRO"]),
                       ("level9", ["-o", "zlib_level=9"]), ("udbz-c", ["-c", "-o",
                                                                         "format=UDBZ"])]:
        path = str(tmp_path / f"{name}.dmg")
        assert cli("convert", *argv, gpt_disk, path)[0] == 0  # .dmg names the format
        with diskforge.open(path) as dev:
            variants[name] = (dev.info().format_specific["variant"], os.path.getsize(path))
    assert variants["default"][0] == variants["c"][0] == "UDZO"
    assert variants["udbz-c"][0] == "UDBZ"
    assert variants["level9"][1] < variants["default"][1]
    code, _, err = cli("convert", "-O", "dmg", "-o", "zlib_level=12", gpt_disk, "y.dmg")
    one_line_error(code, err)


def test_disk_without_partition_table_is_one_whole_disk_entry(tmp_path):
    raw = make_sparse(str(tmp_path / "d.raw"), 3 * MIB, [(4096, TEXT[:9000])])
    dmg = str(tmp_path / "d.dmg")
    assert cli("convert", raw, dmg)[0] == 0
    _, koly, plist = read_dmg(dmg)
    blkx = plist["resource-fork"]["blkx"]
    assert [b["Name"] for b in blkx] == ["whole disk (unknown : 0)"]
    assert koly.ImageVariant == 2 and koly.SectorCount == 3 * MIB // 512
    assert plist["resource-fork"]["plst"][0]["Data"][517] == 1
    assert cli("compare", raw, dmg)[0] == 0


def test_mbr_disk_gets_an_entry_per_primary_partition(tmp_path):
    need("sfdisk")
    raw = make_sparse(str(tmp_path / "m.raw"), 6 * MIB, [(MIB, TEXT[:MIB])])
    subprocess.run(["sfdisk", "-q", raw], input="label: dos\nstart=63, size=2000, type=83\n"
                   "start=4096, size=4096, type=b\n", text=True, check=True)
    dmg = str(tmp_path / "m.dmg")
    assert cli("convert", raw, dmg)[0] == 0
    _, _, plist = read_dmg(dmg)
    assert [b["Name"] for b in plist["resource-fork"]["blkx"]] == [
        "Master Boot Record (MBR : 0)", " (Apple_Free : 1)", " (Linux : 2)",
        " (Apple_Free : 3)", " (Windows_FAT_32 : 4)", " (Apple_Free : 5)"]
    assert cli("compare", raw, dmg)[0] == 0
    assert cli("verify", dmg)[0] == 0


def test_empty_image_and_size_rules(tmp_path):
    path = str(tmp_path / "e.dmg")
    assert cli("create", "-q", path, "5M")[0] == 0
    with diskforge.open(path) as dev:
        assert dev.size == 5 * MIB and dev.read(0, dev.size) == bytes(5 * MIB)
        assert all(e.kind.value == "zero" for e in dev.extents())
    assert cli("verify", path)[0] == 0
    odd = make_sparse(str(tmp_path / "odd.raw"), 1000, [(0, b"x")])
    code, _, err = cli("convert", odd, str(tmp_path / "odd.dmg"))
    one_line_error(code, err)
    assert "multiple of 512" in err
    assert not os.path.exists(tmp_path / "odd.dmg")


# -- property test -----------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:
    piece = st.tuples(st.integers(0, 8191), st.integers(1, 4096),
                      st.sampled_from(["random", "text", "ones"]))
    disks = st.tuples(st.integers(1, 8192), st.lists(piece, max_size=8),
                      st.sampled_from([None, "mbr"]), st.integers(0, 2**32))

    @pytest.mark.parametrize("variant", VARIANTS)
    @settings(max_examples=12, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(disk=disks)
    def test_random_sparse_contents_survive_a_round_trip(variant, disk, tmp_path):
        sectors, pieces, table, seed = disk
        rng = random.Random(seed)
        size = sectors * 512
        extents = []
        for sector, count, kind in pieces:
            off = (sector % sectors) * 512
            n = min(count * 512 - rng.randrange(512), size - off)
            data = rng.randbytes(n) if kind == "random" else \
                (TEXT * 2)[rng.randrange(len(TEXT)):][:n] if kind == "text" else b"\xff" * n
            extents.append((off, data))
        if table == "mbr" and sectors > 8:  # partitions at odd sector boundaries
            a = rng.randrange(1, sectors // 2)
            b = rng.randrange(a + 1, sectors)
            mbr = bytearray(512)
            mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + a.to_bytes(4, "little") \
                + (b - a).to_bytes(4, "little")
            mbr[510:512] = b"\x55\xaa"
            extents.append((0, bytes(mbr)))
        raw = make_sparse(str(tmp_path / "in.raw"), size, extents)
        dmg, back = str(tmp_path / "x.dmg"), str(tmp_path / "back.raw")
        for p in (dmg, back):
            if os.path.exists(p):
                os.unlink(p)
        diskforge.convert(raw, dmg, target_fmt="dmg", options=f"format={variant}")
        diskforge.convert(dmg, back, target_fmt="raw")
        assert sha256_file(back) == sha256_file(raw)
        with diskforge.open(dmg) as dev:
            assert dev.verify() == []


def test_a_dmg_between_64_and_128_kib_is_recognised(tmp_path):
    # the probe's tail window must end at the end of the file (registry regression)
    raw = make_sparse(str(tmp_path / "r.raw"), 256 << 10,
                      [(0, random.Random(1).randbytes(90 << 10))])
    dmg = str(tmp_path / "r.dmg")
    assert cli("convert", "-O", "dmg", raw, dmg)[0] == 0
    assert 64 << 10 < os.path.getsize(dmg) < 128 << 10
    with diskforge.open(dmg) as dev:
        assert dev.format == "dmg"


def test_layout_falls_back_to_whole_disk_for_tables_it_cannot_follow():
    from diskforge.formats.dmg import blkx_plan as layout
    from diskforge.partitions import Partition, PartitionTable
    gpt4k = PartitionTable("gpt", 4096)  # a DMG counts 512-byte sectors
    overlapping = PartitionTable("mbr", 512, partitions=[
        Partition(1, 512 * 10, 512 * 100, "0x83"), Partition(2, 512 * 50, 512 * 10, "0x83")])
    beyond = PartitionTable("mbr", 512, partitions=[Partition(1, 512, 512 * 5000, "0x83")])
    for table in (gpt4k, overlapping, beyond, None):
        regions = layout.plan(table, bytes(1024), 1000).regions
        assert [r.name for r in regions] == ["whole disk (unknown : 0)"]
