"""Hand-built hosted sparse VMDKs for tests: the layouts qemu-img cannot make (grain
sizes other than 128 sectors, fewer entries per grain table, compressed grains with
and without markers in a seekable file, zeroed grains) and the damaged ones the
hostile tests need. Written straight from the Virtual Disk Format 5.0 layout, without
diskforge's code, so reading them with qemu-img is an independent check."""

from __future__ import annotations

import struct
import zlib

SECTOR = 512
FLAG_NL, FLAG_RGD, FLAG_ZEROED = 1, 2, 4
FLAG_COMPRESSED, FLAG_MARKERS = 1 << 16, 1 << 17


def header(*, version=1, flags=FLAG_NL | FLAG_RGD, capacity=0, grain=128,
           desc_offset=0, desc_size=0, gtes=512, rgd=0, gd=0, overhead=0,
           compress=0, magic=b"KDMV") -> bytes:
    """One SparseExtentHeader sector."""
    h = magic + struct.pack("<IIQQQQIQQQB4sH", version, flags, capacity, grain,
                            desc_offset, desc_size, gtes, rgd, gd, overhead, 0,
                            b"\n \r\n", compress)
    return h.ljust(SECTOR, b"\0")


def descriptor(capacity: int, name: str = "x.vmdk", cid: str = "12345678",
               parent_cid: str = "ffffffff", create_type: str = "monolithicSparse",
               parent: str | None = None, extent_type: str = "SPARSE") -> str:
    text = (f"# Disk DescriptorFile\nversion=1\nCID={cid}\nparentCID={parent_cid}\n"
            f'createType="{create_type}"\n')
    if parent:
        text += f'parentFileNameHint="{parent}"\n'
    return text + (f'\n# Extent description\nRW {capacity} {extent_type} "{name}"\n\n'
                   '# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n')


def build(path: str, capacity: int, grains: dict[int, bytes], *, grain: int = 128,
          gtes: int = 512, version: int = 1, compress: bool = False,
          markers: bool = False, zeroed: tuple[int, ...] = (),
          desc: str | None = None, redundant: bool = True, flags: int | None = None) -> dict:
    """Write a sparse extent of ``capacity`` sectors holding ``grains`` (grain index ->
    bytes, at most a grain each) and GTE 1 for ``zeroed``. Returns the layout (byte
    offsets of the directories, tables and each grain) for tests that damage it."""
    gbytes = grain * SECTOR
    ngrains = -(-capacity // grain)
    ngt = -(-ngrains // gtes)
    gd_sectors = -(-ngt * 4 // SECTOR)
    gt_sectors = -(-gtes * 4 // SECTOR)
    desc_raw = desc.encode() if desc else b""
    desc_sectors = max(20, -(-len(desc_raw) // SECTOR)) if desc else 0
    at = 1 + desc_sectors
    rgd = at if redundant else 0
    if redundant:
        at += gd_sectors + ngt * gt_sectors
    gd = at
    at += gd_sectors + ngt * gt_sectors
    overhead = -(-at // grain) * grain
    if flags is None:
        flags = FLAG_NL | (FLAG_RGD if redundant else 0) | \
            (FLAG_ZEROED if zeroed else 0) | \
            (FLAG_COMPRESSED if compress else 0) | (FLAG_MARKERS if markers else 0)
    out = bytearray(overhead * SECTOR)
    out[:SECTOR] = header(version=version, flags=flags, capacity=capacity, grain=grain,
                          desc_offset=1 if desc else 0, desc_size=desc_sectors,
                          gtes=gtes, rgd=rgd, gd=gd, overhead=overhead,
                          compress=1 if compress else 0)
    if desc:
        out[SECTOR:SECTOR + len(desc_raw)] = desc_raw
    entries = [0] * (ngt * gtes)
    places = {}
    for g in sorted(grains):
        data = grains[g]
        start = len(out)
        if compress:
            z = zlib.compress(data)
            blob = (struct.pack("<QI", g * grain, len(z)) + z) if markers else z
            blob += bytes(-len(blob) % SECTOR)
        else:
            blob = data.ljust(gbytes, b"\0")
        out += blob
        entries[g] = start // SECTOR
        places[g] = start
    for g in zeroed:
        entries[g] = 1
    for base in ((rgd, gd) if redundant else (gd,)):
        tables = base + gd_sectors
        for i in range(ngt):
            t = tables + i * gt_sectors
            struct.pack_into("<I", out, base * SECTOR + 4 * i, t)
            struct.pack_into(f"<{gtes}I", out, t * SECTOR, *entries[i * gtes:(i + 1) * gtes])
    with open(path, "wb") as f:
        f.write(out)
    return {"gd": gd * SECTOR, "rgd": rgd * SECTOR, "gt": (gd + gd_sectors) * SECTOR,
            "rgt": (rgd + gd_sectors) * SECTOR, "grains": places, "size": len(out),
            "overhead": overhead * SECTOR}


def expected(capacity: int, grains: dict[int, bytes], grain: int = 128) -> bytes:
    """The flat disk ``build`` describes."""
    disk = bytearray(capacity * SECTOR)
    for g, data in grains.items():
        off = g * grain * SECTOR
        n = min(len(data), len(disk) - off)
        disk[off:off + n] = data[:n]
    return bytes(disk)


def build_cowd(path: str, capacity: int, grains: dict[int, bytes],
               grain: int = 1) -> None:
    """An ESX ``COWD`` extent (vmfsSparse delta) as qemu's VMDK3Header lays it out: a
    2048-byte header, the grain directory at sector 4, grain tables of 4096 entries,
    then the grains."""
    gtes = 4096
    ngt = -(-capacity // (grain * gtes))
    gd_sectors = -(-ngt * 4 // SECTOR)
    tables = 4 + gd_sectors
    at = tables + ngt * gtes * 4 // SECTOR
    out = bytearray(at * SECTOR)
    struct.pack_into("<4sIIIIIII", out, 0, b"COWD", 1, 3, capacity, grain, 4, ngt, 0)
    for i in range(ngt):
        struct.pack_into("<I", out, 4 * SECTOR + 4 * i, tables + i * gtes * 4 // SECTOR)
    for g in sorted(grains):
        i, j = divmod(g, gtes)
        struct.pack_into("<I", out, (tables * SECTOR) + i * gtes * 4 + 4 * j,
                         len(out) // SECTOR)
        out += grains[g].ljust(grain * SECTOR, b"\0")
    struct.pack_into("<I", out, 28, len(out) // SECTOR)        # freeSector
    with open(path, "wb") as f:
        f.write(out)
