"""The exception tree: every user-facing failure is one of these.

The CLI prints ``str(error)`` as one line on stderr and exits non-zero, so each message
must stand alone: it names the file, and where it can, the structure and the field
that is wrong ("disk.qcow2: QCowHeader.l1_size: 4294967295 entries is beyond the file").
Python callers can catch the specific class.
"""

from __future__ import annotations

import os
import re

# C0 and C1 controls, DEL, and the line/paragraph separators: anything that could
# start a new line or move the cursor when printed. Surrogates come from names that
# were not valid UTF-8 (os.fsdecode's surrogateescape).
_UNPRINTABLE_CHARS = "[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]"
_unprintable: "re.Pattern[str] | None" = None  # compiled on first need: start-up time


def printable(text: object) -> str:
    """``text`` made safe to print on one line: control characters become escapes
    (``\\n``, ``\\x1b``). Names taken from inside an image (backing files, parents,
    DMG entries, Rock Ridge names) go through this before they are printed, so a
    hostile name cannot break the one-line error or forge an extra line (DESIGN.md)."""
    global _unprintable
    text = str(text)
    if text.isprintable():  # a superset of those characters (and C code): the usual case
        return text
    if _unprintable is None:
        _unprintable = re.compile(_UNPRINTABLE_CHARS)
    if not _unprintable.search(text):
        return text
    return _unprintable.sub(_escape, text)


def _escape(m: "re.Match[str]") -> str:
    c = m.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if c in named:
        return named[c]
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:          # surrogateescape'd byte
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


class DiskforgeError(Exception):
    """Base of every error diskforge raises on purpose.

    The message and path are escaped with :func:`printable` here, once, so every error
    stays one line whatever a file put into the names it quotes.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        shown = printable(message)
        super().__init__(f"{printable(self.path)}: {shown}" if self.path else shown)


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


class LimitError(DiskforgeError):
    """Refused because the work would exceed a resource limit (memory at once, entries
    walked, nesting depth): the file may be valid, but it asks for more than diskforge
    will spend on one command (see ``limits.py``)."""
