"""The ``-o`` options of VHD output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...errors import UsageError
from ...options import Options, option


@dataclasses.dataclass
class VhdOptions(Options):
    """``-o`` options of VHD output."""
    subformat: str = option("dynamic", "dynamic: grows as data is written; fixed: the"
                            " disk bytes then a footer (what Azure requires)",
                            choices=("dynamic", "fixed"))
    force_size: str = option(
        "auto", "auto: round the size up to a whole MiB (Azure requires it, Hyper-V"
        " accepts it); on: exactly the size given, as qemu's force_size; off: round up"
        " to a CHS geometry, as qemu-img does by default (Virtual PC reads the"
        " geometry)", choices=("auto", "on", "off"))
    block_size: int = option(2 << 20, "bytes per dynamic block (Hyper-V and qemu use 2"
                             " MiB)", kind="size", minimum=4096, maximum=256 << 20,
                             power_of_two=True)

    def validate(self) -> None:
        if self.subformat == "fixed" and self.block_size != 2 << 20:
            raise UsageError("block_size applies to dynamic VHDs only")
