"""bitmap: qemu-img bitmap's actions on an image's persistent dirty bitmaps, and the
copy of a source's bitmaps that ``convert --bitmaps`` makes.

Written against ``BlockDevice.load_bitmaps``/``store_bitmaps``: the bitmaps are read
whole, changed in memory (``dirty_bitmaps.apply_actions``) and stored back, as qemu-img
does between opening and closing the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..blockdev import BlockDevice
from ..dirty_bitmaps import DirtyBitmap, apply_actions
from ..errors import DiskforgeError, UsageError


def edit_bitmaps(dev: BlockDevice, name: str, actions: Sequence[tuple[str, str | None]],
                 *, granularity: int = 0, source: BlockDevice | None = None) -> None:
    """Run the actions in order on bitmap ``name`` of ``dev`` (open for writing);
    ``source``: where ``--merge`` takes its bitmap from (``-b``), else ``dev`` itself.
    When an action fails, those before it are stored and the error is raised, as
    qemu-img leaves it."""
    kept = dev.load_bitmaps()
    supported = kept is not None
    kept = kept if kept is not None else []
    src = None
    if source is not None:
        src = source.load_bitmaps() or []
    error: DiskforgeError | None = None
    done = len(actions)
    try:
        apply_actions(kept, name, actions, size=dev.size, granularity=granularity,
                      default_granularity=dev.default_bitmap_granularity(),
                      can_store=dev.check_new_bitmap, source=src, path=dev.path)
    except DiskforgeError as e:
        error, done = e, getattr(e, "actions_done", 0)
    if supported and done:
        dev.store_bitmaps(kept)
    if error is not None:
        raise error


def bitmaps_to_copy(src: BlockDevice, *, skip_broken: bool,
                    warn: Callable[[str], None]) -> list[DirtyBitmap]:
    """``convert --bitmaps``: the source's persistent bitmaps, checked before anything
    is written (qemu-img's convert_check_bitmaps and convert_copy_bitmaps, with their
    words). Inconsistent ones stop the conversion, or with ``skip_broken`` are left
    out with a warning; qemu looks at them newest first, and so do we."""
    found = src.load_bitmaps()
    if found is None:
        raise UsageError("Source lacks bitmap support", src.path)
    for bm in reversed(found):
        if not bm.consistent:
            if not skip_broken:
                raise UsageError(f"Cannot copy inconsistent bitmap '{bm.name}' (try"
                                 " --skip-broken-bitmaps, or use 'bitmap --remove' to"
                                 " delete it)", src.path)
    out = []
    for bm in reversed(found):
        if not bm.consistent:
            warn(f"Skipping inconsistent bitmap '{bm.name}'")
    for bm in found:
        if bm.consistent:
            out.append(bm)
    return out


def add_copied_bitmaps(target: BlockDevice, copied: list[DirtyBitmap]) -> None:
    """``convert -n --bitmaps``: the copies join the target's own bitmaps; a name the
    target already has is refused (qemu-img: "Failed to create bitmap ...")."""
    have = target.load_bitmaps()
    if have is None:
        raise UsageError(f"Format driver '{target.format}' does not support bitmaps",
                         target.path)
    names = {b.name for b in have}
    for bm in copied:
        if bm.name in names:
            raise UsageError(f"Failed to create bitmap {bm.name}: Bitmap already exists:"
                             f" {bm.name}", target.path)
        target.check_new_bitmap(bm.name, bm.granularity)
        bm.resize(target.size)
        have.append(bm)
    target.store_bitmaps(have)
