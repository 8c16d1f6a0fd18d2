"""UDIF chunk types, and bounded decompression / compression of one chunk.

Every decoder here is given the size the chunk table declares and refuses to produce
more (a decompression bomb costs at most that much memory) or less. The declared size
itself is bounded by the reader (``MAX_CHUNK_BYTES``) before anything is decoded. zlib,
bz2 and lzma decode with ``max_length``; ADC counts per token; LZFSE is decoded by the
reference decoder into a buffer of exactly the declared size plus one byte (below: its
compressed blocks ignore the ``n_raw_bytes`` their headers declare).

Chunk types (the ``EntryType`` of a BLKXChunkEntry), as hdiutil writes them:
"""

from __future__ import annotations

import struct
import zlib

from ... import deflate
from .adc import AdcError, adc_decompress
from .structs import (ADC, BZIP2, COMMENT, IGNORE, LZFSE, LZMA, RAW, TERMINATOR,
                      ZERO_FILL, ZLIB)

NAMES = {ZERO_FILL: "zero-fill", RAW: "raw", IGNORE: "ignore", ADC: "adc", ZLIB: "zlib",
         BZIP2: "bzip2", LZFSE: "lzfse", LZMA: "lzma", COMMENT: "comment",
         TERMINATOR: "terminator"}
COMPRESSED = frozenset({ADC, ZLIB, BZIP2, LZFSE, LZMA})
STORED = COMPRESSED | {RAW}
NO_DATA = frozenset({ZERO_FILL, IGNORE})
MARKERS = frozenset({COMMENT, TERMINATOR})

# xz of hdiutil's ULMO chunks needs a few MiB; the largest preset (9, a 64 MiB
# dictionary) needs 65 MiB, and a chunk holds at most 64 MiB, so a larger dictionary is
# never of use: refuse streams asking for more than that, rather than the whole budget
LZMA_MEMLIMIT = 96 << 20


class ChunkError(ValueError):
    """One chunk does not decode to its declared size (the reader adds where)."""


def decompress(kind: int, data, size: int) -> bytes:
    """The ``size`` bytes chunk ``data`` (any buffer) of type ``kind`` decodes to."""
    try:
        if kind == ZLIB:
            d = deflate.decompressobj()
            out = d.decompress(data, size)
            if not d.eof and d.decompress(d.unconsumed_tail, 1):
                raise ChunkError(f"decompresses to more than its declared {size} bytes")
            done = d.eof
        elif kind in (BZIP2, LZMA):
            out, done = _bz2_lzma_decompress(kind, data, size)
        elif kind == LZFSE:
            declared = lzfse_raw_size(data)
            if declared > size:
                raise ChunkError(f"LZFSE blocks declare {declared} bytes, more than the"
                                 f" chunk's {size}")
            out = lzfse_decompress(data, size)
            done = True
        elif kind == ADC:
            return adc_decompress(data, size)
        else:
            raise ChunkError(f"chunk type 0x{kind:08x} is not compressed")
    except (*deflate.ERRORS, OSError, EOFError, AdcError) as e:
        raise ChunkError(f"corrupt {NAMES.get(kind, hex(kind))} data ({e})") from None
    if len(out) != size:
        raise ChunkError(f"decompresses to {len(out)} bytes, not the declared {size}")
    if not done:
        raise ChunkError(f"{NAMES[kind]} stream is truncated")
    return out


def _bz2_lzma_decompress(kind: int, data, size: int) -> tuple[bytes, bool]:
    """``(output, finished)`` of a bzip2 or xz chunk (bz2 and lzma are imported here:
    most images use neither, and every command that reads a DMG imported both)."""
    if kind == BZIP2:
        import bz2
        d = bz2.BZ2Decompressor()
        errors: tuple = ()
    else:
        import lzma
        d = lzma.LZMADecompressor(lzma.FORMAT_AUTO, memlimit=LZMA_MEMLIMIT)
        errors = (lzma.LZMAError,)
    try:
        out = d.decompress(data, size)
        if not d.eof and not d.needs_input and d.decompress(b"", 1):
            raise ChunkError(f"decompresses to more than its declared {size} bytes")
    except errors as e:
        raise ChunkError(f"corrupt {NAMES[kind]} data ({e})") from None
    return out, d.eof


# LZFSE block magics (lzfse_internal.h), little-endian
_BVX_END, _BVX_RAW, _BVX_V1, _BVX_V2, _BVX_LZVN = b"bvx$", b"bvx-", b"bvx1", b"bvx2", b"bvxn"
_V1_HEADER_SIZE = 772  # sizeof(lzfse_compressed_block_header_v1)


