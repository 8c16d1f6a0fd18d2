"""Apple sparse images (.sparseimage) and sparse bundles (.sparsebundle): read as block
devices, checked against libmodi (pymodi) on a real hdiutil header and on bundles and
images built here; malformed headers, plists and bands fail in one line."""

import io
import os
import plistlib
import random
import shutil

import pytest
from conftest import FIXTURES, cli, need_real, one_line_error

import diskforge
from diskforge.blockdev import ExtentKind

MIB = 1 << 20
SKELETON = os.path.join(FIXTURES, "dmg", "sparsebundle_skeleton", "hfsplus.sparsebundle")


def _pymodi_image(path: str) -> bytes:
    import pymodi
    h = pymodi.handle()
    h.open(path)
    try:
        return h.read_buffer_at_offset(h.get_media_size(), 0)
    finally:
        h.close()


def _pymodi_bundle(path: str, bands: int) -> bytes:
    import pymodi
    h = pymodi.handle()
    h.open(os.path.join(path, "Info.plist"))
    files = [open(os.path.join(path, "bands", f"{i:x}"), "rb")
             if os.path.exists(os.path.join(path, "bands", f"{i:x}")) else io.BytesIO()
             for i in range(bands)]
    try:
        h.open_band_data_files_as_file_objects(files)
        return h.read_buffer_at_offset(h.get_media_size(), 0)
    finally:
        h.close()
        for f in files:
            f.close()


def _sparseimage(path: str, sectors: int, sectors_per_band: int, slots: list[int],
                 rng: random.Random) -> dict[int, bytes]:
    """Write a sparse image whose slot i holds band slots[i]; returns band -> bytes."""
    from diskforge.formats.dmg.sparse import SparseImageHeader
    header = bytearray(4096)
    header[:64] = SparseImageHeader.build(dict(
        version=3, sectors_per_band=sectors_per_band, unknown1=1, sector_count=sectors,
        unknown2=bytes(12), unknown3=sectors, unknown4=bytes(28)))
    bands = {}
    body = bytearray()
    for i, band in enumerate(slots):
        header[64 + 4 * i:68 + 4 * i] = (band + 1).to_bytes(4, "big")
        bands[band] = rng.randbytes(sectors_per_band * 512)
        body += bands[band]
    with open(path, "wb") as f:
        f.write(header + body)
    return bands


def test_sparseimage_with_a_real_hdiutil_header_matches_libmodi(tmp_path):
    header = open(need_real("dmg/fragments/sparseimage_header_4096.bin"), "rb").read()
    path = str(tmp_path / "real.sparseimage")
    with open(path, "wb") as f:
        f.write(header + random.Random(3).randbytes(4 * MIB))  # bands 1, 4, 2, 3
    with diskforge.open(path) as dev:
        assert dev.format == "sparseimage" and dev.size == 4 * MIB
        ours = dev.read(0, dev.size)
    assert ours == _pymodi_image(path)
    body = open(path, "rb").read()[4096:]
    assert ours[3 * MIB:] == body[MIB:2 * MIB]  # slot 1 holds band 4 (numbers are 1-based)


