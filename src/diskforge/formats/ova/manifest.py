"""The OVF manifest (``.mf``): a digest of every file of the package.

DSP0243 ("Package structure") writes one line per file, ``SHA256(name)= hex``
(``SHA1`` in OVF 1.x, ``SHA256``/``SHA512`` in 2.x): OpenSSL's ``dgst`` output. Other
tools write other spellings, all read here: BSD/coreutils ``--tag`` style
``SHA256 (name) = hex``, OpenSSL 3's ``SHA2-256(name)= hex``, ``MD5``/``SHA384``/
``SHA224``, and ``sha256sum`` style ``hex  name`` / ``hex *name`` (the algorithm then
told by the digest's length). vSphere accepts only the first spelling; that judgement
belongs to ``export --check``, not to reading. A line that fits no spelling, an
unknown algorithm or a digest of the wrong length is reported as a problem (it
cannot be checked), never silently skipped.

A certificate (``.cert``, a signature over the manifest) is recognised but not
checked yet: ``verify`` says so.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ...errors import LimitError

MAX_MANIFEST = 1 << 20     # a line per file; real ones are a few hundred bytes

# hashlib name and digest length (hex digits) by the spellings' normalised names
ALGORITHMS = {"MD5": ("md5", 32), "SHA1": ("sha1", 40), "SHA224": ("sha224", 56),
              "SHA256": ("sha256", 64), "SHA384": ("sha384", 96),
              "SHA512": ("sha512", 128)}
BY_LENGTH = {40: "SHA1", 64: "SHA256", 128: "SHA512", 96: "SHA384", 56: "SHA224"}

_TAGGED = re.compile(r"^(?P<alg>[A-Za-z0-9-]+)\s*\((?P<name>.*)\)\s*=\s*(?P<hex>\S+)$")
_SUMS = re.compile(r"^(?P<hex>[0-9A-Fa-f]{32,128}) [ *](?P<name>.+)$")


@dataclass(frozen=True)
class Entry:
    """One line: the algorithm as written and normalised, the file name, the digest."""
    line: int
    spelling: str
    algorithm: str
    name: str
    digest: str


def normalise(spelling: str) -> str:
    """``SHA2-256`` / ``sha256`` / ``SHA-256`` -> ``SHA256``."""
    a = spelling.upper().replace("-", "").replace("_", "")
    if a.startswith("SHA2") and a[4:] in ("224", "256", "384", "512"):
        a = "SHA" + a[4:]
    return a


def parse(data: bytes, path: str) -> tuple[list[Entry], list[str]]:
    """The manifest's entries and the problems that keep lines from being checked."""
    if len(data) > MAX_MANIFEST:
        raise LimitError(f"manifest: {len(data)} bytes, more than {MAX_MANIFEST >> 20}"
                         " MiB", path)
    entries: list[Entry] = []
    problems: list[str] = []
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _TAGGED.match(line)
        if m:
            spelling, name, digest = m.group("alg"), m.group("name"), m.group("hex")
            alg = normalise(spelling)
        else:
            m = _SUMS.match(line)
            if not m:
                problems.append(f"manifest line {n}: not a digest line: {line[:80]!r}")
                continue
            name, digest = m.group("name"), m.group("hex")
            alg = BY_LENGTH.get(len(digest), "?")
            spelling = "sha*sum"
        if alg not in ALGORITHMS:
            problems.append(f"manifest line {n}: unknown digest algorithm {spelling!r}"
                            f" for '{name}': not checked")
            continue
        if len(digest) != ALGORITHMS[alg][1] or not re.fullmatch(r"[0-9A-Fa-f]+", digest):
            problems.append(f"manifest line {n}: {spelling} digest of '{name}' is not"
                            f" {ALGORITHMS[alg][1]} hex digits")
            continue
        entries.append(Entry(n, spelling, alg, name, digest.lower()))
    return entries, problems


def hasher(entry: Entry) -> "hashlib._Hash":
    """A fresh hash object of the entry's algorithm."""
    return hashlib.new(ALGORITHMS[entry.algorithm][0])
