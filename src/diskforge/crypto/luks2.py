"""LUKS2's binary header and JSON metadata, as the LUKS2 On-Disk Format Specification
(Milan Broz, version 1.1.x) names them.

Section 2.1: two copies of the binary header (``luks2_hdr_disk``, 4 KiB), each followed
by its JSON area, together ``hdr_size`` bytes (16 KiB to 4 MiB); the secondary copy
starts at the primary's ``hdr_size``. Each copy's checksum (``csum``, ``checksum_alg``)
covers its ``hdr_size`` bytes with ``csum`` zeroed; the valid copy with the higher
``seqid`` wins, as cryptsetup decides.

Section 3: the JSON object (``keyslots``, ``segments``, ``digests``, ``config``,
``tokens``). It is bounded by ``hdr_size`` (so at most 4 MiB is ever read), parsed
once, and every value used is checked for type and range here: numbers that LUKS2
stores as decimal strings (offsets, sizes) are parsed as unsigned 64-bit values, and
base64 fields must decode. Anything this reader does not handle (reencryption in
progress, integrity, mandatory requirements, several data segments) is refused with
"not supported yet" rather than misread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re

from construct import Bytes, Int16ub, Int64ub, Struct

from ..errors import FormatError, UnsupportedError
from ..limits import check_alloc
from .header import SECTOR, Digest, Kdf, KeySlot, LuksHeader

LUKS2_MAGIC_1ST = b"LUKS\xba\xbe"
LUKS2_MAGIC_2ND = b"SKUL\xba\xbe"
LUKS2_HDR_BIN_LEN = 4096
# section 2.1: hdr_size is 16 KiB .. 4 MiB, a power of two
LUKS2_HDR_SIZES = tuple(16384 << i for i in range(9))
MAX_KEYSLOTS = 32

# section 2.1, luks2_hdr_disk
Luks2HdrDisk = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "hdr_size" / Int64ub,
    "seqid" / Int64ub,
    "label" / Bytes(48),
    "checksum_alg" / Bytes(32),
    "salt" / Bytes(64),
    "uuid" / Bytes(40),
    "subsystem" / Bytes(48),
    "hdr_offset" / Int64ub,
    "_padding" / Bytes(184),
    "csum" / Bytes(64),
    "_padding4096" / Bytes(7 * 512),
)
CSUM_AT = 448  # offset of csum in luks2_hdr_disk

_UINT = re.compile(r"^[0-9]{1,20}$")


class _Where:
    """A JSON path for error lines (``LUKS2 JSON keyslots.0.kdf.memory``)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def fail(self, where: str, message: str, unsupported: bool = False):
        cls = UnsupportedError if unsupported else FormatError
        if unsupported:
            return cls(f"LUKS2 JSON {where}: not supported yet: {message}", self.path)
        return cls(message, self.path, structure="LUKS2 JSON", field=where)

    def obj(self, parent: dict, key: str, where: str) -> dict:
        v = parent.get(key)
        if not isinstance(v, dict):
            raise self.fail(f"{where}.{key}" if where else key, "missing or not an object")
        return v

    def str(self, parent: dict, key: str, where: str) -> str:
        v = parent.get(key)
        if not isinstance(v, str):
            raise self.fail(f"{where}.{key}", "missing or not a string")
        return v

    def uint(self, parent: dict, key: str, where: str, *, as_string: bool,
             top: int = 2**64 - 1) -> int:
        """A number LUKS2 stores as a decimal string (``as_string``) or a JSON number."""
        v = parent.get(key)
        if as_string:
            ok = isinstance(v, str) and _UINT.match(v)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok or not 0 <= int(v) <= top:
            raise self.fail(f"{where}.{key}", f"{str(v)[:40]!r} is not a number in 0..{top}")
        return int(v)

    def b64(self, parent: dict, key: str, where: str, limit: int = 1024) -> bytes:
        v = self.str(parent, key, where)
        if len(v) > limit:
            raise self.fail(f"{where}.{key}", f"{len(v)} characters of base64 (at most"
                            f" {limit})")
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"{where}.{key}", "not valid base64") from None


