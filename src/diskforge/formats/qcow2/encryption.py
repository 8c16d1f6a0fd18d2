"""qcow2 with ``encrypt.format=luks`` (``crypt_method`` 2): unlocking and decrypting
data clusters, kept apart from the read path so that it stays one call there.

qcow2.txt, "Full disk encryption header pointer": the crypto header extension names
the clusters (``offset``, ``length``) holding a LUKS1 header and its key material;
key slot offsets count from that header's start, and its payload offset is unused.
Guest data clusters are encrypted in 512-byte sectors whose IV is the sector's *host*
offset / 512 (QEMU's ``qcow2_co_decrypt``; the old AES method used the guest offset),
so a cluster reads back only at the offset where it was written. Zero and
unallocated clusters are not encrypted: they read as zeros or from the backing file,
as in a plain qcow2.

``crypt_method`` 1 (``encrypt.format=aes``, the old qcow AES, ``AesClusterCrypto``):
no header in the file; the passphrase's first 16 bytes are the AES-128 key, and each
512-byte sector is AES-CBC with the *guest* sector number as its plain64 IV, as in
qcow version 1 (``diskforge.crypto.qcow_aes``, shared with it). Compressed clusters
are not encrypted. No key is needed to open the image (``info`` works, as in
qemu-img); reading a data cluster without one fails, naming ``encrypt.key-secret``.

Reading only; writing encrypted qcow2 images is not supported yet (for AES, QEMU's
system emulators refuse it too). The LUKS work is the core ``diskforge.crypto``
package's.
"""

from __future__ import annotations

from ...blockdev import fill_zero
from ...errors import FormatError, UnsupportedError

SECTOR = 512


class ClusterCrypto:
    """The unlocked LUKS header of an encrypted qcow2: decrypts what is read from the
    image's (or its external data file's) data clusters."""

    def __init__(self, device, key: bytes | None) -> None:
        from ...crypto import open_volume
        h = device.header
        path = device.path
        if h.crypto is None:
            raise FormatError("crypt_method 2 (LUKS) without a full disk encryption header"
                              " extension", path, structure="QCowHeader",
                              field="crypt_method")
        offset, length = h.crypto
        file_size = device.backend.size
        if offset % device.cs or offset < device.cs or length < 592 \
                or offset + length > file_size:
            raise FormatError(f"LUKS header at {offset} (+{length}) is not whole clusters"
                              f" inside the file ({file_size} bytes)", path,
                              structure="Qcow2CryptoHeaderExtension", field="offset")
        if device.writable:
            raise UnsupportedError("not supported yet: writing encrypted qcow2 images", path)

        def read(pos: int, n: int) -> bytes:
            if pos >= length:
                return b""
            return device.backend.pread(offset + pos, min(n, length - pos))

        policy = device.policy
        self.volume = open_volume(read, length, key, path, option="encrypt.key-secret",
                                  header_only=policy is not None and not policy.open_data)
        self.path = path

    format = "luks"

    def read(self, data, host: int, dst, guest: int = 0) -> None:
        """Fill ``dst`` with the plaintext of the bytes at ``host`` in ``data`` (a
        FileBackend), reading whole sectors around them (the IV is the host sector:
        ``guest`` is not used)."""
        k = len(dst)
        start = host // SECTOR * SECTOR
        end = -(-(host + k) // SECTOR) * SECTOR
        cipher = bytearray(end - start)
        got = data.readinto(start, cipher)
        if got < len(cipher):  # past the end of the file: qemu reads zeros there
            fill_zero(cipher, got)
        if self.volume.cipher is None:  # opened for info only (OpenPolicy.open_data)
            raise UnsupportedError(self.volume.missing_key, self.path)
        plain = self.volume.cipher.decrypt(cipher, start // SECTOR)
        dst[:] = plain[host - start:host - start + k]


class AesClusterCrypto:
    """``crypt_method`` 1: the old qcow AES over guest sectors (module docstring)."""

    format = "aes"

    def __init__(self, device, key: bytes | None) -> None:
        if device.writable:
            raise UnsupportedError("not supported yet: writing encrypted qcow2 images (the"
                                   " old AES encryption, encrypt.format=aes, which QEMU"
                                   " refuses to write too)", device.path)
        self.path = device.path
        self.cipher = None
        if key is not None:
            from ...crypto.qcow_aes import QcowAesCipher
            self.cipher = QcowAesCipher(key, device.path, "QCowHeader")

    def read(self, data, host: int, dst, guest: int = 0) -> None:
        """Fill ``dst`` with the plaintext of the guest bytes at ``guest``, stored at
        ``host`` in ``data`` (a FileBackend)."""
        if self.cipher is None:
            from ...crypto.unlock import MISSING_KEY
            raise UnsupportedError(MISSING_KEY.format(kind="qcow2 AES",
                                                      option="encrypt.key-secret"),
                                   self.path)
        self.cipher.read(data.readinto, host, guest, dst)
