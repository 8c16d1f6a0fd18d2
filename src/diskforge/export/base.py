"""What every export target shares: the options a user gives, the size rounding, the
one way a disk is written (a format plugin's writer, found through the registry), and
how a checker reports the rules a file breaks.

A target module (``azure.py``, ``gcp.py`` ...) holds only its own rules and exposes:

- ``NAME`` and ``SUMMARY`` (one line for ``--help``);
- ``export(source, out, opts, progress) -> list[str]``: write the target's files for
  the open ``source`` device, atomically, and return their paths;
- ``check(file, policy=None) -> list[str]``: every rule of the target the file
  breaks, one sentence each (empty: the target would take it). ``file`` is a
  ``checkfile.CheckFile``: a local file or a remote object, read through a backend
  (its size, ranges, a file object, its probed format and header facts), so every
  rule works on a URL without a download; images are opened under ``policy``
  (untrusted mode, ``-U``).

Targets never import a format package: disks are written with
``registry.get(name).writer(path, size, options)`` and read with ``open_image``, so a
target works with any plugin that gives that format (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from ..blockdev import BlockDevice
from ..errors import UsageError

Progress = Callable[[int, int], None]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclasses.dataclass
class ExportOptions:
    """The virtual machine around the disk (OVA, libvirt) and the packaging choices.

    Only the targets that describe a machine read ``cpus``, ``memory``, ``name`` and
    ``firmware``; ``manifest`` is the OVA manifest's digest (``none``: no manifest,
    for tools that cannot check one); ``package`` chooses AWS's upload form."""
    cpus: int = 1
    memory: int = 1024          # MiB
    name: str = ""
    firmware: str = "bios"
    manifest: str = "sha256"
    package: str = ""           # aws: "vmdk" or "ova" (default: from OUT's extension)

    def validate(self) -> None:
        for key, kind in (("cpus", int), ("memory", int), ("name", str), ("firmware", str),
                          ("manifest", str), ("package", str)):
            value = getattr(self, key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UsageError(f"invalid --{key} {value!r}: expected {kind.__name__}")
        if not 1 <= self.cpus <= 768:
            raise UsageError(f"invalid --cpus {self.cpus}: from 1 to 768")
        if not 4 <= self.memory <= 24 << 20:
            raise UsageError(f"invalid --memory {self.memory}: MiB, from 4 to {24 << 20}")
        if self.firmware not in ("bios", "efi"):
            raise UsageError(f"invalid --firmware '{self.firmware}': bios or efi")
        if self.manifest not in ("sha1", "sha256", "none"):
            raise UsageError(f"invalid --manifest '{self.manifest}': sha1, sha256 or none")
        if self.package not in ("", "vmdk", "ova"):
            raise UsageError(f"invalid --package '{self.package}': vmdk or ova")
        bad = [c for c in self.name if ord(c) < 32 or c in "<>&\"'/\\"]
        if bad or len(self.name) > 80:
            raise UsageError("invalid --name: at most 80 characters, without control"
                             " characters, quotes, <, >, & or slashes")

    @classmethod
    def from_mapping(cls, opts: dict) -> "ExportOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise UsageError(f"unknown export option(s): {', '.join(unknown)} (known:"
                             f" {', '.join(sorted(names))})")
        obj = cls(**opts)
        obj.validate()
        return obj

    def vm_name(self, out: str) -> str:
        """``--name``, else the output's file name without its extension."""
        if self.name:
            return self.name
        base = os.path.basename(out)
        stem = base.split(".", 1)[0] or "disk"
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)[:80]


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def write_disk(fmt: str, options: str, source: BlockDevice, out: str, size: int,
               progress: Progress | None) -> None:
    """Convert ``source`` into a new ``fmt`` image of ``size`` bytes (at least the
    source's: the rest reads as zeros) at ``out``, through the registry."""
    from ..errors import UnknownFormatError, UnsupportedError
    from ..ops.convert import convert
    from ..registry import get
    try:
        plugin = get(fmt)
    except UnknownFormatError:
        plugin = None
    if plugin is None or not plugin.can_write:
        raise UnsupportedError(f"not supported yet: writing {fmt} images, which this"
                               " export needs", out)
    opts = plugin.options.parse(options, format_name=plugin.name)
    if size < source.size:
        raise UsageError(f"internal: export would shrink the disk ({source.size} ->"
                         f" {size} bytes)", out)
    convert(source, plugin.writer(out, size, opts), progress=progress)


def sibling(out: str, suffix: str) -> str:
    """``OUT`` with its last extension replaced by ``suffix`` (the domain XML beside
    ``disk.qcow2`` is ``disk.xml``)."""
    root, ext = os.path.splitext(out)
    return (root if ext else out) + suffix


def size_text(n: int) -> str:
    """Bytes with the largest binary unit that divides them exactly, for messages."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"