def read_binary_header(raw: bytes, path: str | None, offset: int) -> dict | None:
    """The binary header in ``raw`` (4 KiB at ``offset``) as a dict, or None when it is
    not a LUKS2 header copy (wrong magic, version, or hdr_size)."""
    h = Luks2HdrDisk.parse(raw[:LUKS2_HDR_BIN_LEN])
    magic = LUKS2_MAGIC_1ST if offset == 0 else LUKS2_MAGIC_2ND
    if h.magic != magic or h.version != 2 or h.hdr_size not in LUKS2_HDR_SIZES \
            or h.hdr_offset != offset:
        return None
    return h


def _checksum_ok(h, area: bytes) -> bool:
    alg = h.checksum_alg.split(b"\0", 1)[0].decode("ascii", "replace").lower()
    try:
        hasher = hashlib.new(alg)
    except (ValueError, TypeError):
        return False
    zeroed = area[:CSUM_AT] + bytes(64) + area[CSUM_AT + 64:]
    hasher.update(zeroed)
    d = hasher.digest()
    return h.csum[:len(d)] == d


def load_json(read, path: str | None, file_size: int):
    """The valid header copy with the highest seqid: ``(binary header, JSON object)``.

    ``read(offset, length)`` reads from the header's start. FormatError when neither
    copy is valid."""
    copies = []
    problems = []
    first = read(0, LUKS2_HDR_BIN_LEN)
    candidates = [0]
    h0 = read_binary_header(first, path, 0) if len(first) == LUKS2_HDR_BIN_LEN else None
    if h0 is not None:
        candidates.append(h0.hdr_size)
    else:
        candidates.extend(LUKS2_HDR_SIZES)  # find the secondary by its own hdr_offset
    for off in dict.fromkeys(candidates):
        raw = first if off == 0 else read(off, LUKS2_HDR_BIN_LEN)
        if len(raw) < LUKS2_HDR_BIN_LEN:
            continue
        h = read_binary_header(raw, path, off)
        if h is None:
            continue
        if off + h.hdr_size > file_size:
            problems.append(f"header copy at {off}: hdr_size {h.hdr_size} past the end of"
                            f" the file ({file_size} bytes)")
            continue
        check_alloc(h.hdr_size, path, "luks2_hdr_disk", "hdr_size")
        area = read(off, h.hdr_size)
        if len(area) < h.hdr_size or not _checksum_ok(h, area):
            problems.append(f"header copy at {off}: checksum mismatch")
            continue
        copies.append((h.seqid, off, h, area))
    if not copies:
        why = "; ".join(problems) or "no valid header copy"
        raise FormatError(why, path, structure="luks2_hdr_disk", field="csum")
    copies.sort(key=lambda c: (-c[0], c[1]))
    _, off, h, area = copies[0]
    text = area[LUKS2_HDR_BIN_LEN:].split(b"\0", 1)[0]
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"not valid JSON ({str(e)[:80]})", path,
                          structure="LUKS2 JSON") from None
    if not isinstance(obj, dict):
        raise FormatError("not a JSON object", path, structure="LUKS2 JSON")
    return h, obj, off


