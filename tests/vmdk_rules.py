"""The rules ESXi, VMware's tools and VirtualBox apply to the sparse VMDKs they accept,
as one checker for the files we write: ``stream_violations(path)`` and
``sparse_violations(path)`` return the rules a file breaks ([] when none), each as
"RULE: what is wrong".

Where each rule comes from (the prefix of each message):
- SPEC: VMware, "Virtual Disk Format 5.0" (vmdk_50_technote.pdf, shipped in
  vmware/open-vmdk): "Hosted Sparse Extent Header", "Grain Directories and Grain
  Tables", "Stream-Optimized Compressed Sparse Extents" (markers, footer, EOS).
- ESXI: what ESXi / vSphere OVF import refuse in stream files: header version below 3
  ("sparse VMDK version too old") and a stream without its end-of-stream marker (qemu
  issue 1357, the reason open-vmdk exists).
- OPENVMDK: vmware/open-vmdk ``vmdk/sparse.c``: grain size a power of two 1-128,
  numGTEsPerGT a power of two >= 128, CID never 0xffffffff/0xfffffffe, the descriptor
  keys its ``makeDiskDescriptorFile`` writes (longContentID, virtualHWVersion,
  geometry, adapterType, toolsVersion).
- VBOX: VirtualBox ``src/VBox/Storage/VMDK.cpp``: ``vmdkValidateHeader`` (header
  version 1 or 3; the newline-detection characters when flag bit 0 is set, "VMDK:
  corrupted by CR/LF translation"), ``vmdkReadBinaryMetaExtent`` (a header with the
  markers flag and gdOffset GD_AT_END has its footer read at the file's end minus 1024
  bytes, validated as a header), ``vmdkReadMetaExtent`` (grain size a power of two, at
  least 8 sectors; entries per grain table a power of two).
"""

from __future__ import annotations

import re
import struct
import zlib

SECTOR = 512
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
FIELDS = ("magic", "version", "flags", "capacity", "grainSize", "descriptorOffset",
          "descriptorSize", "numGTEsPerGT", "rgdOffset", "gdOffset", "overHead",
          "uncleanShutdown", "newline", "compressAlgorithm")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
KNOWN_FLAGS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 16) | (1 << 17)
DDB_KEYS = ("ddb.adapterType", "ddb.geometry.cylinders", "ddb.geometry.heads",
            "ddb.geometry.sectors", "ddb.longContentID", "ddb.toolsVersion",
            "ddb.virtualHWVersion")


def header(data: bytes) -> dict:
    return dict(zip(FIELDS, HEADER.unpack_from(data, 0)))


def _header_rules(h: dict, stream: bool) -> list[str]:
    bad = []
    if h["magic"] != b"KDMV":
        bad.append("SPEC: magicNumber is not KDMV")
    if stream and h["version"] < 3:
        bad.append(f"ESXI: stream header version {h['version']} < 3 (sparse VMDK version"
                   " too old)")
    if h["version"] not in (1, 3):
        bad.append(f"VBOX: header version {h['version']} is not 1 or 3")
    if h["flags"] & ~KNOWN_FLAGS:
        bad.append(f"SPEC: unknown flags {h['flags']:#x}")
    if h["flags"] & 1 and h["newline"] != b"\n \r\n":
        bad.append("VBOX: newline test characters changed (CR/LF translation)")
    if not h["flags"] & 1:
        bad.append("SPEC: flag bit 0 (valid newline test) not set, as VMware sets it")
    g = h["grainSize"]
    if not 1 <= g <= 128 or g & (g - 1):
        bad.append(f"OPENVMDK: grainSize {g} is not a power of two in 1..128")
    elif g < 8:
        bad.append(f"VBOX: grainSize {g} is below 8 sectors")
    if h["numGTEsPerGT"] != 512:
        bad.append(f"SPEC: numGTEsPerGT {h['numGTEsPerGT']} is not 512")
    if h["overHead"] % g:
        bad.append("SPEC: overHead is not a whole number of grains")
    if stream:
        if h["flags"] & (3 << 16) != 3 << 16:
            bad.append("SPEC: stream flags lack compressed (bit 16) and markers (bit 17)")
        if h["compressAlgorithm"] != 1:
            bad.append("SPEC: stream compressAlgorithm is not 1 (deflate)")
    return bad


