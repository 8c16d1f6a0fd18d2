"""The ``-o`` options of VDI output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...options import Options, option

_MIB = 1 << 20


@dataclasses.dataclass
class VdiOptions(Options):
    """``-o`` options of VDI output."""
    static: bool = option(False, "preallocate every block (VirtualBox's fixed image);"
                          " off: blocks are stored as data is written (dynamic)")
    block_size: int = option(_MIB, "bytes per block (VirtualBox and qemu use 1 MiB; qemu"
                             " reads no other size)", kind="size", minimum=512,
                             maximum=256 * _MIB, power_of_two=True)
