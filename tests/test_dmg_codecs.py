"""DMG chunk codecs: the ADC decoder against known vectors, bounded decompression
(bombs), the LZFSE block walk, and the CRC-32 arithmetic the writer relies on."""

import bz2
import lzma
import os
import random
import struct
import zlib

import lzfse
import pytest

from diskforge.formats.dmg import codecs
from diskforge.formats.dmg.adc import AdcError, adc_decompress
from diskforge.formats.dmg.crc import crc32_combine, crc32_zeros

# -- ADC ----------------------------------------------------------------------------------

ADC_VECTORS = [
    # the example of the Rust `adc` crate's documentation: literal, 2-byte match at
    # distance 1 (a run), 3-byte match at distance 7 -- output worked out by hand
    (bytes([0x83, 0xFE, 0xED, 0xFA, 0xCE, 0x00, 0x00, 0x40, 0x00, 0x06]),
     bytes.fromhex("feedface cececefe edface")),
    # a single literal byte, and the longest literal run (128 bytes)
    (bytes([0x80, 0x41]), b"A"),
    (bytes([0xFF]) + bytes(range(128)), bytes(range(128))),
    # 2-byte match: length ((b >> 2) & 15) + 3 = 18 (the longest), distance 2
    (bytes([0x81]) + b"ab" + bytes([0x3C, 0x01]), b"ab" + b"ab" * 9),
    # 3-byte match: length (b & 0x3f) + 4 = 67 (the longest), distance 3
    (bytes([0x82]) + b"xyz" + bytes([0x7F, 0x00, 0x02]), b"xyz" + (b"xyz" * 23)[:67]),
    # 2-byte match with a 10-bit distance: 0x101 + 1 = 258 bytes back
    (bytes([0xFF]) + bytes(128) + bytes([0xFF]) + bytes(range(1, 129)) + bytes([0x81])
     + b"QR" + bytes([0x01, 0x01]),
     bytes(128) + bytes(range(1, 129)) + b"QR" + bytes(3)),
]


@pytest.mark.parametrize("src,out", ADC_VECTORS)
def test_adc_known_vectors(src, out):
    assert adc_decompress(src, len(out)) == out


def test_adc_match_reaches_far_back():
    # 3-byte form: distance 0x1234 + 1 = 4661 bytes back, through literal runs
    data = os.urandom(5000)
    src = bytearray()
    for i in range(0, len(data), 128):
        part = data[i:i + 128]
        src += bytes([0x80 | (len(part) - 1)]) + part
    src += bytes([0x40 | 6, 0x12, 0x34])  # length 10
    out = adc_decompress(bytes(src), 5010)
    assert out[5000:] == data[5000 - 4661:5000 - 4661 + 10]


@pytest.mark.parametrize("src,size,message", [
    (bytes([0x85, 1, 2]), 6, "goes past the end"),          # literal run cut off
    (bytes([0x80, 1, 0x40, 0]), 5, "cut off"),               # 3-byte token cut off
    (bytes([0x80, 1, 0x00]), 4, "cut off"),                  # 2-byte token cut off
    (bytes([0x00, 0x05]), 3, "before the start"),            # reference before output
    (bytes([0x80, 1, 0x3C, 0x00]), 5, "more than its declared"),  # a bomb, per token
    (bytes([0x80, 1]), 512, "not the declared 512"),         # too short
])
def test_adc_rejects_bad_streams(src, size, message):
    with pytest.raises(AdcError, match=message):
        adc_decompress(src, size)


def test_adc_bomb_stops_at_the_declared_size():
    # 3 bytes per 67 output bytes forever: decoding stops one token past the limit
    src = bytes([0x80, 7]) + bytes([0x7F, 0, 0]) * 100000
    with pytest.raises(AdcError, match="more than its declared 4096"):
        adc_decompress(src, 4096)


# -- bounded decompression --------------------------------------------------------------------

TEXT = b"the quick brown fox jumps over the lazy dog " * 30000


@pytest.mark.parametrize("kind,pack", [
    (codecs.ZLIB, lambda d: zlib.compress(d, 6)),
    (codecs.BZIP2, lambda d: bz2.compress(d, 9)),
    (codecs.LZMA, lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE)),
    (codecs.LZFSE, lzfse.compress),
], ids=["zlib", "bzip2", "lzma", "lzfse"])
def test_every_codec_round_trips_and_refuses_more_or_less(kind, pack):
    data = TEXT[:1 << 20]
    packed = pack(data)
    assert codecs.decompress(kind, packed, len(data)) == data
    with pytest.raises(codecs.ChunkError, match="more than|declare"):
        codecs.decompress(kind, packed, len(data) - 512)   # output exceeds declared size
    with pytest.raises(codecs.ChunkError, match="not the declared|truncated"):
        codecs.decompress(kind, packed, len(data) + 512)
    with pytest.raises(codecs.ChunkError):
        codecs.decompress(kind, packed[:len(packed) // 2], len(data))  # truncated
    with pytest.raises(codecs.ChunkError):
        codecs.decompress(kind, b"\x00garbage" * 10, len(data))


def test_a_zlib_bomb_costs_only_the_declared_size():
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in 64 KiB
    with pytest.raises(codecs.ChunkError, match="more than its declared 1048576"):
        codecs.decompress(codecs.ZLIB, bomb, 1 << 20)


def test_lzfse_block_walk_refuses_a_bomb_before_decoding():
    real = lzfse.compress(TEXT[:65536])
    assert codecs.lzfse_raw_size(real) == 65536
    # an uncompressed block that claims 4 GiB, then the end marker
    bomb = b"bvx-" + struct.pack("<I", 0xFFFFFFF0) + b"x" * 16 + b"bvx$"
    with pytest.raises(codecs.ChunkError, match="runs past the chunk"):
        codecs.lzfse_raw_size(bomb)
    lying = b"bvxn" + struct.pack("<II", 1 << 31, 4) + b"abcd" + b"bvx$"
    assert codecs.lzfse_raw_size(lying) == 1 << 31
    with pytest.raises(codecs.ChunkError, match="declare 2147483648"):
        codecs.decompress(codecs.LZFSE, lying, 1 << 20)
    with pytest.raises(codecs.ChunkError, match="no end-of-stream"):
        codecs.lzfse_raw_size(real[:-4])


# -- CRC-32 arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 511, 512, 4096, 1 << 20, (1 << 20) + 7])
def test_crc32_combine_and_zeros_match_zlib(n):
    a, b = os.urandom(1000), os.urandom(n)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n) == zlib.crc32(a + b)
    assert crc32_zeros(zlib.crc32(a), n) == zlib.crc32(a + bytes(n))


def test_crc32_combine_over_many_lengths_and_registers():
    """Every byte lane of the shift tables, through registers of every shape."""
    rng = random.Random(3)
    for _ in range(64):
        a, b = rng.randbytes(rng.randint(1, 64)), rng.randbytes(rng.randint(1, 70000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_zeros_of_a_huge_run_is_instant():
    # 1 TiB of zeros: the CRC without the bytes (checked against a chained computation)
    tib = 1 << 40
    assert crc32_zeros(0, tib) == crc32_zeros(crc32_zeros(0, tib // 2), tib // 2)
