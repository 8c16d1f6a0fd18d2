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

TLS credentials for ``nbds://`` come the same way: ``--object
tls-creds-x509,id=ID,dir=DIR,endpoint=client`` (``verify-peer=no`` to skip checking the
server), with DIR in qemu's layout (``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``). ``--image-opts driver=nbd,...,tls-creds=ID`` names one; when
exactly one is defined, every ``nbds://`` name without its own ``tls-certificates=``
uses it (``tls_environment``: the command runs with ``DISKFORGE_NBD_TLS_CERTIFICATES``
set, which child processes inherit, as ``--s3-endpoint`` sets its variable).
"""

from __future__ import annotations

import binascii
import os
from dataclasses import dataclass

from ..errors import ImageIOError, UsageError
from ..options import split_option_string


TLS_CREDS = "tls-creds-x509"


@dataclass(frozen=True)
class TLSCreds:
    """One ``--object tls-creds-x509``: the client's credentials directory."""
    ident: str
    directory: str
    verify_peer: bool


def _kind(spec: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = spec.partition(",")
    if kind.startswith("qom-type="):
        kind = kind.partition("=")[2]
    return kind, split_option_string(rest)


def parse_object(spec: str) -> "tuple[str, bytes] | TLSCreds":
    """One ``--object``: a secret's ``(id, bytes)`` or a ``TLSCreds``."""
    if _kind(spec)[0] == TLS_CREDS:
        return parse_tls_creds(spec)
    return parse_secret(spec)


def parse_tls_creds(spec: str) -> TLSCreds:
    """``--object tls-creds-x509,id=ID,dir=DIR,endpoint=client[,verify-peer=no]``."""
    _, opts = _kind(spec)
    ident = opts.pop("id", None)
    if not ident:
        raise UsageError(f"--object {TLS_CREDS}: Parameter 'id' is missing")
    where = f"--object {TLS_CREDS},id={ident}"
    directory = opts.pop("dir", None)
    if not directory:
        raise UsageError(f"{where}: not supported yet: credentials without dir= (give"
                         " the directory holding ca-cert.pem)")
    if not os.path.isdir(directory):
        raise UsageError(f"{where}: dir '{directory}' is not a directory")
    endpoint = opts.pop("endpoint", "client")
    if endpoint != "client":
        raise UsageError(f"{where}: endpoint={endpoint}: diskforge is the NBD client"
                         " here (endpoint=client)")
    verify = opts.pop("verify-peer", "on")
    if verify not in ("on", "off", "yes", "no", "true", "false"):
        raise UsageError(f"{where}: verify-peer={verify}: on or off")
    opts.pop("sanity-check", None)  # qemu checks its own files; ssl checks them at use
    if opts:
        raise UsageError(f"{where}: not supported yet: " + ", ".join(sorted(opts)))
    return TLSCreds(ident, directory, verify in ("on", "yes", "true"))


def tls_creds(objects) -> dict[str, TLSCreds]:
    """The ``tls-creds-x509`` objects of a command line, by id."""
    found = (parse_tls_creds(spec) for spec in objects or ()
             if _kind(spec)[0] == TLS_CREDS)
    return {c.ident: c for c in found}


def tls_environment(objects) -> dict[str, str]:
    """The environment an ``nbds://`` name reads its credentials from when exactly
    one ``tls-creds-x509`` object is defined (as one secret serves an image that
    names none); {} otherwise."""
    creds = tls_creds(objects)
    if len(creds) != 1:
        return {}
    from ..remote.nbd import TLS_DIR_ENV, TLS_VERIFY_ENV
    (one,) = creds.values()
    return {TLS_DIR_ENV: one.directory,
            TLS_VERIFY_ENV: "true" if one.verify_peer else "false"}


def parse_secret(spec: str) -> tuple[str, bytes]:
    """``(id, bytes)`` of one ``--object secret,...``."""
    kind, opts = _kind(spec)
    if kind != "secret":
        raise UsageError(f"--object {kind or spec}: not supported yet: only 'secret'"
                         f" (the passphrases of encrypted images) and '{TLS_CREDS}'"
                         " (nbds:// credentials) objects")
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
    secrets = dict(parse_secret(spec) for spec in getattr(args, "object", None) or ()
                   if _kind(spec)[0] != TLS_CREDS)
    if key_id is not None:
        if key_id not in secrets:
            raise UsageError(f"No secret with id '{key_id}'")
        return secrets[key_id]
    if len(secrets) == 1:
        return next(iter(secrets.values()))
    return None
