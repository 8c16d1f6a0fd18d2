"""Passphrases for encrypted images, given as qemu-img gives them.

``--object secret,id=ID,data=TEXT`` (or ``file=PATH``; ``format=base64`` for
base64-encoded data or file contents) defines a secret, and the image names it with
``key-secret=ID`` (raw LUKS) or ``encrypt.key-secret=ID`` (qcow2) in ``--image-opts``
(``driver=luks,key-secret=sec0,file.filename=disk.luks``). As a diskforge convenience,
when exactly one secret is defined and the image names none, that one is used, so
``diskforge convert --object secret,id=s,data=pw disk.luks disk.raw`` works.

Self-contained on purpose: ``open_source`` calls ``source_from`` and nothing else in
the CLI knows about secrets. Encrypted secrets (``keyid=``, ``iv=``) are not
supported yet.
"""

from __future__ import annotations

import argparse
import base64
import binascii

from ..errors import ImageIOError, UsageError


def add_secret_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--object", action="append", default=[], metavar="secret,id=ID,data=..",
                   help="define a secret as qemu-img does (data=TEXT or file=PATH,"
                   " format=raw|base64), named by key-secret= in --image-opts")
    p.add_argument("--image-opts", action="store_true",
                   help="the image name is an option string: driver=FMT,"
                   "file.filename=PATH,key-secret=ID (or encrypt.key-secret=ID)")


def split_keyval(spec: str) -> list[tuple[str, str]]:
    """qemu's ``key=value,...`` syntax, where ``,,`` is a literal comma; a first element
    without ``=`` is returned with the key "" (an object's type)."""
    parts, cur, i = [], [], 0
    while i < len(spec):
        c = spec[i]
        if c == "," and spec[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out = []
    for n, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if n == 0:
                out.append(("", key))
                continue
            raise UsageError(f"invalid option '{part}' in '{spec}': expected key=value")
        out.append((key.strip(), value))
    return out


def parse_secret(spec: str) -> tuple[str, bytes]:
    """``(id, bytes)`` of one ``--object secret,...``."""
    items = split_keyval(spec)
    opts = dict(items)
    kind = opts.pop("", None) or opts.pop("qom-type", None)
    if kind != "secret":
        raise UsageError(f"--object {kind or spec}: not supported yet: only 'secret'"
                         " objects (the passphrases of encrypted images)")
    for key in ("keyid", "iv"):
        if key in opts:
            raise UsageError(f"--object secret: '{key}': not supported yet: encrypted"
                             " secrets")
    ident = opts.get("id")
    if not ident:
        raise UsageError("--object secret: Parameter 'id' is missing")
    if ("data" in opts) == ("file" in opts):
        raise UsageError(f"--object secret,id={ident}: give exactly one of data= and file=")
    if "data" in opts:
        raw = opts["data"].encode("utf-8")
    else:
        try:
            with open(opts["file"], "rb") as f:
                raw = f.read(1 << 20)
        except OSError as e:
            raise ImageIOError.from_os(e, opts["file"]) from None
    fmt = opts.get("format", "raw")
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"--object secret,id={ident}: the data is not valid base64"
                             ) from None
    elif fmt != "raw":
        raise UsageError(f"--object secret,id={ident}: format '{fmt}' is not raw or base64")
    return ident, raw


def source_from(args, path: str, fmt: str | None) -> tuple[str, str | None, bytes | None]:
    """The file, format and passphrase the command line gives for the image ``path``
    (an ``--image-opts`` string when that flag is set)."""
    secrets: dict[str, bytes] = {}
    for spec in getattr(args, "object", None) or ():
        ident, raw = parse_secret(spec)
        secrets[ident] = raw
    key_id = None
    if getattr(args, "image_opts", False):
        opts = dict(split_keyval(path))
        opts.pop("", None)
        path = opts.get("file.filename") or opts.get("filename") or opts.get("file") or ""
        if not path:
            raise UsageError("--image-opts: give the file as file.filename=PATH")
        driver = opts.get("driver")
        if driver and not fmt:
            fmt = "raw" if driver == "file" else driver
        key_id = opts.get("key-secret") or opts.get("encrypt.key-secret")
    if key_id is not None:
        if key_id not in secrets:
            raise UsageError(f"No secret with id '{key_id}'")
        return path, fmt, secrets[key_id]
    if len(secrets) == 1:
        return path, fmt, next(iter(secrets.values()))
    return path, fmt, None
