"""Apple sparse images (UDSP, ``.sparseimage``) and sparse bundles (UDSB, ``.sparsebundle``).

Both store the disk in fixed-size *bands* allocated as they are written; a band never
written reads as zeros. They are what hdiutil makes with ``-type SPARSE`` and
``-type SPARSEBUNDLE``. Read-only here.

Sparse image (one file, big-endian; libmodi's "Mac OS disk image types", §Sparse disk
image): a 4096-byte header, ``SparseImageHeader`` then an array of 32-bit band numbers
at offset 64. Array slot ``i`` holds band ``n - 1`` (0: an unused slot) stored at
``4096 + i * band_size``: bands live in the file in the order they were first written.

Sparse bundle (a directory): ``Info.plist`` (``band-size``, ``size`` in bytes,
``diskimage-bundle-type`` = com.apple.diskimage.sparsebundle) and ``bands/<n>``, band
``n`` in lower-case hexadecimal, each at most ``band-size`` bytes; a missing band or the
part of a band past its file's end reads as zeros. Band files are opened through the
open policy (a band symlinked outside the bundle is refused) and a few at a time.
"""

from __future__ import annotations

import bisect
import collections
import os

from ...blockdev import (BlockDevice, Extent, ExtentKind, FileBackend, FileDevice, ImageInfo,
                         coalesce, fill_zero, pieces)
from ...devices import open_input_file
from ...errors import FormatError, ImageIOError, UnsupportedError
from ...policy import OpenPolicy
from .structs import BAND_TABLE_OFFSET, HEADER_SIZE, SECTOR, SparseImageHeader

MAX_BAND_BYTES = 1 << 30           # hdiutil's bands are 1 MiB (sparse image), 8 MiB (bundle)


