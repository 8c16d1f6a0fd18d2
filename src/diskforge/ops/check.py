"""check: a format's consistency check, with qemu-img's result fields and exit codes.

The checking itself is format knowledge (refcounts for qcow2, checksums for VHD), so
each format implements ``BlockDevice.check``; this module holds the result, its JSON
(qemu-img's keys) and human layouts, and the exit status rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import printable

# qemu-img check's exit codes
EXIT_CLEAN, EXIT_ERROR, EXIT_CORRUPT, EXIT_LEAKS, EXIT_UNSUPPORTED = 0, 1, 2, 3, 63


@dataclass
class CheckResult:
    filename: str
    format: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    messages: list[str] = field(default_factory=list)  # one line per problem found

    @property
    def exit_status(self) -> int:
        if self.check_errors:
            return EXIT_ERROR
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN

    def to_json(self) -> dict:
        d = {"filename": self.filename, "format": self.format,
             "check-errors": self.check_errors}
        for key, value in (("image-end-offset", self.image_end_offset),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value is not None:
                d[key] = value
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed)):
            if value:
                d[key] = value
        return d

    def format_human(self) -> str:
        lines = [printable(m) for m in self.messages]   # they may quote names
        if self.leaks_fixed or self.corruptions_fixed:
            lines.append(f"The following inconsistencies were found and repaired:\n\n"
                         f"    {self.leaks_fixed} leaked clusters\n"
                         f"    {self.corruptions_fixed} corruptions\n")
        if self.corruptions:
            lines.append(f"\n{self.corruptions} errors were found on the image.\n"
                         "Data may be corrupted, or further writes to the image may"
                         " corrupt it.")
        if self.leaks:
            lines.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                         "This means waste of disk space, but no harm to data.")
        if self.check_errors:
            lines.append(f"\n{self.check_errors} internal errors have occurred during"
                         " the check.")
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.total_clusters and self.allocated_clusters:
            # as qemu-img: fragmented and compressed are shares of the allocated clusters
            t, a = self.total_clusters, self.allocated_clusters
            lines.append(f"{a}/{t} = {100.0 * a / t:.2f}% allocated,"
                         f" {100.0 * (self.fragmented_clusters or 0) / a:.2f}% fragmented,"
                         f" {100.0 * (self.compressed_clusters or 0) / a:.2f}% compressed"
                         " clusters")
        if self.image_end_offset is not None:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)

    def format_json(self) -> str:
        return json.dumps(self.to_json(), indent=4)


def check_image(dev, repair: str | None = None) -> CheckResult:
    """The format's own check (when it has one) plus the partition table's: a corrupt
    primary GPT, entries past the end, a looping EBR chain are corruptions too.

    Raises UnsupportedError only when there is nothing at all to check."""
    from ..errors import DiskforgeError, UnsupportedError
    from ..partitions import read_partitions
    try:
        result = dev.check(repair)
    except UnsupportedError:
        result = None
    try:
        table = read_partitions(dev)
    except DiskforgeError as e:
        if result is None:
            raise
        if not result.corruptions:  # unreadable although the format found nothing wrong
            result.messages.append(f"ERROR reading the partition table: {e}")
            result.check_errors += 1
        table = None
    if result is None:
        if table is None:
            raise UnsupportedError("This image format does not support checks", dev.path)
        result = CheckResult(filename=dev.path or "", format=dev.format)
    if table is not None:
        for problem in table.problems:
            result.messages.append(f"ERROR partition table ({table.scheme}): {problem}")
            result.corruptions += 1
    return result
