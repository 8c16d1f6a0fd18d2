"""Hostile Apple images, crafted here: a decompression bomb per codec in a DMG chunk,
property lists that are huge, deep or declare entities, sparse bundles symlinked out of
themselves or claiming an exabyte in 512-byte bands, and names that carry control
characters. Each runs ``diskforge`` in a child (tests/bounded.py): one line naming the
file, structure and field, a non-zero exit, no traceback, seconds and a bounded peak
RSS; names are printed escaped."""

from __future__ import annotations

import bz2
import lzma
import os
import plistlib
import re
import shutil
import struct
import zlib

import lzfse
import pytest
from bounded import PEAK_LIMIT, assert_one_line, run_bounded
from conftest import FIXTURES, cli

from diskforge.formats.dmg import codecs, udif

MIB = 1 << 20
SKELETON = os.path.join(FIXTURES, "dmg", "sparsebundle_skeleton", "hfsplus.sparsebundle")


def make_dmg(path: str, kind: int, stored: bytes, sectors: int, *,
             name: str = "disk image (Apple_HFS : 0)", xml_extra: bytes = b"") -> str:
    """A UDIF image of one blkx entry holding one chunk of ``kind`` that covers
    ``sectors`` sectors and stores ``stored`` (no checksums: type 0 everywhere)."""
    none = {"Type": 0, "Size": 0, "Data": bytes(128)}
    table = udif.BLKXTable.build(dict(
        Version=1, SectorNumber=0, SectorCount=sectors, DataOffset=0, BuffersNeeded=2048,
        BlockDescriptors=0, Reserved=bytes(24), Checksum=none, NumberOfBlockChunks=2))
    table += udif.CHUNK_STRUCT.pack(kind, 0, 0, sectors, 0, len(stored))
    table += udif.CHUNK_STRUCT.pack(codecs.TERMINATOR, 0, sectors, 0, len(stored), 0)
    xml = plistlib.dumps({"resource-fork": {"blkx": [
        {"Attributes": "0x0050", "CFName": name, "Data": table, "ID": "0", "Name": name}]}})
    if xml_extra:
        xml = xml.replace(b"<dict>", b"<dict>" + xml_extra, 1)
    koly = udif.UDIFResourceFile.build(dict(
        Version=4, HeaderSize=512, Flags=1, RunningDataForkOffset=0, DataForkOffset=0,
        DataForkLength=len(stored), RsrcForkOffset=0, RsrcForkLength=0, SegmentNumber=1,
        SegmentCount=1, SegmentID=bytes(16), DataChecksum=none, XMLOffset=len(stored),
        XMLLength=len(xml), Reserved1=bytes(120), MasterChecksum=none, ImageVariant=1,
        SectorCount=sectors, Reserved2=0, Reserved3=0, Reserved4=0))
    with open(path, "wb") as f:
        f.write(stored + xml + koly)
    return path


def lzfse_bomb() -> bytes:
    """1,500 LZFSE blocks, each declaring 1 byte (``n_raw_bytes``) and decoding to
    1 MiB of zeros: 1.1 MB that the reference decoder would make 1.5 GiB of (its
    compressed blocks ignore ``n_raw_bytes``)."""
    block = lzfse.compress(bytes(MIB))
    assert block[:4] == b"bvx2" and block.endswith(b"bvx$")
    block = block[:4] + struct.pack("<I", 1) + block[8:-4]
    return block * 1500 + b"bvx$"


BOMBS = {   # codec: (chunk type, stored bytes); every chunk declares 1 MiB
    "zlib": lambda: (codecs.ZLIB, zlib.compress(bytes(32 * MIB), 9)),
    "bzip2": lambda: (codecs.BZIP2, bz2.compress(bytes(32 * MIB), 9)),
    "lzma": lambda: (codecs.LZMA, lzma.compress(bytes(32 * MIB), format=lzma.FORMAT_XZ,
                                                check=lzma.CHECK_NONE, preset=1)),
    "adc": lambda: (codecs.ADC, b"\x80\x00" + b"\x7f\x00\x00" * 300_000),  # 20 MB
    "lzfse": lambda: (codecs.LZFSE, lzfse_bomb()),
}


