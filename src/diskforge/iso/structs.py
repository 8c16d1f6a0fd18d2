"""ISO structures and constants, named and sectioned as their specifications name them.

One place for the on-disk layouts the package reads: ECMA-119 (ISO 9660) volume
descriptors and directory records, El Torito's boot catalog, and ECMA-167 (UDF)
descriptors. The readers (``volume``, ``records``, ``udf``) hold the logic; this module
imports nothing from the package, so any of them may use it.

Construct structures are for what is parsed once per open; the directory record, a hot
path, is a ``struct.Struct``. Rock Ridge (SUSP/RRIP) entries are variable-length
signature-tagged fields and are parsed in ``rockridge``.

References: ECMA-119 4th edition (2019) §8, §9.1; "El Torito" Bootable CD-ROM Format
Specification 1.0 (1995) §2; ECMA-167 3rd edition parts 2, 3 and 4; OSTA UDF 2.60;
syslinux doc/isolinux.txt (boot info table).
"""

from __future__ import annotations

import struct

from construct import Bytes, Const, Int8ul, Int16ul, Int32ub, Int32ul, Struct

# -- ECMA-119 (ISO 9660) ----------------------------------------------------------------
SECTOR = 2048                 # ECMA-119 §6.1.2: the logical sector
VD_START = 16 * SECTOR        # ECMA-119 §6.2.1: the system area is sectors 0-15
# ECMA-167 2/9.1-9.3 volume structure descriptors (and ECMA-168's) that may stand where
# ISO 9660's do: the UDF volume recognition sequence
VRS_IDENTIFIERS = {b"BEA01", b"NSR02", b"NSR03", b"TEA01", b"BOOT2", b"CDW02"}

# ECMA-119 §8.4 (primary) and §8.5 (supplementary/enhanced): one layout; the fields a
# primary leaves unused carry the volume flags and escape sequences in a supplementary.
# Both-endian numbers are read from their little-endian half.
VolumeDescriptor = Struct(
    "volume_descriptor_type" / Int8ul,
    "standard_identifier" / Const(b"CD001"),
    "volume_descriptor_version" / Int8ul,
    "volume_flags" / Int8ul,
    "system_identifier" / Bytes(32),
    "volume_identifier" / Bytes(32),
    "unused1" / Bytes(8),
    "volume_space_size" / Int32ul, "volume_space_size_be" / Int32ub,
    "escape_sequences" / Bytes(32),
    "volume_set_size" / Int16ul, "volume_set_size_be" / Bytes(2),
    "volume_sequence_number" / Int16ul, "volume_sequence_number_be" / Bytes(2),
    "logical_block_size" / Int16ul, "logical_block_size_be" / Bytes(2),
    "path_table_size" / Int32ul, "path_table_size_be" / Int32ub,
    "type_l_path_table" / Int32ul,
    "optional_type_l_path_table" / Int32ul,
    "type_m_path_table" / Int32ub,
    "optional_type_m_path_table" / Int32ub,
    "root_directory_record" / Bytes(34),
    "volume_set_identifier" / Bytes(128),
    "publisher_identifier" / Bytes(128),
    "data_preparer_identifier" / Bytes(128),
    "application_identifier" / Bytes(128),
    "copyright_file_identifier" / Bytes(37),
    "abstract_file_identifier" / Bytes(37),
    "bibliographic_file_identifier" / Bytes(37),
    "volume_creation_date" / Bytes(17),
    "volume_modification_date" / Bytes(17),
    "volume_expiration_date" / Bytes(17),
    "volume_effective_date" / Bytes(17),
    "file_structure_version" / Int8ul,
)

# ECMA-119 §8.2 with El Torito §2.0: the boot record volume descriptor
BootRecord = Struct(
    "boot_record_indicator" / Const(b"\x00"),
    "iso9660_identifier" / Const(b"CD001"),
    "version" / Int8ul,
    "boot_system_identifier" / Bytes(32),
    "boot_identifier" / Bytes(32),
    "boot_catalog_pointer" / Int32ul,   # El Torito: absolute sector of the catalog
)

# El Torito §2.1: validation entry; §2.2: initial/default entry; §2.3: section header;
# §2.4: section entry. 32 bytes each.
ValidationEntry = Struct(
    "header_id" / Const(b"\x01"),
    "platform_id" / Int8ul,
    "reserved" / Int16ul,
    "id_string" / Bytes(24),
    "checksum" / Int16ul,
    "key" / Const(b"\x55\xaa"),
)
SectionEntry = Struct(           # also the initial/default entry (criteria unused)
    "boot_indicator" / Int8ul,   # 0x88 bootable, 0x00 not
    "boot_media_type" / Int8ul,  # low nibble: emulation; bit 5: extension follows
    "load_segment" / Int16ul,
    "system_type" / Int8ul,
    "unused" / Int8ul,
    "sector_count" / Int16ul,    # virtual (512-byte) sectors loaded at boot
    "load_rba" / Int32ul,        # first 2048-byte sector of the image
    "selection_criteria_type" / Int8ul,
    "vendor_unique_selection_criteria" / Bytes(19),
)
SectionHeader = Struct(
    "header_indicator" / Int8ul,  # 0x90 more headers follow, 0x91 final
    "platform_id" / Int8ul,
    "number_of_section_entries" / Int16ul,
    "id_string" / Bytes(28),
)

