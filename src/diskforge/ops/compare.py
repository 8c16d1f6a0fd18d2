"""compare: are two disks' contents the same, like ``qemu-img compare``.

Ranges both extent maps call zero are never read. The reported offset is the start of
the first differing 512-byte sector, as qemu-img reports it. Without ``strict``, disks
of different sizes are equal when the longer one's tail reads as zeros; with it, sizes
and allocation status must match too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from ..blockdev import BlockDevice, fill_zero, is_zero, pieces
from .map import MapEntry, resolve

BATCH = 4 << 20
SECTOR = 512


@dataclass
class CompareResult:
    """Whether two images read the same, and where they first differ."""
    identical: bool
    offset: int | None = None
    message: str = ""


def _segments(a: Iterator[MapEntry], b: Iterator[MapEntry]):
    """Walk two maps over the same range together: ``(start, length, ea, eb)``."""
    ea, eb = next(a, None), next(b, None)
    while ea is not None and eb is not None:
        start = max(ea.start, eb.start)
        end = min(ea.start + ea.length, eb.start + eb.length)
        if end > start:
            yield start, end - start, ea, eb
        if ea.start + ea.length == end:
            ea = next(a, None)
        if eb.start + eb.length == end:
            eb = next(b, None)


def _first_difference(x: bytes | bytearray, y: bytes | bytearray, n: int) -> int | None:
    if x[:n] == y[:n]:
        return None
    step = 64 * 1024
    for i in range(0, n, step):
        j = min(i + step, n)
        if x[i:j] != y[i:j]:
            for s in range(i, j, SECTOR):
                e = min(s + SECTOR, j)
                if x[s:e] != y[s:e]:
                    return s
    return None  # unreachable


def _fill(dev: BlockDevice, zero: bool, off: int, buf: bytearray, n: int) -> None:
    if zero:
        fill_zero(buf, 0, n)
    else:
        dev.readinto(off, memoryview(buf)[:n])


def compare(a: BlockDevice, b: BlockDevice, *, strict: bool = False,
            progress: Callable[[int, int], None] | None = None) -> CompareResult:
    if strict and a.size != b.size:
        return CompareResult(False, None, "Strict mode: Image size mismatch!")
    common = min(a.size, b.size)
    total = max(a.size, b.size)
    done = 0
    bufa, bufb = bytearray(BATCH), bytearray(BATCH)
    for start, length, ea, eb in _segments(resolve(a, 0, common), resolve(b, 0, common)):
        if strict and ea.present != eb.present:
            return CompareResult(False, start,
                                 f"Strict mode: Offset {start} block status mismatch!")
        if not (ea.zero and eb.zero):
            for off, n in pieces(start, length, BATCH):
                _fill(a, ea.zero, off, bufa, n)
                _fill(b, eb.zero, off, bufb, n)
                rel = _first_difference(bufa, bufb, n)
                if rel is not None:
                    return CompareResult(False, off + rel,
                                         f"Content mismatch at offset {off + rel}!")
                if progress:
                    progress(done + off + n - start, total)
        done += length
        if progress:
            progress(done, total)
    if a.size != b.size:
        longer = a if a.size > b.size else b
        for e in resolve(longer, common, longer.size - common):
            if e.zero:
                continue
            for off, n in pieces(e.start, e.length, BATCH):
                longer.readinto(off, memoryview(bufa)[:n])
                if not is_zero(bufa, 0, n):
                    rel = _first_difference(bufa, bytes(n), n)
                    return CompareResult(False, off + rel,
                                         f"Content mismatch at offset {off + rel}!")
        return CompareResult(True, None, "Warning: Image size mismatch!\n"
                             "Images are identical.")
    return CompareResult(True, None, "Images are identical.")
