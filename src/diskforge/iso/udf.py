"""Reading UDF (ECMA-167 / OSTA UDF 1.02-2.60) file trees on optical images.

Path from the disc to a file: the Anchor Volume Descriptor Pointer (sector 256, or the
last sector) names the Volume Descriptor Sequence; its Partition Descriptor says where
the partition starts and its Logical Volume Descriptor where the File Set Descriptor
is; that names the root directory's ICB (a File Entry or Extended File Entry), whose
allocation descriptors give the directory's File Identifier Descriptors, each naming a
child's ICB. Every descriptor's tag is checked (identifier, checksum, CRC, location)
and every block address is checked against the partition before it is read.

Supported: type 1 partition maps, short/long/extended allocation descriptors,
allocation extent continuations, embedded data, sparse ("not recorded") extents,
symbolic links, POSIX permissions and owners. Not supported yet (an UnsupportedError
says so): virtual, sparable and metadata partition maps (CD-R multisession, CD-RW and
the UDF 2.50+ metadata partition) and strategy-4096 ICB hierarchies (WORM media).

References: ECMA-167 3rd edition, parts 3 (volume structure) and 4 (file structure);
OSTA UDF 2.60 §2 (restrictions) and §2.1.1 (OSTA CS0 character set).
"""

from __future__ import annotations

import binascii
import calendar
import struct

from ..blockdev import BlockDevice
from ..errors import FormatError, UnsupportedError
from .structs import (FILE_TYPES, SECTOR, TAG_AED, TAG_AVDP, TAG_EFE, TAG_FE, TAG_FID,
                      TAG_FSD, TAG_LVD, TAG_PD, TAG_PVD, TAG_TD, TAG_VDP,
                      AnchorVolumeDescriptorPointer, ExtendedFileEntryFields,
                      FileEntryFields, IcbTag, LogicalVolumeDescriptor,
                      PartitionDescriptor, Tag)
from .tree import Entry, Tree

MAX_VDS_SECTORS = 256
MAX_AD_HOPS = 1024
MAX_DIRECTORY_BYTES = 64 << 20
MAX_LINK_BYTES = 65536
MAX_FILE_BYTES = (1 << 63) - 1   # a file's size must be an off_t

def decode_cs0(raw: bytes) -> str:
    """OSTA CS0 "compressed unicode": a compression id (8: one byte a character,
    16: UCS-2 big-endian), then the characters."""
    if not raw:
        return ""
    cid, body = raw[0], raw[1:]
    if cid in (16, 255):
        return body[:len(body) // 2 * 2].decode("utf-16-be", "replace")
    return body.decode("latin-1")


def dstring(field: bytes) -> str:
    """ECMA-167 1/7.2.12: a fixed field whose last byte is the used length."""
    n = field[-1]
    if n == 0 or n >= len(field):
        return ""
    return decode_cs0(field[:n])


def udf_time(raw: bytes) -> float | None:
    """ECMA-167 1/7.3 timestamp → seconds since the epoch (None if unset)."""
    tz_type, year, month, day, hour, minute, second, centi, hundreds, micro = \
        struct.unpack_from("<HhBBBBBBBB", raw)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60):
        return None
    tz = tz_type & 0x0FFF
    if tz & 0x800:
        tz -= 0x1000
    offset = 0 if tz == -2047 or tz_type >> 12 != 1 else tz
    try:
        t = calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    return t - offset * 60 + centi / 100 + hundreds / 10000 + micro / 1e6


