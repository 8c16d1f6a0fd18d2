"""Compressed images read in parallel (parallel.py): qcow2 zlib/zstd clusters, stream
VMDK grains, qcow v1 clusters and DMG chunks decode on the shared pool, in order.

Outputs are compared with qemu-img's reading of the same files (made by qemu-img) and
with the real samples' recorded contents; corrupt units in the middle of a large read
give the one-line error of the first bad unit, and the pool goes on working. That the
pool is really used is checked with its per-thread unit counter, not with timings.
"""

from __future__ import annotations

import os
import random

import pytest

import diskforge
from diskforge import parallel
from diskforge.errors import FormatError
from diskforge.formats.qcow2.structs import QCOW2_SUBCLUSTER_COMPRESSED

from conftest import cli, need, need_real, one_line_error, run, sha256_file
from roformat_helpers import expected, flat_sha256, unpacked

MIB = 1 << 20


def _source(path: str, size: int = 24 * MIB, seed: int = 17) -> str:
    """A disk of text-like, skewed-binary, random and zero extents (64 KiB aligned):
    most clusters compress, some are stored as they are, some are holes."""
    rng = random.Random(seed)
    words = b"the of and disk image cluster table qemu sector boot kernel data".split()
    text = b" ".join(rng.choice(words) for _ in range(300000))
    skew = bytes(rng.choices(range(256), weights=[40 if i in (0, 0x48, 0x89, 0xff) else 1
                                                  for i in range(256)], k=2 * MIB))
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rng.randint(1, 24) * 65536, size - pos)
            kind = rng.choice(["text", "text", "skew", "skew", "random", "zero"])
            if kind != "zero":
                pool = text if kind == "text" else skew
                if kind == "random":
                    data = rng.randbytes(n)
                else:
                    data = (pool * (n // len(pool) + 2))[pos % 4096:pos % 4096 + n]
                f.seek(pos)
                f.write(data)
            pos += n
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _source(str(tmp_path_factory.mktemp("src") / "disk.raw"))


def _decoders(before: dict) -> dict:
    """Units decoded per thread since ``before`` (a copy of ``parallel.decoded_by``)."""
    return {k: v - before.get(k, 0) for k, v in parallel.decoded_by.items()
            if v - before.get(k, 0) > 0}


def _compressed_clusters(path: str) -> list[tuple[int, int]]:
    """(guest offset, L2 entry) of every compressed cluster of a qcow2 image."""
    with diskforge.open(path) as dev:
        return [(g, host) for g, _, kind, host in dev.runs(0, dev.size)
                if kind == QCOW2_SUBCLUSTER_COMPRESSED]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_qcow2_compressed_reads_match_qemu_img_and_use_the_pool(tmp_path, source, ctype):
    need("qemu-img")
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
        source, img)
    assert len(_compressed_clusters(img)) > 100
    theirs = str(tmp_path / "qemu.raw")
    run("qemu-img", "convert", "-O", "raw", img, theirs)
    before = dict(parallel.decoded_by)
    with parallel.limit(2):
        ours = str(tmp_path / "ours.raw")
        assert cli("convert", "-O", "raw", img, ours)[0] == 0
    assert sha256_file(ours) == sha256_file(theirs) == sha256_file(source)
    used = _decoders(before)
    # the caller decodes too; the point is that pool threads did as well
    assert any(name.startswith("diskforge-decode") for name in used), used
    assert len(used) >= 2, used
    # one thread: the same bytes, and no pool thread decodes
    before = dict(parallel.decoded_by)
    one = str(tmp_path / "one.raw")
    assert cli("convert", "-m", "1", "-O", "raw", img, one)[0] == 0
    assert sha256_file(one) == sha256_file(theirs)
    assert not any(name.startswith("diskforge-decode") for name in _decoders(before))


def test_reads_of_every_size_and_offset_agree(tmp_path, source):
    """Small reads (the one-cluster cache), reads starting and ending inside clusters
    (the batch path's cache of its last partial cluster), large ones."""
    need("qemu-img")
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, img)
    data = open(source, "rb").read()
    rng = random.Random(3)
    with diskforge.open(img) as dev:
        for _ in range(150):
            off = rng.randrange(len(data))
            n = min(len(data) - off, rng.choice([1, 512, 4096, 70000, 300000, 3 * MIB]))
            assert dev.read(off, n) == data[off:off + n], (off, n)