# syslinux doc/isolinux.txt: the 56-byte table mkisofs -boot-info-table writes at
# offset 8 of a no-emulation boot image
BootInfoTable = Struct(
    "bi_pvd" / Int32ul,      # LBA of the primary volume descriptor (16)
    "bi_file" / Int32ul,     # LBA of the boot file
    "bi_length" / Int32ul,   # its length in bytes
    "bi_csum" / Int32ul,     # 32-bit sum of its 32-bit words from offset 64
)

PLATFORMS = {0x00: "x86 BIOS", 0x01: "PowerPC", 0x02: "Mac", 0xEF: "UEFI"}
EMULATIONS = {0: "no emulation", 1: "1.2M floppy", 2: "1.44M floppy",
              3: "2.88M floppy", 4: "hard disk"}
VD_TYPES = {0: "boot record", 1: "primary", 2: "supplementary", 3: "partition",
            255: "terminator"}

# ECMA-119 §9.1: DirectoryRecord, the fixed 33 bytes before the file identifier:
#   length, extended attribute record length, location of extent (LE, BE),
#   data length (LE, BE), recording date (7), file flags, file unit size,
#   interleave gap size, volume sequence number (LE, BE), length of file identifier
DirectoryRecord = struct.Struct("<BBL4xL4x7sBBBH2xB")
# ECMA-119 §9.1.6: file flags
FLAG_HIDDEN = 0x01
FLAG_DIRECTORY = 0x02
FLAG_ASSOCIATED = 0x04
FLAG_MULTI_EXTENT = 0x80


# -- ECMA-167 (UDF) ---------------------------------------------------------------------
# ECMA-167 3/7.2: Descriptor Tag
Tag = Struct(
    "tag_identifier" / Int16ul,
    "descriptor_version" / Int16ul,
    "tag_checksum" / Int8ul,
    "reserved" / Int8ul,
    "tag_serial_number" / Int16ul,
    "descriptor_crc" / Int16ul,
    "descriptor_crc_length" / Int16ul,
    "tag_location" / Int32ul,
)
# ECMA-167 3/10.2: Anchor Volume Descriptor Pointer (tag 2)
AnchorVolumeDescriptorPointer = Struct(
    "descriptor_tag" / Bytes(16),
    "main_volume_descriptor_sequence_length" / Int32ul,
    "main_volume_descriptor_sequence_location" / Int32ul,
    "reserve_volume_descriptor_sequence_length" / Int32ul,
    "reserve_volume_descriptor_sequence_location" / Int32ul,
)
# ECMA-167 3/10.5: Partition Descriptor (tag 5), the fields we use
PartitionDescriptor = Struct(
    "descriptor_tag" / Bytes(16),
    "volume_descriptor_sequence_number" / Int32ul,
    "partition_flags" / Int16ul,
    "partition_number" / Int16ul,
    "partition_contents" / Bytes(32),
    "partition_contents_use" / Bytes(128),
    "access_type" / Int32ul,
    "partition_starting_location" / Int32ul,
    "partition_length" / Int32ul,
)
# ECMA-167 3/10.6: Logical Volume Descriptor (tag 6), up to the partition maps
LogicalVolumeDescriptor = Struct(
    "descriptor_tag" / Bytes(16),
    "volume_descriptor_sequence_number" / Int32ul,
    "descriptor_character_set" / Bytes(64),
    "logical_volume_identifier" / Bytes(128),
    "logical_block_size" / Int32ul,
    "domain_identifier" / Bytes(32),
    "logical_volume_contents_use" / Bytes(16),   # long_ad of the File Set Descriptor
    "map_table_length" / Int32ul,
    "number_of_partition_maps" / Int32ul,
    "implementation_identifier" / Bytes(32),
    "implementation_use" / Bytes(128),
    "integrity_sequence_extent" / Bytes(8),
)
# ECMA-167 4/14.6: ICB Tag (inside File Entries)
IcbTag = Struct(
    "prior_recorded_number_of_direct_entries" / Int32ul,
    "strategy_type" / Int16ul,
    "strategy_parameter" / Bytes(2),
    "maximum_number_of_entries" / Int16ul,
    "reserved" / Int8ul,
    "file_type" / Int8ul,
    "parent_icb_location" / Bytes(6),
    "flags" / Int16ul,
)

# ECMA-167 3/7.2.1 and 4/7.2.1: tag identifiers
TAG_AVDP, TAG_VDP, TAG_PD, TAG_LVD, TAG_TD = 2, 3, 5, 6, 8
TAG_PVD = 1
TAG_FSD, TAG_FID, TAG_AED, TAG_FE, TAG_EFE = 256, 257, 258, 261, 266
# ECMA-167 4/14.6.6: ICB file types
FILE_TYPES = {4: "dir", 5: "file", 12: "symlink", 6: "block", 7: "char", 9: "fifo",
              10: "fifo", 11: "socket"}

# ECMA-167 4/14.9 File Entry and 4/14.17 Extended File Entry: offsets of the fields used
# (uid, gid, permissions, link count, information length, modification time, L_EA,
# L_AD, where the extended attributes start)
FileEntryFields = {"uid": 36, "gid": 40, "perm": 44, "links": 48, "len": 56,
                   "mtime": 84, "l_ea": 168, "l_ad": 172, "ea": 176}
ExtendedFileEntryFields = {"uid": 36, "gid": 40, "perm": 44, "links": 48, "len": 56,
                           "mtime": 92, "l_ea": 208, "l_ad": 212, "ea": 216}