def _descriptor_rules(text: str, h: dict, stream: bool, keys: bool = True) -> list[str]:
    bad = []
    kv = dict(re.findall(r'^\s*([\w.]+)\s*=\s*"?([^"\n]*)"?\s*$', text, re.M))
    if stream and kv.get("createType") != "streamOptimized":
        bad.append("SPEC: createType is not streamOptimized")
    cid = kv.get("CID", "")
    if not re.fullmatch(r"[0-9a-f]{8}", cid) or int(cid, 16) >= 0xFFFFFFFE:
        bad.append(f"OPENVMDK: CID {cid!r} is not 8 hex digits below fffffffe")
    extents = re.findall(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+SPARSE\s+"([^"]+)"', text, re.M)
    if len(extents) != 1 or int(extents[0][1]) != h["capacity"]:
        bad.append("SPEC: the descriptor must name one SPARSE extent of the capacity")
    if stream and keys:
        for key in DDB_KEYS:
            if key not in kv:
                bad.append(f"OPENVMDK: descriptor lacks {key}")
        if "ddb.longContentID" in kv and not re.fullmatch(r"[0-9a-f]{32}",
                                                          kv["ddb.longContentID"]):
            bad.append("OPENVMDK: ddb.longContentID is not 32 hex digits")
    return bad


