"""The BAT (MS-VHDX 2.5) read in pieces as it is used, not whole at open.

A 64 TiB disk in 1 MiB blocks has a 520 MiB BAT (qemu-img makes such files), and a
hostile region table can name one as large as a sparse file allows: reading it whole
would be sized by the header, not by the work asked for. Entries are read 64 Ki at a
time (512 KiB) and the pieces kept in a bounded LRU cache; a piece holding an entry
changed in memory stays cached, so an update is never lost before the log applies it
to the file (writes go through the log, device.py).

It answers what the device asks of an ``array('Q')``: ``len``, indexing, contiguous
slices (as arrays), item assignment and iteration.
"""

from __future__ import annotations

import collections
from array import array
from collections.abc import Callable, Iterator

from ...byteorder import le_array

PIECE = 1 << 16          # entries per piece read
CACHED_PIECES = 64       # 32 MiB of entries at most


class BatTable:
    def __init__(self, read: Callable[[int, int, str], bytes], offset: int, count: int):
        self.read = read
        self.offset = offset
        self.count = count
        self.pieces: collections.OrderedDict[int, array] = collections.OrderedDict()
        self.changed: set[int] = set()

    def __len__(self) -> int:
        return self.count

    def _piece(self, p: int) -> array:
        a = self.pieces.get(p)
        if a is not None:
            self.pieces.move_to_end(p)
            return a
        start = p * PIECE
        n = min(PIECE, self.count - start)
        a = le_array(self.read(self.offset + start * 8, n * 8, "BAT"))
        self.pieces[p] = a
        if len(self.pieces) > CACHED_PIECES:
            for old in list(self.pieces):
                if len(self.pieces) <= CACHED_PIECES:
                    break
                if old != p and old not in self.changed:
                    del self.pieces[old]
        return a

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.count)
            if step != 1:
                raise ValueError("BatTable slices are contiguous")
            out = array("Q")
            while start < stop:
                p, o = divmod(start, PIECE)
                n = min(stop - start, PIECE - o)
                out += self._piece(p)[o:o + n]
                start += n
            return out
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError("BAT index out of range")
        return self._piece(i // PIECE)[i % PIECE]

    def __setitem__(self, i: int, value: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError("BAT index out of range")
        p = i // PIECE
        self._piece(p)[i % PIECE] = value
        self.changed.add(p)

    def __iter__(self) -> Iterator[int]:
        for p in range(-(-self.count // PIECE)):
            yield from self._piece(p)
