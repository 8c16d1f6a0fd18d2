"""qcow2 operations: random writes, snapshots, resize, rebase, commit, amend, check and
repair. Every result is checked by ``qemu-img check`` and ``qemu-img compare``."""

import json
import os
import random
import shutil

import pytest
from conftest import cli, need, one_line_error, qemu_img_json, run

import diskforge

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _qemu():
    need("qemu-img")
    need("qemu-io")


def clean(path: str) -> dict:
    proc = run("qemu-img", "check", "--output", "json", path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def same(a: str, b: str) -> None:
    proc = run("qemu-img", "compare", a, b, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def raw_of(workdir: str, name: str, data) -> str:
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def random_content(rng: random.Random, size: int) -> bytearray:
    data = bytearray(size)
    for _ in range(8):
        off = rng.randrange(size)
        n = min(size - off, rng.randrange(1, 400000))
        data[off:off + n] = rng.randbytes(n) if rng.random() < 0.6 else bytes([7]) * n
    return data



def random_writes(dev, ref: bytearray, rng: random.Random, count: int, longest: int) -> None:
    """``count`` random writes and zero writes through ``dev``, mirrored into ``ref``."""
    for _ in range(count):
        off = rng.randrange(len(ref))
        n = rng.randrange(1, min(len(ref) - off, longest) + 1)
        if rng.random() < 0.3:
            dev.write_zeroes(off, n)
            ref[off:off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            dev.write(off, data)
            ref[off:off + n] = data

def test_random_writes_on_qemu_images(workdir):
    rng = random.Random(5)
    for opts in ("compat=1.1", "compat=0.10", "cluster_size=512", "extended_l2=on",
                 "refcount_bits=1,cluster_size=4k", "lazy_refcounts=on"):
        size = 3 * MIB + 1536
        path = os.path.join(workdir, "w.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, str(size))
        ref = bytearray(size)
        with diskforge.open(path, writable=True) as dev:
            random_writes(dev, ref, rng, 50, 200000)
        clean(path)
        same(raw_of(workdir, "ref.raw", ref), path)


def test_writes_into_compressed_image_and_overlay(workdir):
    rng = random.Random(6)
    base = raw_of(workdir, "base.raw", random_content(rng, 4 * MIB))
    comp = os.path.join(workdir, "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", base, comp)
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", top)
    ref = bytearray(open(base, "rb").read())
    for target in (comp, top):
        with diskforge.open(target, writable=True) as dev:
            random_writes(dev, ref, rng, 30, 150000)
        clean(target)
        same(raw_of(workdir, "ref.raw", ref), target)


def test_snapshots_create_list_apply_delete(workdir):
    rng = random.Random(7)
    first = random_content(rng, 2 * MIB)
    path = os.path.join(workdir, "s.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", raw_of(workdir, "first.raw", first), path)
    assert cli("snapshot", "-c", "one", path)[0] == 0
    clean(path)
    with diskforge.open(path, writable=True) as dev:
        dev.write(100, b"changed after one" * 1000)
        dev.write_zeroes(MIB, 128 * 1024)
    second = bytearray(first)
    second[100:100 + 17000] = b"changed after one" * 1000
    second[MIB:MIB + 128 * 1024] = bytes(128 * 1024)
    second_raw = raw_of(workdir, "second.raw", second)
    assert cli("snapshot", "-c", "two", path)[0] == 0
    code, text, _ = cli("snapshot", "-l", path)
    assert code == 0 and "one" in text and "two" in text
    theirs = run("qemu-img", "snapshot", "-l", path).stdout
    assert [line.split()[:2] for line in text.splitlines()[2:]] == \
        [line.split()[:2] for line in theirs.splitlines()[2:]]
    code, text, _ = cli("snapshot", "-l", "--output", "json", path)
    assert json.loads(text) == qemu_img_json("info", path)["snapshots"]
    clean(path)
    same(second_raw, path)
    # qemu reads our snapshot, we read qemu's
    run("qemu-img", "snapshot", "-c", "three", path)
    first_raw = os.path.join(workdir, "first.raw")
    flat = os.path.join(workdir, "flat.raw")
    run("qemu-img", "convert", "-l", "one", "-O", "raw", path, flat)
    same(first_raw, flat)
    assert cli("compare", "--snapshot", "three", path, second_raw)[0] == 0
    # apply and delete
    assert cli("snapshot", "-a", "one", path)[0] == 0
    clean(path)
    same(first_raw, path)
    assert cli("snapshot", "-d", "1", path)[0] == 0
    clean(path)
    assert cli("snapshot", "-a", "two", path)[0] == 0
    same(second_raw, path)
    assert cli("snapshot", "-d", "two", path)[0] == 0
    assert cli("snapshot", "-d", "three", path)[0] == 0
    result = clean(path)
    assert "snapshots" not in qemu_img_json("info", path)
    same(second_raw, path)
    assert result["allocated-clusters"] > 0
    code, _, err = cli("snapshot", "-a", "nope", path)
    one_line_error(code, err)
    assert "no snapshot 'nope'" in err


def test_resize_grow_and_shrink(workdir):
    rng = random.Random(8)
    data = random_content(rng, 3 * MIB)
    data[-4096:] = b"\x01" * 4096
    src = raw_of(workdir, "d.raw", data)
    for opts in ("cluster_size=512", "compat=0.10", "extended_l2=on"):
        path = os.path.join(workdir, "r.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", "-o", opts, src, path)
        assert cli("resize", path, "+200M")[0] == 0
        clean(path)
        assert qemu_img_json("info", path)["virtual-size"] == 203 * MIB
        same(src, path)
        assert cli("resize", "--shrink", path, str(3 * MIB))[0] == 0
        clean(path)
        same(src, path)
        code, _, err = cli("resize", "--safe-shrink", path, str(2 * MIB))
        one_line_error(code, err)
        assert "would cut allocated data" in err
        code, _, err = cli("resize", path, str(2 * MIB))
        one_line_error(code, err)
        # --shrink discards what lies past the new end, as qemu-img does
        assert cli("resize", "--shrink", path, str(2 * MIB - 4096))[0] == 0
        clean(path)
        with diskforge.open(path) as dev:
            assert dev.size == 2 * MIB - 4096
            assert dev.read(0, dev.size) == bytes(data[:2 * MIB - 4096])
        assert cli("resize", path, str(3 * MIB))[0] == 0
        clean(path)
        with diskforge.open(path) as dev:  # what was cut does not come back
            assert dev.read(2 * MIB - 4096, MIB + 4096) == bytes(MIB + 4096)
    # growing an overlay whose backing file is larger: the new area reads zeros
    raw_of(workdir, "big.raw", b"\xee" * (4 * MIB))
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "big.raw", "-F", "raw", top, "1M")
    assert cli("resize", top, "3M")[0] == 0
    clean(top)
    with diskforge.open(top) as dev:
        assert dev.read(0, 4) == b"\xee" * 4 and dev.read(MIB, 2 * MIB) == bytes(2 * MIB)


def test_rebase_safe_unsafe_and_remove(workdir):
    rng = random.Random(9)
    a = random_content(rng, 2 * MIB)
    b = bytearray(a)
    b[MIB:MIB + 300000] = rng.randbytes(300000)
    raw_of(workdir, "a.raw", a)
    raw_of(workdir, "b.raw", b)
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.raw", "-F", "raw", top)
    run("qemu-io", "-c", "write -P 0x42 64k 64k", "-c", "write -z 1200k 4k", top)
    want = os.path.join(workdir, "want.raw")
    run("qemu-img", "convert", "-O", "raw", top, want)
    assert cli("rebase", "-b", "b.raw", "-F", "raw", top)[0] == 0
    clean(top)
    same(want, top)
    assert qemu_img_json("info", top)["backing-filename"] == "b.raw"
    assert cli("rebase", "-b", "", top)[0] == 0  # copy everything in, no backing file
    clean(top)
    same(want, top)
    assert "backing-filename" not in qemu_img_json("info", top)
    assert cli("rebase", "-u", "-b", "a.raw", "-F", "raw", top)[0] == 0
    clean(top)
    same(want, top)  # everything is in the top image now: a.raw changes nothing
    code, _, err = cli("rebase", "-b", "top.qcow2", top)
    one_line_error(code, err)


@pytest.mark.parametrize("base_opts", ["compat=1.1", "compat=0.10", "cluster_size=4k"])
def test_commit(workdir, base_opts):
    rng = random.Random(10)
    src = raw_of(workdir, "src.raw", random_content(rng, 2 * MIB))
    base = os.path.join(workdir, "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-o", base_opts, src, base)
    mid = os.path.join(workdir, "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    run("qemu-io", "-c", "write -P 0x11 0 100k", mid)
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top,
        "3M")  # larger than its backing files: they grow
    run("qemu-io", "-c", "write -P 0x22 50k 200k", "-c", "write -z 1M 64k",
        "-c", "write -P 0x33 2500k 10k", top)
    want = os.path.join(workdir, "want.raw")
    run("qemu-img", "convert", "-O", "raw", top, want)
    keep = os.path.join(workdir, "keep.qcow2")
    shutil.copy(top, keep)
    code, text, _ = cli("commit", top)
    assert code == 0 and "Image committed." in text
    for p in (top, mid, base):
        clean(p)
    same(want, top)
    same(want, mid)
    assert not any(e["present"] and e["depth"] == 0 for e in qemu_img_json("map", top))
    # -b: into the base, through the middle layer; the top keeps its data (-b implies -d)
    shutil.copy(keep, top)
    run("qemu-img", "rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", top)
    assert cli("commit", "-b", base, top)[0] == 0
    clean(base)
    same(want, base)
    same(want, top)


def test_amend(workdir):
    rng = random.Random(12)
    src = raw_of(workdir, "src.raw", random_content(rng, 2 * MIB))
    path = os.path.join(workdir, "a.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", src, path)
    run("qemu-io", "-c", "write -z 0 64k", path)  # a zero cluster, for the downgrade
    want = os.path.join(workdir, "want.raw")
    run("qemu-img", "convert", "-O", "raw", path, want)
    steps = [("lazy_refcounts=on", "lazy-refcounts", True),
             ("refcount_bits=2", "refcount-bits", 2),
             ("refcount_bits=64", "refcount-bits", 64),
             ("lazy_refcounts=off,refcount_bits=16", "refcount-bits", 16),
             ("compat=0.10", "compat", "0.10"),
             ("compat=1.1", "compat", "1.1")]
    for opts, key, value in steps:
        code, _, err = cli("amend", "-o", opts, path)
        assert code == 0, err
        clean(path)
        same(want, path)
        assert qemu_img_json("info", path)["format-specific"]["data"][key] == value
    for opts in ("cluster_size=4k", "extended_l2=on", "compression_type=zstd"):
        code, _, err = cli("amend", "-o", opts, path)
        one_line_error(code, err)
    code, _, err = cli("amend", "-o", "compat=0.10,refcount_bits=4", path)
    one_line_error(code, err)
    clean(path)


def test_check_and_repair_leaks(workdir):
    path = os.path.join(workdir, "l.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M")
    run("qemu-io", "-c", "write -P 1 0 256k", path)
    with diskforge.open(path) as dev:
        rt = dev.header.refcount_table_offset
        cs = dev.cs
    # leak two clusters: grow the file by two and count them as used
    end = -(-os.path.getsize(path) // cs)
    with open(path, "r+b") as f:
        f.truncate((end + 2) * cs)
        f.seek(rt)
        block = int.from_bytes(f.read(8), "big")
        f.seek(block + 2 * end)
        f.write((1).to_bytes(2, "big") * 2)
    theirs = run("qemu-img", "check", "--output", "json", path, check=False)
    code, text, _ = cli("check", "--output", "json", path)
    assert code == theirs.returncode == 3
    assert json.loads(text)["leaks"] == json.loads(theirs.stdout)["leaks"] == 2
    code, text, _ = cli("check", "-r", "leaks", path)
    assert code == 0 and "2 leaked clusters" in text
    clean(path)


def test_check_and_repair_corruption(workdir):
    path = os.path.join(workdir, "c.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M")
    run("qemu-io", "-c", "write -P 1 0 256k", path)
    with diskforge.open(path) as dev:
        rt = dev.header.refcount_table_offset
    with open(path, "r+b") as f:  # a data cluster's count drops to zero
        f.seek(rt)
        block = int.from_bytes(f.read(8), "big")
        f.seek(block + 2 * 5)
        f.write(bytes(2))
    theirs = run("qemu-img", "check", "--output", "json", path, check=False)
    code, text, _ = cli("check", "--output", "json", path)
    assert code == theirs.returncode == 2
    assert json.loads(text)["corruptions"] == json.loads(theirs.stdout)["corruptions"]
    # the count of zero would let a write reuse the cluster: -r all rebuilds the counts
    code, text, _ = cli("check", "-r", "all", path)
    assert code == 0, text
    clean(path)
    run("qemu-io", "-c", "read -P 1 0 256k", path)


def test_dirty_image_repaired_before_writing(workdir):
    path = os.path.join(workdir, "d.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M")
    run("qemu-io", "-c", "write -P 5 0 1M", "-c", "abort", path, check=False)
    assert qemu_img_json("info", path)["dirty-flag"] is True
    with diskforge.open(path, writable=True) as dev:
        dev.write(2 * MIB, b"\x06" * 65536)
    assert qemu_img_json("info", path)["dirty-flag"] is False
    clean(path)
    run("qemu-io", "-c", "read -P 5 0 1M", "-c", "read -P 6 2M 64k", path)


def test_corrupt_bit_refuses_writes(workdir):
    path = os.path.join(workdir, "k.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))  # incompatible_features: corrupt
    with diskforge.open(path) as dev:  # reading still works, as with qemu
        assert dev.read(0, 512) == bytes(512)
        assert dev.info().format_specific["corrupt"] is True
    code, _, err = cli("resize", path, "2M")
    one_line_error(code, err)
    assert "marked corrupt" in err
    assert cli("check", "-r", "all", path)[0] == 0
    assert qemu_img_json("info", path)["format-specific"]["data"]["corrupt"] is False
    assert cli("resize", path, "2M")[0] == 0


def test_bitmaps_are_kept_and_track_writes(workdir):
    path = os.path.join(workdir, "b.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "8M")
    run("qemu-img", "bitmap", "--add", "-g", "64k", path, "track")
    run("qemu-img", "bitmap", "--add", "-g", "64k", "--disable", path, "frozen")
    with diskforge.open(path, writable=True) as dev:
        dev.write(3 * MIB + 5, b"x" * 100)
        dev.write_zeroes(6 * MIB, 128 * 1024)
    clean(path)
    info = qemu_img_json("info", path)["format-specific"]["data"]["bitmaps"]
    assert {b["name"]: b["flags"] for b in info} == {"track": ["auto"], "frozen": []}
    # qemu sees exactly the written ranges in the enabled bitmap: export it over NBD
    # and map it (x-dirty-bitmap reports dirty areas as "data": false)
    need("qemu-nbd")
    import subprocess
    import time
    sock = os.path.join(workdir, "nbd.sock")
    server = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", sock, "-f", "qcow2", "-B",
                               "track", path], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        mapped = json.loads(run(
            "qemu-img", "map", "--output", "json", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},"
            "x-dirty-bitmap=qemu:dirty-bitmap:track").stdout)
    finally:
        server.terminate()
        server.wait()
    dirty = [(e["start"], e["length"]) for e in mapped if not e["data"]]
    assert dirty == [(3 * MIB, 64 * 1024), (6 * MIB, 128 * 1024)]
    with diskforge.open(path) as dev:
        assert dev.read(3 * MIB + 5, 100) == b"x" * 100
    # resize keeps them, as qemu-img resize does (tests/test_qcow2_bitmaps.py)
    assert cli("resize", path, "16M")[0] == 0
    clean(path)


@pytest.mark.parametrize("make", [["-c"], []])
def test_check_report_reads_as_qemu_img_check(workdir, make):
    """The human report, summary line included: fragmented and compressed clusters are
    shares of the allocated ones; an image with nothing allocated has no summary."""
    src = os.path.join(workdir, "s.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20) + b"text " * 100000)
    path = os.path.join(workdir, "r.qcow2")
    run("qemu-img", "convert", *make, "-O", "qcow2", src, path)
    empty = os.path.join(workdir, "e.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", empty, "4M")
    for p in (path, empty):
        code, text, _ = cli("check", p)
        assert (code, text) == (0, run("qemu-img", "check", p).stdout)