def _corrupt(path: str, entry: int, garbage: bytes) -> None:
    """Overwrite the start of a compressed cluster's bytes."""
    with diskforge.open(path) as dev:
        off, _ = dev.geo.compressed_range(entry)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(garbage)


def test_a_corrupt_cluster_mid_read_is_the_one_line_error_and_nothing_hangs(tmp_path,
                                                                            source):
    need("qemu-img")
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, img)
    clusters = _compressed_clusters(img)
    # two bad clusters close together (in one 1 MiB batch if possible), mid-disk
    mid = len(clusters) // 2
    (g1, e1), (g2, e2) = clusters[mid], clusters[mid + 3]
    _corrupt(img, e1, b"\xff" * 64)
    _corrupt(img, e2, b"\xfe" * 64)
    out = str(tmp_path / "out.raw")
    code, _, err = cli("convert", "-O", "raw", img, out)
    one_line_error(code, err)
    assert "L2 entry" in err and os.path.basename(img) in err
    assert f"guest offset {g1:#x}" in err, err   # the first bad cluster, every time
    assert not os.path.exists(out)
    with diskforge.open(img) as dev, parallel.limit(2):
        start = g1 - g1 % MIB - MIB if g1 >= 2 * MIB else 0
        assert start <= g1 < g2 < start + 4 * MIB   # both bad clusters in each read
        for _ in range(20):  # in order, whichever thread finished first
            with pytest.raises(FormatError) as e:
                dev.read(start, min(dev.size - start, 4 * MIB))
            assert f"guest offset {g1:#x}" in str(e.value)
        # the pool still works, and the clusters around the bad ones read
        good = clusters[mid - 40][0]
        data = open(source, "rb").read()
        n = min(g1 - good, 2 * MIB)
        assert n > 0 and dev.read(good, n) == data[good:good + n]
        assert dev.read(g2 + 65536, 65536) == data[g2 + 65536:g2 + 131072]


def test_sequential_reads_decode_ahead_and_report_errors_in_their_turn(tmp_path,
                                                                       source):
    """A reader walking forward (as convert does) has the next read decoded ahead: the
    bytes are the same, a corrupt cluster ahead is reported by the read that covers
    it (not earlier), and a shorter read than the one decoded ahead is served too."""
    need("qemu-img")
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, img)
    data = open(source, "rb").read()
    with diskforge.open(img) as dev, parallel.limit(2):
        before = dict(parallel.decoded_by)
        for off in range(0, dev.size, MIB):
            n = min(MIB, dev.size - off)
            assert dev.read(off, n) == data[off:off + n], off
        assert any(k.startswith("diskforge-decode") for k in _decoders(before))
        # a read shorter than the one decoded ahead (an extent ending mid-batch)
        dev.read(0, MIB)
        dev.read(MIB, MIB)
        assert dev._ahead is not None
        assert dev.read(2 * MIB, MIB // 2 + 4096) == data[2 * MIB:2 * MIB + MIB // 2 + 4096]
    clusters = _compressed_clusters(img)
    g1, e1 = clusters[len(clusters) // 2]
    _corrupt(img, e1, b"\xff" * 64)
    with diskforge.open(img) as dev, parallel.limit(2):
        bad_batch = g1 - g1 % MIB
        for off in range(0, bad_batch, MIB):
            assert dev.read(off, MIB) == data[off:off + MIB], off
        assert dev._ahead is not None and dev._ahead.keys[0][0] >= bad_batch
        with pytest.raises(FormatError) as e:
            dev.read(bad_batch, MIB)
        assert f"guest offset {g1:#x}" in str(e.value)
        # and on past it: the device and the pool go on working
        off = bad_batch + MIB
        assert dev.read(off, MIB) == data[off:off + MIB]


def test_a_cluster_past_the_end_of_the_file_is_reported_after_earlier_bad_ones(tmp_path,
                                                                                source):
    """A bad L2 entry (caught before decoding) and a corrupt cluster before it in the
    same read: the corrupt one's error, as a loop over the clusters would give."""
    need("qemu-img")
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, img)
    with diskforge.open(img) as dev:
        comp = [(g, e) for g, _, kind, e in dev.runs(0, dev.size)
                if kind == QCOW2_SUBCLUSTER_COMPRESSED]
        # two compressed clusters in one L2 table, a few apart
        (g1, e1), (g2, _) = next((a, b) for a, b in zip(comp, comp[4:])
                                 if b[0] - a[0] <= 8 * 65536)
        l1 = dev.l1[g2 >> (dev.cluster_bits + dev.l2_bits)] & ((1 << 56) - 512)
        l2 = l1 + 8 * ((g2 >> dev.cluster_bits) & (dev.l2_entries - 1))
        size = os.path.getsize(img)
        entry2 = dev.l2_table(l1)[(g2 >> dev.cluster_bits) & (dev.l2_entries - 1)]
    _corrupt(img, e1, b"\xff" * 64)
    # the second one's offset moved far past the end of the file
    bits = 62 - (dev.cluster_bits - 8)
    bad = (entry2 & ~((1 << bits) - 1)) | (size * 4)
    with open(img, "r+b") as f:
        f.seek(l2)
        f.write(bad.to_bytes(8, "big"))
    with diskforge.open(img) as dev, parallel.limit(2):
        with pytest.raises(FormatError) as e:
            dev.read(g1, g2 + 65536 - g1)
        assert f"guest offset {g1:#x}" in str(e.value) and "corrupt" in str(e.value)
        with pytest.raises(FormatError) as e:
            dev.read(g1 + 65536, g2 + 65536 - g1 - 65536)
        assert "past the end" in str(e.value)


def test_stream_vmdk_reads_match_qemu_img_and_use_the_pool(tmp_path, source):
    need("qemu-img")
    img = str(tmp_path / "s.vmdk")
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source,
        img)
    theirs = str(tmp_path / "qemu.raw")
    run("qemu-img", "convert", "-O", "raw", img, theirs)
    before = dict(parallel.decoded_by)
    ours = str(tmp_path / "ours.raw")
    with parallel.limit(2):
        assert cli("convert", "-O", "raw", img, ours)[0] == 0
    assert sha256_file(ours) == sha256_file(theirs) == sha256_file(source)
    used = _decoders(before)
    assert any(name.startswith("diskforge-decode") for name in used), used


