"""The anti-forensic information splitter's merge (AFmerge), LUKS1 On-Disk Format
Specification 1.2.3, section 2.4 and figure 4; LUKS2 key slots use it unchanged
(``af.type`` "luks1").

A volume key of ``n`` bytes is stored as ``stripes`` blocks of ``n`` bytes; all but
the last are XORed in turn into a running block that is diffused with the hash after
each one, and the last XORed with the result gives the key back. Diffusion hashes the
block in digest-sized pieces, each prefixed with its big-endian 32-bit index.
"""

from __future__ import annotations

import hashlib


def _diffuse(block: bytes, hash_spec: str) -> bytes:
    size = hashlib.new(hash_spec).digest_size
    out = []
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        h = hashlib.new(hash_spec, (i // size).to_bytes(4, "big") + piece).digest()
        out.append(h[:len(piece)])
    return b"".join(out)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_spec: str) -> bytes:
    """The key hidden in ``material`` (``key_bytes * stripes`` bytes)."""
    d = bytes(key_bytes)
    for s in range(stripes - 1):
        stripe = material[s * key_bytes:(s + 1) * key_bytes]
        d = _diffuse(bytes(a ^ b for a, b in zip(d, stripe)), hash_spec)
    last = material[(stripes - 1) * key_bytes:stripes * key_bytes]
    return bytes(a ^ b for a, b in zip(d, last))
