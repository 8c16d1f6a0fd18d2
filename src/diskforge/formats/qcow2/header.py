"""The qcow2 header and its extensions, as QEMU's docs/interop/qcow2.txt lays them out.

Parsing validates every field before anything is sized by it: cluster size, table
sizes (against qemu's own implementation limits, so a hostile header cannot make us
allocate gigabytes), table offsets (aligned, inside the file), extension lengths,
the backing file name. Unknown incompatible feature bits and encryption are refused
with the feature's name when the image's feature-name table gives it.

Building writes the header cluster the way qemu's ``qcow2_update_header`` does:
header, extensions (backing format, external data file, crypto pointer, feature
table, bitmaps, unknown ones kept), end marker, then the backing file name.
"""

from __future__ import annotations

import struct

from ...errors import FormatError, UnsupportedError
from ...records import Record
from .structs import (COMPRESSION_NAMES, FEATURE_ENTRY_SIZE, FEATURE_NAMES,
                      MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, QCOW2_AUTOCLEAR_BITMAPS,
                      QCOW2_AUTOCLEAR_DATA_FILE_RAW, QCOW2_COMPAT_LAZY_REFCOUNTS,
                      QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_BITMAPS,
                      QCOW2_EXT_MAGIC_CRYPTO_HEADER, QCOW2_EXT_MAGIC_DATA_FILE,
                      QCOW2_EXT_MAGIC_END, QCOW2_EXT_MAGIC_FEATURE_TABLE,
                      QCOW2_INCOMPAT_COMPRESSION, QCOW2_INCOMPAT_CORRUPT,
                      QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_DIRTY,
                      QCOW2_INCOMPAT_EXTL2, QCOW2_INCOMPAT_MASK, QCOW_MAGIC,
                      QCOW_MAX_BACKING_NAME, QCOW_MAX_BITMAPS,
                      QCOW_MAX_BITMAP_DIRECTORY_SIZE, QCOW_MAX_L1_SIZE,
                      QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS, V2_HEADER_LENGTH,
                      V3_HEADER_LENGTH, V3_HEADER_LENGTH_WITH_COMPRESSION, Geometry,
                      QCowExtension, QCowHeader, QCowHeaderV3, Qcow2BitmapHeaderExt,
                      Qcow2CryptoHeaderExtension, Qcow2Feature)


class BitmapsExt(Record):
    """The bitmaps header extension: where the bitmap directory is."""
    __slots__ = ("nb_bitmaps", "directory_size", "directory_offset")

    def __init__(self, nb_bitmaps: int, directory_size: int, directory_offset: int):
        self.nb_bitmaps = nb_bitmaps
        self.directory_size = directory_size
        self.directory_offset = directory_offset


