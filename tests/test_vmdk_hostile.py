"""Hostile VMDKs (issue 14, "Checks": malformed VMDK): truncated and oversized headers,
grain directories and tables past the end, grain sizes and counts no tool writes,
compressed grain bombs, markers that lie, descriptors that name what they must not,
parent loops. Each runs the real CLI in a child with a time limit and its peak RSS
measured (``test_hostile_images.measured``): one line naming the file, the structure
and the field, no traceback, no hang, bounded memory, nothing written."""

import os
import struct
import zlib

import pytest

import diskforge
from test_hostile_images import measured, ok_or_one_line
from vmdk_helpers import FLAG_MARKERS, build, descriptor, header

CAP = 1024          # sectors: 512 KiB disks


def _good(d: str, name: str = "d.vmdk", **kw) -> tuple[str, dict]:
    path = os.path.join(d, name)
    grains = {0: b"\x01" * 65536, 3: b"\x02" * 65536}
    return path, build(path, CAP, grains, desc=descriptor(CAP, name), **kw)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# SparseExtentHeader field offsets (bytes)
OFF = {"capacity": 12, "grainSize": 20, "descriptorOffset": 28, "descriptorSize": 36,
       "numGTEsPerGT": 44, "rgdOffset": 48, "gdOffset": 56}


def _field(path: str, name: str, value: int) -> None:
    fmt = "<I" if name == "numGTEsPerGT" else "<Q"
    _patch(path, OFF[name], struct.pack(fmt, value))


def _all_commands_refuse(d: str, path: str, *fields: str, every: bool = False,
                         untrusted: bool = False) -> str:
    """info and convert (and with ``every``, map and check: the same opening) refuse
    ``path`` with one line naming one of ``fields`` (``untrusted``: in untrusted mode)."""
    out = os.path.join(d, "out.raw")
    err = ""
    commands = [("info", "--backing-chain", path), ("convert", "-O", "raw", path, out)]
    if every:
        commands += [("map", "--output", "json", path), ("check", path)]
    for argv in commands:
        if untrusted:
            argv = ("--untrusted",) + argv
        code, _, err, rss = measured(*argv)
        ok_or_one_line(code, err, rss, *fields)
        assert code != 0, argv
        assert os.path.basename(path) in err
        assert not os.path.exists(out)
    return err


@pytest.mark.parametrize("name,value,field", [
    ("grainSize", 0, "grainSize"),
    ("grainSize", 3, "grainSize"),
    ("grainSize", 256, "grainSize"),
    ("numGTEsPerGT", 0xFFFFFFFF, "numGTEsPerGT"),
    ("numGTEsPerGT", 0, "numGTEsPerGT"),
    ("capacity", 1 << 62, "capacity"),
    ("capacity", 1 << 50, "gdOffset"),          # a directory over the memory budget
    ("gdOffset", 1 << 40, "gdOffset"),
    ("descriptorSize", 1 << 40, "descriptorSize"),
    ("descriptorOffset", 1 << 40, "descriptorOffset"),
])
def test_header_fields_out_of_range(workdir, name, value, field):
    path, _ = _good(workdir)
    _field(path, name, value)
    _all_commands_refuse(workdir, path, f"SparseExtentHeader.{field}")


def test_truncated_header(workdir):
    path = os.path.join(workdir, "t.vmdk")
    with open(path, "wb") as f:
        f.write(header(capacity=CAP, gd=1)[:300])
    _all_commands_refuse(workdir, path, "SparseExtentHeader")


def test_grain_directory_and_tables_past_the_end(workdir):
    path, lay = _good(workdir)
    _patch(path, lay["gd"], struct.pack("<I", 1 << 30))
    _all_commands_refuse(workdir, path, "gdOffset (grain directory entry 0)", every=True)
    path, lay = _good(workdir, "cut.vmdk")
    os.truncate(path, lay["gd"] + 2)          # the directory itself cut short
    _all_commands_refuse(workdir, path, "SparseExtentHeader")


def test_grains_past_the_end_read_as_zeros_and_check_says_so(workdir):
    path, lay = _good(workdir)
    _patch(path, lay["gt"], struct.pack("<I", 1 << 28))
    code, out, err, rss = measured("check", path)
    ok_or_one_line(code, err, rss, report=True)
    assert code == 2 and "points after EOF" in err


def test_directory_of_one_table_named_many_times_is_bounded_by_the_file(workdir):
    """Every entry of a 256 KiB directory names the same grain table: the walk is
    bounded by what the file holds (one table, read once), not by the 8 TiB claim."""
    path = os.path.join(workdir, "many.vmdk")
    entries = 1 << 16
    table = 1 + entries * 4 // 512
    with open(path, "wb") as f:
        f.write(header(capacity=entries * 512 * 128, gd=1, rgd=0, flags=1,
                       overhead=table + 4))
        f.write(struct.pack("<I", table) * entries)
        f.write(bytes(2048))
    for argv in (("map", "--output", "json", path), ("check", path),
                 ("compare", path, path)):
        code, out, err, rss = measured(*argv)
        ok_or_one_line(code, err, rss, report=argv[0] == "check")
        assert code in (0, 2), (argv, err)
        if argv[0] == "map":
            assert '"data": true' not in out


