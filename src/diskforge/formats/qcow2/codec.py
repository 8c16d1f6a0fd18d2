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

from ...errors import FormatError
from .layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD

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

    Both decoders are told the exact output they may produce and stop there: a small
    frame that claims (or really expands to) gigabytes costs at most one cluster.
    zlib's ``max_length`` does it for deflate; for zstd a streaming reader across
    frames is read up to ``cluster_size`` (``ZstdDecompressionObj.decompress`` has no
    such bound and would inflate a whole frame first).
    """
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            out = _zstd_bounded(data, cluster_size)
        else:  # pragma: no cover - refused when the header is parsed
            raise FormatError(f"unknown compression type {ctype}", path)
    except FormatError:
        raise
    except Exception as e:  # zlib.error, zstandard.ZstdError, ValueError
        reason = str(e) or type(e).__name__
        raise FormatError(f"compressed cluster {where} is corrupt: {reason}", path,
                          structure="L2 entry") from None
    if len(out) < cluster_size:
        raise FormatError(f"compressed cluster {where} decompresses to {len(out)} bytes,"
                          f" not {cluster_size} (corrupt or truncated)", path,
                          structure="L2 entry")
    return out[:cluster_size]


def _zstd_bounded(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes decoded from the zstd frames at the start of ``data``.

    A frame whose header declares more than a cluster is corrupt (a bomb): said so,
    rather than silently cut. Frames without a declared size (qemu writes them so)
    are cut at the cluster, as qemu's own decoder does."""
    import io

    import zstandard
    declared = zstandard.get_frame_parameters(data).content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise ValueError(f"the zstd frame declares {declared} bytes, more than the"
                         f" {limit}-byte cluster")
    reader = _zstd_decompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    while len(out) < limit:
        got = reader.read(limit - len(out))
        if not got:
            break
        out += got
    return bytes(out)
