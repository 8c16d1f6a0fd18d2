"""DMG (UDIF) reading: every real hdiutil-made sample flattens to its known contents,
every chunk type is met, extents stay sparse, reads touch only their chunks, verify
checks the three kinds of checksum, and malformed or hostile files fail in one line."""

import csv
import json
import os
import random
import resource
import shutil

import pytest
from conftest import REAL, cli, cli_process, need_real, one_line_error, sha256_file
from dmgutil import chunk, fixture_path, fixture_rows, mish, read_dmg, rewrite, set_chunk, \
    set_mish

import diskforge
from diskforge.blockdev import ExtentKind
from diskforge.formats.dmg import codecs

FLAT = [r for r in fixture_rows() if r["flat_sha256"]]


@pytest.mark.parametrize("row", FLAT, ids=[os.path.basename(r["file"]) for r in FLAT])
def test_real_dmg_converts_to_its_known_contents(row, workdir):
    path = fixture_path(row["file"], workdir)
    assert sha256_file(path) == row["sha256"]  # the fixture is the upstream file
    out = os.path.join(workdir, "flat.raw")
    code, _, err = cli("convert", "-O", "raw", path, out)
    assert code == 0, err
    assert os.path.getsize(out) == int(row["flat_size"])
    assert sha256_file(out) == row["flat_sha256"]
    code, out_text, err = cli("verify", path)
    assert code == 0, out_text + err


def test_every_real_dmg_with_expected_contents_is_covered():
    expected = need_real("EXPECTED.tsv")
    with open(expected) as f:
        real = {r["local_path"]: r for r in csv.DictReader(f, delimiter="\t")
                if r["local_path"].startswith("dmg/")}
    ours = {r["file"].removesuffix(".gz") if r["storage"] == "gzlocal" and
            not os.path.exists(os.path.join(REAL, r["file"])) else r["file"]: r for r in FLAT}
    assert real, "no DMG rows in EXPECTED.tsv"
    for path, row in real.items():
        assert path in ours, f"{path} is not among the DMG fixtures"
        assert (ours[path]["flat_size"], ours[path]["flat_sha256"]) == \
            (row["flat_size_bytes"], row["flat_sha256"])


def test_the_fixtures_cover_every_chunk_type(workdir):
    seen = set()
    for row in FLAT:
        with diskforge.open(fixture_path(row["file"], workdir)) as dev:
            for entry in dev.fork.blkx:
                seen.update(c[0] for c in entry.chunks)
    assert {codecs.ZERO_FILL, codecs.RAW, codecs.IGNORE, codecs.ADC, codecs.ZLIB,
            codecs.BZIP2, codecs.LZFSE, codecs.LZMA, codecs.COMMENT,
            codecs.TERMINATOR} <= seen


def test_zero_fill_and_ignore_chunks_are_zero_extents_and_stay_sparse(workdir):
    path = fixture_path("dmg/dfvfs_hfsplus_zlib_UDZO.dmg", workdir)
    with diskforge.open(path) as dev:
        assert dev.format == "dmg"
        extents = list(dev.extents())
        zero = sum(e.length for e in extents if e.kind is ExtentKind.ZERO)
        assert zero >= 860000  # the zero-fill chunks (1686 sectors) and the free space
        assert sum(e.length for e in extents) == dev.size
        # every ZERO extent reads as zeros
        for e in extents:
            if e.kind is ExtentKind.ZERO:
                assert dev.read(e.offset, e.length) == bytes(e.length)
    out = os.path.join(workdir, "flat.raw")
    assert cli("convert", "-O", "raw", path, out)[0] == 0
    assert os.stat(out).st_blocks * 512 < os.path.getsize(out) - 800000


def test_random_reads_decompress_only_the_chunks_they_touch(workdir, monkeypatch):
    path = fixture_path("dmg/dmgwiz_input_zlib.dmg", workdir)
    flat = os.path.join(workdir, "flat.raw")
    assert cli("convert", "-O", "raw", path, flat)[0] == 0
    data = open(flat, "rb").read()
    calls = []
    real = codecs.decompress
    monkeypatch.setattr(codecs, "decompress",
                        lambda kind, src, size: calls.append(size) or real(kind, src, size))
    with diskforge.open(path) as dev:
        dev._read_ahead = lambda i: None  # count only what the reads themselves need
        assert dev.read(20480 + 1000, 100) == data[21480:21580]  # inside the big chunk
        assert len(calls) == 1
        assert dev.read(20480 + 5000, 3000) == data[25480:28480]  # same chunk: cached
        assert len(calls) == 1
        for off, n in [(0, 512), (511, 2), (17407, 3000), (1 << 20, 1 << 20),
                       (len(data) - 700, 700), (3, len(data) - 3)]:
            assert dev.read(off, n) == data[off:off + n]