def _compressed(d: str, payload: bytes, lba: int = 0, size: int | None = None) -> str:
    """A stream-style file whose grain 0 is ``payload`` behind a marker."""
    path, lay = _good(d, "c.vmdk", compress=True, markers=True, version=3)
    at = -(-lay["size"] // 512) * 512
    n = len(payload) if size is None else size
    _patch(path, at, struct.pack("<QI", lba, n) + payload)
    _patch(path, lay["gt"], struct.pack("<I", at // 512))
    return path


def test_compressed_grain_bomb_stops_at_the_grain(workdir):
    c = zlib.compressobj(9)
    bomb = b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()
    assert len(bomb) < 2 * 65536      # within what a marker may claim for 64 KiB
    path = _compressed(workdir, bomb)
    code, _, err, rss = measured("convert", "-O", "raw", path,
                                 os.path.join(workdir, "out.raw"))
    ok_or_one_line(code, err, rss, "GrainTable.grain")
    assert code == 1 and "inflates past the 65536-byte grain" in err


def test_grain_marker_lba_must_match_the_table(workdir):
    path = _compressed(workdir, zlib.compress(b"\x07" * 65536), lba=128)
    code, _, err, rss = measured("convert", "-O", "raw", path,
                                 os.path.join(workdir, "out.raw"))
    ok_or_one_line(code, err, rss, "GrainMarker.lba")
    assert code == 1
    code, out, err, rss = measured("check", path)
    ok_or_one_line(code, err, rss, report=True)
    assert code == 2 and "says lba 128" in err


def test_grain_marker_size_beyond_the_grain(workdir):
    path = _compressed(workdir, zlib.compress(b"\x07" * 65536), size=0xFFFFFFFF)
    code, _, err, rss = measured("convert", "-O", "raw", path,
                                 os.path.join(workdir, "out.raw"))
    ok_or_one_line(code, err, rss, "GrainMarker.size")
    assert code == 1


def test_stream_footer_that_is_not_one(workdir):
    path, _ = _good(workdir, flags=FLAG_MARKERS | 1 | (1 << 16))
    _field(path, "gdOffset", 0xFFFFFFFFFFFFFFFF)
    _all_commands_refuse(workdir, path, "SparseExtentHeader.gdOffset")


def test_oversized_descriptor_file(workdir):
    path = os.path.join(workdir, "big.vmdk")
    with open(path, "w") as f:
        f.write(descriptor(8, "x.raw", create_type="monolithicFlat", extent_type="FLAT"))
        f.write("# padding\n" * 110000)
    assert os.path.getsize(path) > 1 << 20
    _all_commands_refuse(workdir, path, "descriptor")


def test_cowd_header_fields(workdir):
    path = os.path.join(workdir, "delta.vmdk")
    hdr = bytearray(2048)
    struct.pack_into("<4sIIIIIII", hdr, 0, b"COWD", 1, 3, 1 << 20, 3, 4, 1, 0)
    with open(path, "wb") as f:
        f.write(hdr)
    _all_commands_refuse(workdir, path, "COWDiskHeader.grainSize")
    struct.pack_into("<4sIIIIIII", hdr, 0, b"COWD", 1, 3, 1 << 30, 1, 4, 1 << 30, 0)
    with open(path, "wb") as f:
        f.write(hdr)
    _all_commands_refuse(workdir, path, "COWDiskHeader")


def test_descriptor_paths_and_parents(workdir):
    outside = os.path.join(os.path.dirname(workdir), "secret.raw")
    with open(outside, "wb") as f:
        f.write(b"secret" * 100)
    cases = [("out.vmdk", descriptor(1, "../secret.raw", create_type="monolithicFlat",
                                     extent_type="FLAT").replace('raw"', 'raw" 0'),
              "outside the image's directory"),
             ("abs.vmdk", descriptor(1, outside, create_type="monolithicFlat",
                                     extent_type="FLAT").replace('raw"', 'raw" 0'),
              "outside the image's directory")]
    # untrusted mode confines extents; the default follows them, as qemu-img does
    for name, text, what in cases:
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            f.write(text)
        err = _all_commands_refuse(workdir, path, untrusted=True)
        assert what in err, err
        with diskforge.open(path) as dev:
            assert dev.read(0, 512) == (b"secret" * 100)[:512]
    os.mkfifo(os.path.join(workdir, "fifo"))
    path = os.path.join(workdir, "fifo.vmdk")
    with open(path, "w") as f:
        f.write(descriptor(1, "fifo", create_type="monolithicFlat",
                           extent_type="FLAT").replace('fifo"', 'fifo" 0'))
    err = _all_commands_refuse(workdir, path)
    assert "a FIFO (named pipe); files an image names must be regular files" in err, err
    build(os.path.join(workdir, "a.vmdk"), 64, {},
          desc=descriptor(64, "a.vmdk", parent="b.vmdk"))
    build(os.path.join(workdir, "b.vmdk"), 64, {},
          desc=descriptor(64, "b.vmdk", parent="a.vmdk"))
    assert "loop" in _all_commands_refuse(workdir, os.path.join(workdir, "a.vmdk"),
                                          every=True)
    os.unlink(outside)
