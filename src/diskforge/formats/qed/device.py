"""Reading and checking an existing QED image (read-only).

Opening validates the header as qemu's ``bdrv_qed_do_open`` does (magic, unknown
feature bits, cluster and table sizes, the image size against what the tables can map,
the L1 table offset, the backing file name inside the header clusters) before any size
or offset in it is used, then reads the L1 table whole (after ``limits.check_alloc``).
L2 tables are read when first used and kept in a bounded cache.

Offsets are valid as qemu's ``qed_check_cluster_offset`` says: cluster-aligned, past
the header clusters and before the last whole cluster of the file. Reading through an
invalid L1 or L2 entry raises a one-line CorruptImage naming the entry (qemu fails the
read with EINVAL); ``check`` counts them, as ``qemu-img check`` does.

An image whose need-check bit (``QED_F_NEED_CHECK``) is set opens read-only as qemu
opens it read-only, without a check (it may help recover data); ``info`` shows the bit
as ``need-check`` and, as qemu-img 7.2 does, a clear ``dirty-flag``. A backing file is opened through the open policy; its format is raw when
``QED_F_BACKING_FORMAT_NO_PROBE`` is set, otherwise probed (untrusted mode refuses both,
see ``OpenPolicy.check_backing_format``).
"""

from __future__ import annotations

import collections
import os
from array import array
from collections.abc import Iterator

from ...blockdev import (RUN_DATA, RUN_UNALLOCATED, RUN_ZERO, ImageInfo, TableDevice,
                         merge_runs, skip_filled)
from ...byteorder import to_host_le
from ...checks import CheckResult, ProblemKind, Repair
from ...errors import CorruptImage, UnsupportedError
from ...limits import check_alloc
from ...policy import OpenPolicy
from ...registry import open_image
from .structs import (HEADER_SIZE, MAX_BACKING_NAME, MAX_CLUSTER_SIZE, MAX_TABLE_SIZE,
                      MIN_CLUSTER_SIZE, MIN_TABLE_SIZE, QED_F_BACKING_FILE,
                      QED_F_BACKING_FORMAT_NO_PROBE, QED_F_NEED_CHECK, QED_FEATURE_MASK,
                      QED_MAGIC, QED_ZERO_CLUSTER, QEDHeader, is_power_of_two)

L2_CACHE_BYTES = 16 << 20