def test_reads_from_several_threads_at_once(workdir):
    from concurrent.futures import ThreadPoolExecutor
    path = fixture_path("dmg/keramics_hfsplus_adc_UDCO.dmg", workdir)
    flat = os.path.join(workdir, "flat.raw")
    assert cli("convert", "-O", "raw", path, flat)[0] == 0
    data = open(flat, "rb").read()
    rng = random.Random(4)
    ranges = [(rng.randrange(len(data) - 70000), rng.randrange(1, 70000)) for _ in range(200)]
    with diskforge.open(path) as dev, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: dev.read(r[0], r[1]), ranges))
    assert all(g == data[o:o + n] for g, (o, n) in zip(got, ranges))


def test_info_lists_blkx_partitions_and_the_partition_map(workdir):
    path = fixture_path("dmg/dfvfs_hfsplus_zlib_UDZO.dmg", workdir)
    code, out, err = cli("info", "--details", "--output", "json", path)
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "dmg" and info["virtual-size"] == 1954304
    spec = info["format-specific"]["data"]
    assert spec["variant"] == "UDZO"
    names = [b["name"] for b in spec["blkx"]]
    assert names[0] == "Protective Master Boot Record (MBR : 0)"
    assert "disk image (Apple_HFS : 4)" in names
    hfs = spec["blkx"][names.index("disk image (Apple_HFS : 4)")]
    assert (hfs["start"], hfs["length"]) == (40 * 512, 3744 * 512)
    assert info["partitions"]["scheme"] == "gpt"
    assert info["partitions"]["partitions"][0]["start"] == 40 * 512
    assert info["diskforge"]["resources"]["plst"][0]["size"] == 1032
    code, out, _ = cli("info", "--details", path)
    assert "disk image (Apple_HFS : 4)" in out and "Partition table: GPT" in out
    code, out, _ = cli("info", path)  # qemu-img's lines only
    assert "disk image (Apple_HFS : 4)" in out and "Partition table" not in out


def test_legacy_image_with_data_offsets_and_comments(workdir):
    # blkx DataOffset != 0, comment chunks, a legacy resource fork beside the XML
    path = fixture_path("dmg/dmgwiz_input_non_null_data_offset.dmg", workdir)
    with diskforge.open(path) as dev:
        assert any(e.table.DataOffset for e in dev.fork.blkx)
        info = dev.info()
        assert info.details["rsrc-fork-length"] > 0
        assert info.format_specific["blkx"][0]["name"] == "DDM"


def test_encrypted_dmg_is_refused_plainly(workdir):
    path = fixture_path("dmg/dmgwiz_input_aes256.dmg", workdir)
    code, _, err = cli("info", path)
    one_line_error(code, err)
    assert "encrypted DMG is not supported" in err
    aea = os.path.join(workdir, "x.dmg")
    with open(aea, "wb") as f:
        f.write(b"AEA1" + os.urandom(8192))
    code, _, err = cli("convert", "-O", "raw", aea, os.path.join(workdir, "o.raw"))
    one_line_error(code, err)
    assert "encrypted DMG is not supported" in err


# -- verify -----------------------------------------------------------------------------------

def test_verify_catches_one_flipped_byte_in_the_data_fork(workdir):
    src = fixture_path("dmg/dmgwiz_input_bzip2.dmg", workdir)  # has a data-fork CRC
    for offset, expect in [(100, "data fork CRC-32"), (2000, "data fork CRC-32")]:
        bad = os.path.join(workdir, "bad.dmg")
        shutil.copy(src, bad)
        with open(bad, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x40]))
        code, out, err = cli("verify", bad)
        assert code == 2, out + err
        assert expect in out
    code, out, _ = cli("verify", "--output", "json", bad)
    assert code == 2 and json.loads(out)["verified"] is False


def test_verify_without_a_data_fork_checksum_still_checks_each_blkx(workdir):
    # recent hdiutil leaves the data-fork checksum out: the blkx CRC-32s catch damage
    src = fixture_path("dmg/keramics_hfsplus_zlib_UDZO.dmg", workdir)
    with diskforge.open(src) as dev:
        assert dev.koly.DataChecksum.Type == 0
        i = max(range(len(dev.map)), key=lambda k: dev.map.length[k])
        where = dev.map.offset[i] + dev.map.length[i] // 2
    bad = os.path.join(workdir, "bad.dmg")
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        f.seek(where)
        b = f.read(1)
        f.seek(where)
        f.write(bytes([b[0] ^ 0xFF]))
    code, out, _ = cli("verify", bad)
    assert code == 2 and "blkx entry" in out


