"""qcow2 reading: every variant qemu-img (and qemu-io) makes reads back with the same
sha256 as ``qemu-img convert -O raw`` gives, ``map`` matches ``qemu-img map``, and
``info`` carries qemu-img's format-specific fields."""

import csv
import hashlib
import json
import os
import shutil

import pytest
from conftest import REAL, cli, need, need_real, qemu_img_json, run, sha256_device, sha256_file

import diskforge
from diskforge.ops.map import format_json, map_image

MIB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 6 MiB + 4 KiB disk of mixed content: random, text, written zeros, holes, and
    data in the last, partial cluster (an odd virtual size)."""
    need("qemu-img")
    d = tmp_path_factory.mktemp("qcow2src")
    path = str(d / "src.raw")
    rng = __import__("random").Random(3)
    size = 6 * MIB + 4096 + 512
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(64 * 1024)
        f.write(rng.randbytes(700 * 1024))
        f.seek(2 * MIB)
        f.write((b"qcow2 text-like data, compressible; " * 40000)[:MIB])
        f.seek(4 * MIB)
        f.write(bytes(256 * 1024))
        f.seek(5 * MIB + 12345)
        f.write(rng.randbytes(100000))
        f.seek(size - 3000)
        f.write(rng.randbytes(3000))
    return path


def qemu_sha(path: str, *extra: str, cwd: str | None = None) -> str:
    flat = os.path.abspath(path) + ".flat"
    run("qemu-img", "convert", *extra, "-O", "raw", path, flat, cwd=cwd)
    digest = sha256_file(flat)
    os.unlink(flat)
    return digest


def ours_sha(path: str, **kw) -> str:
    with diskforge.open(path, **kw) as dev:
        assert dev.format == "qcow2"
        return sha256_device(dev)


def same_map(path: str) -> None:
    proc = run("qemu-img", "map", "--output", "json", path)
    with diskforge.open(path) as dev:
        ours = json.loads(format_json(map_image(dev)))
    assert ours == json.loads(proc.stdout)


VARIANTS = [
    ("v2", ["-o", "compat=0.10"]),
    ("v3", ["-o", "compat=1.1"]),
    ("cluster512", ["-o", "cluster_size=512"]),
    ("cluster4k", ["-o", "cluster_size=4096"]),
    ("cluster64k", ["-o", "cluster_size=65536"]),
    ("cluster2M", ["-o", "cluster_size=2M"]),
    ("zlib", ["-c", "-o", "compression_type=zlib"]),
    ("zstd", ["-c", "-o", "compression_type=zstd"]),
    ("zlib-v2-512", ["-c", "-o", "compat=0.10,cluster_size=512"]),
    ("zstd-2M", ["-c", "-o", "compression_type=zstd,cluster_size=2M"]),
    ("prealloc-metadata", ["-o", "preallocation=metadata"]),
    ("prealloc-falloc", ["-o", "preallocation=falloc"]),
    ("prealloc-full", ["-o", "preallocation=full"]),
    ("lazy", ["-o", "lazy_refcounts=on"]),
    ("refcount1", ["-o", "refcount_bits=1"]),
    ("refcount16", ["-o", "refcount_bits=16"]),
    ("refcount64", ["-o", "refcount_bits=64"]),
    ("extended-l2", ["-o", "extended_l2=on"]),
    ("extended-l2-zstd", ["-c", "-o", "extended_l2=on,compression_type=zstd"]),
]


@pytest.mark.parametrize("name,args", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_reads_what_qemu_img_writes(workdir, source, name, args):
    path = os.path.join(workdir, f"{name}.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *args, source, path)
    assert ours_sha(path) == qemu_sha(path) == sha256_file(source)
    if not name.startswith("prealloc"):  # qemu's map of preallocated clusters asks the file
        same_map(path)


def test_zero_clusters_and_subclusters_written_by_qemu_io(workdir, source):
    for opts in ("compat=1.1", "extended_l2=on", "compat=0.10"):
        path = os.path.join(workdir, "z.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", "-o", opts, source, path)
        run("qemu-io", "-c", "write -z 64k 128k", "-c", "write -P 0x5a 2M 3k",
            "-c", "write -z 100k 8k", "-c", "discard 3M 64k", path)
        assert ours_sha(path) == qemu_sha(path)
        same_map(path)


def test_odd_virtual_size(workdir):
    # qemu sizes are whole 512-byte sectors; this one is not a whole cluster
    size = 3 * MIB + 1536
    path = os.path.join(workdir, "odd.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    run("qemu-io", "-c", f"write -P 0x33 {3 * MIB} 1536", "-c", "write -P 0x44 0 777", path)
    with diskforge.open(path) as dev:
        assert dev.size == size
        assert dev.read(3 * MIB, 1536) == b"\x33" * 1536
        assert dev.read(0, 778) == b"\x44" * 777 + b"\0"
    assert ours_sha(path) == qemu_sha(path)


def test_internal_snapshot_readable_as_a_view(workdir, source):
    path = os.path.join(workdir, "snap.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, path)
    run("qemu-img", "snapshot", "-c", "before", path)
    run("qemu-io", "-c", "write -P 0x77 0 1M", "-c", "write -z 2M 512k", path)
    assert ours_sha(path, snapshot="before") == qemu_sha(path, "-l", "before") \
        == sha256_file(source)
    run("qemu-img", "resize", "-q", path, "+1M")
    assert ours_sha(path) == qemu_sha(path)
    # the view has the snapshot's own size (qemu-img convert -l would use today's):
    # what reverting to it gives
    reverted = os.path.join(workdir, "reverted.qcow2")
    shutil.copy(path, reverted)
    run("qemu-img", "snapshot", "-a", "before", reverted)
    assert ours_sha(path, snapshot="1") == qemu_sha(reverted) == sha256_file(source)
    with diskforge.open(path, snapshot="before") as dev:
        assert dev.size == os.path.getsize(source)  # the snapshot's own disk size
    ours = diskforge.info(path).to_json()
    theirs = qemu_img_json("info", path)
    assert ours["snapshots"] == theirs["snapshots"]
    # the CLI: convert, compare and map take --snapshot
    out = os.path.join(workdir, "view.raw")
    assert cli("convert", "--snapshot", "before", "-O", "raw", path, out)[0] == 0
    assert sha256_file(out) == sha256_file(source)
    assert cli("compare", "--snapshot", "before", path, source)[0] == 0
    assert cli("compare", path, source)[0] == 1
    code, text, _ = cli("map", "--output", "json", "--snapshot", "before", path)
    assert code == 0 and json.loads(text)


def test_three_deep_chain_with_writes_at_each_level(workdir, source):
    base = os.path.join(workdir, "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, base)
    run("qemu-io", "-c", "write -P 0x01 1M 128k", base)
    mid = os.path.join(workdir, "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    run("qemu-io", "-c", "write -P 0x02 1088k 256k", "-c", "write -z 2M 64k", mid)
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
        "mid.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-c", "write -P 0x03 1100k 5k", "-c", "write -z 5M 4k",
        "-c", "write -P 0x04 4097 1", top)
    assert ours_sha(top) == qemu_sha(top)
    same_map(top)
    infos = qemu_img_json("info", "--backing-chain", top)
    code, text, _ = cli("info", "--backing-chain", "--output", "json", top)
    ours = json.loads(text)
    assert [i["filename"] for i in ours] == [i["filename"] for i in infos]
    assert [i.get("backing-filename") for i in ours] == \
        [i.get("backing-filename") for i in infos]


def test_relative_backing_path_in_a_subdirectory(workdir, source):
    os.makedirs(os.path.join(workdir, "images", "bases"))
    base = os.path.join(workdir, "images", "bases", "b.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, base)
    top = os.path.join(workdir, "images", "t.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "bases/b.qcow2", "-F", "qcow2",
        top)
    run("qemu-io", "-c", "write -P 9 0 64k", top)
    cwd = os.getcwd()
    try:
        os.chdir(workdir)  # relative to the image, not to the current directory
        assert ours_sha("images/t.qcow2") == qemu_sha("images/t.qcow2")
    finally:
        os.chdir(cwd)
    info = diskforge.info(top)
    assert info.backing_filename == "bases/b.qcow2" and info.backing_format == "qcow2"


def test_external_data_file(workdir, source):
    # qemu resolves a relative data file name from the current directory (diskforge:
    # from the image's, like backing files): run qemu where the image is
    path = os.path.join(workdir, "ext.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-o", "data_file=ext.data", source, path,
        cwd=workdir)
    run("qemu-io", "-c", "write -P 0x61 3M 64k", path, cwd=workdir)
    assert ours_sha(path) == qemu_sha(path, cwd=workdir)
    proc = run("qemu-img", "map", "--output", "json", path, cwd=workdir)
    with diskforge.open(path) as dev:
        assert os.path.join(workdir, "ext.data") in dev.files()
        assert json.loads(format_json(map_image(dev))) == json.loads(proc.stdout)
    raw = os.path.join(workdir, "raw.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-o", "data_file=raw.data,data_file_raw=on",
        source, raw, cwd=workdir)
    assert ours_sha(raw) == qemu_sha(raw, cwd=workdir)
    fs = diskforge.info(raw).format_specific
    assert fs["data-file"] == "raw.data" and fs["data-file-raw"] is True


def test_dirty_image_reads_and_checks_like_qemu(workdir, source):
    path = os.path.join(workdir, "dirty.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M")
    proc = run("qemu-io", "-c", "write -P 5 0 1M", "-c", "write -P 6 5M 64k", "-c", "abort",
               path, check=False)
    assert proc.returncode != 0  # abort leaves the dirty bit set
    assert qemu_img_json("info", path)["dirty-flag"] is True
    assert diskforge.info(path).dirty is True
    assert ours_sha(path) == qemu_sha(path)
    theirs = run("qemu-img", "check", "--output", "json", path, check=False)
    code, text, _ = cli("check", "--output", "json", path)
    assert code == theirs.returncode == 2
    assert json.loads(text)["corruptions"] == json.loads(theirs.stdout)["corruptions"]


def test_info_matches_qemu_img(workdir, source):
    for opts in ("compat=0.10", "compat=1.1,lazy_refcounts=on,refcount_bits=4",
                 "extended_l2=on,compression_type=zstd"):
        path = os.path.join(workdir, "i.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", "-o", opts, source, path)
        run("qemu-img", "bitmap", "--add", "-g", "128k", path, "b0") \
            if "compat=1.1" in opts else None
        theirs = qemu_img_json("info", path)
        ours = diskforge.info(path).to_json()
        for key in ("virtual-size", "format", "cluster-size", "format-specific",
                    "dirty-flag"):
            assert ours[key] == theirs[key], key
        code, text, _ = cli("info", path)
        assert "Format specific information:" in text and "refcount bits:" in text


def test_fixture_converts_and_reads(workdir):
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "mbr-fat.qcow2")
    with diskforge.open(path) as dev:
        assert dev.format == "qcow2" and dev.size == 2 * MIB
        assert dev.read(510, 2) == b"\x55\xaa"
    out = os.path.join(workdir, "out.raw")
    assert cli("convert", path, out)[0] == 0
    with open(os.path.join(os.path.dirname(path), "mbr-fat.raw"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha256_file(out)


def _expected(relpath: str):
    with open(os.path.join(REAL, "EXPECTED.tsv")) as f:
        for row in csv.reader(f, delimiter="\t"):
            if row and row[0] == relpath:
                return int(row[1]), row[2]
    pytest.skip(f"{relpath} not in EXPECTED.tsv")


@pytest.mark.parametrize("name", ["dissect_basic.qcow2", "dissect_basic-zstd.qcow2"])
def test_real_samples(workdir, name):
    path = need_real(f"qcow2/{name}")
    size, digest = _expected(f"qcow2/{name}")
    with diskforge.open(path) as dev:
        assert dev.size == size
        assert sha256_device(dev) == digest
    need("qemu-img")
    same_map(path)


def test_qcow_version_1_is_another_format(workdir):
    need("qemu-img")
    path = os.path.join(workdir, "v1.qcow")
    run("qemu-img", "create", "-q", "-f", "qcow", path, "1M")
    from diskforge.registry import get
    head = open(path, "rb").read(512)
    assert get("qcow2").probe(head, head, os.path.getsize(path)) == 0
    code, _, err = cli("info", "-f", "qcow2", path)
    assert code == 1 and "qcow2 version 1" in err