@pytest.mark.parametrize("codec", sorted(BOMBS))
def test_a_bomb_in_a_chunk_costs_only_the_declared_size(codec, tmp_path):
    kind, stored = BOMBS[codec]()
    bomb = make_dmg(str(tmp_path / "bomb.dmg"), kind, stored, MIB // 512)
    out = tmp_path / "out.raw"
    res = run_bounded("convert", "-O", "raw", bomb, str(out))
    assert_one_line(res, "bomb.dmg", "BLKXChunkEntry",
                    "more than its declared 1048576 bytes")
    assert not out.exists()
    # an honest chunk of the same declared size decodes (the bound refuses only more)
    if codec == "zlib":
        good = make_dmg(str(tmp_path / "good.dmg"), kind, zlib.compress(bytes(MIB)),
                        MIB // 512)
        assert cli("convert", "-O", "raw", good, str(out))[0] == 0
        assert out.read_bytes() == bytes(MIB)


def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch):
    """A valid 64 MiB chunk (the most one may declare) in a 150 MiB address space: the
    MemoryError is reported once its except block has ended (inside it, the traceback
    still held what filled memory and even the message failed to build). With the
    standard library's zlib, whose output buffer this overflows (zlib-ng's binding
    inflates it in less memory, and the convert succeeds)."""
    monkeypatch.setenv("DISKFORGE_INFLATE", "zlib")
    big = make_dmg(str(tmp_path / "big.dmg"), codecs.ZLIB,
                   zlib.compress(bytes(64 * MIB), 9), 64 * MIB // 512)
    res = run_bounded("convert", "-O", "raw", big, str(tmp_path / "o.raw"),
                      address_space=150 * MIB)
    assert_one_line(res, "out of memory")
    assert not (tmp_path / "o.raw").exists()


def test_lzfse_blocks_that_decode_to_more_than_they_declare_are_refused():
    """In-process, with the decoder itself: the header walk alone cannot see this bomb
    (every block declares 1 byte), the bounded decode does."""
    bomb = lzfse_bomb()
    assert codecs.lzfse_raw_size(bomb) == 1500
    with pytest.raises(codecs.ChunkError, match="more than its declared 1048576"):
        codecs.decompress(codecs.LZFSE, bytearray(bomb), MIB)
    real = lzfse.compress(b"abc" * 100_000)
    assert codecs.decompress(codecs.LZFSE, bytearray(real), 300_000) == b"abc" * 100_000


# -- property lists ---------------------------------------------------------------------------

def _plist_case(tmp_path, extra: bytes) -> str:
    return make_dmg(str(tmp_path / "p.dmg"), codecs.ZLIB, zlib.compress(bytes(4096)), 8,
                    xml_extra=extra)


def test_a_plist_of_64_mib_of_empty_elements_ends_in_one_line(tmp_path):
    # plistlib made tens of millions of lists of this (gigabytes), then the error
    # handler itself died in a 39-line chain of MemoryErrors
    dmg = _plist_case(tmp_path, b"<key>junk</key><array>" + b"<array/>" * (8 << 20)
                      + b"</array>")
    assert os.path.getsize(dmg) > 64 * MIB
    res = run_bounded("info", dmg)
    assert_one_line(res, "p.dmg", "plist", "more than 100000 elements")


def test_a_deeply_nested_plist_ends_in_one_line(tmp_path):
    dmg = _plist_case(tmp_path, b"<key>deep</key>" + b"<array>" * 200_000
                      + b"</array>" * 200_000)
    assert_one_line(run_bounded("info", dmg), "plist", "nested deeper than 32 levels")


def test_plist_entities_are_refused(tmp_path):
    dmg = _plist_case(tmp_path, b"")
    lol = b'<!DOCTYPE plist [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
    _rewrite_xml(dmg, lambda xml: re.sub(rb"<!DOCTYPE[^>]*>", lol, xml, count=1).replace(
        b"<key>ID</key>", b"<key>X</key><string>&b;</string><key>ID</key>", 1))
    assert lol in open(dmg, "rb").read()
    assert_one_line(run_bounded("info", dmg), "plist", "entity declarations")


# -- sparse bundles -----------------------------------------------------------------------

def _bundle(tmp_path, **info) -> str:
    path = str(tmp_path / "b.sparsebundle")
    shutil.copytree(SKELETON, path)
    plist = os.path.join(path, "Info.plist")
    d = plistlib.loads(open(plist, "rb").read())
    d.update(info)
    with open(plist, "wb") as f:
        f.write(plistlib.dumps(d))
    return path


def test_a_huge_bundle_of_tiny_bands_is_walked_by_its_bands(tmp_path):
    size = (1 << 62) - 512
    path = _bundle(tmp_path, **{"band-size": 512, "size": size})
    os.mkdir(os.path.join(path, "bands"))
    for band in (0, 0x123456789):
        with open(os.path.join(path, "bands", f"{band:x}"), "wb") as f:
            f.write(b"\xab" * 512)
    res = run_bounded("map", "--output", "json", path, timeout=30)
    assert res.code == 0 and not res.timed_out, res.err
    assert res.seconds < 20 and res.peak_rss < PEAK_LIMIT
    import json
    data = [(e["start"], e["length"]) for e in json.loads(res.out) if e["data"]]
    assert data == [(0, 512), (0x123456789 * 512, 512)]
    assert cli("info", path)[0] == 0


@pytest.mark.parametrize("part", ["Info.plist", "bands", "bands/0"])
def test_bundle_parts_symlinked_out_of_the_bundle_are_refused_when_untrusted(part, tmp_path):
    path = _bundle(tmp_path)
    os.mkdir(os.path.join(path, "bands"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / os.path.basename(part)
    if part == "bands":
        outside.mkdir()
        (outside / "0").write_bytes(b"secret" * 100)
    else:
        shutil.copy(os.path.join(path, part) if part == "Info.plist" else __file__,
                    outside)
    target = os.path.join(path, part)
    if os.path.isdir(target):
        os.rmdir(target)
    elif os.path.exists(target):
        os.unlink(target)
    os.symlink(outside, target)
    # untrusted mode confines a bundle's parts; the default follows them as it follows
    # backing files (regular files, wherever they are)
    res = run_bounded("--untrusted", "info", path)
    assert_one_line(res, "outside", part.split("/")[0] if part != "bands/0" else "band")
    res = run_bounded("info", path)
    assert res.code == 0, res.err


def test_an_oversized_or_deep_info_plist_is_refused(tmp_path):
    path = _bundle(tmp_path)
    head = (b"<plist><dict><key>diskimage-bundle-type</key>"
            b"<string>com.apple.diskimage.sparsebundle</string><key>junk</key>")
    for body, words in ((b"<array>" + b"<array/>" * 300_000 + b"</array>", "larger than"),
                        (b"<array>" + b"<array/>" * 2000 + b"</array>",
                         "more than 1000 elements"),
                        (b"<array>" * 100 + b"</array>" * 100, "nested deeper")):
        with open(os.path.join(path, "Info.plist"), "wb") as f:
            f.write(head + body + b"</dict></plist>")
        assert_one_line(run_bounded("info", path), "Info.plist", words)


@pytest.mark.parametrize("encoding", ["no-such-encoding", "SHIFT_JIS"])
def test_an_unusable_xml_encoding_declaration_is_one_line(encoding, tmp_path):
    """Found by tests/fuzz_formats.py (dmg and sparsebundle): an encoding Python does
    not know raised LookupError, a multi-byte one expat cannot take ValueError, both
    shown as internal errors."""
    path = _bundle(tmp_path)
    with open(os.path.join(path, "Info.plist"), "wb") as f:
        f.write(f'<?xml version="1.0" encoding="{encoding}"?>'.encode() + b"<plist/>")
    assert_one_line(run_bounded("info", "-f", "sparsebundle", path), "Info.plist",
                    "XML encoding")
    dmg = _plist_case(tmp_path, b"")
    _rewrite_xml(dmg, lambda xml: re.sub(rb'encoding="[^"]*"',
                                         f'encoding="{encoding}"'.encode(), xml, count=1))
    assert_one_line(run_bounded("info", dmg), "plist", "XML encoding")


# -- names from inside the image ------------------------------------------------------------

def test_blkx_names_with_control_characters_are_printed_escaped(tmp_path):
    # XML 1.0 cannot carry ESC at all; a newline it carries as it is, a CR as &#13;
    dmg = make_dmg(str(tmp_path / "n.dmg"), codecs.ZLIB, zlib.compress(bytes(4096)), 8,
                   name="disk@NL@FORGED LINE@CR@ (Apple_HFS : 0)")
    _rewrite_xml(dmg, lambda xml: xml.replace(b"@NL@", b"\n").replace(b"@CR@", b"&#13;"))
    code, out, err = cli("info", dmg)
    assert code == 0, err
    assert "\r" not in out and "\nFORGED" not in out
    assert "disk\\nFORGED LINE\\r (Apple_HFS" in out
    # a checksum problem quotes the name too: make the table's CRC-32 wrong
    def wrong_crc(xml: bytes) -> bytes:
        import base64
        start = xml.index(b"<data>") + 6
        end = xml.index(b"</data>", start)
        table = bytearray(base64.b64decode(xml[start:end]))
        table[64:72] = struct.pack(">II", 2, 32)       # Checksum: a CRC-32 of 32 bits
        table[72:76] = b"\xde\xad\xbe\xef"
        return xml[:start] + base64.b64encode(bytes(table)) + xml[end:]

    _rewrite_xml(dmg, wrong_crc)
    code, out, err = cli("verify", dmg)
    assert code == 2, err
    assert "\r" not in out and "\nFORGED" not in out
    assert len(out.splitlines()) == 2 and "disk\\nFORGED LINE" in out


def _rewrite_xml(dmg: str, change) -> None:
    data = open(dmg, "rb").read()
    koly = udif.UDIFResourceFile.parse(data[-512:])
    xml = change(data[koly.XMLOffset:koly.XMLOffset + koly.XMLLength])
    fields = dict(koly)
    fields.pop("_io", None)
    fields.update(XMLLength=len(xml))
    with open(dmg, "wb") as f:
        f.write(data[:koly.XMLOffset] + xml + udif.UDIFResourceFile.build(fields))
