"""Parallels (read-only): the real bundles (plain, expanding, split into six extents),
images made by qemu-img (both header magics, several cluster sizes) and bundles with a
snapshot chain assembled here, read bit for bit as qemu-img reads each image file (the
only other reader: 7-Zip does not open them, and qemu does not read the bundle's XML);
check as qemu-img checks; hostile headers, BATs and descriptors give one line."""

import json
import os
import shutil
import struct

import pytest
from conftest import REAL, cli, need, one_line_error, run
from roformat_helpers import (expected, flat_sha256, patch, pattern_disk, refused,
                              same_as_qemu)

import diskforge
from diskforge.errors import UnsupportedError
from diskforge.registry import get

MIB = 1 << 20
GUID0 = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
GUID1 = "{11111111-2222-3333-4444-555555555555}"
NULL = "{00000000-0000-0000-0000-000000000000}"


def real_bundle(name: str, dest: str) -> str:
    """A copy of a real bundle with its .gz members unpacked (they stay AGPL, in
    shared/: the test skips without them)."""
    import gzip
    src = os.path.join(REAL, "parallels", f"{name}.hdd")
    if not os.path.isdir(src):
        pytest.skip(f"real fixture parallels/{name}.hdd not found under {REAL}")
    out = os.path.join(dest, f"{name}.hdd")
    os.makedirs(out)
    for member in os.listdir(src):
        path = os.path.join(src, member)
        if member.endswith(".gz"):
            with gzip.open(path) as f, open(os.path.join(out, member[:-3]), "wb") as o:
                shutil.copyfileobj(f, o)
        else:
            shutil.copy(path, out)
    return out


@pytest.mark.parametrize("name", ["plain", "expanding"])
def test_real_bundles_read_as_expected(tmp_path, name):
    bundle = real_bundle(name, str(tmp_path))
    rel = "parallels/expanding.hdd (hds extent)"     # both hold the same disk
    assert flat_sha256(bundle) == expected(rel)
    with diskforge.open(os.path.join(bundle, "DiskDescriptor.xml")) as dev:
        assert dev.size == expected(rel)[0] and dev.path == bundle
    info = diskforge.info(bundle)
    assert info.format == "parallels" and info.details["name"] == name


def test_real_split_bundle_matches_qemu_per_extent(tmp_path):
    """Six expandable extents (2 GiB each, mostly empty): each extent's map equals
    qemu-img's map of that extent file, and each of its data runs equals what qemu-img
    dd reads there (converting 10 GiB of holes with qemu-img would take a minute;
    qemu-img 7.2's dd counts ``count`` from the start of the input, skipped blocks
    included)."""
    need("qemu-img")
    bundle = real_bundle("split", str(tmp_path))
    out = str(tmp_path / "piece.raw")
    with diskforge.open(bundle) as dev:
        assert dev.size == 20971520 * 512
        for start, stop, part in dev.parts:
            qmap = json.loads(run("qemu-img", "map", "--output", "json", "-f",
                                  "parallels", part.path).stdout)
            theirs = [(e["start"], e["length"]) for e in qmap if e["data"]]
            ours = [(e.offset - start, e.length) for e in dev.extents(start, stop - start)
                    if e.kind.value == "data"]
            assert ours == theirs and sum(n for _, n in ours) < 64 * MIB
            for off, n in ours:
                run("qemu-img", "dd", "-f", "parallels", "-O", "raw", "bs=512",
                    f"skip={off // 512}", f"count={(off + n) // 512}", f"if={part.path}",
                    f"of={out}")
                assert dev.read(start + off, n) == open(out, "rb").read()
                os.unlink(out)
    code, out, _ = cli("check", bundle)
    assert code == 0 and "No errors" in out


@pytest.mark.parametrize("opts", ["", "cluster_size=64k", "cluster_size=4k"])
def test_qemu_img_convert_output_reads_as_qemu_reads_it(tmp_path, opts):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"))
    img = str(tmp_path / "a.hds")
    run("qemu-img", "convert", "-O", "parallels", *(("-o", opts) if opts else ()), src, img)
    same_as_qemu(img, str(tmp_path))
    assert flat_sha256(img)[1] == flat_sha256(src, "raw")[1]
    with diskforge.open(img) as dev:
        assert get("parallels").qemu_driver(dev) == "parallels"


