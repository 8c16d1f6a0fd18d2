"""measure: how big an image in a given format and options would be, like
``qemu-img measure``: for an empty disk of a size, or for an existing image's contents.
"""

from __future__ import annotations

from ..blockdev import BlockDevice, Extent, ExtentKind
from ..options import Options
from ..registry import Format, Measurement
from .map import map_image


def measure(fmt: Format, options: Options, *, size: int | None = None,
            source: BlockDevice | None = None) -> Measurement:
    """Exactly one of ``size`` (an empty disk) or ``source`` (its allocated contents)."""
    if source is not None:
        allocated = [Extent(e.start, e.length, ExtentKind.DATA)
                     for e in map_image(source) if e.data]
        return fmt.measure(source.size, options, allocated)
    return fmt.measure(size or 0, options, None)