def test_sparseimage_out_of_order_and_missing_bands(tmp_path):
    rng = random.Random(7)
    path = str(tmp_path / "s.sparseimage")
    bands = _sparseimage(path, sectors=10 * 2048 - 100, sectors_per_band=2048,
                         slots=[6, 0, 9, 3], rng=rng)
    want = b"".join(bands.get(b, bytes(MIB)) for b in range(10))[:(10 * 2048 - 100) * 512]
    with diskforge.open(path) as dev:
        assert dev.read(0, dev.size) == want
        kinds = [(e.offset // MIB, e.kind) for e in dev.extents()]
        assert (0, ExtentKind.DATA) in kinds and (1, ExtentKind.ZERO) in kinds
        assert dev.read(3 * MIB - 5, 10) == want[3 * MIB - 5:3 * MIB + 5]
    assert _pymodi_image(path) == want
    out = str(tmp_path / "flat.raw")
    assert cli("convert", "-O", "raw", path, out)[0] == 0
    assert open(out, "rb").read() == want


def test_sparsebundle_skeleton_reads_as_zeros():
    with diskforge.open(SKELETON) as dev:
        assert dev.format == "sparsebundle" and dev.size == 4 * MIB
        assert dev.read(0, dev.size) == bytes(4 * MIB)
        assert [e.kind for e in dev.extents()] == [ExtentKind.ZERO]
    code, out, _ = cli("info", SKELETON)
    assert code == 0 and "sparsebundle" in out


def test_sparsebundle_with_bands_matches_libmodi(tmp_path):
    path = str(tmp_path / "b.sparsebundle")
    shutil.copytree(SKELETON, path)
    info = plistlib.loads(open(os.path.join(path, "Info.plist"), "rb").read())
    info.update({"band-size": MIB, "size": 5 * MIB + 4096})
    with open(os.path.join(path, "Info.plist"), "wb") as f:
        f.write(plistlib.dumps(info))
    os.mkdir(os.path.join(path, "bands"))
    rng = random.Random(11)
    bands = {0: rng.randbytes(MIB), 2: rng.randbytes(300 * 512), 5: rng.randbytes(4096)}
    for n, data in bands.items():
        with open(os.path.join(path, "bands", f"{n:x}"), "wb") as f:
            f.write(data)
    with open(os.path.join(path, "bands", "notes.txt"), "w") as f:
        f.write("not a band")
    want = b"".join(bands.get(i, b"").ljust(MIB, b"\0") for i in range(6))[:5 * MIB + 4096]
    with diskforge.open(path) as dev:
        assert dev.read(0, dev.size) == want
        assert sum(e.length for e in dev.extents() if e.kind is ExtentKind.DATA) == \
            MIB + 300 * 512 + 4096
    assert _pymodi_bundle(path, 6) == want


def test_sparsebundle_band_outside_the_bundle_is_refused_when_untrusted(tmp_path):
    path = str(tmp_path / "b.sparsebundle")
    shutil.copytree(SKELETON, path)
    os.mkdir(os.path.join(path, "bands"))
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    os.symlink(secret, os.path.join(path, "bands", "0"))
    code, _, err = cli("--untrusted", "info", path)
    one_line_error(code, err)
    assert "outside" in err
    assert cli("--untrusted", "info", "--allow-root", str(tmp_path), path)[0] == 0
    assert cli("info", path)[0] == 0  # followed by default, a regular file


@pytest.mark.parametrize("case,message", [
    ("duplicate", "stored twice"), ("beyond", "beyond the disk"),
    ("truncated", "past the end of the file"), ("band0", "sectors per band"),
])
def test_malformed_sparseimage(case, message, tmp_path):
    path = str(tmp_path / "bad.sparseimage")
    _sparseimage(path, 4096, 2048, [0, 1], random.Random(1))
    data = bytearray(open(path, "rb").read())
    if case == "duplicate":
        data[68:72] = (1).to_bytes(4, "big")
    elif case == "beyond":
        data[68:72] = (9).to_bytes(4, "big")
    elif case == "truncated":
        data = data[:4096 + MIB]
    else:
        data[8:12] = bytes(4)
    open(path, "wb").write(data)
    code, _, err = cli("info", path)
    one_line_error(code, err)
    assert message in err


@pytest.mark.parametrize("change,message", [
    ({"band-size": 0}, "band-size"), ({"size": -5}, "size"),
    ({"diskimage-bundle-type": "x"}, "com.apple.diskimage.sparsebundle"),
])
def test_malformed_sparsebundle(change, message, tmp_path):
    path = str(tmp_path / "b.sparsebundle")
    shutil.copytree(SKELETON, path)
    info = plistlib.loads(open(os.path.join(path, "Info.plist"), "rb").read())
    info.update(change)
    with open(os.path.join(path, "Info.plist"), "wb") as f:
        f.write(plistlib.dumps(info))
    code, _, err = cli("info", "-f", "sparsebundle", path)
    one_line_error(code, err)
    assert message in err