def stream_violations(path: str, *, strict: bool = True) -> list[str]:
    """Every rule the streamOptimized file at ``path`` breaks. ``strict`` adds what
    the files we write promise beyond what every VMware tool does (the layout the spec
    describes for a stream written in one pass): gdOffset GD_AT_END with a footer,
    grain tables and directory behind their markers, all-zero grains left out, and
    every descriptor key open-vmdk writes (VMware's older exports lack
    ddb.longContentID, VirtualBox's ddb.toolsVersion; vmware-vdiskmanager's stream
    files keep the directory at the front and store zero grains)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 2 * SECTOR or len(data) % SECTOR:
        return ["SPEC: a stream file is whole sectors, header and EOS at least"]
    h = header(data)
    bad = _header_rules(h, stream=True)
    desc = data[h["descriptorOffset"] * SECTOR:
                (h["descriptorOffset"] + h["descriptorSize"]) * SECTOR]
    bad += _descriptor_rules(desc.split(b"\0", 1)[0].decode("utf-8", "replace"), h, True,
                             strict)
    gd_offset = h["gdOffset"]
    footer_marker = data[-3 * SECTOR:-2 * SECTOR]
    if struct.unpack_from("<QII", footer_marker) != (1, 0, 3):
        if h["gdOffset"] == GD_AT_END or strict:
            bad.append("VBOX: no footer marker at the end minus 1536 bytes (where the"
                       " grain directory of a GD_AT_END header is found)")
            return bad
    else:
        foot = header(data[-2 * SECTOR:-SECTOR])
        for k in FIELDS:
            if k != "gdOffset" and foot[k] != h[k]:
                bad.append(f"SPEC: footer field {k} differs from the header")
        if h["gdOffset"] not in (GD_AT_END, foot["gdOffset"]):
            bad.append("SPEC: header gdOffset is neither GD_AT_END nor the footer's")
        gd_offset = foot["gdOffset"]
    if strict and h["gdOffset"] != GD_AT_END:
        bad.append("SPEC: a stream written in one pass has gdOffset GD_AT_END")
    bad += _walk_stream(data, h, gd_offset, strict)
    return bad


def _walk_stream(data: bytes, h: dict, gd_offset: int, strict: bool) -> list[str]:
    """Markers from overHead to the end: grains in increasing lba order, each inflating
    to its grain; tables behind GT markers; the directory where the footer says; every
    table entry pointing at a grain marker with its lba."""
    bad = []
    grain = h["grainSize"]
    pos = h["overHead"] * SECTOR
    grains, tables, last = {}, {}, -1
    gd_at = eos = None
    while pos + 12 <= len(data):
        lba, size = struct.unpack_from("<QI", data, pos)
        if size:
            if lba % grain or lba >= h["capacity"]:
                bad.append(f"SPEC: grain marker at sector {pos // SECTOR} has lba {lba}")
                return bad
            if lba <= last:
                bad.append("SPEC: grains are not in increasing lba order")
            last = lba
            # a whole grain, or (the last grain) what is left of the capacity, as
            # open-vmdk writes it; 7-Zip takes only the first, so strict wants it
            want = {grain * SECTOR} if strict else \
                {grain * SECTOR, min(grain, h["capacity"] - lba) * SECTOR}
            try:
                out = zlib.decompress(data[pos + 12:pos + 12 + size])
            except zlib.error:
                out = b""
            if len(out) not in want:
                bad.append(f"SPEC: grain at lba {lba} inflates to {len(out)} bytes")
            if strict and not out.strip(b"\0"):
                bad.append(f"SPEC: grain at lba {lba} is all zeros (should be skipped)")
            grains[pos // SECTOR] = lba
            pos += -(-(12 + size) // SECTOR) * SECTOR
            continue
        kind = struct.unpack_from("<I", data, pos + 12)[0]
        if kind == 0:
            eos = pos
            break
        if kind == 1:
            if lba != 4:
                bad.append("SPEC: GT marker numSectors is not 4")
            tables[pos // SECTOR + 1] = struct.unpack_from("<512I", data, pos + SECTOR)
        elif kind == 2:
            gd_at = pos // SECTOR + 1
        elif kind != 3:
            bad.append(f"SPEC: unknown marker type {kind}")
            return bad
        pos += SECTOR + lba * SECTOR
    if eos is None or eos + SECTOR != len(data):
        bad.append("ESXI: the stream does not end with its end-of-stream marker (the"
                   " last sector after the last structure)")
    if gd_at is None and strict:
        bad.append("SPEC: no grain directory marker in the stream")
    if gd_at is not None and gd_at != gd_offset:
        bad.append("SPEC: gdOffset is not the sector after the GD marker")
        return bad
    ngt = -(-h["capacity"] // (grain * 512))
    if (gd_offset + 1) * SECTOR + ngt * 4 > len(data):
        bad.append("SPEC: the grain directory is outside the file")
        return bad
    gd = struct.unpack_from(f"<{ngt}I", data, gd_offset * SECTOR)
    for i, at in enumerate(gd):
        if not at:
            continue
        if strict and at not in tables:
            bad.append(f"SPEC: grain directory entry {i} does not follow a GT marker")
        if (at + 4) * SECTOR > len(data):
            bad.append(f"SPEC: grain directory entry {i} points outside the file")
            continue
        for j, g in enumerate(struct.unpack_from("<512I", data, at * SECTOR)):
            if g and grains.get(g) != (i * 512 + j) * grain:
                bad.append(f"SPEC: GT {i} entry {j} does not point at its grain marker")
                break
    return bad


def sparse_violations(path: str) -> list[str]:
    """Every rule the hosted (monolithicSparse) file at ``path`` breaks: the header
    rules, the embedded descriptor, and both directories pointing inside the file."""
    with open(path, "rb") as f:
        data = f.read()
    h = header(data)
    bad = _header_rules(h, stream=False)
    if h["flags"] & (3 << 16):
        bad.append("SPEC: a hosted sparse extent is not compressed")
    if h["descriptorOffset"]:
        desc = data[h["descriptorOffset"] * SECTOR:
                    (h["descriptorOffset"] + h["descriptorSize"]) * SECTOR]
        bad += _descriptor_rules(desc.split(b"\0", 1)[0].decode("utf-8", "replace"), h,
                                 False)
    ngt = -(-h["capacity"] // (h["grainSize"] * 512))
    for name in ("gdOffset", "rgdOffset"):
        off = h[name] * SECTOR
        if name == "rgdOffset" and not h["flags"] & 2:
            continue
        gd = struct.unpack_from(f"<{ngt}I", data, off)
        for i, at in enumerate(gd):
            if at * SECTOR + 2048 > len(data) or at * SECTOR < h[name] * SECTOR:
                bad.append(f"SPEC: {name} entry {i} points outside the metadata")
                break
            gt = struct.unpack_from("<512I", data, at * SECTOR)
            for g in gt:
                if g > 1 and (g < h["overHead"] or (g + h["grainSize"]) * SECTOR
                              > len(data)):
                    bad.append(f"SPEC: a grain of table {i} is outside the grain area")
                    break
    return bad
