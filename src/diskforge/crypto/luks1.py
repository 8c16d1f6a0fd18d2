"""LUKS1's binary header (``phdr``), as the LUKS On-Disk Format Specification 1.2.3
(Clemens Fruhwirth, 2018) names it: section 2.4, figures 1 and 2. Big-endian; sizes in
512-byte sectors. qemu-img's ``-f luks`` and qcow2's ``encrypt.format=luks`` write it.
"""

from __future__ import annotations

from construct import Array, Bytes, Int16ub, Int32ub, Struct

from ..errors import FormatError
from .header import SECTOR, Digest, Kdf, KeySlot, LuksHeader

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_NUMKEYS = 8
LUKS_KEY_ENABLED = 0x00AC71F3
LUKS_KEY_DISABLED = 0x0000DEAD
LUKS_DIGESTSIZE = 20
LUKS_SALTSIZE = 32

# spec 2.4, figure 2: a key slot
LuksKeyBlock = Struct(
    "active" / Int32ub,
    "passwordIterations" / Int32ub,
    "passwordSalt" / Bytes(LUKS_SALTSIZE),
    "keyMaterialOffset" / Int32ub,     # sectors
    "stripes" / Int32ub,
)

# spec 2.4, figure 1: the partition header
LuksPhdr = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "cipherName" / Bytes(32),
    "cipherMode" / Bytes(32),
    "hashSpec" / Bytes(32),
    "payloadOffset" / Int32ub,         # sectors
    "keyBytes" / Int32ub,
    "mkDigest" / Bytes(LUKS_DIGESTSIZE),
    "mkDigestSalt" / Bytes(LUKS_SALTSIZE),
    "mkDigestIterations" / Int32ub,
    "uuid" / Bytes(40),
    "keyblock" / Array(LUKS_NUMKEYS, LuksKeyBlock),
)
PHDR_SIZE = LuksPhdr.sizeof()  # 592


def _text(raw: bytes, path: str | None, field: str) -> str:
    """A NUL-terminated ASCII field."""
    text = raw.split(b"\0", 1)[0]
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("not ASCII text", path, structure="LuksPhdr", field=field) from None
    if not value.isprintable():
        raise FormatError("holds control characters", path, structure="LuksPhdr", field=field)
    return value


def parse_luks1(raw: bytes, path: str | None, file_size: int) -> LuksHeader:
    """Validate a LUKS1 header (``raw``: at least PHDR_SIZE bytes); ``file_size`` bounds
    every offset (the bytes available from the header's start)."""
    if len(raw) < PHDR_SIZE:
        raise FormatError(f"{len(raw)} bytes, needs {PHDR_SIZE}: truncated", path,
                          structure="LuksPhdr")
    h = LuksPhdr.parse(raw[:PHDR_SIZE])
    if h.magic != LUKS_MAGIC or h.version != 1:
        raise FormatError("not a LUKS1 header", path, structure="LuksPhdr", field="magic")
    cipher = _text(h.cipherName, path, "cipherName")
    mode = _text(h.cipherMode, path, "cipherMode")
    hash_spec = _text(h.hashSpec, path, "hashSpec")
    if h.keyBytes not in (16, 24, 32, 48, 64):
        raise FormatError(f"{h.keyBytes} is not a key size LUKS uses (16..64)", path,
                          structure="LuksPhdr", field="keyBytes")
    payload = h.payloadOffset * SECTOR
    slots: list[KeySlot] = []
    shown: list[dict[str, object]] = []  # qemu-img info's "slots"
    end = PHDR_SIZE
    for i, kb in enumerate(h.keyblock):
        where = f"keyblock[{i}]"
        if kb.active == LUKS_KEY_DISABLED:
            shown.append({"active": False, "key-offset": kb.keyMaterialOffset * SECTOR})
            continue
        if kb.active != LUKS_KEY_ENABLED:
            raise FormatError(f"0x{kb.active:08x} is neither enabled nor disabled", path,
                              structure=f"LuksPhdr.{where}", field="active")
        if not 1 <= kb.stripes <= 1 << 20:
            raise FormatError(f"{kb.stripes} stripes (LUKS writes 4000)", path,
                              structure=f"LuksPhdr.{where}", field="stripes")
        offset = kb.keyMaterialOffset * SECTOR
        size = -(-h.keyBytes * kb.stripes // SECTOR) * SECTOR
        if offset < PHDR_SIZE or offset + size > file_size:
            raise FormatError(f"key material at {offset} (+{size}) is outside the file"
                              f" ({file_size} bytes)", path,
                              structure=f"LuksPhdr.{where}", field="keyMaterialOffset")
        end = max(end, offset + size)
        shown.append({"active": True, "iters": kb.passwordIterations, "key-offset": offset,
                      "stripes": kb.stripes})
        slots.append(KeySlot(str(i), Kdf("pbkdf2", bytes(kb.passwordSalt), hash_spec,
                                         kb.passwordIterations),
                             offset, size, cipher, mode, h.keyBytes, kb.stripes, hash_spec))
    if payload and payload < end:
        raise FormatError(f"payload at {payload} overlaps the key material (to {end})",
                          path, structure="LuksPhdr", field="payloadOffset")
    digest = Digest(hash_spec, h.mkDigestIterations, bytes(h.mkDigestSalt),
                    bytes(h.mkDigest), frozenset(s.name for s in slots))
    uuid = _text(h.uuid, path, "uuid")
    return LuksHeader(
        version=1, uuid=uuid, cipher=cipher, mode=mode, key_size=h.keyBytes,
        payload_offset=payload, payload_size=None, sector_size=SECTOR, iv_tweak=0,
        keyslots=slots, digests=[digest], header_size=max(end, payload),
        details={"hash-alg": hash_spec, "master-key-iters": h.mkDigestIterations,
                 "slots": shown})
