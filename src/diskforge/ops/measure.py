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


def require_room(target: str, fmt: Format, options: Options, *, size: int | None = None,
                 source: BlockDevice | None = None, base: BlockDevice | None = None) -> None:
    """When ``target`` is a block device (written in place), refuse before writing
    anything if the image will not fit: "device is N bytes, image needs M", measured as
    ``measure`` does (an empty disk of ``size``, or ``source``'s allocated contents).
    Where that would overstate the need (compressed output; only what differs from a
    ``base``) only the empty disk is measured. Formats that cannot measure, and what a
    measure cannot foresee, are caught by the writer instead: nothing is ever written
    past the device's end."""
    from ..atomic import final_path
    from ..devices import device_size, is_block_device, too_small
    from ..errors import UnsupportedError
    target = final_path(target)
    if not is_block_device(target) or not fmt.can_measure:
        return
    if source is not None and (base is not None or getattr(options, "compress", False)):
        size, source = source.size, None
    try:
        need = measure(fmt, options, size=size, source=source).required
    except UnsupportedError:
        return
    have = device_size(target)
    if need > have:
        raise too_small(target, have, need)
