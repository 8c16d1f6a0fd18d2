"""``ReadsBytes``: the two reading calls every backend has, over its own ``readinto``.

A leaf module (it imports only ``errors``) so that both ``blockdev`` and ``remote``
can build on it: ``remote`` cannot import ``blockdev`` at its top, which reaches
``policy`` and back to ``remote.names``.
"""

from __future__ import annotations

from .errors import FormatError


class ReadsBytes:
    """``pread`` and ``read_exact`` over a backend's ``readinto``, written once for
    FileBackend and the remote backends (``remote.RemoteBackend``); ``kind`` names what
    the backend reads in the truncation message."""

    kind = "file"
    path: str

    def readinto(self, offset: int, buf) -> int:
        raise NotImplementedError

    def read_exact(self, offset: int, length: int, what: str = "data") -> bytes:
        """Read exactly ``length`` bytes or raise a FormatError naming ``what``."""
        buf = bytearray(length)
        if self.readinto(offset, buf) != length:
            raise FormatError(f"{what} at offset {offset} (+{length}) is past the end of the"
                              f" {self.kind} ({self.size} bytes): truncated", self.path)
        return bytes(buf)

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = self.readinto(offset, buf)
        return bytes(buf[:n]) if n < length else bytes(buf)
