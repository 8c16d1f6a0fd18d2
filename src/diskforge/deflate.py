"""Inflating deflate and zlib streams — qcow2 and qcow v1 compressed clusters, stream
VMDK grains, UDZO chunks — with zlib-ng when it is installed (the ``fast`` extra),
else with the standard library's zlib.

Why: inflating is most of the CPU of reading a compressed image (a cloud image's
qcow2), and zlib-ng's inflate takes half of zlib's CPU time (measured: 172 µs against
354 µs per 64 KiB qcow2 cluster of a qemu-img ``-c`` image, on this 2-core VM). Its
Python binding is CPython's zlib module over zlib-ng (``pycompression/python-zlib-ng``):
the same API (``decompressobj(wbits)``, ``decompress(data, max_length)``,
``unconsumed_tail``, ``eof``), the same output for any valid stream, and it releases
the GIL while it inflates, so the decoding pool (``parallel.py``) scales with it.

It is loaded on first use, not at import (start-up time); ``DISKFORGE_INFLATE=zlib``
in the environment keeps the standard library's. Callers catch
``deflate.ERRORS`` (looked up when an error is raised, after loading): both modules'
``error`` classes.
"""

from __future__ import annotations

import os
import zlib

ERRORS: tuple = (zlib.error,)
IMPLEMENTATION = "?"      # "zlib-ng" or "zlib", once loaded
_decompressobj = None


def decompressobj(wbits: int = 15):
    """A decompression object for ``wbits`` (as ``zlib.decompressobj``)."""
    f = _decompressobj
    if f is None:
        f = _load()
    return f(wbits)


def _load():
    global _decompressobj, ERRORS, IMPLEMENTATION
    try:
        if os.environ.get("DISKFORGE_INFLATE") == "zlib":
            raise ImportError("zlib asked for")   # measuring, or a memory-limit test
        from zlib_ng import zlib_ng
    except ImportError:
        _decompressobj, IMPLEMENTATION = zlib.decompressobj, "zlib"
    else:
        ERRORS = (zlib.error, zlib_ng.error)
        _decompressobj, IMPLEMENTATION = zlib_ng.decompressobj, "zlib-ng"
    return _decompressobj


def use_stdlib() -> None:
    """Inflate with the standard library's zlib from now on (tests of the fallback)."""
    global _decompressobj, IMPLEMENTATION
    _decompressobj, IMPLEMENTATION = zlib.decompressobj, "zlib"


def reset() -> None:
    """Choose again at the next use (undoes ``use_stdlib``)."""
    global _decompressobj
    _decompressobj = None