def test_a_corrupt_stream_vmdk_grain_mid_read_is_the_one_line_error(tmp_path, source):
    need("qemu-img")
    img = str(tmp_path / "s.vmdk")
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source,
        img)
    with diskforge.open(img) as dev:
        size = dev.size
    sparse = _stream_extent(img)
    try:
        grains = [g for g in range(size // sparse.grain) if sparse.entry(g) > 1]
        g = grains[len(grains) // 2]
        at = sparse.entry(g) * 512 + 12 + 20   # inside the deflate stream
    finally:
        sparse.backend.close()
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 40)
    out = str(tmp_path / "out.raw")
    code, _, err = cli("convert", "-O", "raw", img, out)
    one_line_error(code, err)
    assert f"compressed grain {g} " in err and "GrainTable" in err, err
    with diskforge.open(img) as dev, parallel.limit(2):
        for _ in range(10):
            with pytest.raises(FormatError) as e:
                dev.read(max(0, g * 65536 - MIB), 3 * MIB)
            assert f"compressed grain {g} " in str(e.value)
    # read forward in 1 MiB steps (grains decoded ahead): the read covering the bad
    # grain reports it, the ones before it read right, and the reader goes on after
    data = open(source, "rb").read()
    with diskforge.open(img) as dev, parallel.limit(2):
        bad = g * 65536 - g * 65536 % MIB
        for off in range(0, bad, MIB):
            assert dev.read(off, MIB) == data[off:off + MIB], off
        with pytest.raises(FormatError) as e:
            dev.read(bad, MIB)
        assert f"compressed grain {g} " in str(e.value)
        if bad + 2 * MIB <= dev.size:
            assert dev.read(bad + MIB, MIB) == data[bad + MIB:bad + 2 * MIB]


def _stream_extent(path: str):
    """The SparseExtent of a monolithic stream VMDK (its one extent)."""
    from diskforge.blockdev import FileBackend
    from diskforge.formats.vmdk.sparse import open_hosted
    return open_hosted(FileBackend(path, lock=False))


@pytest.mark.parametrize("relpath", [
    "vmdk/vmdkrs_streamOptimized.vmdk",
    "vmdk/vmdkrs_streamOptimizedWithMarkers.vmdk",
])
def test_real_stream_vmdks_read_in_parallel_match_their_recorded_contents(relpath):
    path = need_real(relpath)
    with parallel.limit(2):
        assert flat_sha256(path) == expected(relpath)


@pytest.mark.parametrize("relpath", [
    "dmg/keramics_hfsplus_zlib_UDZO.dmg", "dmg/keramics_hfsplus_lzfse_ULFO.dmg",
    "dmg/keramics_hfsplus_bzip2_UDBZ.dmg", "dmg/keramics_hfsplus_lzma_ULMO.dmg",
    "dmg/dmgwiz_input_zlib.dmg", "dmg/dmgwiz_input_lzfse.dmg",
    "dmg/dmgwiz_input_bzip2.dmg", "dmg/dmgwiz_input_lzma.dmg",
    "dmg/node-udif_compression-lzfse.dmg", "dmg/hdimac_apfs_UDZO.dmg",
])
@pytest.mark.parametrize("threads", [1, 2])
def test_real_dmgs_read_ahead_on_the_pool_match_their_recorded_contents(relpath,
                                                                        threads):
    path = need_real(relpath)
    with parallel.limit(threads):
        assert flat_sha256(path) == expected(relpath)


def test_dmg_read_ahead_uses_the_shared_pool(tmp_path, source):
    img = str(tmp_path / "d.dmg")
    assert cli("convert", "-O", "dmg", "-o", "format=ULFO", source, img)[0] == 0
    before = dict(parallel.decoded_by)
    ours = str(tmp_path / "ours.raw")
    with parallel.limit(2):
        assert cli("convert", "-O", "raw", img, ours)[0] == 0
    assert sha256_file(ours) == sha256_file(source)
    used = _decoders(before)
    assert any(name.startswith("diskforge-decode") for name in used), used


def test_qcow1_compressed_clusters_read_in_parallel(tmp_path):
    relpath = "generated-local/qemu72_v1_compressed.qcow.gz"
    path = unpacked(relpath, str(tmp_path))
    before = dict(parallel.decoded_by)
    with parallel.limit(2):
        assert flat_sha256(path) == expected(relpath)
    assert sum(_decoders(before).values()) > 1


def test_thread_limits():
    assert parallel.threads() >= 1
    with parallel.limit(1):
        assert parallel.threads() == 1
        with parallel.limit(3):
            assert parallel.threads() == 3
        assert parallel.threads() == 1
    with pytest.raises(diskforge.DiskforgeError):
        with parallel.limit(0):
            pass
    code, _, err = cli("convert", "-m", "-1", "-O", "raw", "x.qcow2", "y.raw")
    assert code != 0


def test_run_raises_the_first_failing_items_error_and_skips_later_ones():
    done = []

    def fn(i):
        if i in (5, 9):
            raise ValueError(f"item {i}")
        done.append(i)

    with parallel.limit(2):
        for _ in range(20):
            done.clear()
            with pytest.raises(ValueError, match="item 5"):
                parallel.run(fn, range(200))
            assert set(range(5)) <= set(done)
            assert len(done) < 199


def test_coalesce_reads_groups_neighbouring_ranges():
    spans = [(1000, 300), (1290, 400), (1700, 100), (9000, 10), (9005, 20), (100, 5)]
    assert parallel.coalesce_reads(spans) == [
        (1000, 800, [0, 1, 2]), (9000, 25, [3, 4]), (100, 5, [5])]
    assert [g[2] for g in parallel.coalesce_reads(spans, gap=0, limit=500)] == \
        [[0], [1], [2], [3, 4], [5]]


def test_the_stdlib_zlib_fallback_reads_the_same(tmp_path, source):
    """Without zlib-ng (the ``fast`` extra) the standard library inflates: the same
    bytes, the same one-line errors."""
    from diskforge import deflate
    need("qemu-img")
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, img)
    vmdk = str(tmp_path / "s.vmdk")
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source,
        vmdk)
    deflate.use_stdlib()
    try:
        for path in (img, vmdk):
            assert flat_sha256(path)[1] == sha256_file(source)
        g, e = _compressed_clusters(img)[10]
        _corrupt(img, e, b"\xff" * 64)
        out = str(tmp_path / "out.raw")
        code, _, err = cli("convert", "-O", "raw", img, out)
        one_line_error(code, err)
        assert f"guest offset {g:#x}" in err
        assert deflate.IMPLEMENTATION == "zlib"
    finally:
        deflate.reset()
