"""Disk encryption shared by the formats that carry it: LUKS1 and LUKS2 headers, key-slot
unlocking and sector decryption.

Not a format: the raw ``luks`` container (``formats/luks``) and qcow2's
``encrypt.format=luks`` (a LUKS1 header stored in qcow2 clusters) both use this
package, and formats never import each other. Reading only; writing encrypted images
is not supported yet.

The modules, leaves first:

- ``ciphers``: sector ciphers (``aes-xts-plain64``, ``aes-cbc-essiv:sha256``, and the
  other IV generators qemu and cryptsetup write for AES), decrypting whole sectors;
- ``kdf``: PBKDF2 and Argon2 with cost caps checked before anything runs;
- ``af``: the anti-forensic splitter's merge (AFmerge, LUKS1 specification 2.4);
- ``luks1``, ``luks2``: the on-disk headers, parsed and validated (LUKS2's JSON
  metadata with bounds), each giving a list of key slots and the data segment;
- ``qcow_aes``: the old qcow AES (qcow version 1 and qcow2 ``crypt_method`` 1):
  passphrase to AES-128 key, CBC-plain64 over guest sectors;
- ``unlock``: trying a passphrase against the key slots, verifying the volume key
  against the header's digest, and the ``LuksVolume`` a format reads sectors through.

The ``cryptography`` package (``pip install 'diskforge[luks]'``) does the AES and
Argon2 work; it is imported only when an encrypted image is opened with a key.
"""

from __future__ import annotations

from .unlock import LuksVolume, open_volume, probe_luks

__all__ = ["LuksVolume", "open_volume", "probe_luks"]
