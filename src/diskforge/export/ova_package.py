"""The OVA package: the manifest and the tar, written and checked.

From DSP0243 1.0, section 5 ("OVF Packages"): an OVA is a plain (uncompressed) tar
whose first file is the ``.ovf`` descriptor, then the optional ``.mf`` manifest (and
``.cert``), then the files in the order the descriptor's ``References`` list them;
every file at the top level. The manifest has one line per file of the package
other than itself: ``SHA256(name)= hexdigest`` (SHA1 in OVF 1.0 tools; vSphere 6.5
and later also take SHA256 and SHA512). The spelling is exact: vSphere refuses
``SHA256 (name) = hex`` (coreutils' ``--tag``/BSD style) and OpenSSL 3's
``SHA2-256(name)= hex``, and vCenters older than 6.5 take only SHA1
(VMware KB 2151537 and ovftool's ``--shaAlgorithm``).

What diskforge writes: ustar members (GNU base-256 sizes past 8 GiB), owner 0:0,
mode 0644, the time from ``SOURCE_DATE_EPOCH`` or now, the archive ending on a 10 KiB
record as GNU tar ends one.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from . import tarfmt

ALGORITHMS = {"sha1": ("SHA1", 40), "sha256": ("SHA256", 64), "sha512": ("SHA512", 128)}
_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\(([^()\r\n]+)\)= ([0-9a-fA-F]+)$")
_LOOSE = re.compile(r"^([A-Za-z0-9-]+) ?\((.+)\) ?= ?([0-9a-fA-F]*)$")
COPY = 1 << 20


def file_digest(path: str, alg: str) -> str:
    h = hashlib.new(alg)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(COPY), b""):
            h.update(block)
    return h.hexdigest()


def manifest(entries: list[tuple[str, str]], alg: str) -> bytes:
    """The ``.mf`` text for ``(name, hexdigest)`` pairs."""
    tag = ALGORITHMS[alg][0]
    return "".join(f"{tag}({name})= {digest}\n" for name, digest in entries).encode()


def write_ova(out: str, files: list[tuple[str, bytes | str]]) -> None:
    """The tar at ``out``: each ``(name, content)`` in order, content the bytes or the
    path of a file to copy; written beside ``out`` and renamed into place."""
    from ..atomic import AtomicFile
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    f = AtomicFile(out, stream=True)
    try:
        pos = 0
        for name, content in files:
            size = len(content) if isinstance(content, bytes) else os.stat(content).st_size
            f.pwrite(pos, tarfmt.ustar_header(name, size, mtime))
            pos += tarfmt.BLOCK
            if isinstance(content, bytes):
                f.pwrite(pos, content)
            else:
                _copy(content, f, pos, size)
            pos += size
            pad = tarfmt.padding(size)
            if pad:
                f.pwrite(pos, pad)
                pos += len(pad)
        f.pwrite(pos, tarfmt.end_of_archive(pos))
        f.commit()
    except BaseException:
        f.discard()
        raise


def _copy(path: str, out, at: int, size: int) -> None:
    from ..devices import open_input_file
    from ..errors import DiskforgeError
    with open_input_file(path) as src:
        done = 0
        while done < size:
            block = src.read(min(COPY, size - done))
            if not block:
                raise DiskforgeError("the file shrank while it was being packed", path)
            out.pwrite(at + done, block)
            done += len(block)


# -- checking ------------------------------------------------------------------------------

def check_manifest(text: bytes, members: dict[str, object], digest_of) -> list[str]:
    """Every problem of the manifest ``text``: spelling (line by line), algorithms,
    files missing from it or from the package, digests that differ
    (``digest_of(name, alg)`` hashes a member)."""
    problems = []
    listed: dict[str, tuple[str, str]] = {}
    algs = set()
    for number, raw in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            problems.append(_spelling(number, line))
            continue
        tag, name, digest = m.groups()
        alg = tag.lower()
        if len(digest) != ALGORITHMS[alg][1]:
            problems.append(f"manifest line {number}: a {tag} digest has"
                            f" {ALGORITHMS[alg][1]} hex digits, not {len(digest)}")
            continue
        algs.add(tag)
        listed[name] = (alg, digest.lower())
    if len(algs) > 1:
        problems.append(f"the manifest mixes {' and '.join(sorted(algs))}: use one")
    for name, (alg, digest) in listed.items():
        if name not in members:
            problems.append(f"the manifest lists {name!r}, which is not in the package")
        elif digest_of(name, alg) != digest:
            problems.append(f"the {alg.upper()} digest of {name!r} does not match the"
                            " manifest")
    for name in members:
        if name not in listed and not name.endswith((".mf", ".cert")):
            problems.append(f"{name!r} is not in the manifest")
    return problems


def _spelling(number: int, line: str) -> str:
    from ..errors import printable
    shown = printable(line[:120])
    m = _LOOSE.match(line)
    if m:
        tag, name = m.group(1), m.group(2)
        if tag.upper().startswith("SHA2-"):
            want = "SHA" + tag.upper()[5:]
            return (f"manifest line {number} is OpenSSL 3's spelling '{shown}':"
                    f" vSphere wants '{want}({name})= <hex>'")
        if " (" in line or ") =" in line:
            return (f"manifest line {number} is spelled '{shown}' (coreutils --tag/BSD"
                    f" style, with spaces): vSphere wants '{tag}({name})= <hex>'")
        if tag.upper() in ("MD5", "SHA224", "SHA384"):
            return f"manifest line {number} uses {tag}: vSphere takes SHA1, SHA256, SHA512"
        if tag != tag.upper() and tag.upper() in ("SHA1", "SHA256", "SHA512"):
            return (f"manifest line {number} spells the algorithm '{tag}': vSphere wants"
                    f" '{tag.upper()}'")
    return f"manifest line {number} is not 'SHA256(name)= <hex>': '{shown}'"