class UdfTree(Tree):
    namespace = "udf"

    def __init__(self, dev: BlockDevice):
        self.dev = dev
        self.path = dev.path
        self.bs = SECTOR
        avdp = self._anchor()
        lvd, partitions = None, {}
        problems = []
        for length, location in ((avdp.main_volume_descriptor_sequence_length,
                                  avdp.main_volume_descriptor_sequence_location),
                                 (avdp.reserve_volume_descriptor_sequence_length,
                                  avdp.reserve_volume_descriptor_sequence_location)):
            try:
                lvd, partitions, self.volume_id = self._read_vds(location, length)
            except FormatError as e:
                problems.append(e)
                continue
            if lvd is not None and partitions:
                break
        if lvd is None or not partitions:
            if problems:
                raise problems[0]
            raise FormatError("the volume descriptor sequence has no logical volume or"
                              " partition descriptor", self.path,
                              structure="LogicalVolumeDescriptor")
        if lvd.logical_block_size != SECTOR:
            raise UnsupportedError(f"not supported yet: UDF logical blocks of"
                                   f" {lvd.logical_block_size} bytes", self.path)
        self.maps = self._partition_maps(lvd, partitions)
        fsd_len, fsd_block, fsd_part = self._long_ad(lvd.logical_volume_contents_use)
        fsd = self._descriptor(fsd_part, fsd_block, TAG_FSD, "FileSetDescriptor")
        _, root_block, root_part = self._long_ad(fsd[400:416])
        self._root = self._entry_from_icb("", root_part, root_block)
        if self._root.kind != "dir":
            raise FormatError("the root ICB is not a directory", self.path,
                              structure="FileSetDescriptor", field="root_directory_icb")

    # -- volume structure ------------------------------------------------------------
    def _tagged(self, sector: int, expect: tuple[int, ...] | None, what: str,
                location: int | None = None) -> tuple[int, bytes]:
        """The 2048-byte block at absolute ``sector`` with its tag checked."""
        off = sector * SECTOR
        if sector < 0 or off + SECTOR > self.dev.size:
            raise FormatError(f"block {sector} is past the end of the image: truncated",
                              self.path, structure=what)
        raw = self.dev.read(off, SECTOR)
        tag = Tag.parse(raw)
        if (sum(raw[0:4]) + sum(raw[5:16])) & 0xFF != tag.tag_checksum:
            raise FormatError(f"descriptor tag checksum mismatch at block {sector}",
                              self.path, structure=what, field="tag_checksum")
        if expect is not None and tag.tag_identifier not in expect:
            raise FormatError(f"expected tag {'/'.join(map(str, expect))} at block"
                              f" {sector}, found {tag.tag_identifier}", self.path,
                              structure=what, field="tag_identifier")
        want = sector if location is None else location
        if tag.tag_location != want:
            raise FormatError(f"descriptor at block {sector} says it is at"
                              f" {tag.tag_location}", self.path, structure=what,
                              field="tag_location")
        n = tag.descriptor_crc_length
        if 16 + n <= SECTOR and binascii.crc_hqx(raw[16:16 + n], 0) != tag.descriptor_crc:
            raise FormatError(f"descriptor CRC mismatch at block {sector}", self.path,
                              structure=what, field="descriptor_crc")
        return tag.tag_identifier, raw

    def _anchor(self):
        last = self.dev.size // SECTOR - 1
        errors = []
        for sector in (256, last, last - 256):
            if sector < 0:
                continue
            try:
                _, raw = self._tagged(sector, (TAG_AVDP,), "AnchorVolumeDescriptorPointer")
            except FormatError as e:
                errors.append(e)
                continue
            return AnchorVolumeDescriptorPointer.parse(raw)
        raise errors[0] if errors else FormatError(
            "no anchor volume descriptor pointer", self.path,
            structure="AnchorVolumeDescriptorPointer")

    def _read_vds(self, location: int, length: int):
        lvd, partitions, volume_id = None, {}, ""
        sectors = min(length // SECTOR, MAX_VDS_SECTORS)
        hops = 0
        i = 0
        while i < sectors:
            ident, raw = self._tagged(location + i, None, "VolumeDescriptorSequence")
            i += 1
            if ident == TAG_TD:
                break
            if ident == TAG_PVD:
                volume_id = volume_id or dstring(raw[24:56])
            elif ident == TAG_PD:
                pd = PartitionDescriptor.parse(raw)
                partitions.setdefault(pd.partition_number, pd)
            elif ident == TAG_LVD and lvd is None:
                lvd = LogicalVolumeDescriptor.parse(raw)
                lvd.raw = raw
                volume_id = dstring(lvd.logical_volume_identifier) or volume_id
            elif ident == TAG_VDP:  # 3/10.3: the sequence continues elsewhere
                hops += 1
                if hops > 8:
                    raise FormatError("volume descriptor pointers loop", self.path,
                                      structure="VolumeDescriptorPointer")
                length, location = struct.unpack_from("<LL", raw, 20)
                sectors, i = min(length // SECTOR, MAX_VDS_SECTORS), 0
        return lvd, partitions, volume_id

    def _partition_maps(self, lvd, partitions) -> list[tuple[int, int]]:
        """Per partition reference number: (first absolute sector, length in sectors)."""
        raw = lvd.raw
        count = lvd.number_of_partition_maps
        if count > 64 or 440 + lvd.map_table_length > SECTOR:
            raise FormatError(f"{count} partition maps ({lvd.map_table_length} bytes)",
                              self.path, structure="LogicalVolumeDescriptor",
                              field="number_of_partition_maps")
        maps = []
        pos = 440
        for _ in range(count):
            mtype, mlen = raw[pos], raw[pos + 1]
            if mlen < 2 or pos + mlen > 440 + lvd.map_table_length:
                raise FormatError("partition map runs past the map table", self.path,
                                  structure="LogicalVolumeDescriptor", field="partition_maps")
            if mtype == 1:
                number = struct.unpack_from("<H", raw, pos + 4)[0]
                pd = partitions.get(number)
                if pd is None:
                    raise FormatError(f"partition map names partition {number}, which has"
                                      " no descriptor", self.path,
                                      structure="PartitionDescriptor")
                # the partition may claim more than the image holds (some writers
                # count a lead-out): every read is checked against the image instead
                maps.append((pd.partition_starting_location, pd.partition_length))
            else:
                kind = raw[pos + 5:pos + 28].split(b"\0", 1)[0].decode("latin-1").strip("*")
                raise UnsupportedError(f"not supported yet: UDF partition map type {mtype}"
                                       f" ({kind or 'unknown'})", self.path)
            pos += mlen
        return maps

    # -- blocks and descriptors ------------------------------------------------------
    def _sector(self, part: int, block: int, what: str) -> int:
        if part >= len(self.maps):
            raise FormatError(f"partition reference {part} does not exist", self.path,
                              structure=what)
        start, length = self.maps[part]
        if block >= length:
            raise FormatError(f"block {block} is outside partition {part} ({length}"
                              " blocks)", self.path, structure=what)
        return start + block

    def _descriptor(self, part: int, block: int, tag: int, what: str) -> bytes:
        _, raw = self._tagged(self._sector(part, block, what), (tag,), what, location=block)
        return raw

    @staticmethod
    def _long_ad(raw: bytes) -> tuple[int, int, int]:
        length, block, part = struct.unpack_from("<LLH", raw)
        return length, block, part

    # -- file entries ----------------------------------------------------------------
    def _entry_from_icb(self, name: str, part: int, block: int) -> Entry:
        ident, raw = self._tagged(self._sector(part, block, "FileEntry"), (TAG_FE, TAG_EFE),
                                  "FileEntry", location=block)
        icb = IcbTag.parse(raw[16:36])
        if icb.strategy_type != 4:
            raise UnsupportedError(f"not supported yet: UDF ICB strategy {icb.strategy_type}",
                                   self.path)
        f = ExtendedFileEntryFields if ident == TAG_EFE else FileEntryFields
        uid, gid, perm = struct.unpack_from("<LLL", raw, f["uid"])
        links = struct.unpack_from("<H", raw, f["links"])[0]
        info_len = struct.unpack_from("<Q", raw, f["len"])[0]
        l_ea, l_ad = struct.unpack_from("<LL", raw, f["l_ea"])
        if info_len > MAX_FILE_BYTES:
            raise FormatError(f"information length {info_len} of the entry at block"
                              f" {block} is beyond any file (at most {MAX_FILE_BYTES})",
                              self.path, structure="FileEntry", field="information_length")
        ad_start = f["ea"] + l_ea
        if l_ea > SECTOR or l_ad > SECTOR or ad_start + l_ad > SECTOR:
            raise FormatError(f"extended attributes ({l_ea}) and allocation descriptors"
                              f" ({l_ad}) overflow the entry at block {block}", self.path,
                              structure="FileEntry", field="length_of_allocation_descriptors")
        kind = FILE_TYPES.get(icb.file_type, "file")
        mode = 0
        for shift, base in ((0, 0), (5, 3), (10, 6)):
            bits = perm >> shift
            mode |= ((bits & 1) | (bits & 2) | (bits & 4)) << base
        mode |= (icb.flags >> 6 & 1) << 11 | (icb.flags >> 7 & 1) << 10 \
            | (icb.flags >> 8 & 1) << 9
        e = Entry(name, kind, size=info_len, mode=mode,
                  uid=None if uid == 0xFFFFFFFF else uid,
                  gid=None if gid == 0xFFFFFFFF else gid,
                  mtime=udf_time(raw[f["mtime"]:f["mtime"] + 12]), nlink=links)
        extents = self._extents(raw, ad_start, l_ad, icb.flags & 7, part, block, info_len)
        if kind == "dir":
            e.node = ((part, block), extents)
        elif kind == "symlink":
            if info_len > MAX_LINK_BYTES:
                raise FormatError(f"symbolic link of {info_len} bytes", self.path,
                                  structure="FileEntry", field="information_length")
            e.target = _path_components(self._read_extents(extents, info_len))
            e.size = len(e.target)
        elif kind == "file":
            e.extents = extents
        return e

    def _extents(self, raw: bytes, pos: int, length: int, ad_type: int, part: int,
                 block: int, info_len: int) -> tuple:
        """Image byte ranges of a file's data, clipped to its information length."""
        sector = self._sector(part, block, "FileEntry")
        if ad_type == 3:  # embedded in the entry itself
            if info_len > length:
                raise FormatError(f"embedded data of {info_len} bytes does not fit its"
                                  f" {length}-byte area", self.path, structure="FileEntry",
                                  field="information_length")
            return ((sector * SECTOR + pos, info_len),) if info_len else ()
        if ad_type not in (0, 1, 2):
            raise FormatError(f"allocation descriptor type {ad_type}", self.path,
                              structure="ICBTag", field="flags")
        size = (8, 16, 20)[ad_type]
        out = []
        remaining = info_len
        hops = 0
        seen: set[tuple[int, int]] = set()
        end = pos + length
        while remaining > 0 and pos + size <= end:
            if ad_type == 0:
                elen, loc = struct.unpack_from("<LL", raw, pos)
                apart = part
            elif ad_type == 1:
                elen, loc, apart = struct.unpack_from("<LLH", raw, pos)
            else:
                elen, _rec, _inf, loc, apart = struct.unpack_from("<LLLLH", raw, pos)
            pos += size
            etype, n = elen >> 30, elen & 0x3FFFFFFF
            if n == 0:
                break
            if etype == 3:  # the next extent of allocation descriptors (4/14.5)
                hops += 1
                if (apart, loc) in seen:
                    raise FormatError(f"allocation extent loop: the entry at block {block}"
                                      f" comes back to block {loc}", self.path,
                                      structure="AllocationExtentDescriptor")
                seen.add((apart, loc))
                if hops > MAX_AD_HOPS:
                    raise FormatError("allocation extent chain too long (a loop?)",
                                      self.path, structure="AllocationExtentDescriptor")
                raw = self._descriptor(apart, loc, TAG_AED, "AllocationExtentDescriptor")
                pos = 24
                end = pos + min(struct.unpack_from("<L", raw, 20)[0], SECTOR - 24)
                continue
            take = min(n, remaining)
            if etype == 0:
                first = self._sector(apart, loc, "FileEntry")
                self._sector(apart, loc + (n - 1) // SECTOR, "FileEntry")
                off = first * SECTOR
                if off + take > self.dev.size:
                    raise FormatError(f"file data at byte {off} (+{take}) is past the"
                                      " end of the image: truncated", self.path,
                                      structure="FileEntry")
                out.append((off, take))
            else:  # allocated but not recorded, or not allocated: reads as zeros
                out.append((None, take))
            remaining -= take
        if remaining > 0:
            out.append((None, remaining))  # ECMA-167 4/12.1: an unrecorded tail
        return tuple(out)

    def _read_extents(self, extents: tuple, limit: int) -> bytes:
        parts = []
        for off, n in extents:
            parts.append(bytes(n) if off is None else self.dev.read(off, n))
        return b"".join(parts)[:limit]

    # -- directories -----------------------------------------------------------------
    def root(self) -> Entry:
        return self._root

    def key(self, entry: Entry) -> object:
        return entry.node[0]

    def _where(self, entry: Entry) -> str:
        part, block = entry.node[0]
        return f"UDF block {block} of partition {part}"

    def children(self, entry: Entry) -> list[Entry]:
        _, extents = entry.node
        size = sum(n for _, n in extents)
        if size > MAX_DIRECTORY_BYTES:
            raise FormatError(f"directory of {size} bytes", self.path,
                              structure="FileEntry", field="information_length")
        data = self._read_extents(extents, size)
        out = []
        pos = 0
        while pos + 38 <= len(data):
            tag = Tag.parse(data[pos:pos + 16])
            if tag.tag_identifier != TAG_FID:
                if data[pos:pos + 16] == bytes(16):
                    break
                raise FormatError(f"expected a file identifier descriptor at byte {pos} of"
                                  f" directory '{entry.name or '/'}'", self.path,
                                  structure="FileIdentifierDescriptor", field="tag_identifier")
            chars, l_fi = data[pos + 18], data[pos + 19]
            _, icb_block, icb_part = self._long_ad(data[pos + 20:pos + 36])
            l_iu = struct.unpack_from("<H", data, pos + 36)[0]
            total = (38 + l_iu + l_fi + 3) & ~3
            if pos + 38 + l_iu + l_fi > len(data):
                raise FormatError(f"file identifier runs past the end of directory"
                                  f" '{entry.name or '/'}'", self.path,
                                  structure="FileIdentifierDescriptor",
                                  field="length_of_file_identifier")
            name_raw = data[pos + 38 + l_iu:pos + 38 + l_iu + l_fi]
            pos += total
            if chars & 0x0C:  # deleted or the parent entry
                continue
            out.append(self._entry_from_icb(decode_cs0(name_raw), icb_part, icb_block))
        out.sort(key=lambda e: e.name)
        return out


def _path_components(raw: bytes) -> str:
    """ECMA-167 4/14.16: a symbolic link's path components."""
    parts: list[str] = []
    absolute = False
    pos = 0
    while pos + 4 <= len(raw):
        ctype, l_ci = raw[pos], raw[pos + 1]
        ident = raw[pos + 4:pos + 4 + l_ci]
        pos += 4 + l_ci
        if ctype in (1, 2):
            absolute, parts = True, []
        elif ctype == 3:
            parts.append("..")
        elif ctype == 4:
            parts.append(".")
        elif ctype == 5:
            parts.append(decode_cs0(ident))
    return ("/" if absolute else "") + "/".join(parts)


def volume_identifier(dev: BlockDevice) -> str:
    """The logical volume identifier (what ``info`` shows for UDF)."""
    try:
        tree = UdfTree.__new__(UdfTree)
        tree.dev, tree.path, tree.bs = dev, dev.path, SECTOR
        avdp = tree._anchor()
        _, _, ident = tree._read_vds(avdp.main_volume_descriptor_sequence_location,
                                     avdp.main_volume_descriptor_sequence_length)
    except UnsupportedError:
        return ""
    return ident
