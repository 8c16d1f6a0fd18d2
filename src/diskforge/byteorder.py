"""Tables of fixed-width integers in a file's byte order, as host-order arrays.

Per-cluster tables (qcow2 L1/L2 and refcount blocks, VHD and VHDX BATs) are read and
written whole as ``array``s: about 100x faster than a per-entry parse (DESIGN.md). The
file fixes their byte order (qcow2 and VHD big-endian, VHDX little-endian) and the host
may differ, so a table is swapped exactly when the two differ — one rule, here, instead
of each format's own idiom (an unconditional ``byteswap()`` is wrong on a big-endian
host).
"""

from __future__ import annotations

import sys
from array import array

HOST_IS_BIG = sys.byteorder == "big"


def _swapped(a: array, big: bool) -> array:
    if big != HOST_IS_BIG:
        a.byteswap()
    return a


def be_array(data, typecode: str = "Q") -> array:
    """Big-endian bytes as a host-order array (a new array; ``data`` is not changed)."""
    return _swapped(array(typecode, bytes(data) if isinstance(data, memoryview) else data),
                    True)


def le_array(data, typecode: str = "Q") -> array:
    """Little-endian bytes as a host-order array."""
    return _swapped(array(typecode, bytes(data) if isinstance(data, memoryview) else data),
                    False)


def be_bytes(a: array) -> bytes:
    """A host-order array as big-endian bytes (``a`` is not changed)."""
    if HOST_IS_BIG:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def le_bytes(a: array) -> bytes:
    """A host-order array as little-endian bytes (``a`` is not changed)."""
    if not HOST_IS_BIG:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def to_host_be(a: array) -> array:
    """Swap, in place, an array just filled from big-endian bytes into host order (or
    back again before it is written); returns it."""
    return _swapped(a, True)


def to_host_le(a: array) -> array:
    """The same for an array filled from little-endian bytes."""
    return _swapped(a, False)
