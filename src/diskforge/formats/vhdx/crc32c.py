"""CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven, pure Python.

The standard library only has CRC-32 (IEEE) in zlib. VHDX checksums cover small
structures: the 4 KiB headers, the 64 KiB region tables and log entries, which are
mostly zeros. So runs of zero bytes are not fed byte by byte: appending n zero bytes
is a linear map of the CRC register over GF(2), and the map for n is composed from
the precomputed maps for powers of two (as zlib's crc32_combine does). A 64 KiB region
table then costs about as much as its non-zero prefix.
"""

from __future__ import annotations

import re

_POLY = 0x82F63B78
_ZERO_RUN = re.compile(rb"\0{64,}")


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()
# _ZERO_OPS[k]: the 32 columns of the map "feed 2**k zero bytes" on the raw register
_ZERO_OPS: list[list[int]] = []


def _apply(op: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= op[i]
        vec >>= 1
        i += 1
    return out


def _zero_op(k: int) -> list[int]:
    while len(_ZERO_OPS) <= k:
        if not _ZERO_OPS:
            # one zero byte: the register goes through the table once
            _ZERO_OPS.append([_update(1 << i, b"\0", 0, 1) for i in range(32)])
        else:
            prev = _ZERO_OPS[-1]
            _ZERO_OPS.append([_apply(prev, col) for col in prev])
    return _ZERO_OPS[k]


def _update(crc: int, data: bytes, start: int, end: int) -> int:
    table = _TABLE
    for b in data[start:end]:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _zeros(crc: int, n: int) -> int:
    k = 0
    while n:
        if n & 1:
            crc = _apply(_zero_op(k), crc)
        n >>= 1
        k += 1
    return crc


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    data = bytes(data)
    reg = crc ^ 0xFFFFFFFF
    pos = 0
    for m in _ZERO_RUN.finditer(data):
        reg = _update(reg, data, pos, m.start())
        reg = _zeros(reg, m.end() - m.start())
        pos = m.end()
    reg = _update(reg, data, pos, len(data))
    return reg ^ 0xFFFFFFFF
