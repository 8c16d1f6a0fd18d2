"""File names for the ISO 9660, Joliet and UDF trees of an ISO being built.

Rock Ridge keeps a file's real name; the other trees have rules of their own, so each
directory's names are translated together (to keep them unique after truncation):

- ISO 9660 levels 1-3 (ECMA-119 §7.5, §7.6, §10): d-characters only (A-Z, 0-9, _);
  level 1 is 8.3 for files and 8 for directories; levels 2 and 3 allow 30 characters
  of name plus extension and 31 for a directory. Files carry the ";1" version.
- Level 4 (ISO 9660:1999): the name as it is, cut to 207 bytes, without a version.
- Joliet: UCS-2, at most 64 characters, none of ``* / : ; ? \\``; pycdlib also counts
  the limit in UTF-8 bytes, so the cut honours both.
- UDF: OSTA CS0 identifiers of at most 254 bytes (8-bit) or 127 characters (16-bit).

Cut names keep their extension; a clash is resolved by replacing the tail with a
counter (``NAME_1``), as genisoimage and xorriso do.
"""

from __future__ import annotations

import unicodedata

D_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
JOLIET_FORBIDDEN = frozenset("*/:;?\\")
_TO_D_CHARS = {c: "_" for c in range(128) if chr(c) not in D_CHARS}


def _d_chars(text: str) -> str:
    """Upper case, accents folded (NFKD), anything else outside A-Z 0-9 _ as "_"."""
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return text.upper().translate(_TO_D_CHARS)


def iso9660_names(names: list[tuple[str, bool]], level: int,
                  reserved: set[str] = frozenset()) -> dict[str, str]:
    """ISO 9660 identifiers (files with ";1" below level 4) for one directory's
    ``(name, is_dir)`` entries; ``reserved`` identifiers are kept free."""
    taken = {r if level >= 4 else r.upper() for r in reserved}
    out = {}
    for name, is_dir in names:
        if level >= 4:
            base = name.replace(";", "_")
            ident = _cut_bytes(base, 207)
            ident = _unique(ident, "", taken, _cut_bytes, 207, fold=False)
            out[name] = ident
            continue
        if is_dir:
            limit = 8 if level == 1 else 31
            stem = _d_chars(name.replace(".", "_")) or "_"
            ident = _unique(stem[:limit], "", taken, lambda s, n: s[:n], limit)
        else:
            stem, dot, ext = name.rpartition(".")
            if not dot:
                stem, ext = ext, ""
            stem, ext = _d_chars(stem.replace(".", "_")), _d_chars(ext)
            if not stem and not ext:
                stem = "_"
            if level == 1:
                stem, ext = stem[:8], ext[:3]
                limit = 8
            else:
                if len(stem) + len(ext) > 30:
                    ext = ext[:10]
                limit = 30 - len(ext)
                stem = stem[:limit]
            suffix = ("." + ext) if ext else "."
            ident = _unique(stem, suffix, taken, lambda s, n: s[:n], limit) + ";1"
        out[name] = ident
    return out


def joliet_names(names: list[str], reserved: set[str] = frozenset()) -> dict[str, str]:
    """Joliet names for one directory (at most 64 UCS-2 characters and 64 UTF-8 bytes)."""
    return _fitted_names(names, reserved, _fits_joliet, lambda name: "".join(
        "_" if c in JOLIET_FORBIDDEN or ord(c) < 32 else c for c in name))


def udf_names(names: list[str], reserved: set[str] = frozenset()) -> dict[str, str]:
    """UDF names for one directory (OSTA CS0: 254 bytes 8-bit, or 127 UCS-2 units)."""
    return _fitted_names(names, reserved, _fits_udf, lambda name: name)


def _fitted_names(names: list[str], reserved: set[str], fits, clean) -> dict[str, str]:
    """Each name cleaned, kept when it ``fits`` and is unused, else its stem cut (the
    extension kept when it is at most 16 characters) and numbered until unique: the
    rule Joliet and UDF share, with their own character sets and lengths."""
    taken = set(reserved)
    out = {}
    for name in names:
        cleaned = clean(name)
        if fits(cleaned) and cleaned not in taken:
            taken.add(cleaned)
            out[name] = cleaned
            continue
        stem, dot, ext = cleaned.rpartition(".")
        if not dot or not stem or len(ext) > 16:
            stem, ext = cleaned, ""
        out[name] = _unique_fit(stem, "." + ext if ext else "", taken, fits)
    return out


def _fits_joliet(s: str) -> bool:
    return len(s.encode("utf-16-be", "surrogatepass")) <= 128 and len(s.encode("utf-8")) <= 64


def _fits_udf(s: str) -> bool:
    try:
        return len(s.encode("latin-1")) <= 254
    except UnicodeEncodeError:
        return len(s.encode("utf-16-be", "surrogatepass")) <= 254


def _cut_bytes(s: str, n: int) -> str:
    raw = s.encode("utf-8")
    if len(raw) <= n:
        return s
    return raw[:n].decode("utf-8", "ignore")


def _unique(stem: str, suffix: str, taken: set[str], cut, limit: int, *,
            fold: bool = True) -> str:
    """``stem + suffix``, or with a counter replacing the tail of ``stem``, unused in
    ``taken`` (compared without regard to case when ``fold``); records the choice."""
    key = str.upper if fold else str
    cand = stem + suffix
    n = 0
    while key(cand) in taken:
        n += 1
        tail = f"_{n}"
        cand = cut(stem, max(limit - len(tail), 0)) + tail + suffix
    taken.add(key(cand))
    return cand


def _unique_fit(stem: str, suffix: str, taken: set[str], fits) -> str:
    """Cut ``stem`` until ``stem + suffix`` fits and is unused (with a counter if need be)."""
    n = 0
    while True:
        tail = f"_{n}" if n else ""
        s = stem
        while s and not fits(s + tail + suffix):
            s = s[:-1]
        cand = s + tail + suffix
        if cand not in taken and fits(cand):
            taken.add(cand)
            return cand
        n += 1
