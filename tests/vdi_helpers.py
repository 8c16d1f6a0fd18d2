"""VDI test helpers, written from VirtualBox's VDICore.h and VDI.cpp without diskforge's
code: a checker of VirtualBox's header rules, and a builder of VDI files with any
layout (versions 0.2 and 1.1, block sizes, per-block extra data, map and data offsets,
block order, zero entries, parents) for the readers' tests.
"""

from __future__ import annotations

import os
import struct

PRE = struct.Struct("<64sII")                         # VDIPREHEADER
H1 = struct.Struct("<III256sII4IIQIIII16s16s16s16s")  # VDIHEADER1
H1PLUS = struct.Struct(H1.format + "4I")              # VDIHEADER1PLUS
H0 = struct.Struct("<II256s4IQIII16s16s16s")          # VDIHEADER0
SIGNATURE = 0xBEDA107F
FREE, ZERO = 0xFFFFFFFF, 0xFFFFFFFE
assert (PRE.size, H1.size, H1PLUS.size, H0.size) == (72, 384, 400, 348)


def _pow2(n: int) -> bool:
    # VDI.cpp's getPowerOfTwo(n) != 0: a power of two other than 1
    return n >= 2 and n & (n - 1) == 0


def header(path: str) -> dict:
    """The pre-header and 1.1 header fields of ``path``, by VDICore.h's names."""
    with open(path, "rb") as f:
        raw = f.read(PRE.size + H1PLUS.size)
    info, sig, ver = PRE.unpack_from(raw)
    names = ("cbHeader u32Type fFlags szComment offBlocks offData LC LH LS LcbSector"
             " u32Dummy cbDisk cbBlock cbBlockExtra cBlocks cBlocksAllocated uuidCreate"
             " uuidModify uuidLinkage uuidParentModify").split()
    h = dict(zip(names, H1.unpack_from(raw, PRE.size)))
    h.update(szFileInfo=info, u32Signature=sig, u32Version=ver)
    if h["cbHeader"] >= H1PLUS.size:
        h["LCHSGeometry"] = H1PLUS.unpack_from(raw, PRE.size)[-4:]
    return h


def virtualbox_header_problems(path: str) -> list[str]:
    """Why VirtualBox would refuse to open ``path`` (vdiValidatePreHeader and
    vdiValidateHeader of VDI.cpp, version 1.1), as a list of reasons; [] when it
    would open it."""
    h = header(path)
    out = []
    if h["u32Signature"] != SIGNATURE:
        out.append("u32Signature")
    if h["u32Version"] != 0x00010001:
        out.append(f"u32Version {h['u32Version']:#x}")
        return out
    if h["cbHeader"] < H1.size:
        out.append("cbHeader < sizeof(VDIHEADER1)")
    if h["offBlocks"] < PRE.size + H1.size:
        out.append("offBlocks inside the header")
    if h["offData"] < h["offBlocks"] + 4 * h["cBlocks"]:
        out.append("offData inside the block map")
    if not 1 <= h["u32Type"] <= 4:
        out.append("u32Type")
    if (h["fFlags"] << 8) & ~0x100:
        out.append("fFlags")
    if "LCHSGeometry" in h and h["LCHSGeometry"][3] != 512:
        out.append("LCHSGeometry.cbSector")
    if h["cbDisk"] == 0 or h["cbBlock"] == 0 or h["cBlocks"] == 0 or not _pow2(h["cbBlock"]):
        out.append("cbDisk/cbBlock/cBlocks")
    if h["cBlocksAllocated"] > h["cBlocks"]:
        out.append("cBlocksAllocated > cBlocks")
    if h["cbBlockExtra"] and not _pow2(h["cbBlockExtra"]):
        out.append("cbBlockExtra")
    if h["cbBlock"] * h["cBlocks"] < h["cbDisk"]:
        out.append("cbBlock * cBlocks < cbDisk")
    if h["uuidCreate"] == bytes(16):
        out.append("uuidCreate is null")
    if h["uuidModify"] == bytes(16):
        out.append("uuidModify is null")
    return out