def _to_sector_bat(img: str) -> None:
    """Rewrite qemu's "WithouFreSpacExt" image as a "WithoutFreeSpace" one: the BAT in
    sectors instead of clusters."""
    with open(img, "r+b") as f:
        h = bytearray(f.read(64))
        tracks, n = struct.unpack_from("<II", h, 28)
        bat = list(struct.unpack(f"<{n}I", f.read(4 * n)))
        h[:16] = b"WithoutFreeSpace"
        f.seek(0)
        f.write(h + struct.pack(f"<{n}I", *(e * tracks for e in bat)))


def test_old_magic_counts_the_bat_in_sectors(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"))
    img = str(tmp_path / "old.hds")
    run("qemu-img", "convert", "-O", "parallels", "-o", "cluster_size=64k", src, img)
    _to_sector_bat(img)
    same_as_qemu(img, str(tmp_path))
    assert flat_sha256(img)[1] == flat_sha256(src, "raw")[1]


def _check_both(img: str) -> int:
    q = run("qemu-img", "check", "--output", "json", img, check=False)
    code, out, _ = cli("check", "--output", "json", img)
    assert code == q.returncode
    ours, theirs = json.loads(out), json.loads(q.stdout)
    for key in ("total-clusters", "allocated-clusters", "fragmented-clusters",
                "image-end-offset", "corruptions", "leaks"):
        assert ours.get(key) == theirs.get(key), key
    return code


def test_check_matches_qemu_img(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"))
    img = str(tmp_path / "a.hds")
    run("qemu-img", "convert", "-O", "parallels", "-o", "cluster_size=64k", src, img)
    assert _check_both(img) == 0
    with open(img, "ab") as f:
        f.write(b"\1" * 100000)                  # space after the last cluster: leaks
    assert _check_both(img) == 3
    patch(img, 44, "<I", 0x746F6E59)             # in_use: not closed
    assert _check_both(img) == 2
    with diskforge.open(img) as dev:
        i = next(k for k, e in enumerate(dev.bat) if e)
    patch(img, 64 + 4 * i, "<I", 1 << 20)        # a cluster outside the file
    assert _check_both(img) == 2
    code, _, err = cli("check", img)  # the findings on stderr, as qemu-img prints them
    assert "ERROR image was not closed correctly" in err
    assert f"ERROR cluster {i} is outside image" in err


# -- bundles assembled here ----------------------------------------------------------------

def descriptor(size_sectors: int, storages, shots=((GUID0, NULL),), top=None) -> str:
    """A DiskDescriptor.xml as Parallels writes them: ``storages`` is a list of
    (start, end, [(guid, type, file)])."""
    parts = ["<?xml version='1.0' encoding='UTF-8'?>",
             '<Parallels_disk_image Version="1.0">', "<Disk_Parameters>",
             f"<Disk_size>{size_sectors}</Disk_size>",
             f"<Encryption><Engine>{NULL}</Engine></Encryption>",
             "<Name>t</Name></Disk_Parameters><StorageData>"]
    for start, end, images in storages:
        parts.append(f"<Storage><Start>{start}</Start><End>{end}</End>"
                     "<Blocksize>2048</Blocksize>")
        for guid, typ, name in images:
            parts.append(f"<Image><GUID>{guid}</GUID><Type>{typ}</Type>"
                         f"<File>{name}</File></Image>")
        parts.append("</Storage>")
    parts.append("</StorageData><Snapshots>")
    if top:
        parts.append(f"<TopGUID>{top}</TopGUID>")
    for guid, parent in shots:
        parts.append(f"<Shot><GUID>{guid}</GUID><ParentGUID>{parent}</ParentGUID></Shot>")
    parts.append("</Snapshots></Parallels_disk_image>")
    return "\n".join(parts)


def _bundle(tmp_path, xml: "str | bytes") -> str:
    d = tmp_path / "t.hdd"
    d.mkdir(exist_ok=True)
    (d / "DiskDescriptor.xml").write_bytes(xml if isinstance(xml, bytes) else xml.encode())
    return str(d)


@pytest.mark.parametrize("base_type", ["Compressed", "Plain"])
def test_bundle_reads_the_current_snapshot_over_its_parent(tmp_path, base_type):
    """Base image and a snapshot's image over it: clusters the snapshot holds come from
    it, the rest from the base (the expectation is built from qemu-img's reading and
    map of each file)."""
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"), 4 * MIB)
    delta = pattern_disk(str(tmp_path / "delta.raw"), 4 * MIB, seed=2)
    d = tmp_path / "t.hdd"
    d.mkdir()
    if base_type == "Plain":
        shutil.copy(src, d / "base.hds")
    else:
        run("qemu-img", "convert", "-O", "parallels", src, str(d / "base.hds"))
    run("qemu-img", "convert", "-O", "parallels", "-o", "cluster_size=64k", delta,
        str(d / "snap.hds"))
    xml = descriptor(8192, [(0, 8192, [(GUID0, base_type, "base.hds"),
                                       (GUID1, "Compressed", "snap.hds")])],
                     shots=((GUID0, NULL), (GUID1, GUID0)))
    bundle = _bundle(tmp_path, xml)
    want = bytearray(open(src, "rb").read())
    snap = open(delta, "rb").read()
    for e in json.loads(run("qemu-img", "map", "--output", "json",
                            str(d / "snap.hds")).stdout):
        if e["data"]:
            want[e["start"]:e["start"] + e["length"]] = snap[e["start"]:e["start"]
                                                               + e["length"]]
    with diskforge.open(bundle) as dev:
        assert dev.read(0, dev.size) == bytes(want)
        assert dev.chain == [GUID1, GUID0]
    code, out, err = cli("convert", "-O", "raw", bundle, str(tmp_path / "o.raw"))
    assert code == 0 and open(str(tmp_path / "o.raw"), "rb").read() == bytes(want), err
    # with TopGUID naming the base, the base alone is read
    _bundle(tmp_path, xml.replace("<Snapshots>", f"<Snapshots><TopGUID>{GUID0}</TopGUID>"))
    assert flat_sha256(bundle)[1] == flat_sha256(src, "raw")[1]


def test_writing_is_not_supported_yet(tmp_path):
    need("qemu-img")
    img = str(tmp_path / "a.hds")
    run("qemu-img", "create", "-q", "-f", "parallels", img, "1M")
    with pytest.raises(UnsupportedError, match="not supported yet: writing parallels"):
        get("parallels").open(img, writable=True)
    code, _, err = cli("convert", "-O", "parallels", img, str(tmp_path / "b.hds"))
    assert code == 1 and "not supported yet: writing parallels images" in err


# -- hostile inputs --------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    need("qemu-img")
    src = pattern_disk(str(tmp_path / "src.raw"), 2 * MIB)
    img = str(tmp_path / "h.hds")
    run("qemu-img", "convert", "-O", "parallels", "-o", "cluster_size=64k", src, img)
    return img


def test_truncated_header(small):
    os.truncate(small, 50)
    refused(small, "too small for a Parallels header")


@pytest.mark.parametrize("offset,fmt,value,field", [
    (16, "<I", 3, "ParallelsHeader.version"),
    (28, "<I", 0, "ParallelsHeader.tracks"),
    (28, "<I", 1 << 30, "ParallelsHeader.tracks"),
    (32, "<I", 0x7FFFFFFF, "ParallelsHeader.bat_entries"),
    (32, "<I", 1000000, "ParallelsHeader.bat_entries"),         # past the end
])
def test_bad_header_fields(small, offset, fmt, value, field):
    patch(small, offset, fmt, value)
    refused(small, field)


def test_bat_larger_than_the_budget(small):
    patch(small, 32, "<I", 0x1FFFFFFF)            # a 2 GiB BAT in a sparse file
    os.truncate(small, 3 << 30)
    refused(small, "ParallelsHeader.bat_entries", "256 MiB")


def test_cluster_past_the_end(small, tmp_path):
    with diskforge.open(small) as dev:
        i = next(k for k, e in enumerate(dev.bat) if e)
    patch(small, 64 + 4 * i, "<I", 1 << 20)
    code, _, err = cli("convert", "-O", "raw", small, str(tmp_path / "o.raw"))
    one_line_error(code, err)
    assert f"BAT.{i}" in err and "past the end" in err


def test_untrusted_mode_confines_the_bundle_files(tmp_path):
    need("qemu-img")
    d = tmp_path / "t.hdd"
    d.mkdir()
    for name in ("a.hds", "b.hds"):
        run("qemu-img", "create", "-q", "-f", "parallels", str(d / name), "1M")
    os.rename(d / "a.hds", tmp_path / "a.hds")
    xml = descriptor(4096, [(0, 2048, [(GUID0, "Compressed", str(tmp_path / "a.hds"))]),
                            (2048, 4096, [(GUID0, "Compressed", "b.hds")])])
    bundle = _bundle(tmp_path, xml)
    code, _, err = cli("--untrusted", "info", bundle)
    one_line_error(code, err)
    assert "outside the image's directory" in err, err
    assert cli("--untrusted", "info", "--allow-root", str(tmp_path), bundle)[0] == 0
    assert cli("info", bundle)[0] == 0


@pytest.mark.parametrize("change,words", [
    (lambda x: x.replace("<?xml version='1.0' encoding='UTF-8'?>",
                         "<?xml version='1.0'?><!DOCTYPE p [<!ENTITY a 'aaaa'>]>"),
     ["document type declaration"]),
    (lambda x: x.replace("</Parallels_disk_image>", "<!-- " + "x" * (1 << 20) + " -->"
                         "</Parallels_disk_image>"), ["more than 1048576 bytes"]),
    (lambda x: x.replace("<Start>2048</Start>", "<Start>2049</Start>"),
     ["StorageData.Storage[1].Start"]),
    (lambda x: x.replace("<End>2048</End>", "<End>-1</End>"), ["Storage[0].End"]),
    (lambda x: x.replace("<Disk_size>4096</Disk_size>", "<Disk_size>9999</Disk_size>"),
     ["Disk_Parameters.Disk_size"]),
    (lambda x: x.replace(f"<ParentGUID>{NULL}</ParentGUID>",
                         f"<ParentGUID>{GUID0}</ParentGUID>"), ["loop"]),
    (lambda x: x.replace("<File>a.hds</File>", "<File>/etc/passwd</File>"),
     ["/etc/passwd", "not a Parallels image"]),  # followed by default, as qemu-img does
    (lambda x: x.replace("<File>a.hds</File>", "<File>missing.hds</File>"),
     ["missing.hds: No such file"]),
    (lambda x: x.replace("<Type>Compressed</Type>", "<Type>Sparse</Type>", 1),
     ["not supported yet: Parallels images of type 'Sparse'"]),
    (lambda x: x.replace(f"<Engine>{NULL}</Engine>", f"<Engine>{GUID1}</Engine>"),
     ["not supported yet: encrypted Parallels disks"]),
    (lambda x: x.replace("<Disk_Parameters>", "<Disk_Parameters><", 1),
     ["not well-formed XML"]),
    (lambda x: x.encode("utf-16"), ["not UTF-8 text"]),
    (lambda x: x.encode().replace(b"<Name>t", b"<Name>t\0"), ["NUL byte"]),
])
def test_hostile_descriptors(tmp_path, change, words):
    need("qemu-img")
    d = tmp_path / "t.hdd"
    d.mkdir()
    for name in ("a.hds", "b.hds"):
        run("qemu-img", "create", "-q", "-f", "parallels", str(d / name), "1M")
    xml = descriptor(4096, [(0, 2048, [(GUID0, "Compressed", "a.hds")]),
                            (2048, 4096, [(GUID0, "Compressed", "b.hds")])])
    assert cli("info", _bundle(tmp_path, xml))[0] == 0
    changed = change(xml)
    bundle = _bundle(tmp_path, changed)
    # (a descriptor that is not UTF-8 text is not recognised when named directly)
    for target in (bundle,) + (() if isinstance(changed, bytes) else
                               (os.path.join(bundle, "DiskDescriptor.xml"),)):
        code, _, err = cli("info", target)
        one_line_error(code, err)
        assert all(w in err for w in words), err