class Header(Record):
    """A parsed and validated qcow2 header, with its extensions.

    ``unknown_extensions``: extensions we do not know, kept verbatim on rewrite
    (qcow2.txt asks for it); ``extra_header``: bytes of additional v3 header fields we
    do not know, kept on rewrite."""
    __slots__ = ("version", "cluster_bits", "size", "crypt_method", "l1_size",
                 "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
                 "nb_snapshots", "snapshots_offset", "incompatible_features",
                 "compatible_features", "autoclear_features", "refcount_order",
                 "header_length", "compression_type", "backing_file", "backing_format",
                 "data_file", "feature_names", "bitmaps", "crypto", "unknown_extensions",
                 "extra_header")

    def __init__(self, version: int, cluster_bits: int, size: int, crypt_method: int,
                 l1_size: int, l1_table_offset: int, refcount_table_offset: int,
                 refcount_table_clusters: int, nb_snapshots: int, snapshots_offset: int,
                 incompatible_features: int = 0, compatible_features: int = 0,
                 autoclear_features: int = 0, refcount_order: int = 4,
                 header_length: int = V2_HEADER_LENGTH, compression_type: int = 0,
                 backing_file: str | None = None, backing_format: str | None = None,
                 data_file: str | None = None,
                 feature_names: dict[tuple[int, int], str] | None = None,
                 bitmaps: BitmapsExt | None = None, crypto: tuple[int, int] | None = None,
                 unknown_extensions: list[tuple[int, bytes]] | None = None,
                 extra_header: bytes = b""):
        self.version = version
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        self.backing_file = backing_file
        self.backing_format = backing_format
        self.data_file = data_file
        self.feature_names = {} if feature_names is None else feature_names
        self.bitmaps = bitmaps
        self.crypto = crypto
        self.unknown_extensions = [] if unknown_extensions is None else unknown_extensions
        self.extra_header = extra_header

    # -- derived facts ---------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_bits, self.refcount_order, self.extended_l2)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_CORRUPT)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES.get(self.compression_type, str(self.compression_type))

    def feature_name(self, kind: int, bit: int) -> str:
        name = self.feature_names.get((kind, bit))
        if name is None:
            name = next((n for k, b, n in FEATURE_NAMES if (k, b) == (kind, bit)), None)
        return name or f"unknown feature bit {bit}"

    # -- writing -----------------------------------------------------------------------
    def build(self, *, feature_table: bool | None = None) -> bytes:
        """The header cluster's bytes (header, extensions, backing file name).

        Raises UnsupportedError when it does not fit in one cluster (a long backing
        name with 512-byte clusters). The feature-name table is written, as qemu
        writes it, only when clusters are larger than 4 KiB.
        """
        cs = self.cluster_size
        if feature_table is None:
            feature_table = self.version >= 3 and cs > 4096
        out = bytearray(QCowHeader.build(dict(
            version=self.version, backing_file_offset=0, backing_file_size=0,
            cluster_bits=self.cluster_bits, size=self.size, crypt_method=self.crypt_method,
            l1_size=self.l1_size, l1_table_offset=self.l1_table_offset,
            refcount_table_offset=self.refcount_table_offset,
            refcount_table_clusters=self.refcount_table_clusters,
            nb_snapshots=self.nb_snapshots, snapshots_offset=self.snapshots_offset)))
        if self.version >= 3:
            extra = self.extra_header
            length = V3_HEADER_LENGTH_WITH_COMPRESSION + len(extra) + (-len(extra) % 8)
            out += QCowHeaderV3.build(dict(
                incompatible_features=self.incompatible_features,
                compatible_features=self.compatible_features,
                autoclear_features=self.autoclear_features,
                refcount_order=self.refcount_order, header_length=length))
            tail = bytearray(length - V3_HEADER_LENGTH)
            tail[0] = self.compression_type
            tail[8:8 + len(extra)] = extra
            out += tail

        def ext(magic: int, data: bytes) -> None:
            out.extend(QCowExtension.build(dict(magic=magic, len=len(data))))
            out.extend(data)
            out.extend(bytes(-len(data) % 8))

        if self.backing_format:
            ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, self.backing_format.encode())
        if self.data_file:
            ext(QCOW2_EXT_MAGIC_DATA_FILE, self.data_file.encode())
        if self.crypto is not None:
            ext(QCOW2_EXT_MAGIC_CRYPTO_HEADER, Qcow2CryptoHeaderExtension.build(
                dict(offset=self.crypto[0], length=self.crypto[1])))
        if feature_table:
            ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, b"".join(
                Qcow2Feature.build(dict(type=k, bit=b, name=n)) for k, b, n in FEATURE_NAMES))
        if self.bitmaps is not None:
            ext(QCOW2_EXT_MAGIC_BITMAPS, Qcow2BitmapHeaderExt.build(dict(
                nb_bitmaps=self.bitmaps.nb_bitmaps, reserved32=0,
                bitmap_directory_size=self.bitmaps.directory_size,
                bitmap_directory_offset=self.bitmaps.directory_offset)))
        for magic, data in self.unknown_extensions:
            ext(magic, data)
        out += bytes(8)  # end of the header extension area
        if self.backing_file:
            name = self.backing_file.encode()
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        if len(out) > cs:
            raise UnsupportedError(f"the qcow2 header ({len(out)} bytes with its extensions"
                                   f" and backing file name) does not fit in one"
                                   f" {cs}-byte cluster; use a larger cluster_size")
        return bytes(out)


