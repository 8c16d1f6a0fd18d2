"""The BlockDevice of a raw LUKS container: the payload, decrypted sector by sector.

The virtual disk is the payload: from the header's payload offset (LUKS1
``payloadOffset``, LUKS2 segment ``offset``) to the segment's end, or to the end of
the file when the size is "dynamic" (LUKS1 always), rounded down to whole sectors, as
qemu's luks driver and dm-crypt size it. Every extent is DATA: a hole in the file
decrypts to noise, not zeros. Read-only (writing LUKS is not supported yet).
"""

from __future__ import annotations

from ...blockdev import FileDevice, ImageInfo, fill_zero
from ...errors import FormatError, UnsupportedError
from ...limits import check_alloc

_BATCH = 1 << 20  # ciphertext decrypted per step: bounded memory for any read


class LuksDevice(FileDevice):
    format = "luks"

    def _open(self, key: bytes | None = None) -> None:
        from ...crypto import open_volume
        if self.writable:
            raise UnsupportedError("not supported yet: writing LUKS images", self.path)
        file_size = self.backend.size
        header_only = self.policy is not None and not self.policy.open_data
        self.volume = open_volume(self.backend.pread, file_size, key, self.path,
                                  header_only=header_only)
        v = self.volume
        end = file_size if v.payload_size is None else v.payload_offset + v.payload_size
        if v.payload_offset > file_size or end > file_size:
            raise FormatError(f"payload at {v.payload_offset} (to {end}) is past the end of"
                              f" the file ({file_size} bytes)", self.path,
                              structure="LUKS header", field="payload offset")
        ss = v.sector_size
        self.size = (end - v.payload_offset) // ss * ss

    def readinto(self, offset: int, buf) -> int:
        n = len(buf)
        self.check_range(offset, n)
        mv = memoryview(buf).cast("B")
        ss = self.volume.sector_size
        pos = offset
        while pos < offset + n:
            start = pos // ss * ss
            stop = min(-(-(offset + n) // ss) * ss, start + _BATCH)
            check_alloc(stop - start, self.path, "LUKS payload read")
            cipher = bytearray(stop - start)
            got = self.backend.readinto(self.volume.payload_offset + start, cipher)
            if got < len(cipher):  # the file shrank under us: what is gone reads as zeros
                fill_zero(cipher, got)
            plain = self.volume.decrypt(cipher, start)
            take = min(stop, offset + n) - pos
            mv[pos - offset:pos - offset + take] = plain[pos - start:pos - start + take]
            pos += take
        return n

    def info(self) -> ImageInfo:
        h = self.volume.header
        specific: dict[str, object] = {}
        details: dict[str, object] = {"luks-version": h.version}
        if h.version == 1:  # qemu-img info's keys, in its order
            specific = self.volume.qemu_info()
        else:  # qemu does not read LUKS2: diskforge's own names
            details.update(h.details)
        return ImageInfo(filename=self.path, format="luks", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes(), encrypted=True,
                         format_specific=specific, details=details)
