"""An open qcow2 image as a BlockDevice: opening (header, snapshot table, backing file
and external data file, refcounts and bitmaps when writable), the header facts, and
the maintenance operations, which live in their own modules.

The device is three parts, as QEMU splits qcow2: ``cluster.py`` (``ClusterMap``:
cluster mapping, extents, reads), ``write.py`` (``WritePath``: copy-on-write writes,
zeroing, flush ordering) and this module (open, info, close). check, maintenance and
snapshot receive the device and use the package API the two mixins document; they
never import this module.
"""

from __future__ import annotations

import collections
import os
from array import array

from ...byteorder import be_array
from ...blockdev import FileBackend, FileDevice, ImageInfo
from ...errors import FormatError, UnsupportedError, UsageError
from ...policy import OpenPolicy
from ...registry import open_image
from . import snapshot as snapshot_table
from .cluster import ClusterMap
from .header import parse as parse_header
from .structs import QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW_MAGIC, Geometry
from .write import WritePath

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...checks import CheckResult, Repair
    from .bitmaps import Bitmaps
    from .refcount import Refcounts

L2_CACHE_BYTES = 32 << 20


class Qcow2Device(ClusterMap, WritePath, FileDevice):
    format = "qcow2"
    backing = None
    refs: Refcounts | None = None       # the refcounts, loaded when opened writable
    bitmaps: Bitmaps | None = None      # persistent dirty bitmaps, kept when writable
    snapshot = None                     # the internal snapshot this view shows
    data: FileBackend | None = None     # where guest clusters live: the image itself
                                        # or its external data file
    crypto = None                       # encryption.ClusterCrypto when encrypted

    # -- opening -------------------------------------------------------------------------
    def _open(self, snapshot: str | None = None, key: bytes | None = None) -> None:
        self.data = self.backend
        size = self.backend.size
        head = self.backend.pread(0, min(size, 1 << 16))
        if len(head) >= 24 and head[:4] == QCOW_MAGIC:
            bits = int.from_bytes(head[20:24], "big")
            if 16 < bits <= 21:
                head = self.backend.pread(0, min(size, 1 << bits))
        self.header = h = parse_header(head, size, self.path)
        self.geo: Geometry = h.geometry
        self.cs = h.cluster_size
        if h.crypt_method:  # encrypt.format=luks or aes: encryption.py decrypts clusters
            from .encryption import AesClusterCrypto, ClusterCrypto
            self.crypto = (AesClusterCrypto if h.crypt_method == 1 else ClusterCrypto)(
                self, key)
        self.cluster_bits = h.cluster_bits
        self.l2_entries = self.geo.l2_entries
        self.l2_bits = self.geo.l2_bits
        self.extended = h.extended_l2
        self.file_size = size
        self.snapshots, self.snapshot_table_size = snapshot_table.read_table(
            self.backend, h.snapshots_offset, h.nb_snapshots, self.cs, size, self.path)
        self.size = h.size
        self.l1_offset, self.l1_size = h.l1_table_offset, h.l1_size
        if snapshot is not None:
            if self.writable:
                raise UsageError("a snapshot view is read-only", self.path)
            snap = self.snapshot = snapshot_table.find(self.snapshots, snapshot, self.path)
            self.size = snap.disk_size if snap.disk_size is not None else h.size
            self.l1_offset, self.l1_size = snap.l1_table_offset, snap.l1_size
            if self.l1_size < self.geo.l1_entries_for(self.size):
                raise FormatError(f"snapshot {snap.id}: L1 table of {snap.l1_size} entries"
                                  f" cannot map {self.size} bytes", self.path,
                                  structure="QCowSnapshotHeader", field="l1_size")
        self.l1 = be_array(self.backend.read_exact(self.l1_offset, self.l1_size * 8,
                                                   "L1 table")) if self.l1_size \
            else array("Q")
        self.l1_dirty = False
        self.header_dirty = False
        self.l2_cache: collections.OrderedDict[int, array] = collections.OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_capacity = max(8, L2_CACHE_BYTES // self.cs)
        self._index_cache: dict[int, tuple[list[int], list[tuple]]] = {}
        self._table_base: dict[int, int] = {}
        self._comp_cache: tuple[int, bytes] | None = None
        self._ahead = None      # parallel.Ahead: the next read, being decoded
        self._read_end = -1     # where the last read ended (read-ahead when the next
                                # one starts there)
        if h.has_data_file:
            self._open_data_file()
        if h.backing_file:
            self.open_backing(h.backing_file, h.backing_format)
        if self.writable:
            # the refcounts, check and maintenance are imported by what writes (info
            # and reads never need them: they were a fifth of info's start-up)
            from .refcount import Refcounts
            self.refs = Refcounts(self.backend, self.geo, h.refcount_table_offset,
                                  h.refcount_table_clusters, self.path)
            if h.bitmaps is not None:
                from .bitmaps import Bitmaps  # (an image without bitmaps never needs it)
                self.bitmaps = Bitmaps(self)
        # lazy refcounts left inconsistent (the dirty bit): repaired before the first
        # change, as qemu does on opening; not at open, so that 'check' sees them
        self.needs_repair = self.writable and h.dirty

    def _open_data_file(self) -> None:
        name = self.header.data_file
        if not name:
            raise UnsupportedError("not supported yet: a qcow2 image with an external data"
                                   " file that it does not name", self.path)
        policy = self.policy or OpenPolicy()
        full = policy.resolve(self.path, name, "external data file")
        if "://" in full:  # an object beside a remote image (remote/refs.py)
            from ...remote.refs import open_file
            self.data = open_file(full)
        else:
            self.data = FileBackend(full, writable=self.writable, referenced=True)
        self.data_path = full

    def open_backing(self, name: str, fmt: str | None) -> None:
        """Open the backing file ``name`` (as the header names it) through the open
        policy; also what ``set_backing`` calls after a rebase."""
        if self.header.data_file_raw:
            raise FormatError("a raw external data file excludes a backing file", self.path,
                              structure="QCowHeader", field="backing_file_offset")
        policy = self.policy or OpenPolicy().descend(self.path)
        if not policy.open_backing:
            return
        full = policy.resolve(self.path, name, "backing file")
        policy.check_backing_format(
            self.path, name, fmt,
            f"QCowExtension {QCOW2_EXT_MAGIC_BACKING_FORMAT:#x} (backing file format name)")
        self.backing = open_image(full, fmt or None, policy=policy)

    # -- facts -----------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        h = self.header
        full = None
        if h.backing_file:
            full = h.backing_file if os.path.isabs(h.backing_file) else os.path.join(
                os.path.dirname(self.path), h.backing_file)
        return ImageInfo(
            filename=self.path, format="qcow2", virtual_size=self.size,
            actual_size=self.backend.allocated_bytes(), cluster_size=self.cs,
            backing_filename=h.backing_file, full_backing_filename=full,
            backing_format=h.backing_format, dirty=h.dirty,
            encrypted=self.crypto is not None, format_specific=self.format_specific(),
            snapshots=[s.to_json() for s in self.snapshots],
            details=self._details())

    def format_specific(self) -> dict:
        """qemu-img info's "format-specific" data, keys as qemu prints them."""
        h = self.header
        aes = self.crypto is not None and self.crypto.format == "aes"
        if h.version == 2:
            return {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16,
                    **({"encrypt": {"format": "aes"}} if aes else {})}
        d: dict = {"compat": "1.1", "compression-type": h.compression_name,
                   "lazy-refcounts": h.lazy_refcounts}
        if h.bitmaps is not None:
            from .bitmaps import read_directory
            d["bitmaps"] = [b.to_json() for b in read_directory(self)]
        d["refcount-bits"] = self.geo.refcount_bits
        if aes:
            d["encrypt"] = {"format": "aes"}
        elif self.crypto is not None:  # the LUKS header, "format" where qemu puts it
            enc: dict = {}
            for k, v in self.crypto.volume.qemu_info().items():
                enc[k] = v
                if k == "uuid":
                    enc["format"] = "luks"
            d["encrypt"] = enc
        d["corrupt"] = h.corrupt
        d["extended-l2"] = h.extended_l2
        if h.has_data_file:
            d["data-file"] = h.data_file
            d["data-file-raw"] = h.data_file_raw
        return d

    def _details(self) -> dict:
        h = self.header
        d = {"version": h.version, "header-length": h.header_length,
             "l1-size": h.l1_size, "l1-table-offset": h.l1_table_offset,
             "refcount-table-offset": h.refcount_table_offset,
             "refcount-table-clusters": h.refcount_table_clusters,
             "refcount-order": h.refcount_order, "snapshots": h.nb_snapshots}
        if h.version >= 3:
            d["incompatible-features"] = h.incompatible_features
            d["compatible-features"] = h.compatible_features
            d["autoclear-features"] = h.autoclear_features
        if h.unknown_extensions:
            d["unknown-extensions"] = [f"{m:#010x} ({len(b)} bytes)"
                                       for m, b in h.unknown_extensions]
        if self.snapshot is not None:
            d["snapshot-view"] = f"{self.snapshot.id} ({self.snapshot.name})"
        return d

    def files(self) -> list[str]:
        own = [self.path]
        if self.data is not self.backend:
            own.append(self.data_path)
        return own + (self.backing.files() if self.backing is not None else [])

    def close(self) -> None:
        if self.closed:
            return
        try:
            if getattr(self, "_ahead", None) is not None:
                self.drop_read_ahead()
            if self.writable and self.refs is not None:
                self.flush()
                if self.bitmaps is not None:
                    self.bitmaps.close()
        finally:
            if self.data is not None and self.data is not self.backend:
                self.data.close()
            super().close()

    # == maintenance hooks ===================================================================
    def check(self, repair: "Repair | None" = None) -> "CheckResult":
        from ...checks import Repair  # not at import: info and convert never check
        from .check import check as check_image
        return check_image(self, Repair.NONE if repair is None else repair)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        self._require_writable()
        from . import maintenance
        maintenance.resize(self, size, shrink=shrink)

    def preallocate(self, offset: int, length: int, mode: str) -> None:
        self._require_writable()
        from . import maintenance
        maintenance.preallocate(self, offset, length, mode)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        self._require_writable()
        from . import maintenance
        maintenance.set_backing(self, name, fmt)

    def make_empty(self) -> None:
        self._require_writable()
        from . import maintenance
        maintenance.make_empty(self)

    def amend(self, options, given: set[str]) -> None:
        self._require_writable()
        from . import maintenance
        maintenance.amend(self, options, given)

    # persistent dirty bitmaps (bitmaps.py)
    def load_bitmaps(self, *, data: bool = True) -> list | None:
        from . import bitmaps as bitmap_store
        if not bitmap_store.supports_bitmaps(self):
            return None
        return bitmap_store.load(self, data=data)

    def store_bitmaps(self, kept: list) -> None:
        from . import bitmaps as bitmap_store
        self._require_writable()
        bitmap_store.store(self, kept)

    def check_new_bitmap(self, name: str, granularity: int) -> None:
        from . import bitmaps as bitmap_store
        bitmap_store.check_new(self, name, granularity)

    def default_bitmap_granularity(self) -> int:
        from . import bitmaps as bitmap_store
        return bitmap_store.default_granularity(self.cs)

    # snapshots
    def list_snapshots(self) -> list[dict]:
        return [s.to_json() for s in self.snapshots]

    def create_snapshot(self, name: str) -> None:
        self._require_writable()
        snapshot_table.create(self, name)

    def apply_snapshot(self, key: str) -> None:
        self._require_writable()
        snapshot_table.apply(self, key)

    def delete_snapshot(self, key: str) -> None:
        self._require_writable()
        snapshot_table.delete(self, key)


def open_device(path: str, *, writable: bool = False, policy=None,
                snapshot: str | None = None, key: bytes | None = None) -> Qcow2Device:
    return Qcow2Device(path, writable=writable, policy=policy, snapshot=snapshot, key=key)


__all__ = ["Qcow2Device", "open_device"]