class _Banded(BlockDevice):
    """Shared reading logic: ``_band(i)`` says where band ``i`` lives."""
    band_size: int

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        for pos, take in pieces(offset, n, self.band_size):
            band, within = divmod(pos, self.band_size)
            self._read_band(band, within, mv[pos - offset:pos - offset + take])
        return n

    def extents(self, offset: int = 0, length: int | None = None):
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return coalesce(self._extents(offset, offset + length))

    def _present(self) -> list[int]:
        """The bands that have bytes stored, in increasing order."""
        raise NotImplementedError

    def _extents(self, start: int, end: int):
        """Walks the bands present, not the virtual disk band by band: tiny bands and
        a huge ``size`` (2^62 bytes in 512-byte bands) would be 2^53 steps."""
        bs = self.band_size
        present = self._present()
        i = bisect.bisect_left(present, start // bs)
        pos = start
        while i < len(present) and present[i] * bs < end:
            band = present[i]
            i += 1
            first = band * bs
            a, b = max(pos, first), min(end, first + self._stored(band))
            if b <= a:
                continue
            if a > pos:
                yield Extent(pos, a - pos, ExtentKind.ZERO, False)
            yield Extent(a, b - a, ExtentKind.DATA, True, self._host(band, a - first))
            pos = b
        if pos < end:
            yield Extent(pos, end - pos, ExtentKind.ZERO, False)


class SparseImageDevice(_Banded, FileDevice):
    format = "sparseimage"

    def _open(self) -> None:
        where = {"structure": "SparseImageHeader"}
        head = self.backend.read_exact(0, HEADER_SIZE, "sparse image header")
        if head[:4] != b"sprs":
            raise FormatError("no 'sprs' signature", self.path, **where)
        self.header = hdr = SparseImageHeader.parse(head)
        if hdr.version != 3:
            raise UnsupportedError(f"not supported yet: sparse image version {hdr.version}",
                                   self.path)
        if not 0 < hdr.sectors_per_band <= MAX_BAND_BYTES // SECTOR:
            raise FormatError(f"{hdr.sectors_per_band} sectors per band is out of range",
                              self.path, field="sectors_per_band", **where)
        self.band_size = hdr.sectors_per_band * SECTOR
        self.size = hdr.sector_count * SECTOR
        bands = -(-hdr.sector_count // hdr.sectors_per_band)
        if BAND_TABLE_OFFSET + 4 * bands > HEADER_SIZE:
            raise UnsupportedError(f"not supported yet: a sparse image of {bands} bands"
                                   " (its band table would not fit in the 4 KiB header)",
                                   self.path)
        file_size = self.backend.size
        self.slot_of: dict[int, int] = {}
        for slot in range(bands):
            value = int.from_bytes(head[BAND_TABLE_OFFSET + 4 * slot:
                                        BAND_TABLE_OFFSET + 4 * slot + 4], "big")
            if value == 0:
                continue
            band = value - 1
            if band >= bands:
                raise FormatError(f"slot {slot} holds band {band}, beyond the disk's"
                                  f" {bands} bands", self.path, field="band table", **where)
            if band in self.slot_of:
                raise FormatError(f"band {band} is stored twice (slots"
                                  f" {self.slot_of[band]} and {slot})", self.path,
                                  field="band table", **where)
            if HEADER_SIZE + slot * self.band_size >= file_size:
                raise FormatError(f"band {band} (slot {slot}) lies past the end of the file"
                                  f" ({file_size} bytes): truncated", self.path, **where)
            self.slot_of[band] = slot
        self.file_size = file_size

    def _present(self) -> list[int]:
        return sorted(self.slot_of)

    def _host(self, band: int, within: int) -> int:
        return HEADER_SIZE + self.slot_of[band] * self.band_size + within

    def _stored(self, band: int) -> int:
        if band not in self.slot_of:
            return 0
        return min(self.band_size, self.size - band * self.band_size,
                   self.file_size - self._host(band, 0))

    def _read_band(self, band: int, within: int, dst) -> None:
        stored = self._stored(band)
        k = max(0, min(len(dst), stored - within))
        if k:
            got = self.backend.readinto(self._host(band, within), dst[:k])
            if got != k:
                raise FormatError(f"band {band} is cut off (file truncated)", self.path)
        if k < len(dst):
            fill_zero(dst, k)

    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path, format=self.format, virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(),
                         cluster_size=self.band_size,
                         format_specific={"band-size": self.band_size,
                                          "bands-stored": len(self.slot_of)},
                         details={"version": self.header.version,
                                  "sectors-per-band": self.header.sectors_per_band})


BUNDLE_TYPE = "com.apple.diskimage.sparsebundle"
MAX_INFO_PLIST = 1 << 20           # hdiutil's is about 500 bytes
OPEN_BANDS = 16


class SparseBundleDevice(_Banded):
    format = "sparsebundle"

    def __init__(self, path: str, policy: OpenPolicy | None = None):
        from .plist import PlistError, loads
        self.path = path
        self.policy = policy or OpenPolicy()
        self.plist_path = os.path.join(path, "Info.plist")
        # the bundle's own parts are opened only where they resolve inside it (or an
        # allowed root): an Info.plist or bands/ symlinked elsewhere is refused
        self.policy.resolve(self.plist_path, "Info.plist", "bundle file Info.plist")
        try:
            with open_input_file(self.plist_path) as f:  # a FIFO is refused, not read
                raw = f.read(MAX_INFO_PLIST + 1)
        except OSError as e:
            raise ImageIOError.from_os(e, self.plist_path) from None
        if len(raw) > MAX_INFO_PLIST:
            raise FormatError(f"larger than {MAX_INFO_PLIST} bytes (hdiutil's is about"
                              " 500)", path, structure="Info.plist")
        try:
            info = loads(raw, max_bytes=MAX_INFO_PLIST, max_elements=1000)
        except PlistError as e:
            raise FormatError(f"Info.plist is not a valid property list ({e})", path,
                              structure="Info.plist") from None
        if not isinstance(info, dict) or info.get("diskimage-bundle-type") != BUNDLE_TYPE:
            raise FormatError(f"Info.plist does not say {BUNDLE_TYPE}", path,
                              structure="Info.plist", field="diskimage-bundle-type")
        band_size, size = info.get("band-size"), info.get("size")
        for name, value, hi in (("band-size", band_size, MAX_BAND_BYTES),
                                ("size", size, (1 << 63) - 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi \
                    or (name == "band-size" and value == 0):
                raise FormatError(f"{value!r} is not a valid {name}", path,
                                  structure="Info.plist", field=name)
        self.band_size, self.size = band_size, size
        self.info_plist = info
        self.bands_dir = os.path.join(path, "bands")
        if os.path.lexists(self.bands_dir):
            self.policy.resolve(self.plist_path, "bands", "bundle directory bands")
        self.sizes: dict[int, int] = {}
        count = -(-size // band_size)
        try:
            entries = list(os.scandir(self.bands_dir))
        except FileNotFoundError:
            entries = []  # no band was ever written
        except OSError as e:
            raise ImageIOError.from_os(e, self.bands_dir) from None
        for entry in entries:
            try:
                band = int(entry.name, 16)
            except ValueError:
                continue
            if entry.name != f"{band:x}" or band >= count:
                continue  # not a band name, or beyond the disk
            real = self.policy.resolve(self.plist_path, os.path.join("bands", entry.name),
                                       "band file")
            try:
                n = os.stat(real).st_size
            except OSError as e:
                raise ImageIOError.from_os(e, real) from None
            if n > band_size:
                raise FormatError(f"band file {entry.name} holds {n} bytes, more than the"
                                  f" band size {band_size}", path, structure="bands")
            self.sizes[band] = n
        self._bands = sorted(b for b, n in self.sizes.items() if n)
        self._open: collections.OrderedDict[int, FileBackend] = collections.OrderedDict()

    def _present(self) -> list[int]:
        return self._bands

    def _stored(self, band: int) -> int:
        return min(self.sizes.get(band, 0), self.size - band * self.band_size)

    def _host(self, band: int, within: int) -> int | None:
        return None  # each band is its own file

    def _backend(self, band: int) -> FileBackend:
        f = self._open.get(band)
        if f is not None:
            self._open.move_to_end(band)
            return f
        f = FileBackend(os.path.join(self.bands_dir, f"{band:x}"), referenced=True)
        self._open[band] = f
        while len(self._open) > OPEN_BANDS:
            self._open.popitem(last=False)[1].close()
        return f

    def _read_band(self, band: int, within: int, dst) -> None:
        k = max(0, min(len(dst), self._stored(band) - within))
        if k:
            f = self._backend(band)
            if f.readinto(within, dst[:k]) != k:
                raise FormatError(f"band file {band:x} shrank while open", self.path)
        if k < len(dst):
            fill_zero(dst, k)

    def files(self) -> list[str]:
        return [self.plist_path] + [os.path.join(self.bands_dir, f"{b:x}")
                                    for b in sorted(self.sizes)]

    def info(self) -> ImageInfo:
        allocated = 0
        for b in self.sizes:
            try:
                allocated += os.stat(os.path.join(self.bands_dir, f"{b:x}")).st_blocks * 512
            except OSError:
                pass
        return ImageInfo(filename=self.path, format=self.format, virtual_size=self.size,
                         actual_size=allocated, cluster_size=self.band_size,
                         format_specific={"band-size": self.band_size,
                                          "bands-stored": len(self.sizes)},
                         details={"bundle-backingstore-version":
                                  self.info_plist.get("bundle-backingstore-version")})

    def close(self) -> None:
        if not self.closed:
            for f in self._open.values():
                f.close()
            self._open.clear()
        super().close()
