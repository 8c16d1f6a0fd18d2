"""Where things go in the VMDK files we write: sparse-extent layout, extent splitting,
extent file names, the descriptor we write, and ``measure``.

Shared by the writers (``writer``, ``stream``) and ``VmdkFormat.measure`` so that what
``measure`` predicts is what the writers lay out. Facts, with where they come from:

- A hosted sparse extent as qemu-img lays it out (qemu ``block/vmdk.c``,
  ``vmdk_init_extent``): header (1 sector), embedded descriptor (sectors 1-20, only in
  a monolithic file), redundant grain directory, its grain tables, grain directory,
  its grain tables, then grains from ``overHead`` (rounded up to a grain). Every
  grain directory entry points at its table, whether or not the table has entries.
- twoGbMax* extents hold 2 GiB each (4194304 sectors), the last what is left, and are
  named ``NAME-s001.vmdk`` / ``NAME-f001.vmdk``; a monolithicFlat extent is
  ``NAME-flat.vmdk`` (qemu's and VMware's names).
- Grain table entries hold 32-bit sector numbers, so a sparse extent file cannot pass
  2 TiB; VMware's limit for a sparse disk's capacity is the same.
"""

from __future__ import annotations

import dataclasses
import os
import random

from .descriptor import Descriptor, ExtentLine
from .structs import (DEFAULT_GRAIN_SECTORS, DEFAULT_GTES_PER_GT, SECTOR,
                      default_geometry, grain_tables_needed, sectors)

SPLIT_SECTORS = (2 << 30) // SECTOR   # twoGbMax*: 2 GiB per extent (VMware, qemu)
MAX_SPARSE_BYTES = (1 << 32) * SECTOR  # 32-bit grain offsets: 2 TiB
GT_BYTES = DEFAULT_GTES_PER_GT * 4     # one grain table: 2 KiB, 4 sectors
GT_SECTORS = sectors(GT_BYTES)
QEMU_TOOLS_VERSION = "2147483647"      # qemu's and open-vmdk's default (INT32_MAX)
DEFAULT_HWVERSION = "4"


