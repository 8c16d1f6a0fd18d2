"""The ``-o`` options of raw output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...options import Options, option


@dataclasses.dataclass
class RawOptions(Options):
    """``-o`` options of raw output."""
    preallocation: str = option("off", "off: sparse file; falloc: reserve every block"
                                " with fallocate; full: write zeros everywhere",
                                choices=("off", "falloc", "full"))
