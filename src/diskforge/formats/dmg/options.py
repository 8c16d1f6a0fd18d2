"""The ``-o`` options of DMG output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...options import Options, option


@dataclasses.dataclass
class DmgOptions(Options):
    """``-o`` options of DMG output."""
    format: str = option("UDZO", "hdiutil's image format: UDZO zlib, UDBZ bzip2, ULFO"
                         " LZFSE, ULMO LZMA, UDRO raw chunks (read-only), UDRW every"
                         " sector stored raw (read-write)",
                         choices=("UDZO", "UDBZ", "ULFO", "ULMO", "UDRO", "UDRW"))
    zlib_level: int = option(1, "zlib level for UDZO (hdiutil's default is 1)",
                             minimum=1, maximum=9)
