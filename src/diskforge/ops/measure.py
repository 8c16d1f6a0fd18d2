"""measure: how big an image in a given format and options would be, like
``qemu-img measure``: for an empty disk of a size, or for an existing image's contents.
"""

from __future__ import annotations

from ..blockdev import BlockDevice, Extent, ExtentKind
from ..options import Options
from ..registry import Format, Measurement


def measure(fmt: Format, options: Options, *, size: int | None = None,
            source: BlockDevice | None = None) -> Measurement:
    """Exactly one of ``size`` (an empty disk) or ``source`` (its allocated contents).

    As qemu-img, a source's allocation is counted in its own allocation units (its
    cluster size: a VHD's 2 MiB blocks, a VHDX's payload blocks), even where diskforge
    maps it more finely (a VHD's sector bitmaps), so the two tools agree on what an
    image needs."""
    if source is not None:
        from .map import map_image  # not at import: every convert imports require_room
        unit = source.info().cluster_size or 1
        allocated: list[Extent] = []
        for e in map_image(source):
            if not e.data:
                continue
            start = e.start - e.start % unit
            end = min(source.size, -(-(e.start + e.length) // unit) * unit)
            if allocated and start <= allocated[-1].offset + allocated[-1].length:
                last = allocated.pop()
                start, end = last.offset, max(end, last.offset + last.length)
            allocated.append(Extent(start, end - start, ExtentKind.DATA))
        m = fmt.measure(source.size, options, allocated)
        return _with_bitmaps(m, fmt, options, source)
    return fmt.measure(size or 0, options, None)


def _with_bitmaps(m: Measurement, fmt: Format, options: Options,
                  source: BlockDevice) -> Measurement:
    """qemu-img's "bitmaps" line: for a target format that can hold persistent bitmaps
    (``measure_bitmaps``) and a source that can have them, what copying them adds
    (``convert --bitmaps``), 0 when it has none."""
    counter = getattr(fmt, "measure_bitmaps", None)
    if counter is None:
        return m
    found = source.load_bitmaps(data=False)
    if found is None:
        return m
    return m.replace(bitmaps=counter(options, found))


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
