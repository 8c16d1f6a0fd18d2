"""The one abstraction: a virtual disk as a BlockDevice, and its sink, the ImageWriter.

Every container format turns a file into a :class:`BlockDevice` (random-access reads,
an extent map, optional writes) and offers an :class:`ImageWriter` (extents in
increasing offset order, then ``finish()``). Everything else — convert, compare,
map, imaging, serving over NBD — is written once against these two.

The model follows nbdkit's plugin callbacks and QEMU's BlockDriver: a few operations
every format can answer. ``extents()`` is what makes operations fast: nothing that an
extent map calls zero is ever read.
"""

from __future__ import annotations

import abc
import enum
import mmap
import os
import stat
from collections.abc import Iterator

from .errors import DiskforgeError, FormatError, ImageIOError, UnsupportedError, UsageError
from .locks import Access, Hold, access_for, acquire
from .readbytes import ReadsBytes
from .records import FrozenRecord, Record

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:  # checks (its enums and records) is imported by the formats that check
    from .checks import CheckResult, Repair


# A shared, read-only view of zeros. Comparing against a prefix of it runs at memcmp
# speed, far faster than counting zero bytes (DESIGN.md, "facts worth knowing"). It is
# an anonymous mapping, not a bytes object: nothing is allocated or touched at import
# (start-up time), every page is the kernel's one zero page (so compares stay in cache),
# and slicing a memoryview never copies.
ZERO_BUFFER_SIZE = 8 << 20
ZEROES = memoryview(mmap.mmap(-1, ZERO_BUFFER_SIZE, prot=mmap.PROT_READ))


def is_zero(buf, start: int = 0, length: int | None = None) -> bool:
    """True when ``buf[start:start+length]`` is all zero bytes.

    ``bytes``/``bytearray`` are compared in place with ``startswith`` (a memcmp, no
    copy); a ``memoryview`` comparison would be element by element and 100x slower,
    so other buffers are given as the *prefix* of a zero ``bytes`` (``_view_is_zero``),
    which compares them in place too.
    """
    if length is None:
        length = len(buf) - start
    if not isinstance(buf, (bytes, bytearray)):
        return _view_is_zero(memoryview(buf).cast("B")[start:start + length])
    while length > 0:
        n = min(length, ZERO_BUFFER_SIZE)
        if not buf.startswith(ZEROES[:n], start):
            return False
        start += n
        length -= n
    return True