class QedDevice(TableDevice):
    """A QED image opened read-only as a block device."""

    format = "qed"

    def _open(self) -> None:
        if self.writable:
            raise UnsupportedError("not supported yet: writing qed images", self.path)
        f = self.backend
        size = f.size
        if size < HEADER_SIZE:
            raise self._err(f"the file is {size} bytes, too small for a QED header",
                            "QEDHeader")
        h = self.header = QEDHeader.parse(f.read_exact(0, HEADER_SIZE, "QEDHeader"))
        if h.magic != QED_MAGIC:
            raise self._err("magic is not 'QED\\0': not a QED image", "QEDHeader",
                            "magic")
        unknown = h.features & ~QED_FEATURE_MASK
        if unknown:
            raise UnsupportedError(f"not supported yet: QED feature bits {unknown:#x}"
                                   " (QEDHeader.features)", self.path)
        cs = h.cluster_size
        if not (is_power_of_two(cs) and MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE):
            raise self._err(f"cluster size {cs} is not a power of two between"
                            f" {MIN_CLUSTER_SIZE} and {MAX_CLUSTER_SIZE}", "QEDHeader",
                            "cluster_size")
        ts = h.table_size
        if not (is_power_of_two(ts) and MIN_TABLE_SIZE <= ts <= MAX_TABLE_SIZE):
            raise self._err(f"table size {ts} is not a power of two between"
                            f" {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}", "QEDHeader",
                            "table_size")
        if h.header_size == 0:
            raise self._err("the header takes no clusters", "QEDHeader", "header_size")
        self.cs = cs
        self.cluster_bits = cs.bit_length() - 1
        self.table_bytes = ts * cs
        self.table_entries = self.table_bytes // 8
        self.header_bytes = h.header_size * cs
        # qemu's s->file_size: the start of the last (partial) cluster
        self.file_size = size
        self.clusters_end = size // cs * cs
        max_size = self.table_entries * self.table_entries * cs
        if h.image_size % 512 or h.image_size > max_size:
            raise self._err(f"image size {h.image_size} is not a multiple of 512 or more"
                            f" than the tables can map ({max_size})", "QEDHeader",
                            "image_size")
        self.size = h.image_size
        self.need_check = bool(h.features & QED_F_NEED_CHECK)
        problem = self._table_problem(h.l1_table_offset)
        if problem:
            raise self._err(f"L1 table offset {h.l1_table_offset} {problem}", "QEDHeader",
                            "l1_table_offset")
        check_alloc(self.table_bytes, self.path, "QEDHeader", "table_size")
        self.l1 = self._table(h.l1_table_offset, "L1 table")
        self.l2_cache: collections.OrderedDict[int, array] = collections.OrderedDict()
        self.l2_capacity = max(2, L2_CACHE_BYTES // self.table_bytes)
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        if h.features & QED_F_BACKING_FILE:
            self.backing_file = self._backing_name()
            if h.features & QED_F_BACKING_FORMAT_NO_PROBE:
                self.backing_format = "raw"
            self._open_backing()

    def _table(self, offset: int, what: str) -> array:
        """A table's little-endian 64-bit entries at ``offset``, read straight into the
        array (one copy of a large table in memory, not three)."""
        table = array("Q", [0]) * self.table_entries
        if self.backend.readinto(offset, table) != self.table_bytes:
            raise self._err(f"{what} at offset {offset} (+{self.table_bytes}) is past the"
                            f" end of the file ({self.file_size} bytes): truncated", what)
        return to_host_le(table)

    # -- offsets, as qed_check_cluster_offset and qed_check_table_offset judge them ------
    def _cluster_problem(self, offset: int) -> str | None:
        if offset & (self.cs - 1):
            return "is not aligned to the cluster size"
        if offset < self.header_bytes:
            return "is inside the header clusters"
        if offset >= self.clusters_end:
            return f"is past the end of the file ({self.file_size} bytes)"
        return None

    def _table_problem(self, offset: int) -> str | None:
        return self._cluster_problem(offset) or self._cluster_problem(
            offset + self.table_bytes - self.cs) and \
            f"leaves no room for the {self.table_bytes}-byte table before the end of" \
            f" the file ({self.file_size} bytes)"

    def _backing_name(self) -> str:
        h = self.header
        off, n = h.backing_filename_offset, h.backing_filename_size
        if n == 0 or off + n > self.header_bytes:
            raise self._err(f"backing file name ({n} bytes at offset {off}) is empty or"
                            f" outside the {self.header_bytes}-byte header",
                            "QEDHeader", "backing_filename_offset")
        if n > MAX_BACKING_NAME:
            raise self._err(f"backing file name of {n} bytes is too long (qemu's limit"
                            f" is {MAX_BACKING_NAME})", "QEDHeader",
                            "backing_filename_size")
        raw = self.backend.read_exact(off, n, "backing file name")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._err("the backing file name is not valid UTF-8", "QEDHeader",
                            "backing_filename_offset") from None

    def _open_backing(self) -> None:
        name = self.backing_file
        assert name is not None
        policy = self.policy or OpenPolicy().descend(self.path)
        if not policy.open_backing:
            return
        full = policy.resolve(self.path, name, "backing file")
        policy.check_backing_format(
            self.path, name, self.backing_format,
            "QEDHeader.features (QED_F_BACKING_FORMAT_NO_PROBE, the only backing format"
            " QED records)")
        self.backing = open_image(full, self.backing_format, policy=policy)

    # -- tables ------------------------------------------------------------------------
    def _l2(self, l1_index: int) -> array | None:
        off = self.l1[l1_index]
        if off == 0:
            return None
        table = self.l2_cache.get(off)
        if table is not None:
            self.l2_cache.move_to_end(off)
            return table
        problem = self._table_problem(off)
        if problem:
            raise CorruptImage(f"L1 entry {l1_index}: L2 table offset {off} {problem}",
                               self.path, structure="L1 table", field=str(l1_index))
        table = self._table(off, f"L2 table {l1_index}")
        self.l2_cache[off] = table
        if len(self.l2_cache) > self.l2_capacity:
            self.l2_cache.popitem(last=False)
        return table

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """``(offset, length, kind, host)`` pieces for ``merge_runs``: stretches of empty
        L1 and L2 entries skipped at memory speed (``skip_filled``), so the walk costs
        per allocated cluster, not per cluster of the disk."""
        cs, bits, per = self.cs, self.cluster_bits, self.table_entries
        span = per * cs                 # the bytes one L2 table maps
        end = offset + length
        pos = offset
        while pos < end:
            ci = pos >> bits
            l1i, l2i = divmod(ci, per)
            table = self._l2(l1i)
            if table is None:
                last = min(len(self.l1), -(-end // span))
                nxt = skip_filled(self.l1, l1i + 1, last)
                kind, host, stop = RUN_UNALLOCATED, 0, min(end, nxt * span)
            else:
                entry = table[l2i]
                table_end = min(end, (l1i + 1) * span)
                if entry == 0 or entry == QED_ZERO_CLUSTER:
                    # a run of the same special value
                    last = min(per, -(-table_end >> bits) - l1i * per)
                    j = l2i + 1
                    if entry == 0:
                        j = skip_filled(table, j, last)
                    else:
                        while j < last and table[j] == QED_ZERO_CLUSTER:
                            j += 1
                    kind = RUN_UNALLOCATED if entry == 0 else RUN_ZERO
                    host, stop = 0, min(table_end, (l1i * per + j) * cs)
                else:
                    problem = self._cluster_problem(entry)
                    if problem:
                        raise CorruptImage(f"L2 entry {ci}: data cluster offset {entry}"
                                           f" {problem}", self.path, structure="L2 table",
                                           field=str(ci))
                    kind, host = RUN_DATA, entry + (pos & (cs - 1))
                    stop = min(end, (ci + 1) * cs)
            yield pos, stop - pos, kind, host
            pos = stop

    # -- reading -----------------------------------------------------------------------
    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        return merge_runs(self._pieces(offset, length))

    # -- checking ----------------------------------------------------------------------
    def check(self, repair: Repair = Repair.NONE) -> CheckResult:
        """As qemu's qed-check.c: every L1 and L2 offset valid and every cluster used
        once (corruptions), clusters of the file that nothing uses (leaks). Repair
        needs a writable image: not supported yet (``-r`` is refused by the open)."""
        res = CheckResult(filename=self.path, format="qed")
        cs, per = self.cs, self.table_entries
        nclusters = self.clusters_end // cs
        check_alloc(nclusters, self.path, "check", "used clusters")
        used = bytearray(nclusters)      # a byte per cluster of the file
        tclusters = self.table_bytes // cs

        def mark(offset: int, count: int, what: str, structure: str, index: int) -> bool:
            first = offset // cs
            if any(used[first:first + count]):
                res.add(ProblemKind.CORRUPTION, f"ERROR: {what} at offset {offset} is"
                        " referenced more than once", structure, str(index))
                return False
            used[first:first + count] = b"\x01" * count
            return True

        mark(self.header.l1_table_offset, tclusters, "the L1 table", "QEDHeader", 0)
        allocated = fragmented = 0
        last_offset = 0
        i = 0
        n1 = len(self.l1)
        while i < n1:
            i = skip_filled(self.l1, i, n1)
            if i >= n1:
                break
            off = self.l1[i]
            problem = self._table_problem(off)
            if problem:
                res.add(ProblemKind.CORRUPTION, f"ERROR: L1 entry {i}: L2 table offset"
                        f" {off} {problem}", "L1 table", str(i))
            elif mark(off, tclusters, f"L2 table {i}", "L1 table", i):
                table = self._table(off, f"L2 table {i}")
                j = 0
                while j < per:
                    j = skip_filled(table, j, per)
                    if j >= per:
                        break
                    e = table[j]
                    ci = i * per + j
                    j += 1
                    if e == QED_ZERO_CLUSTER:
                        continue
                    allocated += 1
                    if last_offset and last_offset + cs != e:
                        fragmented += 1
                    last_offset = e
                    problem = self._cluster_problem(e)
                    if problem:
                        res.add(ProblemKind.CORRUPTION, f"ERROR: L2 entry {ci}: data"
                                f" cluster offset {e} {problem}", "L2 table", str(ci))
                    else:
                        mark(e, 1, f"data cluster {ci}", "L2 table", ci)
            i += 1
        first = self.header.header_size
        leaked = used.count(0, first) if first < nclusters else 0
        if leaked:
            res.add(ProblemKind.LEAK, f"Leaked clusters: {leaked}", "QEDHeader", None,
                    count=leaked)
        res.total_clusters = -(-self.size // cs)
        if allocated:
            res.allocated_clusters = allocated
            # as qemu-img, which leaves the counts out when they are zero
            res.fragmented_clusters = fragmented or None
        if self.need_check:
            res.note("Warning: the image's need-check bit (QED_F_NEED_CHECK) is set")
        return res

    # -- facts -------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        h = self.header
        full = None
        if self.backing_file:
            full = self.backing_file if os.path.isabs(self.backing_file) else \
                os.path.join(os.path.dirname(self.path), self.backing_file)
        return ImageInfo(
            filename=self.path, format="qed", virtual_size=self.size,
            actual_size=self.backend.allocated_bytes(), cluster_size=self.cs,
            backing_filename=self.backing_file, full_backing_filename=full,
            backing_format=self.backing_format,
            details={"need-check": self.need_check,
                     "table-size": h.table_size, "header-size": h.header_size,
                     "features": h.features, "compat-features": h.compat_features,
                     "autoclear-features": h.autoclear_features,
                     "l1-table-offset": h.l1_table_offset})
