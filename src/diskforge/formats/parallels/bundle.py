"""A Parallels disk bundle (a ``.hdd`` directory with ``DiskDescriptor.xml``) as one
block device: its extents (``Storage``) side by side, each read as the current
snapshot sees it.

For each extent, the images of the current snapshot's chain (``descriptor.chain``)
are opened from the base up: a ``Plain`` image is the extent's raw bytes, a
``Compressed`` one an expandable image whose unallocated clusters read from the image
below it. Files are found as the descriptor names them, through the open policy
(confined to the bundle's directory; an absolute name that no longer exists is looked
for by its base name in the bundle, as a copied or moved bundle needs).

The extents must cover ``[0, Disk_size)`` in order without gaps or overlaps; an image
shorter than its extent reads as zeros past its end. Other snapshots than the current
one are listed by ``info`` and not readable ("not supported yet").
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator

from ...blockdev import (BlockDevice, Extent, ExtentKind, FileBytesDevice, ImageInfo,
                         chain_extents, coalesce, fill_zero)
from ...checks import CheckResult, Problem, Repair
from ...devices import referenced_files
from ...errors import FormatError, UnsupportedError
from ...policy import OpenPolicy
from . import descriptor as desc
from .image import ParallelsImage
from .structs import SECTOR

DESCRIPTOR = "DiskDescriptor.xml"


class ParallelsBundle(BlockDevice):
    """The bundle at ``path`` (the directory), read-only."""

    format = "parallels"

    def __init__(self, path: str, *, policy: OpenPolicy | None = None) -> None:
        self.path = os.fspath(path)
        self.policy = policy or OpenPolicy().descend(self.path)
        self.descriptor_path = os.path.join(self.path, DESCRIPTOR)
        self.parts: list[tuple[int, int, BlockDevice]] = []    # start, end (bytes), device
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        from ...devices import open_input_file
        try:
            with open_input_file(self.descriptor_path) as f:
                data = f.read(desc.MAX_DESCRIPTOR + 1)
        except OSError as e:
            from ...errors import ImageIOError
            raise ImageIOError.from_os(e, self.descriptor_path) from None
        d = self.descriptor = desc.parse(data, self.descriptor_path)
        if d.encryption_engine.strip("{}").strip("0-"):
            raise UnsupportedError("not supported yet: encrypted Parallels disks"
                                   f" (Encryption.Engine {d.encryption_engine})", self.path)
        self.chain = d.chain(self.descriptor_path)
        self.size = d.disk_size * SECTOR
        pos = 0
        for i, st in enumerate(d.storages):
            where = f"StorageData.Storage[{i}]"
            if st.start != pos:
                raise FormatError(f"starts at sector {st.start}, not {pos} where the"
                                  " extent before it ends", self.descriptor_path,
                                  structure=where, field="Start")
            if st.end <= st.start:
                raise FormatError(f"ends at sector {st.end}, not after its start",
                                  self.descriptor_path, structure=where, field="End")
            pos = st.end
            self.parts.append((st.start * SECTOR, st.end * SECTOR,
                               self._open_storage(st, where)))
        if pos != d.disk_size:
            raise FormatError(f"the extents end at sector {pos}, the disk has"
                              f" {d.disk_size}", self.descriptor_path,
                              structure="Disk_Parameters", field="Disk_size")
        self._starts = [p[0] for p in self.parts]

    def _find(self, name: str) -> str:
        if os.path.isabs(name) and not os.path.exists(name):
            moved = os.path.join(self.path, os.path.basename(name))
            if os.path.exists(moved):
                name = moved
        return self.policy.resolve(self.descriptor_path, name, "Parallels image file")

    def _open_storage(self, st: desc.Storage, where: str) -> BlockDevice:
        dev: BlockDevice | None = None
        try:
            for guid in reversed(self.chain):
                ref = st.images.get(guid)
                if ref is None:
                    raise FormatError(f"no Image for snapshot {guid}", self.descriptor_path,
                                      structure=where)
                full = self._find(ref.file)
                if ref.type not in ("Plain", "Compressed"):
                    raise UnsupportedError(f"not supported yet: Parallels images of type"
                                           f" '{ref.type}' ({where})", self.path)
                # files the descriptor names: regular files outside /proc, /sys, /dev,
                # checked again on the open descriptor (policy.py)
                with referenced_files():
                    if ref.type == "Plain":
                        if dev is not None:
                            dev.close()
                            dev = None
                        dev = FileBytesDevice(full)
                    else:
                        dev = ParallelsImage(full, policy=self.policy, parent=dev)
        except BaseException:
            if dev is not None:
                dev.close()
            raise
        assert dev is not None
        return dev

    # -- reading -----------------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        pos, end = offset, offset + n
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            start, stop, dev = self.parts[i]
            cnt = min(end, stop) - pos
            piece = mv[pos - offset:pos - offset + cnt]
            inside = max(0, min(cnt, dev.size - (pos - start)))
            if inside:
                dev.readinto(pos - start, piece[:inside])
            fill_zero(piece, inside)
            pos += cnt
            i += 1
        return n

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Each extent's map, its snapshot chain resolved (``chain_extents``); host
        offsets are left out, since the bytes live in several files."""
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)

        def gen():
            pos, end = offset, offset + length
            i = bisect.bisect_right(self._starts, pos) - 1
            while pos < end:
                start, stop, dev = self.parts[i]
                cnt = min(end, stop) - pos
                inside = max(0, min(cnt, dev.size - (pos - start)))
                if inside:
                    for le in chain_extents(dev, pos - start, inside):
                        e = le.extent
                        yield Extent(e.offset + start, e.length, e.kind, e.allocated)
                if inside < cnt:
                    yield Extent(pos + inside, cnt - inside, ExtentKind.ZERO, False)
                pos += cnt
                i += 1
        return coalesce(gen())

    # -- facts -------------------------------------------------------------------------
    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        """Every expandable image of the current chain checked as qemu-img checks a
        Parallels image; findings are prefixed with the image's file name."""
        res = CheckResult(filename=self.path, format="parallels")
        total = allocated = 0
        for dev in self._images():
            sub = dev.check(repair)
            name = os.path.basename(dev.path)
            for p in sub.problems:
                res.problems.append(Problem(p.kind, f"{name}: {p.message}", p.structure,
                                            p.field, p.repairable))
            res.corruptions += sub.corruptions
            res.leaks += sub.leaks
            res.check_errors += sub.check_errors
            total += sub.total_clusters or 0
            allocated += sub.allocated_clusters or 0
        if allocated:
            res.total_clusters, res.allocated_clusters = total, allocated
        return res

    def _images(self) -> Iterator[ParallelsImage]:
        for _, _, dev in self.parts:
            while dev is not None:
                if isinstance(dev, ParallelsImage):
                    yield dev
                dev = dev.backing

    def info(self) -> ImageInfo:
        d = self.descriptor
        actual = 0
        for f in self.files():
            try:
                actual += os.stat(f).st_blocks * 512
            except OSError:
                pass
        details: dict[str, object] = {
            "descriptor": DESCRIPTOR, "name": d.name, "uid": d.uid,
            "current-snapshot": self.chain[0],
            "extents": [{"start": s, "length": e - s,
                         "files": [os.path.basename(p) for p in _chain_files(dev)]}
                        for s, e, dev in self.parts],
        }
        if d.shots:
            details["snapshots"] = [{"guid": g, "parent": p} for g, p in d.shots.items()]
            if len(d.shots) > 1:
                details["not-supported-yet"] = ("reading other snapshots than the current"
                                                " one")
        return ImageInfo(filename=self.path, format="parallels", virtual_size=self.size,
                         actual_size=actual,
                         dirty=any(i.unclean for i in self._images()), details=details)

    def files(self) -> list[str]:
        out = [self.descriptor_path]
        for _, _, dev in self.parts:
            out += _chain_files(dev)
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _, _, dev in self.parts:
            dev.close()


def _chain_files(dev: BlockDevice | None) -> list[str]:
    out = []
    while dev is not None:
        if dev.path:
            out.append(dev.path)
        dev = dev.backing
    return out
