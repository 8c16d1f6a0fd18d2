"""Passphrases for encrypted images, given as qemu-img gives them.

``--object secret,id=ID,data=TEXT`` (or ``file=PATH``; ``format=base64`` for
base64-encoded data or file contents) defines a secret, and the image names it with
``key-secret=ID`` (raw LUKS) or ``encrypt.key-secret=ID`` (qcow2) in ``--image-opts``
(``driver=luks,key-secret=sec0,file.filename=disk.luks``). As a diskforge convenience,
when exactly one secret is defined and the image names none, that one is used, so
``diskforge convert --object secret,id=s,data=pw disk.luks disk.raw`` works.

``qemu_text.image_opts`` reads the ``key-secret=`` of an option string; ``open_source``
asks ``key_for`` for the passphrase it names. Encrypted secrets (``keyid=``, ``iv=``)
are not supported yet.
"""

from __future__ import annotations

import binascii

from ..errors import ImageIOError, UsageError
from ..options import split_option_string


def parse_secret(spec: str) -> tuple[str, bytes]:
    """``(id, bytes)`` of one ``--object secret,...``."""
    kind, _, rest = spec.partition(",")
    opts = split_option_string(rest)
    if kind.startswith("qom-type="):
        kind = kind.partition("=")[2]
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
        import base64  # only for secrets given so (every open asks key_for)
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"--object secret,id={ident}: the data is not valid base64"
                             ) from None
    elif fmt != "raw":
        raise UsageError(f"--object secret,id={ident}: format '{fmt}' is not raw or base64")
    return ident, raw


def key_for(args, key_id: str | None) -> bytes | None:
    """The passphrase the command line gives for an image: the secret ``key_id`` names
    (from ``key-secret=`` in ``--image-opts``), or the only secret defined when the
    image names none."""
    secrets = dict(parse_secret(spec) for spec in getattr(args, "object", None) or ())
    if key_id is not None:
        if key_id not in secrets:
            raise UsageError(f"No secret with id '{key_id}'")
        return secrets[key_id]
    if len(secrets) == 1:
        return next(iter(secrets.values()))
    return None