@dataclasses.dataclass(frozen=True)
class SparseLayout:
    """Sector positions of one hosted sparse extent of ``capacity`` sectors, as qemu
    lays it out. ``embedded_descriptor``: the descriptor lives in sectors 1-20
    (monolithicSparse; the split -sNNN extents carry none, as VMware's and qemu's)."""
    capacity: int
    embedded_descriptor: bool = True
    grain: int = DEFAULT_GRAIN_SECTORS
    gtes_per_gt: int = DEFAULT_GTES_PER_GT

    @property
    def gt_count(self) -> int:
        return grain_tables_needed(self.capacity, self.grain, self.gtes_per_gt)

    @property
    def gd_sectors(self) -> int:
        return sectors(self.gt_count * 4)

    @property
    def descriptor_offset(self) -> int:
        return 1 if self.embedded_descriptor else 0

    @property
    def descriptor_sectors(self) -> int:
        return 20 if self.embedded_descriptor else 0

    @property
    def rgd_offset(self) -> int:
        # right after the header and descriptor; a split extent without a descriptor
        # starts it at sector 1, as VMware's -s001 files do (qemu leaves 20 empty
        # descriptor sectors there)
        return 1 + self.descriptor_sectors

    @property
    def gd_offset(self) -> int:
        return self.rgd_offset + self.gd_sectors + GT_SECTORS * self.gt_count

    @property
    def overhead(self) -> int:
        end = self.gd_offset + self.gd_sectors + GT_SECTORS * self.gt_count
        return -(-end // self.grain) * self.grain

    def gt_at(self, directory_offset: int, index: int) -> int:
        """Sector of grain table ``index`` of the directory at ``directory_offset``."""
        return directory_offset + self.gd_sectors + GT_SECTORS * index

    @property
    def grains(self) -> int:
        return -(-self.capacity // self.grain)

    def file_bytes(self, allocated_grains: int) -> int:
        return (self.overhead + allocated_grains * self.grain) * SECTOR


def split_extents(capacity: int, split: bool) -> list[int]:
    """Sector counts of the extents of a disk of ``capacity`` sectors."""
    if not split:
        return [capacity]
    out = []
    left = capacity
    while left > 0:
        out.append(min(SPLIT_SECTORS, left))
        left -= out[-1]
    return out or [0]


def extent_names(descriptor_path: str, subformat: str, count: int) -> list[str]:
    """Base names of the extent files beside a descriptor, as qemu-img names them:
    ``disk.vmdk`` -> ``disk-flat.vmdk``, ``disk-s001.vmdk``, ``disk-f001.vmdk``."""
    base = os.path.basename(descriptor_path)
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, ext = base, ""
    ext = f".{ext}" if ext else ""
    if subformat == "monolithicFlat":
        return [f"{stem}-flat{ext}"]
    letter = "s" if subformat == "twoGbMaxExtentSparse" else "f"
    return [f"{stem}-{letter}{i:03d}{ext}" for i in range(1, count + 1)]


def new_cid(rng: random.Random) -> int:
    """A content ID: random, never 0xffffffff (no parent) or 0xfffffffe, which VMware
    reserves (open-vmdk ``writeDescriptor`` draws again on both)."""
    while True:
        cid = rng.getrandbits(32)
        if cid < 0xFFFFFFFE:
            return cid


def build_descriptor(*, subformat: str, capacity: int, extents: list[ExtentLine],
                     options, cid: int, parent_cid: int = 0xFFFFFFFF,
                     parent_hint: str | None = None,
                     rng: random.Random | None = None) -> Descriptor:
    """The descriptor we write. Hosted kinds: qemu-img's text key for key (its header
    keys, then ddb.virtualHWVersion, geometry, adapterType, toolsVersion).
    streamOptimized: what VMware's open-vmdk writes (``encoding``,
    ``ddb.longContentID``, cylinders rounded up and capped at 65535 for SCSI, 16383 for
    IDE as VMware caps them), which ESXi and OVF import expect."""
    hw = options.hwversion or ("6" if options.compat6 else DEFAULT_HWVERSION)
    tools = options.toolsversion or QEMU_TOOLS_VERSION
    adapter = options.adapter_type
    stream = subformat == "streamOptimized"
    d = Descriptor()
    d.header["version"] = "1"
    if stream:
        d.header["encoding"] = "UTF-8"
    d.cid = cid
    d.parent_cid = parent_cid
    d.header["createType"] = subformat
    if parent_hint is not None:
        d.header["parentFileNameHint"] = parent_hint
    d.extents = extents
    if stream:
        rng = rng or random.Random()
        words = [rng.getrandbits(32) for _ in range(3)]
        d.ddb["ddb.longContentID"] = "".join(f"{w:08x}" for w in words) + f"{cid:08x}"
    d.ddb["ddb.virtualHWVersion"] = hw
    if stream:
        heads = 16 if adapter == "ide" else 255
        cyl = min(-(-capacity // (heads * 63)), 16383 if adapter == "ide" else 65535)
        geometry = (cyl, heads, 63)
    else:
        geometry = default_geometry(capacity, adapter)
    d.ddb["ddb.geometry.cylinders"] = str(geometry[0])
    d.ddb["ddb.geometry.heads"] = str(geometry[1])
    d.ddb["ddb.geometry.sectors"] = str(geometry[2])
    d.ddb["ddb.adapterType"] = adapter
    d.ddb["ddb.toolsVersion"] = tools
    return d


def capacity_sectors(size: int) -> int:
    """The capacity of a disk of ``size`` bytes: whole sectors, rounded up (qemu)."""
    return sectors(size)


def measure(size: int, options, allocated) -> tuple[int, int]:
    """``(required, fully_allocated)`` bytes, summed over every file of the image.

    Hosted sparse: the metadata (rounded to a grain) plus one grain per grain the
    contents touch; streamOptimized: the same upper bound as if no grain compressed
    (a grain marker sector more per grain, plus the stream's markers, grain tables,
    directory and footer), as qcow2's measure does for compressed output; flat: the
    whole disk. Descriptor files count their text."""
    cap = capacity_sectors(size)
    sub = options.subformat
    desc_bytes = 1024  # a separate descriptor file: well under 1 KiB of text
    if sub in ("monolithicFlat", "twoGbMaxExtentFlat"):
        total = cap * SECTOR + desc_bytes
        return total, total
    grain = DEFAULT_GRAIN_SECTORS
    if sub == "streamOptimized":
        layout = SparseLayout(cap)
        touched = _touched_grains(allocated, grain, cap)
        per_grain = (grain + 1) * SECTOR  # 12-byte marker + deflate's worst case fits
        meta = (128 + 3 + layout.gd_sectors) * SECTOR  # header area, GD/footer/EOS
        used_gts = _touched_gts(allocated, grain, cap)
        req = meta + touched * per_grain + used_gts * (GT_SECTORS + 1) * SECTOR
        full = meta + layout.grains * per_grain + layout.gt_count * (GT_SECTORS + 1) * SECTOR
        return req, full
    split = sub == "twoGbMaxExtentSparse"
    req = full = desc_bytes if split else 0
    start = 0
    for ext_cap in split_extents(cap, split):
        layout = SparseLayout(ext_cap, embedded_descriptor=not split)
        touched = _touched_grains(allocated, grain, cap, start, start + ext_cap)
        req += layout.file_bytes(touched)
        full += layout.file_bytes(layout.grains)
        start += ext_cap
    return req, full


def _touched(allocated, unit: int, lo: int, hi: int) -> int:
    """How many ``unit``-sector blocks of sectors ``[lo, hi)`` the allocated extents
    touch: intervals merged in block units, so the work is per extent, not per block
    (a fully allocated 2 TiB disk is one extent, 33 million grains)."""
    spans = []
    for e in allocated or ():
        a = max(e.offset // SECTOR, lo)
        b = min(-(-(e.offset + e.length) // SECTOR), hi)
        if a < b:
            spans.append((a // unit, -(-b // unit)))
    count, reach = 0, -1
    for a, b in sorted(spans):
        a = max(a, reach)
        if b > a:
            count += b - a
            reach = b
    return count


def _touched_grains(allocated, grain: int, cap: int, lo: int = 0,
                    hi: int | None = None) -> int:
    return _touched(allocated, grain, lo, cap if hi is None else hi)


def _touched_gts(allocated, grain: int, cap: int) -> int:
    return _touched(allocated, grain * DEFAULT_GTES_PER_GT, 0, cap)


def sparse_header(layout: SparseLayout, *, version: int, flags: int,
                  gd_offset: int, rgd_offset: int, overhead: int,
                  compress: int = 0) -> bytes:
    """The 512-byte hosted sparse extent header (spec: "Hosted Sparse Extent Header").
    ``uncleanShutdown`` is 0: the file is complete when this is written."""
    from .structs import NEWLINE_TEST, SPARSE_MAGIC, SparseExtentHeader
    return SparseExtentHeader.build(dict(
        magicNumber=SPARSE_MAGIC, version=version, flags=flags,
        capacity=layout.capacity, grainSize=layout.grain,
        descriptorOffset=layout.descriptor_offset,
        descriptorSize=layout.descriptor_sectors, numGTEsPerGT=layout.gtes_per_gt,
        rgdOffset=rgd_offset, gdOffset=gd_offset, overHead=overhead,
        uncleanShutdown=0, newlineTest=NEWLINE_TEST, compressAlgorithm=compress,
        pad=bytes(433)))