def skip_filled(table, start: int, stop: int, fill: int = 0) -> int:
    """Index of the first entry of ``table[start:stop]`` holding a byte other than
    ``fill`` (0 for qcow2/VHDX tables, 0xFF for VHD's unused BAT entries), or ``stop``.

    ``table`` is an ``array`` (or any buffer of fixed-size entries). Why: a huge
    virtual disk's tables are mostly empty, and a walk that looked at each entry in
    Python would be bounded by the virtual size rather than by what is allocated; this
    skips whole stretches at memory speed (a copy and a memcmp per chunk).
    """
    mv = memoryview(table)
    width = mv.itemsize
    filler = bytes((fill,))
    i = start
    step = 256 // width      # small first (dense tables), growing to a MiB (sparse)
    while i < stop:
        j = min(stop, i + step)
        step = min(step * 8, (1 << 20) // width)
        chunk = mv[i:j].tobytes()
        if fill == 0 and chunk.startswith(ZEROES[:len(chunk)]):
            i = j
            continue
        rest = len(chunk.lstrip(filler))
        if rest:
            return i + (len(chunk) - rest) // width
        i = j
    return stop


def fill_zero(buf, start: int = 0, end: int | None = None) -> None:
    """Set ``buf[start:end]`` to zeros, from the shared zero view (no allocation): how a
    read fills holes, unallocated blocks and bytes past a short file."""
    mv = memoryview(buf).cast("B")
    end = len(mv) if end is None else end
    while start < end:
        n = min(end - start, ZERO_BUFFER_SIZE)
        mv[start:start + n] = ZEROES[:n]
        start += n


def pieces(offset: int, length: int, unit: int) -> Iterator[tuple[int, int]]:
    """Split ``[offset, offset+length)`` at multiples of ``unit``: ``(offset, length)``
    of each piece, in order. The one request splitter for cluster-, block- and
    buffer-sized work (``divmod(offset, unit)`` gives a piece's block and offset in it).
    """
    end = offset + length
    while offset < end:
        n = min(end - offset, unit - offset % unit)
        yield offset, n
        offset += n


def aligned_buffer(size: int, alignment: int = 4096) -> tuple[bytearray, int]:
    """A bytearray with a ``size``-byte window starting at an ``alignment``-aligned
    address: ``(buffer, start)``.

    Why: the kernel copies to and from a page-aligned buffer up to twice as fast as
    from the arbitrary offset malloc gives a bytearray (measured: pread+pwrite of a
    1 GiB file, 0.40 s aligned vs 0.71-0.98 s at +16 bytes).
    """
    import ctypes  # only the copy paths pay for it, not start-up
    buf = bytearray(size + alignment)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return buf, (-addr) % alignment


def zero_runs(buf, base: int, granularity: int, length: int | None = None,
              start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """Split ``buf[start:start+length]`` (the disk bytes at ``base``) into coalesced
    runs of all-zero and not-all-zero granules, as ``(offset, length, is_zero)``.

    Granule boundaries are absolute multiples of ``granularity``, so a writer whose unit
    is a cluster sees zero runs made of whole clusters. ``buf`` may be any buffer (a
    memoryview slice is read in place, never copied).

    Speed matters here: it runs over every byte a convert reads. Python cannot afford a
    step per byte or even per granule, so the whole batch is screened in C first: the
    first 8-byte word of every granule is gathered with one strided copy, and ``find``
    of a zero word in that short string names the candidates. A granule whose first
    word is not zero is data, decided without touching the rest of it; candidates are
    compared in full, a whole run of them with one memcmp (which stops at the first
    non-zero byte). So data bytes are touched 8 per granule and zero bytes once. (The
    former ``find`` of a whole zero granule re-preprocessed its 4 KiB needle on every
    call and crawled through data holding short zero runs: callgrind counted 9
    instructions per byte of file-system-like data.)
    """
    if length is None:
        length = len(buf) - start
    if length <= 0:
        return
    # no whole-buffer is_zero first: the screen finds an all-zero batch as one run of
    # candidates anyway, and a zero head before data would be compared twice
    yield from _coalesce_runs(_granule_runs(memoryview(buf).cast("B")[start:start + length],
                                            base, granularity, length), base)


def _coalesce_runs(runs, base: int):
    """Merge neighbouring ``(rel_offset, length, zero)`` runs of the same kind."""
    cur_off, cur_len, cur_zero = 0, 0, None
    for off, n, z in runs:
        if z is cur_zero:
            cur_len += n
            continue
        if cur_len:
            yield base + cur_off, cur_len, cur_zero
        cur_off, cur_len, cur_zero = off, n, z
    if cur_len:
        yield base + cur_off, cur_len, cur_zero


def _granule_runs(mv: memoryview, base: int, gran: int, length: int):
    """Uncoalesced runs of ``mv`` (``length`` bytes at disk offset ``base``)."""
    head = min((-base) % gran, length)
    if head:
        yield 0, head, _view_is_zero(mv[:head])
    count = (length - head) // gran
    if count:
        body = mv[head:head + count * gran]
        # the first word of every granule, gathered by one strided copy: a granule
        # whose first word is not zero is data, decided without touching the rest
        w = 8 if gran % 8 == 0 else 1
        zw = bytes(w)
        heads = bytes(body.cast("Q" if w == 8 else "B")[::gran // w])
        find, run_at = heads.find, _zero_words(w).match
        i = 0
        while i < count:
            p = find(zw, i * w)
            while p >= 0 and p % w:          # a zero word must start a granule's head
                p = find(zw, p + w - p % w)
            c = count if p < 0 else p // w
            if c > i:
                yield head + i * gran, (c - i) * gran, False
            if c >= count:
                break
            e = run_at(heads, c * w).end() // w     # a run of candidates
            a = head + c * gran
            if _view_is_zero(mv[a:a + (e - c) * gran]):
                yield a, (e - c) * gran, True
            else:
                for j in range(c, e):
                    a = head + j * gran
                    yield a, gran, _view_is_zero(mv[a:a + gran])
            i = e
    tail = head + count * gran
    if tail < length:
        yield tail, length - tail, _view_is_zero(mv[tail:])


_zero_word_runs: dict[int, object] = {}


def _zero_words(w: int):
    """A compiled pattern matching a run of whole ``w``-byte zero words (``re`` is
    imported only here: convert's first batch pays for it, not start-up)."""
    pat = _zero_word_runs.get(w)
    if pat is None:
        import re
        pat = _zero_word_runs[w] = re.compile(b"(?:" + b"\\x00" * w + b")+")
    return pat


_ZERO_BYTES_SIZE = 256 << 10
_zero_bytes: bytes | None = None


def _view_is_zero(mv: memoryview) -> bool:
    """True when the bytes of ``mv`` are all zero: ``bytes.startswith`` takes any buffer
    as its prefix, so a real bytes object of zeros compares against a memoryview slice
    in place (a memcmp; the shared mmap view has no ``startswith`` of its own)."""
    global _zero_bytes
    if _zero_bytes is None:
        _zero_bytes = bytes(_ZERO_BYTES_SIZE)
    zb = _zero_bytes
    n = len(mv)
    if n <= _ZERO_BYTES_SIZE:
        return zb.startswith(mv)
    for pos in range(0, n, _ZERO_BYTES_SIZE):
        if not zb.startswith(mv[pos:pos + _ZERO_BYTES_SIZE]):
            return False
    return True


class ExtentKind(enum.Enum):
    DATA = "data"        # allocated here, read it
    ZERO = "zero"        # known to read as zeros (allocated-zero or hole with no backing)
    BACKING = "backing"  # not allocated here; reads come from the backing device


class Extent(FrozenRecord):
    """A run of the virtual disk with one kind.

    ``allocated`` and ``host_offset`` exist for ``map`` (qemu-img's ``present`` and
    ``offset``): a ZERO extent may be a zero cluster stored here (allocated) or a hole
    (not allocated); ``host_offset`` is where the bytes live in this layer's file, when
    they live in one place contiguously. ``host_file`` names that file when it is not
    the layer's own (a VMDK's separate extent files); None means the layer's file.
    """
    __slots__ = ("offset", "length", "kind", "allocated", "host_offset", "host_file")

    def __init__(self, offset: int, length: int, kind: ExtentKind, allocated: bool = True,
                 host_offset: int | None = None, host_file: str | None = None):
        self.offset = offset
        self.length = length
        self.kind = kind
        self.allocated = allocated
        self.host_offset = host_offset
        self.host_file = host_file

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(extents) -> Iterator[Extent]:
    """Merge neighbours of the same kind and allocation whose host offsets continue."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if (cur is not None and cur.end == e.offset and cur.kind is e.kind
                and cur.allocated == e.allocated and cur.host_file == e.host_file
                and ((cur.host_offset is None and e.host_offset is None)
                     or (cur.host_offset is not None and e.host_offset is not None
                         and cur.host_offset + cur.length == e.host_offset))):
            cur = Extent(cur.offset, cur.length + e.length, cur.kind, cur.allocated,
                         cur.host_offset, cur.host_file)
        else:
            if cur is not None:
                yield cur
            cur = e
    if cur is not None:
        yield cur


class LayerExtent(FrozenRecord):
    """An extent of the composed disk: which layer of the chain supplies it (``depth``
    0 is the top image, ``device`` that layer)."""
    __slots__ = ("extent", "depth", "device")

    def __init__(self, extent: Extent, depth: int, device: "BlockDevice"):
        self.extent = extent
        self.depth = depth
        self.device = device


def chain_extents(dev: "BlockDevice", offset: int = 0, length: int | None = None, *,
                  as_mapped: bool = False) -> Iterator[LayerExtent]:
    """The extents of what a reader of ``dev`` sees, BACKING runs resolved down the
    backing chain: the one walker of a chain (as QEMU's
    ``bdrv_co_common_block_status_above``), for ``map``, the NBD server's block status
    and imaging. Beyond a shorter backing image, or with none, a BACKING run reads as
    zeros: a ZERO extent, not allocated, at the depth of the layer whose backing image
    ended (qemu's block status sets ZERO there, on that layer, "offset >= the backing
    file's length", and ``qemu-img map`` 7.2 prints that layer's depth). Extents
    are clipped to ``[offset, offset+length)``, and a plugin that stops short has the
    rest reported as DATA (always safe). ``as_mapped``: each layer's ``map_extents``
    (what ``qemu-img map`` prints) instead of its ``extents``."""
    if length is None:
        length = dev.size - offset
    yield from _chain_extents(dev, offset, length, 0, as_mapped)


def _chain_extents(dev: "BlockDevice", offset: int, length: int,
                   depth: int, as_mapped: bool = False) -> Iterator[LayerExtent]:
    end = offset + length
    pos = offset
    for e in (dev.map_extents if as_mapped else dev.extents)(offset, length):
        start, stop = max(e.offset, pos), min(e.end, end)
        if stop <= start:
            continue
        pos = stop
        if e.kind is ExtentKind.BACKING:
            below = dev.backing
            inside = 0 if below is None else max(0, min(stop, below.size) - start)
            if inside:
                yield from _chain_extents(below, start, inside, depth + 1,
                                          as_mapped)
            if start + inside < stop:
                yield LayerExtent(Extent(start + inside, stop - start - inside,
                                         ExtentKind.ZERO, False), depth, dev)
        elif start == e.offset and stop == e.end:
            yield LayerExtent(e, depth, dev)
        else:
            host = None if e.host_offset is None else e.host_offset + start - e.offset
            yield LayerExtent(Extent(start, stop - start, e.kind, e.allocated, host,
                                     e.host_file), depth, dev)
        if pos >= end:
            return
    if pos < end:
        yield LayerExtent(Extent(pos, end - pos, ExtentKind.DATA), depth, dev)


class ImageInfo(Record):
    """Structured header facts; ``to_json`` uses qemu-img's JSON key names.

    ``format_specific``: qemu-img's "format-specific" data (key names as qemu-img
    prints them); ``details``: facts qemu-img does not show (header fields), under our
    own names; ``partitions``: the partition table the virtual disk holds
    (``partitions.PartitionTable.to_json()``)."""
    __slots__ = ("filename", "format", "virtual_size", "actual_size", "cluster_size",
                 "backing_filename", "full_backing_filename", "backing_format", "dirty",
                 "encrypted", "format_specific", "snapshots", "details", "partitions",
                 "__dict__")

    def __init__(self, filename: str, format: str, virtual_size: int,
                 actual_size: int | None = None, cluster_size: int | None = None,
                 backing_filename: str | None = None,
                 full_backing_filename: str | None = None,
                 backing_format: str | None = None, dirty: bool = False,
                 encrypted: bool = False, format_specific: dict | None = None,
                 snapshots: list | None = None, details: dict | None = None,
                 partitions: dict | None = None):
        self.filename = filename
        self.format = format
        self.virtual_size = virtual_size
        self.actual_size = actual_size
        self.cluster_size = cluster_size
        self.backing_filename = backing_filename
        self.full_backing_filename = full_backing_filename
        self.backing_format = backing_format
        self.dirty = dirty
        self.encrypted = encrypted
        self.format_specific: dict[str, object] = {} if format_specific is None \
            else format_specific
        self.snapshots: list[dict[str, object]] = [] if snapshots is None else snapshots
        self.details: dict[str, object] = {} if details is None else details
        self.partitions: dict[str, object] | None = partitions

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"virtual-size": self.virtual_size, "filename": self.filename,
                               "format": self.format}
        if self.actual_size is not None:
            out["actual-size"] = self.actual_size
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        if self.encrypted:
            out["encrypted"] = True
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
            out["full-backing-filename"] = self.full_backing_filename or self.backing_filename
            if self.backing_format:
                out["backing-filename-format"] = self.backing_format
        if self.snapshots:
            out["snapshots"] = self.snapshots
        if self.format_specific:
            out["format-specific"] = {"type": self.format, "data": self.format_specific}
        out["dirty-flag"] = self.dirty
        if self.details:
            out["diskforge"] = self.details
        if self.partitions is not None:
            out["partitions"] = self.partitions
        return out


class Backing(FrozenRecord):
    """What a writer needs to make an overlay: the name to record in the new image (as
    the user gave it, usually relative to the new image's directory), the backing
    image's format, and the opened backing device (for its size and for copy-on-write).
    """
    __slots__ = ("name", "format", "device")

    def __init__(self, name: str, format: str, device: "BlockDevice | None" = None):
        self.name = name
        self.format = format
        self.device = device


class BlockDevice(abc.ABC):
    """A virtual disk. Subclasses implement ``readinto`` and, where they can, ``extents``
    and the write operations.

    Reads of any length at any offset inside ``[0, size)`` are correct; alignment is the
    plugin's business. A device owns the backing device it opened and closes it.
    """

    size: int = 0
    format: str = "?"
    backing: "BlockDevice | None" = None
    path: str | None = None
    writable: bool = False
    closed: bool = False

    # -- reading ------------------------------------------------------------------
    @abc.abstractmethod
    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` with the disk bytes at ``offset``; returns ``len(buf)``."""

    def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Coalesced extents covering ``[offset, offset+length)`` in order.
        A format that cannot tell reports DATA."""
        if length is None:
            length = self.size - offset
        if length > 0:
            yield Extent(offset, length, ExtentKind.DATA)

    def map_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents ``qemu-img map`` prints: ``extents`` itself, unless qemu's
        driver of the format reports coarser runs than diskforge finds (a dynamic
        VHD's whole blocks). Only ``map`` asks; convert, compare and the NBD server
        keep the finer ``extents`` (holes inside a block are never read)."""
        return self.extents(offset, length)

    # -- writing ------------------------------------------------------------------
    # As nbdkit's server checks every request before a plugin sees it: ``write`` and
    # ``write_zeroes`` check writability and the range here, once, then call the
    # format's hooks ``_write`` and ``_write_zeroes``, which may assume both.
    def write(self, offset: int, data) -> None:
        """Store ``data`` at ``offset`` (the device must be open writable)."""
        mv = memoryview(data).cast("B")
        self.check_writable(offset, len(mv))
        self._write(offset, mv)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros (holes where the format can)."""
        self.check_writable(offset, length)
        self._write_zeroes(offset, length)

    def check_writable(self, offset: int, length: int) -> None:
        """Refuse a write to a read-only device or outside the disk."""
        if not self.writable:
            raise UnsupportedError(f"{self.format} image is open read-only", self.path)
        self.check_range(offset, length)

    def _write(self, offset: int, mv: memoryview) -> None:
        """The format's write of a checked request."""
        raise UnsupportedError(f"{self.format} image is open read-only", self.path)

    def _write_zeroes(self, offset: int, length: int) -> None:
        """The format's zeroing of a checked range; by default, zeros written."""
        for pos, n in pieces(offset, length, ZERO_BUFFER_SIZE):
            self._write(pos, ZEROES[:n])

    def flush(self) -> None:
        pass

    # -- optional maintenance: formats override what they support ---------------------
    def check(self, repair: "Repair | None" = None) -> "CheckResult":
        """Consistency check (``diskforge check``), repairing what ``repair`` asks
        (``Repair.NONE`` in the formats that check)."""
        raise UnsupportedError("This image format does not support checks", self.path)

    def verify(self) -> list[str]:
        """Problems the format's own checksums reveal (``diskforge verify``); [] if none."""
        raise UnsupportedError(f"{self.format} images carry no checksums to verify",
                               self.path)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Change the virtual size; shrinking only when ``shrink`` is set."""
        raise UnsupportedError(f"not supported yet: resizing {self.format} images",
                               self.path)

    def preallocate(self, offset: int, length: int, mode: str) -> None:
        """Allocate ``[offset, offset+length)`` as ``resize --preallocation=MODE`` does
        for the grown part (``metadata``, ``falloc``, ``full``), contents unchanged.
        With ``length`` 0 only refuse what cannot be done (``resize`` asks that before
        it changes the size)."""
        raise UnsupportedError(f"not supported yet: --preallocation={mode} for"
                               f" {self.format} images", self.path)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point the image at another backing file (rebase -u) without copying data."""
        raise UnsupportedError(f"{self.format} images have no backing file to change",
                               self.path)

    def relink_backing(self) -> None:
        """The backing file was just written (``commit``): record what the format keeps
        of its identity (VHDX: its DataWriteGuid), so the image still opens on it.
        Formats that record nothing do nothing."""

    def make_empty(self) -> None:
        """Drop what this layer stores so it reads through to its backing file (what
        ``commit`` does to the committed image)."""
        raise UnsupportedError(f"not supported yet: emptying {self.format} images",
                               self.path)

    def amend(self, options, given: set[str]) -> None:
        """Change the format options named in ``given`` in place (``diskforge amend``)."""
        raise UnsupportedError(f"not supported yet: amending {self.format} images",
                               self.path)

    # persistent dirty bitmaps (``diskforge bitmap``, ``convert --bitmaps``, see
    # dirty_bitmaps.py); formats that cannot hold them have none and store none
    def load_bitmaps(self, *, data: bool = True) -> "list | None":
        """The image's persistent bitmaps (``DirtyBitmap``; without their bits unless
        ``data``), or None when the format (or this version of it) has no place for
        them."""
        return None

    def store_bitmaps(self, bitmaps: list) -> None:
        """Replace the image's persistent bitmaps with ``bitmaps``."""
        if bitmaps:
            raise UnsupportedError(f"Can't store persistent bitmaps to {self.path}:"
                                   " Operation not supported", self.path)

    def check_new_bitmap(self, name: str, granularity: int) -> None:
        """Raise (qemu's words) when a new persistent bitmap cannot be stored here."""
        raise UnsupportedError(f"Can't store persistent bitmaps to {self.path}:"
                               " Operation not supported")

    def default_bitmap_granularity(self) -> int:
        return 65536

    # internal snapshots (``diskforge snapshot``); a snapshot is found by ID, then name
    def list_snapshots(self) -> list[dict[str, object]]:
        """qemu-img's JSON for each internal snapshot."""
        return []

    def create_snapshot(self, name: str) -> None:
        raise UnsupportedError(f"{self.format} images have no internal snapshots",
                               self.path)

    def apply_snapshot(self, key: str) -> None:
        raise UnsupportedError(f"{self.format} images have no internal snapshots",
                               self.path)

    def delete_snapshot(self, key: str) -> None:
        raise UnsupportedError(f"{self.format} images have no internal snapshots",
                               self.path)

    # -- facts --------------------------------------------------------------------
    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path or "", format=self.format, virtual_size=self.size)

    def files(self) -> list[str]:
        """Every file this device reads, its backing chain included (used to refuse
        writing an output onto one of its own inputs)."""
        own = [self.path] if self.path else []
        return own + (self.backing.files() if self.backing is not None else [])

    def host_backend(self, extent: Extent) -> "FileBackend | None":
        """The file that holds a DATA ``extent`` of this layer byte for byte at
        ``extent.host_offset`` — not compressed, not encrypted, not overlaid by a log —
        so ``convert -C`` can copy it inside the kernel (copy_file_range). None, the
        default, where a format cannot promise that; formats that can override this."""
        return None

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.backing is not None:
            self.backing.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers for subclasses -----------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"range {offset}+{length} is outside the disk "
                             f"({self.size} bytes)", self.path)


class FileDevice(BlockDevice):
    """A device whose image is one file: opening the backend, running the format's
    ``_open`` and cleaning up when that fails happen here, in one place.

    Subclasses implement ``_open(**kwargs)`` (parse and validate the headers, open the
    backing device) with ``self.backend``, ``self.path``, ``self.writable`` and
    ``self.policy`` set. When ``_open`` raises, whatever it opened (the backing device,
    the backend) is closed before the error propagates. ``lock`` is the backend's QEMU
    lock request (``locks.py``; True: a reader's or a writer's, by ``writable``).

    ``backend``, when given, is an already open backend the image is read from instead
    of ``path`` (a disk stored inside another file, such as a member of an OVA's tar, or
    a remote object); the device owns it and closes it. ``path`` then only names the
    image in messages and resolves what the image names (extents, backing files).
    """

    backend: "FileBackend"

    def __init__(self, path: str | os.PathLike, *, writable: bool = False, policy=None,
                 lock: "Access | bool" = True, backend: "FileBackend | None" = None,
                 **kwargs) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.policy = policy
        self.backend = backend if backend is not None else \
            FileBackend(self.path, writable=writable, lock=lock)
        try:
            self._open(**kwargs)
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _open(self, **kwargs) -> None:
        """Read and validate the image's structures (``self.backend`` is open)."""

    def _err(self, message: str, structure: str, field: str | None = None) -> FormatError:
        """A FormatError naming this image and the structure and field at fault."""
        return FormatError(message, self.path, structure=structure, field=field)

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        finally:
            self.backend.close()


class FileBytesDevice(FileDevice):
    """A device whose virtual disk is a file's own bytes (raw files and devices, ISOs):
    holes are ZERO extents with their file offset, as qemu's file driver shows them.
    Subclasses that check the bytes (an ISO's volume descriptors) extend ``_open``."""

    def __init__(self, path: str, *, writable: bool = False, **kwargs) -> None:
        # QEMU's raw driver lets other writers in; see locks.py
        super().__init__(path, writable=writable,
                         lock=access_for(writable, shares_writes=True), **kwargs)

    def _open(self) -> None:
        self.size = self.backend.size

    def readinto(self, offset: int, buf) -> int:
        n = len(buf)
        self.check_range(offset, n)
        got = self.backend.readinto(offset, buf)
        if got < n:  # the file shrank under us: what is gone reads as zeros
            fill_zero(buf, got, n)
        return n

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(
            Extent(o, n, ExtentKind.DATA if data else ExtentKind.ZERO, True, o)
            for o, n, data in self.backend.data_ranges(offset, offset + length))

    def host_backend(self, extent: Extent) -> "FileBackend | None":
        return plain_host(self.backend, extent)


def plain_host(backend, extent: Extent) -> "FileBackend | None":
    """``backend`` when it is a local file and ``extent`` names an offset in it (no
    other file): the usual answer of ``BlockDevice.host_backend`` for formats that
    store data uncompressed in their own file."""
    if extent.host_offset is None or extent.host_file is not None:
        return None
    return backend if isinstance(backend, FileBackend) else None


# The kinds of a run of a table-mapped disk (``TableDevice._runs``).
RUN_UNALLOCATED = 0   # not stored here: the backing device, or zeros without one
RUN_ZERO = 1          # reads as zeros, whatever the backing device holds
RUN_DATA = 2          # stored uncompressed at ``host``
RUN_COMPRESSED = 3    # one compressed cluster; ``host`` is what the format needs to find it


class TableDevice(FileDevice):
    """A device whose format maps the disk through tables to runs of the file (qcow
    version 1, QED, Parallels): a subclass yields the runs of a range from ``_runs``
    (built with :func:`merge_runs`) and, if it has compressed clusters, reads one with
    ``_read_compressed`` (called from several threads at once when a read covers
    several: it must only read the file and write its piece); reading, the extent map and the backing fallback are written
    once, here. ``backing`` is the backing device or None."""

    backing: "BlockDevice | None" = None

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """``(pos, n, kind, host)`` covering ``[offset, offset+length)`` in order."""
        raise NotImplementedError

    def _read_compressed(self, pos: int, host: int, piece: memoryview) -> None:
        raise UnsupportedError("internal: this format has no compressed clusters",
                               self.path)

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        compressed = []
        for pos, cnt, kind, host in self._runs(offset, n):
            piece = mv[pos - offset:pos - offset + cnt]
            if kind == RUN_DATA:
                got = self.backend.readinto(host, piece)
                if got < cnt:  # a last cluster cut short reads as zeros, as in qemu
                    fill_zero(piece, got)
            elif kind == RUN_COMPRESSED:
                compressed.append((pos, host, piece))
            elif kind == RUN_UNALLOCATED and self.backing is not None and \
                    pos < self.backing.size:
                inside = min(cnt, self.backing.size - pos)
                self.backing.readinto(pos, piece[:inside])
                fill_zero(piece, inside)
            else:
                fill_zero(piece)
        if len(compressed) == 1:
            self._read_compressed(*compressed[0])
        elif compressed:
            # a large read's compressed clusters, decoded on all cores (parallel.py);
            # _read_compressed must be safe to call from several threads at once
            from . import parallel
            parallel.run(lambda unit: self._read_compressed(*unit), compressed)
        return n

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        hole = ExtentKind.BACKING if self.backing is not None else ExtentKind.ZERO

        def gen():
            for pos, cnt, kind, host in self._runs(offset, length):
                if kind == RUN_DATA:
                    yield Extent(pos, cnt, ExtentKind.DATA, True, host)
                elif kind == RUN_COMPRESSED:
                    yield Extent(pos, cnt, ExtentKind.DATA, True)
                elif kind == RUN_ZERO:
                    yield Extent(pos, cnt, ExtentKind.ZERO, True)
                else:
                    yield Extent(pos, cnt, hole, False)
        return coalesce(gen())


def merge_runs(pieces) -> Iterator[tuple[int, int, int, int]]:
    """Join consecutive ``(pos, n, kind, host)`` pieces into runs: unallocated and zero
    pieces of one kind always, data pieces when their bytes follow each other in the
    file, compressed clusters never (each is decompressed on its own)."""
    run: list[int] | None = None
    for pos, n, kind, host in pieces:
        if run is not None and run[2] == kind and kind != RUN_COMPRESSED and \
                (kind != RUN_DATA or run[3] + run[1] == host):
            run[1] += n
            continue
        if run is not None:
            yield run[0], run[1], run[2], run[3]
        run = [pos, n, kind, host]
    if run is not None:
        yield run[0], run[1], run[2], run[3]


class FilterDevice(BlockDevice):
    """A device that forwards to an inner one, as nbdkit's filters forward to ``next``:
    subclasses override only what they change (a rescue reader that maps read errors
    to zeros, a window onto part of a disk). It owns the inner device and closes it.
    """

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.format = inner.format
        self.path = inner.path
        self.writable = inner.writable
        self.backing = None  # the inner device closes its own chain

    def readinto(self, offset: int, buf) -> int:
        return self.inner.readinto(offset, buf)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self.inner.extents(offset, length)

    def _write(self, offset: int, mv: memoryview) -> None:
        self.inner.write(offset, mv)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def info(self) -> ImageInfo:
        return self.inner.info()

    def files(self) -> list[str]:
        return self.inner.files()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()


class ImageWriter(abc.ABC):
    """The sink every format offers: one writer serves convert, create and imaging.

    Contract (what ``ops.convert`` guarantees):
    - calls come in increasing, non-overlapping offset order;
    - ``write(offset, data)``: store these bytes; ``data`` is only valid during the call;
    - ``zero(offset, length)``: this range must read as zeros, even over a backing file;
    - a range given to neither reads through to the backing image (zeros without one);
    - ``finish()`` makes the image complete and puts it under its final name;
      ``abort()`` (also on an exception inside ``with``) leaves nothing behind.

    Writers with CPU-heavy work (compression) set ``parallel = True``: then convert runs
    ``prepare(offset, data)`` in a thread pool (it must be thread-safe and must not
    keep ``data``) and hands each result, in order, to ``write_prepared``.
    """

    # the unit the writer allocates in: convert detects zeros per granule of this size
    granularity: int = 4096
    parallel: bool = False

    def prepare(self, offset: int, data) -> object:
        return data

    @abc.abstractmethod
    def write_prepared(self, offset: int, prepared: object) -> None:
        """Store what ``prepare`` returned for ``offset``."""

    def write(self, offset: int, data) -> None:
        self.write_prepared(offset, self.prepare(offset, data))

    @abc.abstractmethod
    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> None:
        """Complete the image and put it under its final name: the format's
        ``_finish`` writes its closing structures, ``_commit`` puts the output in
        place; on any failure the output is discarded (``abort``) and the error
        re-raised, so a failed finish leaves nothing behind."""
        try:
            self._finish()
            self._commit()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> None:
        """The format's closing structures (tables, trailers, headers)."""

    def _commit(self) -> None:
        """Put the output in place: by default the ``out`` file (an AtomicFile)."""
        out = getattr(self, "out", None)
        if out is not None:
            out.commit()

    @abc.abstractmethod
    def abort(self) -> None: ...

    # -- optional: resumable output (imaging) ------------------------------------------
    def checkpoint(self) -> dict:
        """Make everything written so far durable in the partial output and return the
        writer's state (JSON-able, naming the partial file) from which
        ``Format.resume_writer`` can continue after an interruption. Called only
        between calls, at an offset everything before which has been written."""
        raise UnsupportedError("not supported yet: resumable output for this format")

    def suspend(self) -> None:
        """Stop after a failure or interruption, keeping the output of the last
        checkpoint for a resume (writers that cannot resume just abort)."""
        self.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class DeviceWriter(ImageWriter):
    """An ImageWriter over a writable BlockDevice: writes in place (``convert -n``,
    restore onto a device). It cannot be atomic; ``abort`` only flushes."""

    def __init__(self, device: BlockDevice, *, granularity: int = 4096):
        self.device = device
        self.granularity = granularity

    def write_prepared(self, offset: int, prepared) -> None:
        self.device.write(offset, prepared)

    def zero(self, offset: int, length: int) -> None:
        self.device.write_zeroes(offset, length)

    def _finish(self) -> None:
        self.device.flush()

    def abort(self) -> None:
        try:
            self.device.flush()
        except DiskforgeError:
            pass


class FileBackend(ReadsBytes):
    """An open regular file or block device, read and written with pread/pwrite.

    Formats use it for every byte of I/O so that OS errors become one-line
    ImageIOErrors naming the file, and so that holes can be asked for and made.

    While open it holds QEMU's image locks (``locks.py``): ``lock=True`` takes what a
    reader or a writer of an image with metadata takes, an ``Access`` takes that, and
    ``lock=False`` none (a glance such as probing, which needs no consistency).
    """

    _lock: "Hold | None" = None
    _direct_fd = -1          # a second descriptor with O_DIRECT (qemu-img's -t/-T none)
    DIRECT_ALIGN = 4096      # offsets, lengths and buffers of O_DIRECT reads
    DIRECT_CHUNK = 1 << 20

    def __init__(self, path: str | os.PathLike, *, writable: bool = False,
                 fd: int | None = None, lock: "Access | bool" = True,
                 referenced: bool = False):
        self.path = os.fspath(path)
        self.writable = writable
        if fd is None:
            # FIFOs, sockets, char devices refused; a file an image names
            # (``referenced``) must be a regular file outside /proc, /sys, /dev
            from .devices import open_input
            fd = open_input(self.path, writable=writable, referenced=referenced)
        self.fd = fd
        st = os.fstat(fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise ImageIOError("is a directory, not an image", self.path)
        if lock:
            try:
                self._lock = acquire(fd, self.path, access_for(writable)
                                     if lock is True else lock)
            except BaseException:
                os.close(fd)
                raise

    # -- sizes ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # -- I/O ----------------------------------------------------------------------------
    def use_direct_io(self) -> bool:
        """Read, and when open writable also write, from now on bypassing the page cache
        (O_DIRECT), as qemu-img's cache mode ``none`` does. False (and nothing changes)
        where the system has no O_DIRECT or the file is a block device written in place
        (buffered, as before); where the file system refuses O_DIRECT (EINVAL), an
        ImageIOError with qemu's words, since qemu-img fails there too.

        Why a second descriptor: the first keeps the locks and serves what cannot be
        aligned, and O_DIRECT's alignment rules then bind only the second, which is
        used through an aligned bounce buffer (``_direct_readinto``,
        ``_direct_pwrite``) whatever the caller asks for."""
        if self._direct_fd >= 0:
            return True
        if not hasattr(os, "O_DIRECT") or self.is_block_device and self.writable:
            return False
        mode = os.O_RDWR if self.writable else os.O_RDONLY
        try:
            fd = os.open(self.path, mode | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == 22:  # EINVAL; qemu_open's message (util/osdep.c)
                raise ImageIOError(f"Could not open '{self.path}': filesystem does not"
                                   " support O_DIRECT", self.path) from None
            raise ImageIOError.from_os(e, self.path) from None
        a, b = os.fstat(fd), os.fstat(self.fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):  # renamed meanwhile: not ours
            os.close(fd)
            return False
        self._direct_fd = fd
        return True

    def _direct_pwrite(self, offset: int, mv: memoryview) -> None:
        """Write ``mv`` at ``offset``: the whole aligned blocks through the O_DIRECT
        descriptor (copied into an aligned bounce buffer), an unaligned head and tail
        through the buffered one. Both reach the same file, and Linux writes back and
        drops cached pages of a range before direct I/O on it, so the two stay coherent;
        the pieces never share a page."""
        align = self.DIRECT_ALIGN
        head = min(len(mv), -offset % align)
        body = (len(mv) - head) // align * align
        if head:
            self._buffered_pwrite(offset, mv[:head])
        if body:
            # page-aligned; one per call, so writers in several threads never share it
            bounce = mmap.mmap(-1, min(body, self.DIRECT_CHUNK))
            try:
                done = 0
                while done < body:
                    k = min(body - done, self.DIRECT_CHUNK)
                    bounce[:k] = mv[head + done:head + done + k]
                    pos = offset + head + done
                    try:
                        with memoryview(bounce) as view:
                            n = os.pwritev(self._direct_fd, [view[:k]], pos)
                    except OSError as e:
                        if e.errno != 22:  # EINVAL: alignment this file refuses; buffered
                            raise ImageIOError.from_os(e, self.path) from None
                        n = 0
                    if n < k:  # short or refused: the rest of this piece buffered
                        self._buffered_pwrite(pos + n, mv[head + done + n:head + done + k])
                    done += k
            finally:
                bounce.close()
        if head + body < len(mv):
            self._buffered_pwrite(offset + head + body, mv[head + body:])

    def _direct_readinto(self, offset: int, mv: memoryview) -> int:
        import mmap
        align, total = self.DIRECT_ALIGN, 0
        bounce = mmap.mmap(-1, self.DIRECT_CHUNK + align)  # page-aligned
        try:
            while total < len(mv):
                pos = offset + total
                start = pos - pos % align
                want = min(len(mv) - total, self.DIRECT_CHUNK)
                span = -(-(pos + want - start) // align) * align
                n = os.preadv(self._direct_fd, [memoryview(bounce)[:span]], start)
                got = min(max(0, n - (pos - start)), want)
                if got <= 0:
                    break
                mv[total:total + got] = bounce[pos - start:pos - start + got]
                total += got
                if n < span:  # end of file
                    break
        finally:
            bounce.close()
        return total

    def readinto(self, offset: int, buf) -> int:
        """Read up to ``len(buf)`` bytes at ``offset``; short only at end of file."""
        mv = memoryview(buf).cast("B")
        if self._direct_fd >= 0:
            try:
                return self._direct_readinto(offset, mv)
            except OSError as e:
                if e.errno != 22:  # EINVAL: alignment this device refuses; buffered
                    raise ImageIOError.from_os(e, self.path) from None
                os.close(self._direct_fd)
                self._direct_fd = -1
        total = 0
        try:
            while total < len(mv):
                n = os.preadv(self.fd, [mv[total:]], offset + total)
                if n == 0:
                    break
                total += n
        except OSError as e:
            raise ImageIOError.from_os(e, self.path) from None
        return total

    def pwrite(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        if self.is_block_device and offset + len(mv) > self.size:
            from .devices import too_small  # a device cannot grow: say so, write nothing
            raise too_small(self.path, self.size, offset + len(mv))
        if self._direct_fd >= 0 and self.writable:
            self._direct_pwrite(offset, mv)
        else:
            self._buffered_pwrite(offset, mv)

    def _buffered_pwrite(self, offset: int, mv: memoryview) -> None:
        try:
            while len(mv):
                n = os.pwrite(self.fd, mv, offset)
                mv = mv[n:]
                offset += n
        except OSError as e:
            raise ImageIOError.from_os(e, self.path) from None

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zero bytes over ``[offset, offset+length)`` (allocating them: for holes,
        see ``punch_hole``)."""
        for pos, n in pieces(offset, length, ZERO_BUFFER_SIZE):
            self.pwrite(pos, ZEROES[:n])

    def truncate(self, size: int) -> None:
        if self.is_block_device:
            from .devices import too_small
            if size > self.size:
                raise too_small(self.path, self.size, size)
            raise UnsupportedError("a block device cannot be truncated", self.path)
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise ImageIOError.from_os(e, self.path) from None

    def flush(self, *, durable: bool = True) -> None:
        if durable:
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                raise ImageIOError.from_os(e, self.path) from None

    # -- holes --------------------------------------------------------------------------
    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(offset, length, is_data)`` runs from SEEK_DATA/SEEK_HOLE. Where the file
        system cannot tell (or for a block device), everything is data."""
        if self.is_block_device or not hasattr(os, "SEEK_DATA"):
            if end > offset:
                yield offset, end - offset, True
            return
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:  # ENXIO: no data after pos
                    yield pos, end - pos, False
                    return
                yield pos, end - pos, True  # unsupported: assume data
                return
            if data > pos:
                hole_end = min(data, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                if pos >= end:
                    return
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(hole, end)
            if hole <= pos:  # defensive: never loop forever
                hole = end
            yield pos, hole - pos, True
            pos = hole

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range, keeping the size; False when the system cannot."""
        from . import _fallocate
        return _fallocate.punch_hole(self.fd, offset, length)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WindowBackend(ReadsBytes):
    """A read-only window ``[offset, offset+length)`` of another backend, seen as a
    file of ``length`` bytes: FileBackend's reading interface, so any format's reader
    opens a disk stored inside another file (a member of an OVA's tar) in place,
    without extracting it (``Format.open(name, backend=WindowBackend(...))``).

    Reads are clipped to the window (never a byte of the neighbouring member), holes
    are the inner file's holes shifted into the window, and every write is refused.
    ``name`` names the window in messages (``vm.ova:disk1.vmdk``). The inner backend
    stays its opener's: closing the window does not close it, so several windows (the
    disk, the members a manifest check streams) share one open file and its locks.
    """

    is_block_device = False
    writable = False

    def __init__(self, inner: "FileBackend | WindowBackend", offset: int, length: int,
                 name: str | None = None) -> None:
        if offset < 0 or length < 0:
            raise UsageError(f"window {offset}+{length} is not a range of the file",
                             inner.path)
        self.inner = inner
        self.offset = offset
        self.length = length
        self.path = name if name is not None else inner.path
        self.closed = False

    @property
    def size(self) -> int:
        return self.length

    def allocated_bytes(self) -> int:
        return sum(n for _, n, data in self.data_ranges(0, self.length) if data)

    def readinto(self, offset: int, buf) -> int:
        """Read up to ``len(buf)`` bytes at ``offset`` of the window; short only at
        the window's end (or where the inner file ends first)."""
        if self.closed:
            raise ImageIOError("read after close", self.path)
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self.length - offset))
        if n == 0 or offset < 0:
            return 0
        return self.inner.readinto(self.offset + offset, mv[:n])

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        end = min(end, self.length)
        if end <= offset:
            return
        for pos, n, data in self.inner.data_ranges(self.offset + offset, self.offset + end):
            yield pos - self.offset, n, data

    def _refuse(self, *args, **kwargs):
        raise UnsupportedError("is read-only here (a window onto part of another file);"
                               " nothing is written into it", self.path)

    pwrite = write_zeroes = truncate = punch_hole = _refuse

    def flush(self, *, durable: bool = True) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
