"""check: a format's consistency check plus the partition table's.

The checking itself is format knowledge (refcounts for qcow2, checksums for VHD), so
each format implements ``BlockDevice.check``; the result type, its JSON (qemu-img's
keys), human layout and exit status rules are in the core (``checks.py``), which the
formats import without reaching up into ``ops``.
"""

from __future__ import annotations

from ..checks import EXIT_CLEAN, EXIT_CORRUPT, EXIT_ERROR, EXIT_LEAKS, EXIT_UNSUPPORTED
from ..checks import CheckResult, ProblemKind, Repair

__all__ = ["EXIT_CLEAN", "EXIT_CORRUPT", "EXIT_ERROR", "EXIT_LEAKS", "EXIT_UNSUPPORTED",
           "CheckResult", "Repair", "check_image"]


def check_image(dev, repair: "Repair | str | None" = None, *, format_checks: bool = True,
                partitions: bool = True) -> CheckResult:
    """The format's own check (when it has one and ``format_checks``) plus, with
    ``partitions``, the partition table's: a corrupt primary GPT, entries past the end,
    a looping EBR chain are corruptions too.

    Raises UnsupportedError only when there is nothing at all to check."""
    from ..errors import DiskforgeError, UnsupportedError
    from ..partitions import read_partitions
    result = None
    if format_checks:
        try:
            result = dev.check(Repair.parse(repair))
        except UnsupportedError:
            result = None
    if not partitions:
        if result is None:
            raise UnsupportedError("This image format does not support checks", dev.path)
        return result
    try:
        table = read_partitions(dev)
    except DiskforgeError as e:
        if result is None:
            raise
        if not result.corruptions:  # unreadable although the format found nothing wrong
            result.add(ProblemKind.ERROR, f"ERROR reading the partition table: {e}",
                       "partition table")
        table = None
    if result is None:
        if table is None:
            raise UnsupportedError("This image format does not support checks", dev.path)
        result = CheckResult(filename=dev.path or "", format=dev.format)
    if table is not None:
        for problem in table.problems:
            result.add(ProblemKind.CORRUPTION,
                       f"ERROR partition table ({table.scheme}): {problem}",
                       f"partition table ({table.scheme})")
    return result