def _err(path, field_name: str, message: str, structure: str = "QCowHeader"):
    return FormatError(message, path, structure=structure, field=field_name)


def parse(buf: bytes, file_size: int, path: str | None = None) -> Header:
    """Parse and validate the header from the first cluster's bytes ``buf`` (fewer when
    the file is shorter) of a file of ``file_size`` bytes."""
    if len(buf) < V2_HEADER_LENGTH:
        raise FormatError(f"file is {file_size} bytes, too short for a qcow2 header"
                          " (truncated)", path, structure="QCowHeader")
    if buf[:4] != QCOW_MAGIC:
        raise _err(path, "magic", "not a qcow2 image (bad magic)")
    h = QCowHeader.parse(buf[:V2_HEADER_LENGTH])
    if h.version not in (2, 3):
        raise UnsupportedError(f"not supported: qcow2 version {h.version} (only 2 and 3"
                               " exist)", path)
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise _err(path, "cluster_bits", f"{h.cluster_bits} is outside 9..21 (cluster sizes"
                   " 512 B to 2 MiB)")
    cs = 1 << h.cluster_bits
    hdr = Header(version=h.version, cluster_bits=h.cluster_bits, size=h.size,
                 crypt_method=h.crypt_method, l1_size=h.l1_size,
                 l1_table_offset=h.l1_table_offset,
                 refcount_table_offset=h.refcount_table_offset,
                 refcount_table_clusters=h.refcount_table_clusters,
                 nb_snapshots=h.nb_snapshots, snapshots_offset=h.snapshots_offset)
    if h.version >= 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise FormatError("the file ends inside the version 3 header (truncated)", path,
                              structure="QCowHeader")
        v3 = QCowHeaderV3.parse(buf[V2_HEADER_LENGTH:V3_HEADER_LENGTH])
        if v3.header_length < V3_HEADER_LENGTH:
            raise _err(path, "header_length", f"{v3.header_length} is shorter than the"
                       f" {V3_HEADER_LENGTH} bytes of a version 3 header")
        if v3.header_length > cs:
            raise _err(path, "header_length", f"{v3.header_length} exceeds the cluster"
                       f" size {cs}")
        if len(buf) < v3.header_length:
            raise FormatError("the file ends inside the header (truncated)", path,
                              structure="QCowHeader")
        if v3.refcount_order > 6:
            raise _err(path, "refcount_order", f"{v3.refcount_order} is above 6 (64-bit"
                       " refcounts)")
        hdr.incompatible_features = v3.incompatible_features
        hdr.compatible_features = v3.compatible_features
        hdr.autoclear_features = v3.autoclear_features
        hdr.refcount_order = v3.refcount_order
        hdr.header_length = v3.header_length
        if v3.header_length > V3_HEADER_LENGTH:
            hdr.compression_type = buf[V3_HEADER_LENGTH]
            hdr.extra_header = bytes(buf[V3_HEADER_LENGTH + 8:v3.header_length]).rstrip(b"\0")
    ext_start = hdr.header_length
    ext_end = h.backing_file_offset if h.backing_file_offset else cs
    _parse_extensions(hdr, buf, ext_start, min(ext_end, cs), path)
    _check_features(hdr, path)
    if h.backing_file_offset:
        n = h.backing_file_size
        if n > QCOW_MAX_BACKING_NAME or h.backing_file_offset > cs \
                or n > cs - h.backing_file_offset:
            raise _err(path, "backing_file_size", f"backing file name of {n} bytes at"
                       f" offset {h.backing_file_offset} is too long or outside the"
                       " header cluster")
        if h.backing_file_offset + n > len(buf):
            raise _err(path, "backing_file_offset", "the backing file name is past the end"
                       " of the file (truncated)")
        if n:
            hdr.backing_file = _text(buf[h.backing_file_offset:h.backing_file_offset + n],
                                     path, "backing file name")
    _check_tables(hdr, file_size, path)
    return hdr


def _text(raw: bytes, path, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"the {what} is not valid UTF-8", path,
                          structure="QCowHeader") from None


