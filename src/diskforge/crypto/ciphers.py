"""Sector ciphers: how LUKS turns a key, a cipher specification and a sector number into
plaintext.

A specification is what LUKS stores: cipher name (``aes``) and mode
(``xts-plain64``, ``cbc-essiv:sha256``), LUKS1 in two fields, LUKS2 joined
(``aes-xts-plain64``). The mode is the block-cipher mode and an IV generator
(dm-crypt's names, which qemu's crypto layer shares):

- ``plain``: the sector number's low 32 bits, little-endian, zero-padded;
- ``plain64``: the sector number as 64 bits, little-endian, zero-padded;
- ``plain64be``: the same, big-endian (qemu writes it on request);
- ``essiv:HASH``: ``plain64``'s block encrypted with AES under HASH(key) (ESSIV).

AES only: qemu-img and cryptsetup write AES by default, and twofish, serpent and cast5
are not in the ``cryptography`` package; they are refused with "not supported yet".
Decryption works on whole sectors in batches, because per-call overhead dominates
otherwise: CBC batches every sector of a read into one ECB pass.
"""

from __future__ import annotations

import hashlib

from ..errors import FormatError, UnsupportedError

IV_GENERATORS = ("plain", "plain64", "plain64be", "essiv")
MODES = ("xts", "cbc", "ecb")


def need_cryptography(path: str | None):
    """The ``cryptography`` cipher module, or one clear line saying how to get it."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise UnsupportedError("reading encrypted images needs the 'cryptography' package:"
                               " pip install 'diskforge[luks]'", path) from None
    return Cipher, algorithms, modes


def hash_name(name: str, path: str | None, where: str) -> str:
    """A LUKS hash name (``sha256``) as hashlib knows it, or a FormatError naming
    ``where``."""
    n = name.strip().lower()
    try:
        hashlib.new(n)
    except (ValueError, TypeError):
        raise UnsupportedError(f"{where}: hash '{name}': not supported yet", path) from None
    return n


def check_spec(cipher_name: str, cipher_mode: str, path: str | None,
               where: str) -> tuple[str, str, str]:
    """The (mode, IV generator, ESSIV hash) of a cipher spec we can decrypt, else the
    refusal; needs no key, so a header opened without one is checked too."""
    if cipher_name.lower() != "aes":
        raise UnsupportedError(f"{where}: cipher '{cipher_name}-{cipher_mode}': not"
                               " supported yet (AES only)", path)
    mode, _, ivgen = cipher_mode.lower().partition("-")
    ivgen, _, iv_hash = ivgen.partition(":")
    if mode not in MODES or (mode != "ecb" and ivgen not in IV_GENERATORS) \
            or (ivgen == "essiv") != bool(iv_hash):
        raise UnsupportedError(f"{where}: cipher mode '{cipher_mode}': not supported yet",
                               path)
    return mode, ivgen, iv_hash


class SectorCipher:
    """Decrypts runs of whole sectors of one encrypted area (a key slot's key material,
    or the payload) under one key."""

    def __init__(self, cipher_name: str, cipher_mode: str, key: bytes, sector_size: int,
                 path: str | None, where: str) -> None:
        Cipher, algorithms, modes = need_cryptography(path)
        self._Cipher, self._algorithms, self._modes = Cipher, algorithms, modes
        self.sector_size = sector_size
        spec = f"{cipher_name}-{cipher_mode}"
        mode, ivgen, iv_hash = check_spec(cipher_name, cipher_mode, path, where)
        self.mode, self.ivgen = mode, ivgen
        valid = (32, 64) if mode == "xts" else (16, 24, 32)
        if len(key) not in valid:
            raise FormatError(f"key of {len(key)} bytes does not fit {spec} (needs one of"
                              f" {', '.join(map(str, valid))})", path, structure=where)
        self.key = key
        self._essiv = None
        if ivgen == "essiv":
            salt = hashlib.new(hash_name(iv_hash, path, where), key).digest()
            if len(salt) not in (16, 24, 32):
                raise UnsupportedError(f"{where}: ESSIV hash '{iv_hash}' gives a"
                                       f" {len(salt) * 8}-bit key: not supported yet", path)
            self._essiv = Cipher(algorithms.AES(salt), modes.ECB())
        try:
            if mode == "xts":
                # the key's two halves may not be equal (an XTS weakness): refused here,
                # once, so that a hostile key slot cannot fail later reads
                Cipher(algorithms.AES(key), modes.XTS(bytes(16)))
                self._ecb = None
            else:
                self._ecb = Cipher(algorithms.AES(key), modes.ECB())
        except ValueError as e:
            raise FormatError(f"unusable {spec} key ({e})", path, structure=where) from None

    def _ivs(self, first: int, count: int, step: int) -> bytes:
        """The IVs of ``count`` sectors from sector number ``first`` (then every
        ``step``), concatenated."""
        if step != 1:
            numbers = range(first, first + count * step, step)
            return b"".join(self._ivs(n, 1, 1) for n in numbers)
        if self.ivgen == "plain":
            raw = b"".join(((first + i) & 0xFFFFFFFF).to_bytes(16, "little")
                           for i in range(count))
        elif self.ivgen == "plain64be":
            raw = b"".join(((first + i) & (2**64 - 1)).to_bytes(8, "big") + bytes(8)
                           for i in range(count))
        else:  # plain64 and essiv start from the same block
            raw = b"".join(((first + i) & (2**64 - 1)).to_bytes(16, "little")
                           for i in range(count))
        if self._essiv is not None:
            raw = self._essiv.encryptor().update(raw)
        return raw

    def decrypt(self, data, first_sector: int, step: int = 1) -> bytes:
        """Plaintext of ``data`` (whole sectors), whose first sector has IV number
        ``first_sector``, the next ``first_sector + step`` and so on."""
        ss = self.sector_size
        mv = memoryview(data).cast("B")
        count = len(mv) // ss
        if count * ss != len(mv):
            raise ValueError("decrypt: not a whole number of sectors")
        if self.mode == "ecb":
            return self._ecb.decryptor().update(mv)
        ivs = self._ivs(first_sector, count, step)
        if self.mode == "xts":
            Cipher, AES, XTS = self._Cipher, self._algorithms.AES, self._modes.XTS
            aes = AES(self.key)
            return b"".join(Cipher(aes, XTS(ivs[i * 16:i * 16 + 16])).decryptor()
                            .update(mv[i * ss:(i + 1) * ss]) for i in range(count))
        # CBC: P_j = D(C_j) xor C_{j-1}, with the sector's IV before its first block;
        # one ECB pass over everything, one XOR against the shifted ciphertext
        plain = self._ecb.decryptor().update(mv)
        prev = b"".join(ivs[i * 16:i * 16 + 16] + mv[i * ss:(i + 1) * ss - 16]
                        for i in range(count))
        n = len(plain)
        return (int.from_bytes(plain, "little") ^ int.from_bytes(prev, "little")
                ).to_bytes(n, "little")