def test_verify_checks_the_master_checksum(workdir):
    src = fixture_path("dmg/dmgwiz_input_zlib.dmg", workdir)
    _, koly, _ = read_dmg(src)
    ck = dict(koly.MasterChecksum)
    ck.pop("_io", None)
    ck["Data"] = b"\x12\x34\x56\x78" + bytes(124)
    bad = rewrite(src, os.path.join(workdir, "bad.dmg"), koly_changes={"MasterChecksum": ck})
    code, out, _ = cli("verify", bad)
    assert code == 2 and "master CRC-32 is" in out


def test_verify_on_a_format_without_checksums_is_an_error(workdir):
    raw = os.path.join(workdir, "d.raw")
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
    code, _, err = cli("verify", raw)
    one_line_error(code, err)
    assert code == 1


# -- malformed and hostile files ------------------------------------------------------------

ZLIB_DMG = "dmg/dmgwiz_input_zlib.dmg"


def _big_chunk(plist):
    """(blkx index, chunk index) of the largest zlib chunk."""
    best = None
    for i, entry in enumerate(plist["resource-fork"]["blkx"]):
        data = mish(plist, i)
        for j in range(int.from_bytes(data[200:204], "big")):
            c = chunk(data, j)
            if c[0] == codecs.ZLIB and (best is None or c[3] > best[2]):
                best = (i, j, c[3])
    return best[:2]


def _mutate_chunk(field: int, value):
    def mutate(plist):
        i, j = _big_chunk(plist)
        data = mish(plist, i)
        c = chunk(data, j)
        c[field] = value(c) if callable(value) else value
        set_chunk(data, j, c)
        set_mish(plist, i, data)
    return mutate


def _mutate_header(offset: int, fmt_bytes: bytes, index: int = 0):
    def mutate(plist):
        data = mish(plist, index)
        data[offset:offset + len(fmt_bytes)] = fmt_bytes
        set_mish(plist, index, data)
    return mutate


def _gigabyte(plist):
    """A zlib chunk (and its table) declaring 8 GiB of output."""
    i, j = _big_chunk(plist)
    data = mish(plist, i)
    c = chunk(data, j)
    c[3] = (8 << 30) // 512
    set_chunk(data, j, c)
    data[16:24] = c[3].to_bytes(8, "big")  # BLKXTable.SectorCount
    set_mish(plist, i, data)


def _overlap(plist):
    blkx = plist["resource-fork"]["blkx"]
    blkx.append(dict(blkx[-1]))  # the same sectors described twice


def _limited(argv, workdir):
    """Run the CLI in a child limited to 1 GiB of address space: a giant allocation
    would fail there (and show as an internal error, not a one-line format error)."""
    limit = 1 << 30
    proc = cli_process(*argv, cwd=workdir, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_AS, (limit, limit)))
    return proc.returncode, proc.stderr


BAD = {
    "truncated-trailer": (None, "the trailer is cut off"),
    "short-file": (None, "too short for a UDIF trailer"),
    "data-fork-past-eof": ({"koly": {"DataForkLength": 1 << 40}}, "runs past the end"),
    "xml-past-eof": ({"koly": {"XMLLength": 1 << 33}}, "past the end"),
    "xml-garbage": ("garbage", "property list is not valid"),
    "absurd-chunk-count": (_mutate_header(200, b"\xff\xff\xff\xff"),
                           "do not fit in blkx entry"),
    "absurd-sector-count": (_mutate_header(16, b"\x7f" + b"\xff" * 7),
                            "beyond any disk"),
    "absurd-chunk-offset": (_mutate_chunk(4, 1 << 50), "outside the data fork"),
    "gigabyte-chunk": (_gigabyte, "more than the 64 MiB"),
    "overlapping-tables": (_overlap, "chunk tables overlap"),
    "bomb-chunk": (_mutate_chunk(3, lambda c: c[3] // 2), "more than its declared"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_dmg_gives_one_line_error(case, workdir):
    src = fixture_path(ZLIB_DMG, workdir)
    how, message = BAD[case]
    bad = os.path.join(workdir, "bad.dmg")
    data = open(src, "rb").read()
    if case == "truncated-trailer":
        open(bad, "wb").write(data[:-100])
    elif case == "short-file":
        open(bad, "wb").write(data[-300:])
    elif how == "garbage":
        rewrite(src, bad)
        data, koly, _ = read_dmg(bad)
        body = bytearray(data)
        body[koly.XMLOffset:koly.XMLOffset + 64] = b"<plist><dict><key>x".ljust(64)
        open(bad, "wb").write(bytes(body))
    elif isinstance(how, dict):
        rewrite(src, bad, koly_changes=how["koly"])
    else:
        rewrite(src, bad, how)
    out = os.path.join(workdir, "out.raw")
    forced = ["-f", "dmg"] if case == "short-file" else []
    code, err = _limited(["convert", "-O", "raw", *forced, bad, out], workdir)
    one_line_error(code, err)
    assert message in err, err
    assert "internal error" not in err
    assert not os.path.exists(out)
