"""Opening what a remote image names: helpers for format code that stats or opens a
referenced name directly (VMDK extent files, a qcow2 external data file, VHD parent
candidates): ``exists`` and ``open_file``, which take a local path or a URL alike.
Where a name may lead is decided in ``names.py`` (``OpenPolicy.resolve`` hands a URL
referrer there).
"""

from __future__ import annotations

import os

from ..errors import ImageIOError
from . import is_remote, open_backend


def exists(name: str) -> bool:
    """Whether ``name`` (a local path or a URL) is there to be opened: for a URL, one
    small request; errors other than "not found" are raised, not hidden."""
    if not is_remote(name):
        return os.path.isfile(name)
    try:
        backend = open_backend(name)
    except ImageIOError as e:
        if "No such" in str(e):  # http's "No such file (HTTP 404)", s3's "No such object"
            return False
        raise
    backend.close()
    return True


def open_file(name: str, *, writable: bool = False):
    """An open backend for a file an image names: FileBackend for a local path, the
    scheme's read backend for a URL (remote ones are never written in place)."""
    if is_remote(name):
        return open_backend(name)
    from ..blockdev import FileBackend
    return FileBackend(name, writable=writable)
