"""Reading an existing qcow version 1 image (read-only).

Opening validates the header as qemu's ``qcow_open`` does (version 1, cluster and L2
sizes in qemu's ranges, the L1 table size the disk size implies, encryption) before any
size or offset in it is used, then reads the L1 table whole (after
``limits.check_alloc``). L2 tables are read when first used and kept in a bounded
cache. A table or data cluster that lies past the end of the file is reported when it
is reached, naming the L1 or L2 entry; compressed clusters are inflated with the
cluster size as the output limit, so a deflate bomb stops at one cluster.

An L2 entry is 0 (not allocated: read from the backing file, or zeros), a host offset,
or a compressed cluster (bit 63). qcow version 1 has no zero clusters and no backing
format: a backing file is probed, as qemu probes it (untrusted mode therefore refuses
it, see ``OpenPolicy.check_backing_format``).
"""

from __future__ import annotations

import collections
import os
from array import array
from collections.abc import Iterator

from ... import deflate
from ...blockdev import (RUN_COMPRESSED, RUN_DATA, RUN_UNALLOCATED, Extent, ImageInfo,
                         TableDevice, merge_runs, skip_filled)
from ...byteorder import to_host_be
from ...crypto.unlock import MISSING_KEY
from ...errors import CorruptImage, UnsupportedError
from ...limits import check_alloc
from ...policy import OpenPolicy
from ...registry import open_image
from .structs import (HEADER_SIZE, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L2_BITS,
                      MIN_CLUSTER_BITS, MIN_L2_BITS, QCOW_CRYPT_AES, QCOW_CRYPT_NONE,
                      QCOW_MAGIC, QCOW_OFLAG_COMPRESSED, QCOW_VERSION, QCowHeader,
                      compressed_location)

L2_CACHE_BYTES = 16 << 20


def aes_cipher(key: bytes, path: str):
    """The qcow AES cipher (``crypto.qcow_aes``: the passphrase's first 16 bytes as an
    AES-128 key, CBC with plain64 IVs of guest sectors)."""
    from ...crypto.qcow_aes import QcowAesCipher
    return QcowAesCipher(key, path, "QCowHeader")


