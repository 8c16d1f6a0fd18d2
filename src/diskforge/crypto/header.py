"""What LUKS1 and LUKS2 headers have in common, once parsed and validated: the key
slots, the digest a volume key is checked against, and the encrypted data segment.

``luks1`` and ``luks2`` each turn their on-disk header into a ``LuksHeader``; ``unlock``
works on this model only. Offsets here are in bytes from the start of the LUKS header
(a raw container's byte 0; qcow2's crypto header clusters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SECTOR = 512


@dataclass(frozen=True)
class Kdf:
    """How a passphrase becomes a key slot's key: ``pbkdf2`` (``hash``,
    ``iterations``) or ``argon2i``/``argon2id`` (``time``, ``memory`` KiB, ``cpus``)."""
    type: str
    salt: bytes
    hash: str = ""
    iterations: int = 0
    time: int = 0
    memory: int = 0
    cpus: int = 0


@dataclass(frozen=True)
class KeySlot:
    """One key slot: where its key material is (``area_offset``, ``area_size``), how
    it is encrypted (``cipher``/``mode``, always 512-byte sectors numbered from 0) and
    split (``stripes`` copies merged with ``af_hash``)."""
    name: str              # "0".."7" (LUKS1), the JSON key (LUKS2)
    kdf: Kdf
    area_offset: int
    area_size: int
    cipher: str
    mode: str
    key_size: int
    stripes: int
    af_hash: str
    priority: int = 1      # LUKS2: 0 ignore, 1 normal, 2 high (tried first)


@dataclass(frozen=True)
class Digest:
    """PBKDF2 of the volume key: the check that a key slot gave the right key."""
    hash: str
    iterations: int
    salt: bytes
    digest: bytes
    keyslots: frozenset[str] = frozenset()


@dataclass
class LuksHeader:
    """A LUKS1/LUKS2 header, validated: what unlocking and decrypting need."""
    version: int
    uuid: str
    cipher: str            # the payload's cipher and mode
    mode: str
    key_size: int
    payload_offset: int    # bytes
    payload_size: int | None  # bytes; None: to the end of the file
    sector_size: int       # 512 (LUKS1), 512..4096 (LUKS2)
    iv_tweak: int          # added to the payload's sector numbers (LUKS2)
    keyslots: list[KeySlot]
    digests: list[Digest]
    header_size: int       # bytes the header occupies, key slots included
    details: dict[str, object] = field(default_factory=dict)
