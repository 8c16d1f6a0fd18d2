"""Images that live elsewhere: ``http(s)://`` (range requests), ``s3://bucket/key`` and
``nbd://host[:port]/name`` / ``nbd+unix:///name?socket=PATH`` (``nbds``: over TLS).

Each scheme is a *backend* under ``BlockDevice`` with FileBackend's reading interface
(``path``, ``size``, ``readinto``, ``pread``, ``read_exact``, ``data_ranges``,
``allocated_bytes``, ``flush``, ``close``; writes refused unless the scheme writes in
place, as NBD does: ``writes_in_place``), so
every format plugin reads through it without knowing (``Format.open(url,
backend=...)``). One module per scheme, imported only when a name with that scheme
is opened, so the base install and ``diskforge info`` on a local file never pay for
them. A remote image is untrusted (``OpenPolicy.untrusted()``): the names it holds
resolve only to objects beside it, never to local files.
"""

from __future__ import annotations

import importlib

from ..readbytes import ReadsBytes
from ..errors import UsageError

# scheme -> module under diskforge.remote that has open_backend(url, **options)
SCHEMES = {
    "http": "http", "https": "http",
    "s3": "s3",
    "nbd": "nbd", "nbds": "nbd", "nbd+unix": "nbd", "nbds+unix": "nbd",
}


def scheme_of(name: str) -> str | None:
    """The remote scheme ``name`` uses (lower case), or None for a local path."""
    head, sep, _ = name.partition("://")
    if not sep or "/" in head:
        return None
    head = head.lower()
    return head if head in SCHEMES else None


def is_remote(name: object) -> bool:
    return isinstance(name, str) and scheme_of(name) is not None


def _module(name: str):
    scheme = scheme_of(name)
    if scheme is None:
        raise UsageError("not a remote name (http://, https://, s3://, nbd://)", name)
    try:
        return importlib.import_module(f"{__name__}.{SCHEMES[scheme]}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(__name__):
            raise UsageError(f"not supported yet: {scheme}:// images", name) from None
        raise


def open_backend(url: str, **options):
    """An open read backend for ``url`` (see the module docstring)."""
    return _module(url).open_backend(url, **options)


def writes_in_place(url: str) -> bool:
    """Whether ``url``'s scheme opens writable in place (``open_backend(url,
    writable=True)``): an NBD export does; HTTP and S3 objects are only uploaded whole."""
    return bool(getattr(_module(url), "WRITES_IN_PLACE", False))


def open_upload(url: str, **options):
    """A new upload to ``url`` (``part``/``put``/``complete``/``abort``); the outputs
    over it are in ``remote/upload.py``. Only schemes that write have one."""
    module = _module(url)
    if not hasattr(module, "open_upload"):
        raise UsageError(f"not supported yet: writing to {scheme_of(url)}:// names", url)
    return module.open_upload(url, **options)


class RemoteBackend(ReadsBytes):
    """The parts of FileBackend's reading interface every scheme shares, written once:
    ``size``, ``pread`` and ``read_exact`` (``ReadsBytes``, as FileBackend's), all-data ``data_ranges`` (a scheme that can
    tell holes, NBD, overrides it), the write calls refused through ``_refuse``, and
    the context manager. A subclass sets ``path`` and ``_size`` and defines
    ``readinto``, ``close`` and ``_refuse`` (its own words for "not written here")."""

    is_block_device = False
    writable = False
    kind = "object"
    path: str
    _size: int

    @property
    def size(self) -> int:
        return self._size

    def allocated_bytes(self) -> int:
        return sum(n for _, n, data in self.data_ranges(0, self._size) if data)

    def data_ranges(self, offset: int, end: int):
        """All data: the scheme cannot tell holes (the format's own map does)."""
        end = min(end, self._size)
        if end > offset:
            yield offset, end - offset, True

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError

    def pwrite(self, *args, **kwargs):
        self._refuse()

    write_zeroes = truncate = punch_hole = pwrite

    def flush(self, *, durable: bool = True) -> None:
        pass

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
