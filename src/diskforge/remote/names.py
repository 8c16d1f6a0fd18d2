"""Names inside a remote image: backing files, VMDK extents, VHD/VHDX parents.

An image read from a URL is untrusted: what it names resolves only to objects under
its own prefix (the URL's "directory"), never to a local file, another host, or a
place above the prefix. ``OpenPolicy.resolve`` hands a URL referrer here.

The rule: a relative name is joined to the referrer's directory as a path (so
``../x`` may not climb out, and ``%2e%2e`` spelled in a name is taken literally and
quoted, never decoded by the server into ``..``); an absolute URL is accepted only
when it lies under that same prefix with the same scheme and host; an absolute
local path (``/x``, ``C:\\x``, ``\\\\server\\x``) is refused. The referrer's query
string (a presigned URL's signature) is not carried over, since it signs one object
only: a sibling named by a presigned image is asked for without it, and the server's
refusal is the error the user sees.

Only names here (``errors`` and ``urllib``), no opening, so ``policy`` can use it
without importing any backend; ``refs.py`` opens what a name leads to.
"""

from __future__ import annotations

import posixpath
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..errors import SafetyError
from . import scheme_of

# characters left as they are when a name becomes a URL path (RFC 3986 pchar and "/")
_SAFE = "/!$&'()*+,;=:@-._~"


def resolve_reference(referrer: str, reference: str, what: str = "backing file") -> str:
    """The URL of ``reference`` as named inside the remote image ``referrer``, or a
    SafetyError naming why it may not be opened (module docstring)."""
    scheme = scheme_of(referrer)
    if scheme is None:
        raise SafetyError(f"internal: {what} resolved against a local path", referrer)
    if scheme.startswith("nbd"):
        raise SafetyError(f"{what} '{reference}': an image read over NBD may not name"
                          " other files (an export has no neighbours to find them in)",
                          referrer)
    ref = reference.replace("\\", "/") if "\\" in reference and "://" not in reference \
        else reference
    base = urlsplit(referrer)
    base_dir = posixpath.dirname(_path_of(base.path, scheme))
    if "://" in ref:
        target = urlsplit(ref)
        path = posixpath.normpath(_path_of(target.path, scheme)) if target.path else ""
        same_place = (target.scheme.lower() == base.scheme.lower()
                      and target.netloc.lower() == base.netloc.lower())
        if not same_place or not _under(path, base_dir) or target.query:
            raise SafetyError(f"{what} '{reference}' is not an object under"
                              f" {_shown(base, base_dir)}; an image read from a URL may"
                              " only name objects beside it", referrer)
        return _url(base, path, scheme)
    if ref.startswith("/") or (len(ref) > 1 and ref[1] == ":"):
        raise SafetyError(f"{what} '{reference}' is an absolute local path; an image read"
                          " from a URL may only name objects beside it, never local"
                          " files", referrer)
    path = posixpath.normpath(posixpath.join(base_dir, ref))
    if not _under(path, base_dir):
        raise SafetyError(f"{what} '{reference}' resolves outside"
                          f" {_shown(base, base_dir)}; an image read from a URL may only"
                          " name objects beside it", referrer)
    return _url(base, path, scheme)


def _path_of(path: str, scheme: str) -> str:
    """A URL path as the object's name: http(s) paths are percent-encoded, S3 keys in
    an ``s3://`` name are written as they are."""
    return unquote(path) if scheme in ("http", "https") else path


def _url(base, path: str, scheme: str) -> str:
    if scheme in ("http", "https"):
        path = quote(path, safe=_SAFE)
    return urlunsplit((base.scheme, base.netloc, path, "", ""))


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") + "/"
    return path.startswith(root) and ".." not in path.split("/")


def _shown(base, base_dir: str) -> str:
    return shown_url(urlunsplit((base.scheme, base.netloc, base_dir.rstrip("/") + "/",
                                 "", "")))


def shown_url(url: str) -> str:
    """``url`` without user:password, for messages."""
    p = urlsplit(url)
    if p.username is None and p.password is None:
        return url
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))