def virtualbox_layout_differences(path: str) -> list[str]:
    """Where ``path`` differs from what VirtualBox's vdiCreate writes (vdiInitHeader):
    VDIHEADER1PLUS, map and data on 1 MiB boundaries, geometries not calculated,
    blocks numbered densely from 0, the file ending after the last block."""
    h = header(path)
    out = []
    if h["cbHeader"] != H1PLUS.size:
        out.append(f"cbHeader {h['cbHeader']}")
    if h["offBlocks"] % (1 << 20) or h["offData"] % (1 << 20):
        out.append("offBlocks/offData not on 1 MiB")
    if (h["LC"], h["LH"], h["LS"], h["LcbSector"]) != (0, 0, 0, 512):
        out.append("LegacyGeometry")
    if h.get("LCHSGeometry") != (0, 0, 0, 512):
        out.append("LCHSGeometry")
    if h["cBlocks"] != -(-h["cbDisk"] // h["cbBlock"]):
        out.append("cBlocks")
    if h["cbDisk"] % 512:
        out.append("cbDisk not whole sectors")
    with open(path, "rb") as f:
        f.seek(h["offBlocks"])
        entries = struct.unpack(f"<{h['cBlocks']}I", f.read(4 * h["cBlocks"]))
        size = os.fstat(f.fileno()).st_size
    used = sorted(e for e in entries if e < ZERO)
    if used != list(range(len(used))) or len(used) != h["cBlocksAllocated"]:
        out.append("block indices not 0..cBlocksAllocated-1")
    if size != h["offData"] + h["cBlocksAllocated"] * (h["cbBlock"] + h["cbBlockExtra"]):
        out.append(f"file size {size}")
    if h["u32Type"] == 4 and h["uuidParentModify"] == bytes(16):
        out.append("uuidParentModify is null")
    return out


def uuid(n: int) -> bytes:
    """A fixed, non-null RTUUID for hand-made files."""
    return bytes([n]) * 15 + b"\x01"


def build(path: str, disk: bytes, *, block_size: int = 1 << 20, version: int = 0x00010001,
          extra: int = 0, off_blocks: int | None = None, off_data: int | None = None,
          order: list[int] | None = None, zero_blocks: tuple[int, ...] = (),
          free_blocks: tuple[int, ...] | None = None, image_type: int = 1,
          create: bytes = uuid(1), modify: bytes = uuid(2), linkage: bytes = bytes(16),
          parent_modify: bytes = bytes(16), plus: bool = True) -> str:
    """A VDI of ``disk`` with the layout asked for: blocks stored in ``order`` (block
    numbers; default: every block with a non-zero byte, in disk order), ``zero_blocks``
    as VDI_IMAGE_BLOCK_ZERO, the rest VDI_IMAGE_BLOCK_FREE. Version 0x00000002 makes a
    VDIHEADER0 file (offsets implied)."""
    bs = block_size
    n = -(-len(disk) // bs)
    blocks = [disk[i * bs:(i + 1) * bs].ljust(bs, b"\0") for i in range(n)]
    if order is None:
        order = [i for i in range(n) if blocks[i].strip(b"\0") and i not in zero_blocks
                 and (free_blocks is None or i not in free_blocks)]
    entries = [FREE] * n
    for k, i in enumerate(order):
        entries[i] = k
    for i in zero_blocks:
        entries[i] = ZERO
    if version == 0x00000002:
        off_blocks = PRE.size + H0.size
        off_data = off_blocks + 4 * n
        hdr = H0.pack(image_type, 0, b"", 0, 0, 0, 512, len(disk), bs, n, len(order),
                      create, modify, linkage)
    else:
        hsize = H1PLUS.size if plus else H1.size
        # sector-aligned by default, as qemu requires; anything valid when asked
        off_blocks = 512 if off_blocks is None else off_blocks
        off_data = -(-(off_blocks + 4 * n) // 512) * 512 if off_data is None else off_data
        fields = (hsize, image_type, 0, b"", off_blocks, off_data, 0, 0, 0, 512, 0,
                  len(disk), bs, extra, n, len(order), create, modify, linkage,
                  parent_modify)
        hdr = H1PLUS.pack(*fields, 0, 0, 0, 512) if plus else H1.pack(*fields)
    with open(path, "wb") as f:
        f.write(PRE.pack(b"<<< test VDI >>>\n", SIGNATURE, version) + hdr)
        f.seek(off_blocks)
        f.write(struct.pack(f"<{n}I", *entries))
        for k, i in enumerate(order):
            f.seek(off_data + k * (extra + bs))
            f.write(b"\xee" * extra + blocks[i])   # the service data is not disk data
        f.truncate(max(f.tell(), off_data))
    return path
