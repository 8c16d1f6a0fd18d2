"""Parent locators: where a differencing disk says its parent lives.

The dynamic disk header holds up to eight locator entries pointing at data elsewhere
in the file, each tagged with a platform code (spec: "Parent Locator Entries"):

- ``W2ru``: a path relative to the child, UTF-16LE (``.\\parent.vhd``);
- ``W2ku``: an absolute Windows path, UTF-16LE (``C:\\VMs\\parent.vhd``);
- ``Mac X``: a ``file://`` URL, UTF-8 (RFC 2396);
- ``Wi2r``/``Wi2k``: deprecated ANSI relative/absolute paths.

Besides them the header has the "Parent Unicode Name" (UTF-16BE), which Windows fills
with the parent's full path. Windows measures "Platform Data Space" in bytes although
the specification says sectors (seen in a diskpart-made file), so only the data length
is used, after checking it against the file.

Candidates are tried in the order a relative name survives a move best: W2ru, Mac X,
W2ku, Wi2r, Wi2k, the unicode name, and last the file name of an absolute Windows
path looked up beside the child. Each goes through ``OpenPolicy.resolve`` (the
child's directory and allowed roots only); the parent's unique id is then checked
against the child's record, so a wrong guess is refused rather than used.
"""

from __future__ import annotations

import ntpath
import os
import posixpath

from ...records import FrozenRecord
from .structs import SECTOR

MAX_LOCATOR_BYTES = 65536  # a Windows path is at most 32767 UTF-16 units

ORDER = (b"W2ru", b"MacX", b"W2ku", b"Wi2r", b"Wi2k")
PLATFORM_NAMES = {b"W2ru": "W2ru", b"W2ku": "W2ku", b"MacX": "Mac X", b"Mac ": "Mac",
                  b"Wi2r": "Wi2r", b"Wi2k": "Wi2k"}


class Locator(FrozenRecord):
    """A parent locator entry, decoded: ``platform`` ("W2ru", "Mac X", ..., or "name"
    for the Parent Unicode Name), ``text`` as stored (decoded), ``path`` as a local
    path to try ("" when it cannot be one)."""
    __slots__ = ("platform", "text", "path")

    def __init__(self, platform: str, text: str, path: str):
        self.platform = platform
        self.text = text
        self.path = path


def decode(code: bytes, data: bytes) -> str:
    """The text of one locator's data."""
    if code in (b"W2ru", b"W2ku"):
        return data.decode("utf-16-le", "replace").split("\0", 1)[0]
    if code == b"MacX":
        return data.decode("utf-8", "replace").split("\0", 1)[0]
    return data.decode("latin-1").split("\0", 1)[0]


def _is_windows_absolute(text: str) -> bool:
    drive, _ = ntpath.splitdrive(text)
    return bool(drive)


def local_path(platform: bytes, text: str) -> str:
    """Turn a locator's text into a path on this system ("" if it cannot be one)."""
    if not text:
        return ""
    if platform == b"MacX":
        if not text.startswith("file://"):
            return ""
        rest = text[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        from urllib.parse import unquote  # only Mac X locators need it
        return unquote(rest)
    if _is_windows_absolute(text):
        return ""  # "C:\..." or "\\server\share": not a path here
    return text.replace("\\", "/")


def candidates(entries: list[tuple[bytes, str]], unicode_name: str) -> list[Locator]:
    """Local paths to try for the parent, best first, without duplicates."""
    out: list[Locator] = []
    seen: set[str] = set()

    def add(platform: str, text: str, path: str) -> None:
        if path and path not in seen:
            seen.add(path)
            out.append(Locator(platform, text, path))

    for code in ORDER:
        for c, text in entries:
            if c == code:
                add(PLATFORM_NAMES[c], text, local_path(c, text))
    if unicode_name:
        add("name", unicode_name, local_path(b"W2ku", unicode_name))
    # last resort: the parent's file name beside the child (its unique id is checked)
    for c, text in entries + [(b"name", unicode_name)]:
        if text and c != b"MacX" and _is_windows_absolute(text):
            add(PLATFORM_NAMES.get(c, "name"), text, ntpath.basename(text))
    return out


def encode_locators(parent_abs: str, child_dir: str) -> list[tuple[bytes, bytes]]:
    """The locators diskforge writes, as Windows does: W2ku (absolute) and W2ru
    (relative to the child, ``.\\name`` style)."""
    rel = os.path.relpath(parent_abs, child_dir)
    rel_win = rel.replace(posixpath.sep, "\\")
    if not rel_win.startswith(".."):
        rel_win = ".\\" + rel_win
    return [(b"W2ku", parent_abs.encode("utf-16-le")),
            (b"W2ru", rel_win.encode("utf-16-le"))]


def locator_entries(parent_abs: str, child_dir: str, start: int):
    """Parent locator entries for a parent, their data placed from ``start`` (a
    sector boundary): ``(entries, [(offset, data)], end)``. The data space is given
    in bytes, as Windows writes it. (Both the writer and ``rebase -u`` write them.)"""
    entries, blobs = [], []
    at = start
    for code, data in encode_locators(parent_abs, child_dir):
        space = max(SECTOR, -(-len(data) // SECTOR) * SECTOR)
        entries.append(dict(platform_code=code, platform_data_space=space,
                            platform_data_length=len(data), reserved=0,
                            platform_data_offset=at))
        blobs.append((at, data))
        at += space
    return entries, blobs, at


def parent_name(parent_abs: str) -> str:
    """The "Parent Unicode Name": the full path as Windows records it, or the file name
    when the path does not fit the field's 255 characters."""
    return parent_abs if len(parent_abs) <= 255 else os.path.basename(parent_abs)[:255]