def _parse_extensions(hdr: Header, buf: bytes, offset: int, end: int, path) -> None:
    seen: set[int] = set()
    while offset < end:
        if offset + 8 > min(end, len(buf)):
            if offset + 8 > len(buf) and end > len(buf):
                raise FormatError("the file ends inside the header extensions (truncated)",
                                  path, structure="QCowExtension")
            break
        e = QCowExtension.parse(buf[offset:offset + 8])
        offset += 8
        if e.magic == QCOW2_EXT_MAGIC_END:
            return
        if e.len > end - offset or offset + e.len > len(buf):
            raise FormatError(f"extension {e.magic:#010x} of {e.len} bytes runs past the"
                              " header area", path, structure="QCowExtension", field="len")
        data = bytes(buf[offset:offset + e.len])
        if e.magic in seen and e.magic != QCOW2_EXT_MAGIC_FEATURE_TABLE:
            raise FormatError(f"extension {e.magic:#010x} appears twice", path,
                              structure="QCowExtension", field="magic")
        seen.add(e.magic)
        if e.magic == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if e.len > 1023:
                raise FormatError(f"backing format name of {e.len} bytes is too long",
                                  path, structure="QCowExtension", field="len")
            hdr.backing_format = _text(data, path, "backing format name")
        elif e.magic == QCOW2_EXT_MAGIC_DATA_FILE:
            if e.len > 1023:
                raise FormatError(f"external data file name of {e.len} bytes is too long",
                                  path, structure="QCowExtension", field="len")
            hdr.data_file = _text(data, path, "external data file name")
        elif e.magic == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            for i in range(0, len(data) - FEATURE_ENTRY_SIZE + 1, FEATURE_ENTRY_SIZE):
                f = Qcow2Feature.parse(_ascii(data[i:i + FEATURE_ENTRY_SIZE]))
                hdr.feature_names[(f.type, f.bit)] = f.name
        elif e.magic == QCOW2_EXT_MAGIC_BITMAPS:
            if e.len != Qcow2BitmapHeaderExt.sizeof():
                raise FormatError(f"bitmaps extension is {e.len} bytes, not 24", path,
                                  structure="Qcow2BitmapHeaderExt")
            b = Qcow2BitmapHeaderExt.parse(data)
            if hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
                if not 1 <= b.nb_bitmaps <= QCOW_MAX_BITMAPS:
                    raise FormatError(f"{b.nb_bitmaps} bitmaps is out of range", path,
                                      structure="Qcow2BitmapHeaderExt", field="nb_bitmaps")
                if b.bitmap_directory_size > QCOW_MAX_BITMAP_DIRECTORY_SIZE:
                    raise FormatError(f"bitmap directory of {b.bitmap_directory_size} bytes"
                                      " is too large", path,
                                      structure="Qcow2BitmapHeaderExt",
                                      field="bitmap_directory_size")
                hdr.bitmaps = BitmapsExt(b.nb_bitmaps, b.bitmap_directory_size,
                                         b.bitmap_directory_offset)
            # else: as qemu, a bitmaps extension whose autoclear bit was cleared by a
            # program without bitmap support is inconsistent and dropped
        elif e.magic == QCOW2_EXT_MAGIC_CRYPTO_HEADER:
            if e.len == Qcow2CryptoHeaderExtension.sizeof():
                c = Qcow2CryptoHeaderExtension.parse(data)
                hdr.crypto = (c.offset, c.length)
        else:
            hdr.unknown_extensions.append((e.magic, data))
        offset += e.len + (-e.len % 8)


def _ascii(raw: bytes) -> bytes:
    # feature names are ASCII; replace anything else so a hostile table cannot break
    # the parse of a name we only ever print
    return bytes(c if 32 <= c < 127 or c == 0 else 63 for c in raw)


