"""Compressed clusters: raw deflate (window 4 KiB, as qemu writes it) and zstd.

qemu stores a compressed cluster only when it shrinks to at most ``cluster_size - 1``
bytes; otherwise the cluster is written uncompressed. Decompression stops once a full
cluster is produced: the tail of the last 512-byte sector may hold the start of the
next compressed cluster (qcow2.txt), and a zstd cluster may be several frames.

zlib and zstandard release the GIL, so compression runs in the convert pipeline's
threads; a zstandard compressor must not be shared between threads, hence one per
thread.
"""

from __future__ import annotations

import sys
import threading
import zlib

from ... import deflate
from ...errors import FormatError
from .structs import COMPRESSION_ZLIB, COMPRESSION_ZSTD

_local = threading.local()


def _zstd_compressor():
    c = getattr(_local, "zstd_c", None)
    if c is None:
        import zstandard
        c = _local.zstd_c = zstandard.ZstdCompressor(level=3)
    return c


def _zstd_decompressor():
    d = getattr(_local, "zstd_d", None)
    if d is None:
        import zstandard
        d = _local.zstd_d = zstandard.ZstdDecompressor()
    return d


if sys.version_info >= (3, 11):
    def _deflate(data) -> bytes:
        return zlib.compress(data, 6, -12)
else:  # pragma: no cover - zlib.compress has no wbits before 3.11
    def _deflate(data) -> bytes:
        c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()


def compress(ctype: int, data) -> bytes | None:
    """The compressed form of one whole cluster, or None when it would not be
    smaller than the cluster (then the caller stores it uncompressed)."""
    out = _deflate(data) if ctype == COMPRESSION_ZLIB else _zstd_compressor().compress(data)
    return out if len(out) < len(data) else None


def decompress(ctype: int, data: bytes, cluster_size: int, where: str,
               path: str | None) -> bytes:
    """One cluster from its compressed bytes (which may carry trailing bytes).

    Both decoders are bounded by the cluster: a small frame that claims (or really
    expands to) gigabytes costs at most one cluster's work. zlib's ``max_length`` does
    it for deflate (the rest of a deflate stream is ignored, as qemu does); zstd is
    fed in small steps and a frame that runs past the cluster is corrupt, as in qemu.
    """
    try:
        if ctype == COMPRESSION_ZLIB:
            out = deflate.decompressobj(-15).decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            out = _zstd_bounded(data, cluster_size)
        else:  # pragma: no cover - refused when the header is parsed
            raise FormatError(f"unknown compression type {ctype}", path)
    except FormatError:
        raise
    except Exception as e:  # deflate.ERRORS, zstandard.ZstdError, ValueError
        reason = str(e) or type(e).__name__
        raise FormatError(f"compressed cluster {where} is corrupt: {reason}", path,
                          structure="L2 entry") from None
    if len(out) < cluster_size:
        raise FormatError(f"compressed cluster {where} decompresses to {len(out)} bytes,"
                          f" not {cluster_size} (corrupt or truncated)", path,
                          structure="L2 entry")
    return out[:cluster_size]


# compressed bytes fed to zstd at a time: a zstd block of 4 bytes (RLE) can expand to
# 128 KiB, so one step never makes more than 16 MiB however hostile the input
_ZSTD_STEP = 512


def _zstd_bounded(data: bytes, limit: int) -> bytes:
    """The ``limit`` bytes the zstd frames at the start of ``data`` decode to.

    As qemu's decoder: frames are decoded one after another until the cluster is full,
    and a frame still unfinished when it is full is corrupt (a bomb, or damage). A
    frame that declares more than a cluster is refused before decoding. The input is
    fed a few hundred bytes at a time (python-zstandard's decompressobj has no output
    bound), so memory stays bounded whatever the frame expands to.
    """
    import zstandard
    declared = zstandard.get_frame_parameters(data).content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise ValueError(f"the zstd frame declares {declared} bytes, more than the"
                         f" {limit}-byte cluster")
    if declared == limit:
        # qemu's cluster: one frame declaring the whole cluster, decoded in one call and
        # returned as it comes (the loop below costs two more copies of the cluster,
        # 0.1 s of CPU per GiB); anything else -- a shorter frame, an unfinished one,
        # trailing frames -- goes through the loop, which checks it
        d = _zstd_decompressor().decompressobj()
        first = d.decompress(data)
        if d.eof and len(first) == limit:
            return first
    out = bytearray()
    pos = 0
    while len(out) < limit and pos < len(data):
        d = _zstd_decompressor().decompressobj()
        if pos:
            declared = zstandard.get_frame_parameters(data[pos:]).content_size
        # a frame that declares its size (qemu's do) cannot decode to more: zstd stops
        # with an error past it, after at most one block (128 KiB), so the whole input
        # goes in one call -- a hundred times fewer calls, and the GIL held only briefly
        step = len(data) if declared != zstandard.CONTENTSIZE_UNKNOWN and \
            declared <= limit - len(out) else _ZSTD_STEP
        while not d.eof and pos < len(data):
            piece = data[pos:pos + step]
            pos += len(piece)
            out += d.decompress(piece)
            if len(out) > limit:
                raise ValueError("a zstd frame decodes to more than the"
                                 f" {limit}-byte cluster")
        if not d.eof:
            break       # truncated: the caller reports the short cluster
        pos -= len(d.unused_data)
    return bytes(out)