class Qcow1Device(TableDevice):
    """A qcow version 1 image opened read-only as a block device."""

    format = "qcow"

    def _open(self, key: bytes | None = None) -> None:
        if self.writable:
            raise UnsupportedError("not supported yet: writing qcow images", self.path)
        f = self.backend
        self.file_size = size = f.size
        if size < HEADER_SIZE:
            raise self._err(f"the file is {size} bytes, too small for a qcow header",
                            "QCowHeader")
        h = self.header = QCowHeader.parse(f.read_exact(0, HEADER_SIZE, "QCowHeader"))
        if h.magic != QCOW_MAGIC:
            raise self._err("magic is not 'QFI\\xfb': not a qcow image", "QCowHeader",
                            "magic")
        if h.version != QCOW_VERSION:
            raise self._err(f"version {h.version} is not 1 (qcow2 images have 2 or 3)",
                            "QCowHeader", "version")
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise self._err(f"cluster_bits {h.cluster_bits}: the cluster size must be"
                            " between 512 and 64k", "QCowHeader", "cluster_bits")
        if not MIN_L2_BITS <= h.l2_bits <= MAX_L2_BITS:
            raise self._err(f"l2_bits {h.l2_bits}: the L2 table size must be between 512"
                            " and 64k", "QCowHeader", "l2_bits")
        self.cipher = None
        if h.crypt_method == QCOW_CRYPT_AES and key is not None:
            self.cipher = aes_cipher(key, self.path)
        if h.crypt_method not in (QCOW_CRYPT_NONE, QCOW_CRYPT_AES):
            raise self._err(f"invalid encryption method {h.crypt_method}", "QCowHeader",
                            "crypt_method")
        if h.size <= 1:
            raise self._err(f"image size {h.size} is too small (must be at least 2"
                            " bytes)", "QCowHeader", "size")
        self.cluster_bits = h.cluster_bits
        self.cs = 1 << h.cluster_bits
        self.l2_bits = h.l2_bits
        self.l2_entries = 1 << h.l2_bits
        shift = h.cluster_bits + h.l2_bits
        if h.size > (1 << 64) - 1 - (1 << shift):
            raise self._err(f"image size {h.size} is too large", "QCowHeader", "size")
        # qemu counts in 512-byte sectors: a size that is not a multiple reads shorter
        self.size = h.size // 512 * 512
        self.l1_size = -(-h.size >> shift)
        self.l1_offset = h.l1_table_offset
        check_alloc(8 * self.l1_size, self.path, "QCowHeader", "size")
        if self.l1_offset + 8 * self.l1_size > size:
            raise self._err(f"the L1 table ({self.l1_size} entries at offset"
                            f" {self.l1_offset}) runs past the end of the file ({size}"
                            " bytes)", "QCowHeader", "l1_table_offset")
        self.l1 = self._table(self.l1_offset, self.l1_size, "L1 table")
        self.l2_cache: collections.OrderedDict[int, array] = collections.OrderedDict()
        self.l2_capacity = max(4, L2_CACHE_BYTES // (8 * self.l2_entries))
        self._last_compressed: tuple[int, bytes] | None = None
        self.backing_file = self._backing_name()
        if self.backing_file:
            self._open_backing(self.backing_file)

    def _table(self, offset: int, n: int, what: str) -> array:
        """``n`` big-endian 64-bit entries at ``offset``, read straight into the array
        (one copy of a large table in memory, not three)."""
        table = array("Q", [0]) * n
        if self.backend.readinto(offset, table) != 8 * n:
            raise self._err(f"{what} at offset {offset} (+{8 * n}) is past the end of the"
                            f" file ({self.file_size} bytes): truncated", what)
        return to_host_be(table)

    def _backing_name(self) -> str | None:
        h = self.header
        if not h.backing_file_offset:
            return None
        n = h.backing_file_size
        if n > MAX_BACKING_NAME:
            raise self._err(f"backing file name of {n} bytes is too long (qemu's limit is"
                            f" {MAX_BACKING_NAME})", "QCowHeader", "backing_file_size")
        if n == 0:
            return None
        if h.backing_file_offset + n > self.file_size:
            raise self._err(f"the backing file name ({n} bytes at offset"
                            f" {h.backing_file_offset}) is past the end of the file",
                            "QCowHeader", "backing_file_offset")
        raw = self.backend.read_exact(h.backing_file_offset, n, "backing file name")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._err("the backing file name is not valid UTF-8", "QCowHeader",
                            "backing_file_offset") from None

    def _open_backing(self, name: str) -> None:
        """Through the open policy, as qcow2 does; qcow version 1 names no backing
        format, so the file is probed (untrusted mode refuses that)."""
        policy = self.policy or OpenPolicy().descend(self.path)
        if not policy.open_backing:
            return
        full = policy.resolve(self.path, name, "backing file")
        policy.check_backing_format(self.path, name, None,
                                    "QCowHeader (qcow version 1 has no backing format)")
        self.backing = open_image(full, None, policy=policy)

    # -- tables ------------------------------------------------------------------------
    def _l2(self, l1_index: int) -> array | None:
        """The L2 table an L1 entry names (None: not allocated)."""
        off = self.l1[l1_index]
        if off == 0:
            return None
        table = self.l2_cache.get(off)
        if table is not None:
            self.l2_cache.move_to_end(off)
            return table
        n = 8 * self.l2_entries
        if off + n > self.file_size:
            raise CorruptImage(f"L1 entry {l1_index}: L2 table at offset {off} (+{n}) is"
                               f" past the end of the file ({self.file_size} bytes)",
                               self.path, structure="L1 table", field=str(l1_index))
        table = self._table(off, self.l2_entries, f"L2 table {l1_index}")
        self.l2_cache[off] = table
        if len(self.l2_cache) > self.l2_capacity:
            self.l2_cache.popitem(last=False)
        return table

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """``(offset, length, kind, host)`` pieces of ``[offset, offset+length)`` for
        ``merge_runs``: unallocated stretches found a table at a time (``skip_filled``),
        one piece per compressed cluster (``host`` is its L2 entry). The walk costs per
        allocated cluster, not per cluster of the disk."""
        cs, bits, per = self.cs, self.cluster_bits, self.l2_entries
        end = offset + length
        pos = offset
        while pos < end:
            ci = pos >> bits
            l1i, l2i = divmod(ci, per)
            table = self._l2(l1i)
            span_end = min(end, (l1i + 1) * per * cs)
            if table is None:
                last = min(len(self.l1), -(-end // (per * cs)))
                nxt = skip_filled(self.l1, l1i + 1, last)
                kind, host, stop = RUN_UNALLOCATED, 0, min(end, nxt * per * cs)
            else:
                entry = table[l2i]
                if entry == 0:
                    last = min(per, -(-span_end >> bits) - l1i * per)
                    nxt = skip_filled(table, l2i, last)
                    kind, host = RUN_UNALLOCATED, 0
                    stop = min(span_end, (l1i * per + nxt) * cs)
                elif entry & QCOW_OFLAG_COMPRESSED:
                    kind, host = RUN_COMPRESSED, entry
                    stop = min(end, (ci + 1) * cs)
                else:
                    if entry >= self.file_size:
                        raise CorruptImage(f"L2 entry {ci}: data cluster at offset {entry}"
                                           " is past the end of the file"
                                           f" ({self.file_size} bytes)", self.path,
                                           structure="L2 table", field=str(ci))
                    kind, host = RUN_DATA, entry + (pos & (cs - 1))
                    stop = min(end, (ci + 1) * cs)
            yield pos, stop - pos, kind, host
            pos = stop

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        return merge_runs(self._pieces(offset, length))

    # -- AES (crypt_method 1) ------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method == QCOW_CRYPT_AES

    def readinto(self, offset: int, buf) -> int:
        """As every table format reads, except that stored clusters of an encrypted
        image are deciphered (qemu's qcow_co_preadv: AES-CBC per 512-byte sector, the
        IV the guest sector number, plain64); compressed clusters are stored plain."""
        if not self.encrypted:
            return super().readinto(offset, buf)
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.check_range(offset, n)
        for pos, cnt, kind, host in self._runs(offset, n):
            piece = mv[pos - offset:pos - offset + cnt]
            if kind != RUN_DATA:
                super().readinto(pos, piece)
                continue
            if self.cipher is None:
                raise UnsupportedError(MISSING_KEY.format(kind="qcow AES",
                                                          option="encrypt.key-secret"),
                                       self.path)
            if not self.cipher.read(self.backend.readinto, host, pos, piece):
                lead = pos % 512
                raise CorruptImage(f"data cluster at offset {host - lead} (+{cnt + lead})"
                                   f" is past the end of the file ({self.file_size}"
                                   " bytes)", self.path, structure="L2 table")
        return n

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """As every table format maps, without host offsets for enciphered data (qemu's
        map shows none either; and convert -C must not copy ciphertext)."""
        if not self.encrypted:
            return super().extents(offset, length)
        return (Extent(e.offset, e.length, e.kind, e.allocated)
                for e in super().extents(offset, length))

    def _compressed(self, entry: int, ci: int) -> bytes:
        """A compressed cluster, inflated: exactly one cluster or a CorruptImage."""
        if self._last_compressed is not None and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        host, n = compressed_location(entry, self.cluster_bits)
        if n == 0 or host + n > self.file_size:
            raise CorruptImage(f"L2 entry {ci}: compressed cluster of {n} bytes at offset"
                               f" {host} is outside the file ({self.file_size} bytes)",
                               self.path, structure="L2 table", field=str(ci))
        raw = self.backend.read_exact(host, n, f"compressed cluster {ci}")
        d = deflate.decompressobj(-15)
        try:
            out = d.decompress(raw, self.cs)
        except deflate.ERRORS as e:
            raise CorruptImage(f"L2 entry {ci}: compressed cluster does not inflate ({e})",
                               self.path, structure="L2 table", field=str(ci)) from None
        if len(out) != self.cs:
            raise CorruptImage(f"L2 entry {ci}: compressed cluster inflates to {len(out)}"
                               f" bytes, not the {self.cs}-byte cluster", self.path,
                               structure="L2 table", field=str(ci))
        self._last_compressed = (entry, out)
        return out

    def _read_compressed(self, pos: int, host: int, piece: memoryview) -> None:
        inside = pos & (self.cs - 1)
        piece[:] = self._compressed(host, pos >> self.cluster_bits)[inside:inside +
                                                                    len(piece)]

    # -- facts -------------------------------------------------------------------------
    def info(self) -> ImageInfo:
        h = self.header
        full = None
        if self.backing_file:
            full = self.backing_file if os.path.isabs(self.backing_file) else \
                os.path.join(os.path.dirname(self.path), self.backing_file)
        return ImageInfo(
            filename=self.path, format="qcow", virtual_size=self.size,
            actual_size=self.backend.allocated_bytes(), cluster_size=self.cs,
            backing_filename=self.backing_file, full_backing_filename=full,
            encrypted=self.encrypted,
            details={"version": h.version, "cluster-bits": h.cluster_bits,
                     "l2-bits": h.l2_bits, "l1-size": self.l1_size,
                     "l1-table-offset": h.l1_table_offset, "mtime": h.mtime})
