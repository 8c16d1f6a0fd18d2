"""The file an export checker judges, read through a backend: a local file
(``FileBackend``) or a remote object (``remote.open_backend``: http(s)://, s3://), so
``export --check TARGET URL`` reads the rules' few bytes in place (the VHD footer, the
tar headers, the gzip stream once) with range requests, never downloading the file
first.

A checker gets a :class:`CheckFile` and asks it what it needs: ``size``, ``pread``,
a seekable binary file object (``open()``, for ``tarfile``/``gzip``), the format it
probes as (``format()``) and the header facts of the image (``info()``). Local files
are opened as before: special files refused, no locks taken (a glance, as probing).
"""

from __future__ import annotations

import io
import os

# The buffer of the file objects handed to tarfile and gzip: one HTTP block (the
# backend's cache unit), so a tar header read costs at most one 64 KiB range, and
# gzip's 128 KiB reads go straight to the backend (which streams them ahead once
# they run in sequence). A larger buffer would make every header seek a 1 MiB read,
# which the HTTP backend takes for sequential and answers with readahead.
BUFFER = 64 << 10


class CheckFile:
    """An open file (local or remote) a checker reads; a context manager."""

    def __init__(self, path: str, backend, remote: bool) -> None:
        self.path = path
        self.backend = backend
        self.remote = remote

    @property
    def size(self) -> int:
        return self.backend.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.backend.pread(offset, length)

    def open(self) -> io.BufferedReader:
        """A new seekable, read-only binary file object over the whole file."""
        return io.BufferedReader(_BackendRaw(self.backend), buffer_size=BUFFER)

    def format(self) -> str:
        """The format the file probes as, as the registry names it ("an unreadable
        image" when probing refuses it, an encrypted container without its key):
        checkers report what a file is even when it cannot be read."""
        from ..errors import UnsupportedError
        from ..registry import probe, probe_backend
        try:
            if self.remote:
                return probe_backend(self.backend, self.path).name
            return probe(self.path).name
        except UnsupportedError:
            return "an unreadable image"

    def info(self, fmt: str, policy=None):
        """``(ImageInfo, None)``, or ``(None, reason)`` when the image does not open (a
        differencing disk without its parent, a damaged header): for a checker that is
        a rule broken, since the target could not read it either. A remote image is
        opened as every remote image is (untrusted: its parents only beside it)."""
        from ..errors import DiskforgeError
        from ..registry import open_image
        try:
            with open_image(self.path, fmt, policy=policy) as dev:
                return dev.info(), None
        except DiskforgeError as e:
            return None, f"cannot be read as {fmt}: {e.message}"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "CheckFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_check_file(path: str | os.PathLike) -> CheckFile:
    """Open ``path`` (a local name or a remote URL) for a checker. A missing or
    unreadable local file is qemu-img's "Could not open" line; a remote one is the
    backend's own (404, permission, unreachable)."""
    from ..remote import is_remote
    path = os.fspath(path)
    if is_remote(path):
        from ..remote import open_backend
        return CheckFile(path, open_backend(path), True)
    from ..blockdev import FileBackend
    from ..registry import check_readable
    check_readable(path)
    return CheckFile(path, FileBackend(path, lock=False), False)


class _BackendRaw(io.RawIOBase):
    """A backend as a raw, seekable file (what ``io.BufferedReader`` wraps)."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._backend.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buf) -> int:
        n = self._backend.readinto(self._pos, buf) if self._pos < self._backend.size \
            else 0
        self._pos += n
        return n
