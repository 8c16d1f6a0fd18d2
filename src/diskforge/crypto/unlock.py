"""Unlocking: a passphrase against the key slots, the volume key checked against the
header's digest, and the ``LuksVolume`` through which formats read plaintext.

As cryptsetup and qemu do, every active key slot is tried (LUKS2: higher priority
first, priority 0 never); a slot opens when the key its passphrase-derived key
decrypts, merged (AFmerge), matches the digest. A wrong passphrase is one line,
qemu's words: "Invalid password, cannot unlock any keyslot". The KDF work over all
slots tried is bounded (``kdf.KdfBudget``), and key material is read only after its
offset and size were checked against the file.
"""

from __future__ import annotations

import hmac

from ..errors import DiskforgeError, FormatError, UnsupportedError
from ..limits import check_alloc
from .af import af_merge
from .ciphers import SectorCipher, check_spec, hash_name
from .header import SECTOR, KeySlot, LuksHeader
from .kdf import KdfBudget, argon2, pbkdf2

MISSING_KEY = ("encrypted ({kind}); give its passphrase: --object secret,id=sec0,"
               "data=PASSPHRASE (or file=PATH) with {option}=sec0, or"
               " diskforge.open(path, key=b'...')")


class WrongKey(DiskforgeError):
    """No key slot opens with the passphrase given."""


def probe_luks(head: bytes) -> int:
    """1 or 2 when ``head`` starts with a LUKS1/LUKS2 header, else 0."""
    if head[:6] == b"LUKS\xba\xbe" and head[6:8] in (b"\x00\x01", b"\x00\x02"):
        return head[7]
    return 0


def read_header(read, path: str | None, size: int) -> LuksHeader:
    """The validated header at the start of what ``read(offset, length)`` reads
    (``size`` bytes available)."""
    head = read(0, 8)
    version = probe_luks(head)
    if version == 1:
        from .luks1 import PHDR_SIZE, parse_luks1
        return parse_luks1(read(0, PHDR_SIZE), path, size)
    from .luks2 import parse_luks2  # LUKS2, or one whose primary copy was wiped
    return parse_luks2(read, path, size)


def _derive(slot: KeySlot, key: bytes, path: str | None, budget: KdfBudget) -> bytes:
    where = f"keyslot {slot.name} kdf"
    k = slot.kdf
    if k.type == "pbkdf2":
        return pbkdf2(k.hash, key, k.salt, k.iterations, slot.key_size, path, where, budget)
    return argon2(k.type, key, k.salt, k.time, k.memory, k.cpus, slot.key_size, path,
                  where, budget)


def unlock(header: LuksHeader, read, key: bytes, path: str | None) -> bytes:
    """The volume key ``key`` (a passphrase) opens, or WrongKey."""
    budget = KdfBudget()
    tried = 0
    for slot in header.keyslots:
        if slot.priority == 0:
            continue
        digests = [d for d in header.digests if slot.name in d.keyslots]
        if not digests:
            continue
        tried += 1
        where = f"keyslot {slot.name}"
        af_hash = hash_name(slot.af_hash, path, f"{where} af.hash")
        derived = _derive(slot, key, path, budget)
        check_alloc(slot.area_size, path, f"{where} key material")
        material = read(slot.area_offset, slot.area_size)
        if len(material) != slot.area_size:
            raise FormatError(f"key material at {slot.area_offset} (+{slot.area_size}) is"
                              " past the end of the file: truncated", path,
                              structure=where)
        cipher = SectorCipher(slot.cipher, slot.mode, derived, SECTOR, path, where)
        plain = cipher.decrypt(material, 0)
        candidate = af_merge(plain, slot.key_size, slot.stripes, af_hash)
        for d in digests:
            got = pbkdf2(d.hash, candidate, d.salt, d.iterations, len(d.digest), path,
                         "digest", budget)
            if d.digest and hmac.compare_digest(got, d.digest):
                return candidate
    if not tried:
        raise UnsupportedError("no usable key slot (every one is disabled or has no"
                               " digest)", path)
    raise WrongKey("Invalid password, cannot unlock any keyslot", path)


class LuksVolume:
    """An unlocked LUKS header: decrypts payload sectors.

    ``decrypt(data, offset)`` takes ciphertext of whole sectors that sit at byte
    ``offset`` of the payload (LUKS2: of the segment), numbering IVs as cryptsetup and
    qemu do: the payload's offset in 512-byte units plus ``iv_tweak``, whatever the
    sector size (LUKS2 does not use dm-crypt's ``iv_large_sectors``: a 4096-byte
    sector's IV is its offset / 512, and the next sector's is 8 more — checked against
    cryptsetup's own encryption in the tests).
    """

    def __init__(self, header: LuksHeader, volume_key: bytes | None, path: str | None,
                 missing_key: str = "") -> None:
        self.header = header
        self.path = path
        self.sector_size = header.sector_size
        self.payload_offset = header.payload_offset
        self.payload_size = header.payload_size
        self.missing_key = missing_key  # the refusal when opened without a key
        self.cipher = None if volume_key is None else SectorCipher(
            header.cipher, header.mode, volume_key, header.sector_size, path, "payload")

    def decrypt(self, data, offset: int) -> bytes:
        if self.cipher is None:  # opened for its header only (OpenPolicy.open_data)
            raise UnsupportedError(self.missing_key, self.path)
        return self.cipher.decrypt(data, offset // SECTOR + self.header.iv_tweak,
                                   self.sector_size // SECTOR)

    def qemu_info(self) -> dict[str, object]:
        """``qemu-img info``'s format-specific data of a LUKS1 header, keys and order as
        qemu prints them (it reads no LUKS2); empty for LUKS2."""
        h = self.header
        if h.version != 1:
            return {}
        mode, _, ivgen = h.mode.partition("-")
        bits = h.key_size * 8 // (2 if mode == "xts" else 1)  # XTS: two AES keys
        info = {"ivgen-alg": ivgen.split(":")[0] or None,
                "ivgen-hash-alg": ivgen.partition(":")[2] or None,
                "hash-alg": h.details["hash-alg"], "cipher-alg": f"{h.cipher}-{bits}",
                "uuid": h.uuid, "cipher-mode": mode, "slots": h.details["slots"],
                "payload-offset": h.payload_offset,
                "master-key-iters": h.details["master-key-iters"]}
        return {k: v for k, v in info.items() if v is not None}


def open_volume(read, size: int, key: bytes | None, path: str | None, *,
                option: str = "key-secret", header_only: bool = False) -> LuksVolume:
    """Parse, validate and unlock the LUKS header at the start of ``read``'s view.
    Without a key, the refusal says how to give one (``option``: the -o key naming
    the secret, which differs between raw LUKS and qcow2). ``header_only`` (an open for
    ``info``, see ``OpenPolicy.open_data``) parses the header and unlocks nothing, with
    or without a key, as qemu-img info does; the first decryption is refused."""
    header = read_header(read, path, size)
    missing = MISSING_KEY.format(kind=f"LUKS{header.version}", option=option)
    if header_only:  # as qemu's QCRYPTO_BLOCK_OPEN_NO_IO: a key given is not even tried
        check_spec(header.cipher, header.mode, path, "payload")
        return LuksVolume(header, None, path, missing)
    if key is None:
        raise UnsupportedError(missing, path)
    volume_key = unlock(header, read, key, path)
    return LuksVolume(header, volume_key, path)
