"""The old qcow AES encryption (``crypt_method`` 1 of qcow version 1 and of qcow2,
``encrypt.format=aes``), shared by both formats, which never import each other.

qemu's qcrypto_block_qcow_init (crypto/block-qcow.c): the passphrase's first 16
bytes, zero-padded, are an AES-128 key; every 512-byte sector is AES-CBC with a
plain64 IV, the sector's *guest* offset / 512 (qcow2 with LUKS uses the host
offset instead: a different scheme, in ``encryption.py`` of qcow2). There is no key
check in the format: a wrong passphrase reads garbage, in qemu too. Compressed
clusters are stored in plain; zero and unallocated ones are not encrypted.

Reading only: QEMU refuses to create or write such images in its system emulators
and so does diskforge ("not supported yet").
"""

from __future__ import annotations

from .ciphers import SectorCipher

SECTOR = 512
KEY_BYTES = 16


class QcowAesCipher:
    """AES-128-CBC-plain64 over 512-byte sectors numbered by guest offset."""

    def __init__(self, passphrase: bytes, path: str | None, where: str) -> None:
        key = bytes(passphrase[:KEY_BYTES]).ljust(KEY_BYTES, b"\0")
        self.cipher = SectorCipher("aes", "cbc-plain64", key, SECTOR, path, where)

    def decrypt(self, data, first_sector: int) -> bytes:
        """The plaintext of whole sectors ``data``, the first numbered ``first_sector``."""
        return self.cipher.decrypt(data, first_sector)

    def read(self, readinto, host: int, guest: int, dst) -> bool:
        """Fill ``dst`` with the plaintext of the guest bytes at ``guest``, stored at
        ``host`` (``readinto(offset, buf) -> int`` reads the file), reading the whole
        sectors around them (host and guest offsets agree within a sector: clusters
        are sector-aligned in both). False when the file ends before the last sector
        (the missing part is taken as zeros, as qemu reads past the end of a file)."""
        lead = guest % SECTOR
        span = -(-(lead + len(dst)) // SECTOR) * SECTOR
        raw = bytearray(span)
        got = readinto(host - lead, raw)
        plain = self.cipher.decrypt(raw, (guest - lead) // SECTOR)
        dst[:] = plain[lead:lead + len(dst)]
        return got >= span
