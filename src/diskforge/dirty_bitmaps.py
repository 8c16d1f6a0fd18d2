"""Persistent dirty bitmaps in memory, and ``qemu-img bitmap``'s actions over them.

A dirty bitmap records which parts of a disk changed since it was created or last
cleared: one bit per ``granularity`` bytes (a power of two), set when anything in
that range is written. Backup tools (libvirt, Proxmox, oVirt incremental backup) read
them over NBD (``qemu:dirty-bitmap:NAME``). qcow2 keeps them in the image
(``formats/qcow2/bitmaps.py``); other formats have none.

Kept format-neutral so that ``convert --bitmaps``, ``measure`` and the ``bitmap``
subcommand are written once: a format loads its bitmaps into ``DirtyBitmap`` objects
(``BlockDevice.load_bitmaps``) and stores a list of them back
(``BlockDevice.store_bitmaps``). The bits are kept as qemu serialises them (and as
qcow2 stores them): bit ``i`` covers bytes ``[i * granularity, (i + 1) *
granularity)``, least significant bit of each byte first.

``apply_actions`` is qemu-img 7.2's ``img_bitmap``: the actions run in the order given
and the bitmaps are stored afterwards even when one fails (qemu stores what is in
memory when it closes the image), with qemu's error words: "Operation add on bitmap
b0 failed: Bitmap already exists: b0".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .errors import DiskforgeError, UsageError
from .limits import check_alloc

MIN_GRANULARITY = 512            # qemu: "power of 2 and at least 512"
MAX_GRANULARITY = 1 << 31        # qcow2's BME_MAX_GRANULARITY_BITS; a uint32 in qemu

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass
class DirtyBitmap:
    """One bitmap: its name, bytes per bit, the disk size it covers, whether it
    records writes (qcow2's ``auto`` flag), and its bits. ``bits`` is None for an
    inconsistent bitmap (qcow2's ``in-use`` flag left set by a crash): its contents
    are unknown, and qemu allows only removing it."""
    name: str
    granularity: int
    size: int
    enabled: bool = True
    bits: bytearray | None = None

    @classmethod
    def empty(cls, name: str, granularity: int, size: int, enabled: bool = True,
              path: str | None = None) -> "DirtyBitmap":
        nbytes = -(-cls.bit_count(size, granularity) // 8)
        check_alloc(nbytes, path, "dirty bitmap", name)
        return cls(name, granularity, size, enabled, bytearray(nbytes))

    @staticmethod
    def bit_count(size: int, granularity: int) -> int:
        return -(-size // granularity)

    @property
    def nbits(self) -> int:
        return self.bit_count(self.size, self.granularity)

    @property
    def consistent(self) -> bool:
        return self.bits is not None

    # -- changes ---------------------------------------------------------------------
    def set_range(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` dirty (clipped to the disk)."""
        end = min(self.size, offset + length)
        if self.bits is None or end <= offset:
            return
        g = self.granularity
        set_bits(self.bits, offset // g, (end - 1) // g)

    def clear(self) -> None:
        if self.bits is not None:
            self.bits[:] = bytes(len(self.bits))

    def merge(self, other: "DirtyBitmap") -> None:
        """Every range dirty in ``other`` becomes dirty here (qemu's
        bdrv_merge_dirty_bitmap: sizes must match, granularities may differ)."""
        if self.bits is None or other.bits is None:
            return
        if other.size != self.size:
            raise UsageError(f"Bitmaps are of different sizes (destination size is"
                             f" {self.size}, source size is {other.size}) and can't be"
                             " merged")
        if other.granularity == self.granularity:
            mine, theirs = self.bits, other.bits
            for i in range(0, len(mine), 1 << 20):  # a MiB at a time: bounded memory
                a, b = mine[i:i + (1 << 20)], theirs[i:i + (1 << 20)]
                if b.count(0) != len(b):
                    mine[i:i + len(a)] = (int.from_bytes(a, "little")
                                          | int.from_bytes(b, "little")).to_bytes(
                                              len(a), "little")
            return
        for offset, length in other.dirty_ranges():
            self.set_range(offset, length)

    def resize(self, size: int) -> None:
        """The disk grew or shrank: new bits are clean, bits past the end dropped (as
        qemu's hbitmap_truncate)."""
        self.size = size
        if self.bits is None:
            return
        nbits = self.nbits
        nbytes = -(-nbits // 8)
        if nbytes > len(self.bits):
            self.bits.extend(bytes(nbytes - len(self.bits)))
        else:
            del self.bits[nbytes:]
        if nbits % 8 and self.bits:
            self.bits[-1] &= (1 << (nbits % 8)) - 1

    # -- reading ---------------------------------------------------------------------
    def dirty_ranges(self) -> Iterator[tuple[int, int]]:
        """(offset, length) in bytes of each dirty run, in order, clipped to the disk."""
        if self.bits is None:
            return
        g = self.granularity
        for first, end in bit_runs(self.bits):
            start = first * g
            stop = min(self.size, end * g)
            if stop > start:
                yield start, stop - start

    def dirty_bytes(self) -> int:
        return sum(n for _, n in self.dirty_ranges())


def set_bits(buf: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) of ``buf``, least significant first."""
    b0, b1 = first // 8, last // 8
    if b0 == b1:
        buf[b0] |= (0xFF << (first % 8)) & (0xFF >> (7 - last % 8))
        return
    buf[b0] |= (0xFF << (first % 8)) & 0xFF
    if b1 > b0 + 1:
        buf[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
    buf[b1] |= 0xFF >> (7 - last % 8)


_SET = re.compile(rb"\xff+|[^\x00\xff]")


def bit_runs(buf: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(first bit, end bit) of each run of set bits: zero bytes and full bytes are
    passed over by the regular-expression engine, only partly set bytes bit by bit."""
    run_start = run_end = -1
    for m in _SET.finditer(buf):
        s, e = m.span()
        byte = buf[s]
        if byte == 0xFF:
            pieces: list[tuple[int, int]] = [(s * 8, e * 8)]
        else:
            pieces = []
            bit = 0
            while bit < 8:
                if byte >> bit & 1:
                    j = bit
                    while j < 8 and byte >> j & 1:
                        j += 1
                    pieces.append((s * 8 + bit, s * 8 + j))
                    bit = j
                else:
                    bit += 1
        for ps, pe in pieces:
            if ps == run_end:
                run_end = pe
                continue
            if run_start >= 0:
                yield run_start, run_end
            run_start, run_end = ps, pe
    if run_start >= 0:
        yield run_start, run_end


def find(bitmaps: Sequence[DirtyBitmap], name: str) -> DirtyBitmap | None:
    return next((b for b in bitmaps if b.name == name), None)


def _usable(bm: DirtyBitmap) -> None:
    if bm.bits is None:
        raise UsageError(f"Bitmap '{bm.name}' is inconsistent and cannot be used (try"
                         f" 'bitmap --remove' to delete this bitmap from disk)")


def parse_granularity(text: str | None) -> int:
    """``-g``: bytes, with qemu's suffixes; 0 or absent means the format's default."""
    if text is None:
        return 0
    from .options import parse_size
    return parse_size(text, "granularity")


def apply_actions(bitmaps: list[DirtyBitmap], name: str,
                  actions: Sequence[tuple[str, str | None]], *, size: int,
                  granularity: int = 0, default_granularity: int = 65536,
                  can_store: Callable[[str, int], None] | None = None,
                  source: list[DirtyBitmap] | None = None,
                  path: str | None = None) -> None:
    """Run ``qemu-img bitmap``'s actions on ``bitmaps`` (changed in place), in order.

    ``can_store(name, granularity)`` raises when the image cannot hold a new
    persistent bitmap (qcow2 v2, a bitmap too large); ``source`` is where ``--merge``
    finds its source bitmap (another image's, or by default these same bitmaps).
    A failing action raises "Operation OP on bitmap NAME failed: ..." (its
    ``actions_done`` says how many before it took effect; the caller stores those, as
    qemu does)."""
    if source is None:
        source = bitmaps
    for done, (op, arg) in enumerate(actions):
        try:
            _apply(bitmaps, name, op, arg, size, granularity, default_granularity,
                   can_store, source, path)
        except DiskforgeError as e:  # (a format's own refusal too: qcow2 v2, raw)
            error = UsageError(f"Operation {op} on bitmap {name} failed: {e.message}",
                               path)
            error.actions_done = done  # type: ignore[attr-defined]
            raise error from None


def _apply(bitmaps: list[DirtyBitmap], name: str, op: str, arg: str | None, size: int,
           granularity: int, default_granularity: int,
           can_store: Callable[[str, int], None] | None, source: list[DirtyBitmap],
           path: str | None) -> None:
    bm = find(bitmaps, name)
    if op == "add":
        if bm is not None:
            raise UsageError(f"Bitmap already exists: {name}")
        g = granularity or default_granularity
        if g < MIN_GRANULARITY or g & (g - 1) or g > MAX_GRANULARITY:
            raise UsageError("Granularity must be power of 2 and at least 512")
        if can_store is not None:
            can_store(name, g)
        bitmaps.append(DirtyBitmap.empty(name, g, size, True, path))
        return
    if bm is None:
        raise UsageError(f"Dirty bitmap '{name}' not found")
    if op == "remove":
        bitmaps.remove(bm)
    elif op == "clear":
        _usable(bm)
        bm.clear()
    elif op in ("enable", "disable"):
        _usable(bm)
        bm.enabled = op == "enable"
    elif op == "merge":
        src = find(source, arg or "")
        if src is None:
            raise UsageError(f"Dirty bitmap '{arg}' not found")
        _usable(bm)
        _usable(src)
        bm.merge(src)
    else:  # pragma: no cover - the CLI offers only ACTIONS
        raise UsageError(f"unknown bitmap action {op}")
