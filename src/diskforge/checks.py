"""The result of a consistency check, and the repair a caller asks for.

Formats implement ``BlockDevice.check(repair)`` and return a :class:`CheckResult`; the
``check`` operation adds the partition table's findings and the CLI prints it. Both
types live here, below the formats and beside ``ImageInfo``'s module, so that the core
(``blockdev``) never reaches up into ``ops`` for them.

Each finding is a :class:`Problem` row — its kind, the structure and field as the
format's specification names them, the line qemu-img would print, and whether a
repair can fix it — so what is counted, verified or repaired is decided from the rows,
never by matching words in the printed text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import printable


class Repair(enum.Enum):
    """qemu-img check's ``-r``: nothing, leaked clusters only, or everything."""
    NONE = None
    LEAKS = "leaks"
    ALL = "all"

    @classmethod
    def parse(cls, value: "Repair | str | None") -> "Repair":
        """From the CLI's ``-r`` spelling (or None), or a Repair already."""
        return value if isinstance(value, Repair) else cls(value)

    @property
    def leaks(self) -> bool:
        """Whether leaked clusters are freed."""
        return self is not Repair.NONE

    @property
    def errors(self) -> bool:
        """Whether corruptions are repaired too."""
        return self is Repair.ALL

    def __bool__(self) -> bool:
        return self is not Repair.NONE


class ProblemKind(enum.Enum):
    CORRUPTION = "corruption"  # counted in ``corruptions`` (exit 2)
    LEAK = "leak"              # counted in ``leaks`` (exit 3)
    ERROR = "error"            # the check itself failed somewhere (exit 1)
    NOTE = "note"              # printed, not counted (warnings, "repaired ...")


@dataclass(frozen=True)
class Problem:
    """One finding: ``message`` is the line as printed (qemu-img's wording where the
    two overlap); ``structure``/``field`` name where, as the specification does."""
    kind: ProblemKind
    message: str
    structure: str | None = None
    field: str | None = None
    repairable: bool = False


# qemu-img check's exit codes
EXIT_CLEAN, EXIT_ERROR, EXIT_CORRUPT, EXIT_LEAKS, EXIT_UNSUPPORTED = 0, 1, 2, 3, 63


@dataclass
class CheckResult:
    """What ``check`` found in one image, in qemu-img check's terms."""
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
    problems: list[Problem] = field(default_factory=list)  # in the order found

    @property
    def messages(self) -> list[str]:
        """The printed line of each problem, in order."""
        return [p.message for p in self.problems]

    def add(self, kind: ProblemKind, message: str, structure: str | None = None,
            field: str | None = None, *, repairable: bool = False,
            count: int = 1) -> Problem:
        """Record a finding and count it (``count`` times: a table shared by several
        snapshots stands for that many references)."""
        p = Problem(kind, message, structure, field, repairable)
        self.problems.append(p)
        if kind is ProblemKind.CORRUPTION:
            self.corruptions += count
        elif kind is ProblemKind.LEAK:
            self.leaks += count
        elif kind is ProblemKind.ERROR:
            self.check_errors += count
        return p

    def note(self, message: str) -> None:
        """A printed line that is not a problem (a warning, what was repaired)."""
        self.problems.append(Problem(ProblemKind.NOTE, message))

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
            # qemu-img leaves each count out when it is zero (collect_image_check's
            # has_* = value != 0): an empty overlay has no allocated-clusters key
            if value:
                d[key] = value
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed)):
            if value:
                d[key] = value
        return d

    def problem_lines(self) -> list[str]:
        """The findings, one line each (qemu-img prints them on stderr)."""
        return [printable(m) for m in self.messages]   # they may quote names

    def format_human(self) -> str:
        """Findings and summary together (for a log; the CLI prints the findings on
        stderr and ``format_summary`` on stdout, as qemu-img)."""
        return "\n".join([*self.problem_lines(), self.format_summary()])

    def format_summary(self) -> str:
        """What qemu-img prints on stdout: the counts, the allocation line, the end."""
        lines = []
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
        import json  # only for --output json: start-up of the rest
        return json.dumps(self.to_json(), indent=4)
