"""Resource limits for one command: what diskforge will spend before refusing.

A hostile header can name tables of billions of entries, a sparse file can satisfy
"the table fits in the file", and a tiny compressed chunk can claim gigabytes. Rather
than meet a MemoryError (or the OOM killer) halfway through, every allocation or walk
sized by a number read from a file asks here first and gets a one-line
:class:`LimitError` naming the file, structure and field.

256 MiB at once is far above anything a valid image needs in one piece (a 64 TiB qcow2
with 64 KiB clusters has a 8 MiB L1 table; a 1 TiB UDZO's plist is about 55 MiB), and
well below what a 2-core, few-GiB service worker can give.
"""

from __future__ import annotations

import os

from .errors import LimitError

MEMORY_BUDGET = 256 << 20


def check_alloc(nbytes: int, path: str | os.PathLike | None, structure: str,
                field: str | None = None, *, budget: int | None = None) -> int:
    """Return ``nbytes`` when it fits the per-command memory budget, else raise.

    Call it before allocating (or reading whole) anything whose size came from a file.
    The budget is read at each call (not bound at import) because untrusted mode
    lowers ``MEMORY_BUDGET`` for the whole command (``untrusted.py``).
    """
    if budget is None:
        budget = MEMORY_BUDGET
    if nbytes > budget:
        where = ".".join(p for p in (structure, field) if p)
        raise LimitError(f"{where}: needs {nbytes} bytes at once, more than the"
                         f" {budget >> 20} MiB limit for one command", path)
    return nbytes
