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
    """One cluster from its compressed bytes (which may carry trailing bytes)."""
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            out = b""
            rest = data
            while len(out) < cluster_size and rest:
                d = _zstd_decompressor().decompressobj()
                out += d.decompress(rest)
                if not d.eof:
                    break
                rest = d.unused_data
        else:  # pragma: no cover - refused when the header is parsed
            raise FormatError(f"unknown compression type {ctype}", path)
    except FormatError:
        raise
    except Exception as e:  # zlib.error, zstandard.ZstdError
        raise FormatError(f"compressed cluster {where} is corrupt: {e}", path,
                          structure="L2 entry") from None
    if len(out) < cluster_size:
        raise FormatError(f"compressed cluster {where} decompresses to {len(out)} bytes,"
                          f" not {cluster_size} (corrupt or truncated)", path,
                          structure="L2 entry")
    return out[:cluster_size]