def _check_features(hdr: Header, path) -> None:
    if hdr.crypt_method not in (0, 1, 2):
        # 1 is qcow's old AES-CBC (insecure, write-deprecated in QEMU); 2 is
        # encrypt.format=luks, a LUKS1 header in the clusters the crypto extension names;
        # both read by encryption.py when a key is given
        raise UnsupportedError(f"QCowHeader.crypt_method: encrypted (unknown crypt_method"
                               f" {hdr.crypt_method}); not supported yet: reading such"
                               " qcow2 images", path)
    unknown = hdr.incompatible_features & ~QCOW2_INCOMPAT_MASK
    if unknown:
        names = ", ".join(hdr.feature_name(0, b) for b in range(64) if unknown >> b & 1)
        raise UnsupportedError(f"not supported: qcow2 incompatible feature(s): {names}",
                               path)
    if hdr.version < 3 and hdr.compression_type:
        raise _err(path, "compression_type", "set in a version 2 image")
    has_bit = bool(hdr.incompatible_features & QCOW2_INCOMPAT_COMPRESSION)
    if has_bit != (hdr.compression_type != 0):
        raise _err(path, "compression_type", f"{hdr.compression_type} does not agree with"
                   " the compression type feature bit")
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedError(f"not supported: qcow2 compression type"
                               f" {hdr.compression_type}", path)
    if hdr.extended_l2 and hdr.cluster_bits < 14:
        raise _err(path, "cluster_bits", "extended L2 entries need clusters of at least"
                   " 16 KiB")
    if hdr.data_file and not hdr.has_data_file:
        raise FormatError("external data file name without the external data file"
                          " feature bit", path, structure="QCowExtension")
    if hdr.data_file_raw and not hdr.has_data_file:
        # qemu clears an autoclear bit it cannot honour; so do we
        hdr.autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW


def _check_tables(hdr: Header, file_size: int, path) -> None:
    cs = hdr.cluster_size
    geo = hdr.geometry
    if hdr.size > (1 << 63) - 1:
        raise _err(path, "size", f"{hdr.size} bytes is beyond any disk")
    if hdr.l1_size * 8 > QCOW_MAX_L1_SIZE:
        raise _err(path, "l1_size", f"{hdr.l1_size} entries is larger than qemu's limit"
                   f" of {QCOW_MAX_L1_SIZE // 8}")
    if hdr.l1_size < geo.l1_entries_for(hdr.size):
        raise _err(path, "l1_size", f"{hdr.l1_size} entries cannot map a disk of"
                   f" {hdr.size} bytes")
    if hdr.l1_size:
        _check_area(hdr.l1_table_offset, hdr.l1_size * 8, cs, file_size, path,
                    "l1_table_offset", "the L1 table")
    if hdr.refcount_table_clusters == 0:
        raise _err(path, "refcount_table_clusters", "0: the image has no refcount table")
    if hdr.refcount_table_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
        raise _err(path, "refcount_table_clusters", f"{hdr.refcount_table_clusters}"
                   f" clusters is larger than qemu's limit of"
                   f" {QCOW_MAX_REFTABLE_SIZE // cs}")
    _check_area(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, cs,
                file_size, path, "refcount_table_offset", "the refcount table")
    if hdr.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise _err(path, "nb_snapshots", f"{hdr.nb_snapshots} is more than qemu's limit of"
                   f" {QCOW_MAX_SNAPSHOTS}")
    if hdr.nb_snapshots:
        _check_area(hdr.snapshots_offset, 40 * hdr.nb_snapshots, cs, file_size, path,
                    "snapshots_offset", "the snapshot table")
    if hdr.bitmaps is not None:
        _check_area(hdr.bitmaps.directory_offset, hdr.bitmaps.directory_size, cs,
                    file_size, path, "bitmap_directory_offset", "the bitmap directory",
                    "Qcow2BitmapHeaderExt")


def _check_area(offset: int, length: int, cs: int, file_size: int, path, field_name: str,
                what: str, structure: str = "QCowHeader") -> None:
    if offset % cs:
        raise _err(path, field_name, f"{what} at {offset:#x} is not cluster aligned",
                   structure)
    if offset < cs:
        raise _err(path, field_name, f"{what} at {offset:#x} overlaps the header",
                   structure)
    if offset + length > file_size:
        raise _err(path, field_name, f"{what} at {offset:#x} (+{length}) is past the end"
                   f" of the file ({file_size} bytes)", structure)