def lzfse_raw_size(data: bytes) -> int:
    """Sum of the ``n_raw_bytes`` the blocks of an LZFSE stream declare.

    Walking the block headers refuses, before anything is decoded, a chunk whose
    blocks say they hold more than the chunk declares, and one whose blocks run past it
    (truncated). It is not the bound itself: compressed blocks may decode to more than
    their ``n_raw_bytes`` (see :func:`lzfse_decompress`, which is).
    """
    pos, total, n = 0, 0, len(data)
    while True:
        if pos + 4 > n:
            raise ChunkError("LZFSE stream has no end-of-stream block (truncated)")
        magic = data[pos:pos + 4]
        if magic == _BVX_END:
            return total
        if magic == _BVX_RAW and pos + 8 <= n:
            raw = struct.unpack_from("<I", data, pos + 4)[0]
            size = 8 + raw
        elif magic == _BVX_LZVN and pos + 12 <= n:
            raw, payload = struct.unpack_from("<II", data, pos + 4)
            size = 12 + payload
        elif magic == _BVX_V1 and pos + _V1_HEADER_SIZE <= n:
            raw = struct.unpack_from("<I", data, pos + 4)[0]
            lit, lmd = struct.unpack_from("<II", data, pos + 20)
            size = _V1_HEADER_SIZE + lit + lmd
        elif magic == _BVX_V2 and pos + 32 <= n:
            raw, v0, v1, v2 = struct.unpack_from("<IQQQ", data, pos + 4)
            size = (v2 & 0xFFFFFFFF) + ((v0 >> 20) & 0xFFFFF) + ((v1 >> 40) & 0xFFFFF)
        else:
            raise ChunkError(f"not an LZFSE block at chunk offset {pos}")
        total += raw
        if size <= 0 or pos + size > n:
            raise ChunkError(f"LZFSE block at chunk offset {pos} runs past the chunk")
        pos += size


def lzfse_decompress(data, size: int) -> bytes:
    """Decode the LZFSE stream ``data`` (any buffer) into at most ``size`` bytes.

    The ``lzfse`` package's ``decompress`` has no output limit: it doubles its buffer
    until the stream fits, and the reference decoder bounds an LZFSE block (``bvx1``,
    ``bvx2``) only by the buffer it is given, not by the block's ``n_raw_bytes`` -- so
    blocks that declare 1 byte each can decode to gigabytes. The package's extension
    module exports the reference ``lzfse_decode_buffer``, which never writes past the
    buffer it is handed and returns the buffer's size when the stream would go on:
    called with ``size + 1`` bytes, that is the bound, and the sign of a bomb.
    """
    import ctypes
    decode = _lzfse_decode_buffer()
    out = bytearray(size + 1)
    if isinstance(data, bytearray):   # the reader's buffer: no copy
        src = (ctypes.c_char * len(data)).from_buffer(data)
    else:
        src = bytes(data)
    dst = (ctypes.c_char * len(out)).from_buffer(out)
    got = decode(dst, len(out), src, len(src), None)   # ctypes drops the GIL here
    del dst, src
    if got == len(out):
        raise ChunkError(f"decompresses to more than its declared {size} bytes")
    if got == 0:
        raise ChunkError("corrupt lzfse data (the decoder failed)")
    del out[got:]
    return bytes(out)


_LZFSE_DECODE = []


def _lzfse_decode_buffer():
    """``lzfse_decode_buffer(dst, dst_size, src, src_size, scratch)`` from the ``lzfse``
    package's extension module (loaded once)."""
    if not _LZFSE_DECODE:
        import ctypes
        import lzfse
        try:
            fn = ctypes.CDLL(lzfse.__file__).lzfse_decode_buffer
        except (OSError, AttributeError):
            from ...errors import UnsupportedError
            raise UnsupportedError("not supported yet: LZFSE chunks with this build of the"
                                   " lzfse package (its extension module does not export"
                                   " lzfse_decode_buffer, the only bounded decoder)"
                                   ) from None
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_void_p]
        _LZFSE_DECODE.append(fn)
    return _LZFSE_DECODE[0]


# -- compression (the writer) --------------------------------------------------------------

def compressor(kind: int, level: int):
    """A function ``data -> compressed bytes`` for chunk type ``kind`` (thread-safe:
    every call makes its own compressor state)."""
    if kind == ZLIB:
        return lambda data: zlib.compress(data, level)
    if kind == BZIP2:
        import bz2
        return lambda data: bz2.compress(data, 1)  # 100 kB blocks: chunks are smaller
    if kind == LZMA:
        import lzma
        return lambda data: lzma.compress(data, format=lzma.FORMAT_XZ,
                                          check=lzma.CHECK_NONE, preset=level)
    if kind == LZFSE:
        import lzfse
        return lambda data: lzfse.compress(bytes(data))
    raise ValueError(f"cannot compress chunk type 0x{kind:08x}")