def parse_luks2(read, path: str | None, file_size: int) -> LuksHeader:
    """Validate a LUKS2 header (both copies considered) and its JSON metadata."""
    h, meta, copy_at = load_json(read, path, file_size)
    w = _Where(path)
    config = w.obj(meta, "config", "")
    json_size = w.uint(config, "json_size", "config", as_string=True)
    keyslots_size = w.uint(config, "keyslots_size", "config", as_string=True)
    if json_size + LUKS2_HDR_BIN_LEN != h.hdr_size:
        raise w.fail("config.json_size", f"{json_size} does not match hdr_size {h.hdr_size}")
    reqs = config.get("requirements")
    if isinstance(reqs, dict) and reqs.get("mandatory"):
        raise w.fail("config.requirements.mandatory",
                     f"{str(reqs.get('mandatory'))[:80]}", unsupported=True)
    metadata_end = 2 * h.hdr_size
    area_end = metadata_end + keyslots_size

    segments = w.obj(meta, "segments", "")
    if len(segments) != 1:
        raise w.fail("segments", f"{len(segments)} data segments (one is read)",
                     unsupported=True)
    seg_name, seg = next(iter(segments.items()))
    where = f"segments.{seg_name}"
    if not isinstance(seg, dict):
        raise w.fail(where, "not an object")
    if w.str(seg, "type", where) != "crypt":
        raise w.fail(f"{where}.type", f"segment type {seg['type'][:40]!r}", unsupported=True)
    if "integrity" in seg and seg["integrity"] is not None:
        raise w.fail(f"{where}.integrity", "authenticated encryption (dm-integrity)",
                     unsupported=True)
    seg_offset = w.uint(seg, "offset", where, as_string=True)
    size_text = seg.get("size")
    seg_size = None if size_text == "dynamic" else w.uint(seg, "size", where, as_string=True)
    iv_tweak = w.uint(seg, "iv_tweak", where, as_string=True)
    sector_size = w.uint(seg, "sector_size", where, as_string=False)
    if sector_size not in (512, 1024, 2048, 4096):
        raise w.fail(f"{where}.sector_size", f"{sector_size} (LUKS2 allows 512..4096)")
    if seg_offset % SECTOR or seg_offset < area_end:
        raise w.fail(f"{where}.offset", f"{seg_offset} overlaps the header and key slots"
                     f" (which end at {area_end}) or is not a multiple of 512")
    if seg_size is not None and seg_size % sector_size:
        raise w.fail(f"{where}.size", f"{seg_size} is not a multiple of the sector size")
    cipher, mode = _split_cipher(w.str(seg, "encryption", where), w, f"{where}.encryption")

    digests_obj = w.obj(meta, "digests", "")
    digests: list[Digest] = []
    for name, d in digests_obj.items():
        where = f"digests.{name}"
        if not isinstance(d, dict):
            raise w.fail(where, "not an object")
        if w.str(d, "type", where) != "pbkdf2":
            raise w.fail(f"{where}.type", f"digest type {d['type'][:40]!r}", unsupported=True)
        segs = d.get("segments")
        if not isinstance(segs, list) or seg_name not in segs:
            continue  # a digest of another (absent) segment
        slots = d.get("keyslots")
        if not isinstance(slots, list) or not all(isinstance(s, str) for s in slots):
            raise w.fail(f"{where}.keyslots", "not a list of key slot names")
        digests.append(Digest(w.str(d, "hash", where),
                              w.uint(d, "iterations", where, as_string=False),
                              w.b64(d, "salt", where), w.b64(d, "digest", where),
                              frozenset(slots)))
    if not digests:
        raise w.fail("digests", f"no digest for segment {seg_name}")

    keyslots_obj = w.obj(meta, "keyslots", "")
    if len(keyslots_obj) > MAX_KEYSLOTS:
        raise w.fail("keyslots", f"{len(keyslots_obj)} key slots (LUKS2 has at most"
                     f" {MAX_KEYSLOTS})")
    slots: list[KeySlot] = []
    for name, k in keyslots_obj.items():
        where = f"keyslots.{name}"
        if not isinstance(k, dict):
            raise w.fail(where, "not an object")
        if w.str(k, "type", where) != "luks2":
            continue  # reencryption slots and the like open nothing
        key_size = w.uint(k, "key_size", where, as_string=False, top=512)
        area = w.obj(k, "area", where)
        if w.str(area, "type", f"{where}.area") != "raw":
            raise w.fail(f"{where}.area.type", f"{area['type'][:40]!r}", unsupported=True)
        a_off = w.uint(area, "offset", f"{where}.area", as_string=True)
        a_size = w.uint(area, "size", f"{where}.area", as_string=True)
        a_key = w.uint(area, "key_size", f"{where}.area", as_string=False, top=512)
        a_cipher, a_mode = _split_cipher(w.str(area, "encryption", f"{where}.area"), w,
                                         f"{where}.area.encryption")
        af = w.obj(k, "af", where)
        if w.str(af, "type", f"{where}.af") != "luks1":
            raise w.fail(f"{where}.af.type", f"{af['type'][:40]!r}", unsupported=True)
        stripes = w.uint(af, "stripes", f"{where}.af", as_string=False)
        af_hash = w.str(af, "hash", f"{where}.af")
        if not 1 <= stripes <= 1 << 20:
            raise w.fail(f"{where}.af.stripes", f"{stripes} stripes (LUKS2 writes 4000)")
        need = -(-key_size * stripes // SECTOR) * SECTOR
        if a_off < metadata_end or a_off + a_size > min(area_end, file_size) \
                or need > a_size:
            raise w.fail(f"{where}.area.offset", f"area {a_off} (+{a_size}) holding"
                         f" {need} bytes of key material is outside the key slots area"
                         f" ({metadata_end}..{area_end}) or the file ({file_size} bytes)")
        kdf_obj = w.obj(k, "kdf", where)
        kind = w.str(kdf_obj, "type", f"{where}.kdf")
        salt = w.b64(kdf_obj, "salt", f"{where}.kdf")
        if kind == "pbkdf2":
            kdf = Kdf(kind, salt, hash=w.str(kdf_obj, "hash", f"{where}.kdf"),
                      iterations=w.uint(kdf_obj, "iterations", f"{where}.kdf",
                                        as_string=False))
        elif kind in ("argon2i", "argon2id"):
            kdf = Kdf(kind, salt, time=w.uint(kdf_obj, "time", f"{where}.kdf",
                                               as_string=False),
                      memory=w.uint(kdf_obj, "memory", f"{where}.kdf", as_string=False),
                      cpus=w.uint(kdf_obj, "cpus", f"{where}.kdf", as_string=False))
        else:
            raise w.fail(f"{where}.kdf.type", f"key derivation {kind[:40]!r}",
                         unsupported=True)
        priority = k.get("priority", 1)
        if not isinstance(priority, int) or isinstance(priority, bool):
            priority = 1
        slots.append(KeySlot(name, kdf, a_off, need, a_cipher, a_mode, a_key, stripes,
                             af_hash, priority))
        if a_key != key_size:
            raise w.fail(f"{where}.area.key_size", f"{a_key} differs from key_size"
                         f" {key_size}", unsupported=True)
    slots.sort(key=lambda s: -s.priority)
    key_size = slots[0].key_size if slots else 0
    uuid = h.uuid.split(b"\0", 1)[0].decode("ascii", "replace")
    return LuksHeader(
        version=2, uuid=uuid, cipher=cipher, mode=mode, key_size=key_size,
        payload_offset=seg_offset, payload_size=seg_size, sector_size=sector_size,
        iv_tweak=iv_tweak, keyslots=slots, digests=digests, header_size=seg_offset,
        details={"cipher": f"{cipher}-{mode}", "sector-size": sector_size,
                 "payload-offset": seg_offset, "uuid": uuid, "hdr-size": h.hdr_size,
                 "header-copy": "primary" if copy_at == 0 else "secondary",
                 "key-slots": [s.name for s in slots]})


def _split_cipher(spec: str, w: _Where, where: str) -> tuple[str, str]:
    """``aes-xts-plain64`` as ``("aes", "xts-plain64")`` (LUKS2 joins what LUKS1 keeps
    in two fields). Kernel-API names (``capi:...``) are refused."""
    cipher, sep, mode = spec.partition("-")
    if not sep or not cipher or not mode or spec.startswith("capi:"):
        raise w.fail(where, f"cipher {spec[:60]!r}", unsupported=True)
    return cipher, mode
