"""The exception tree: every user-facing failure is one of these.

The CLI prints ``str(error)`` as one line on stderr and exits non-zero, so each message
must stand alone: it names the file, and where it can, the structure and the field
that is wrong ("disk.qcow2: QCowHeader.l1_size: 4294967295 entries is beyond the file").
Python callers can catch the specific class.
"""

from __future__ import annotations

import os


class DiskforgeError(Exception):
    """Base of every error diskforge raises on purpose."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(DiskforgeError):
    """The request itself is wrong: unknown option, missing argument, bad value."""


class FormatError(DiskforgeError):
    """A file's bytes do not make a valid image: truncated, corrupt, out of range.

    ``structure`` and ``field`` say where (as the format's specification names them).
    """

    def __init__(self, message: str, path=None, *, structure: str | None = None,
                 field: str | None = None):
        self.structure = structure
        self.field = field
        where = ".".join(p for p in (structure, field) if p)
        super().__init__(f"{where}: {message}" if where else message, path)


class UnknownFormatError(DiskforgeError):
    """No plugin by that name or extension, or no plugin recognises the file."""


class UnsupportedError(DiskforgeError):
    """A valid image or request that diskforge does not handle (yet).

    The message starts with "not supported yet: " or says plainly why never.
    """


class SafetyError(DiskforgeError):
    """Refused to protect data: writing onto an input, a file outside the allowed
    roots, a backing-chain loop, a chain too deep."""


class ImageIOError(DiskforgeError):
    """The operating system failed a read, write or open."""

    @classmethod
    def from_os(cls, exc: OSError, path=None) -> "ImageIOError":
        reason = exc.strerror or str(exc)
        err = cls(reason, path if path is not None else exc.filename)
        err.errno = exc.errno
        return err


class CorruptImage(FormatError):
    """The image is recognised, but its consistency checks fail (checksums, overlaps)."""
