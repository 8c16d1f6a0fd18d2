"""restore: write an image's composed disk onto a device or into a file, then prove it.

Refuses a target smaller than the virtual size, and a device that is mounted, used as
swap or held by another driver (device-mapper, md) unless forced; the device is also
opened O_EXCL, so the kernel refuses it while anything else claims it (the rule every
output shares: ``devices.py``, applied by the writer's ``AtomicFile``). Zero extents are
zeroed efficiently (BLKZEROOUT on devices, holes in files), never read. Afterwards the
target is read back — from the medium, not the page cache — and its sha256 compared with
what was written and with the image's integrity record when it has one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from ..blockdev import BlockDevice, FileBackend
from ..devices import busy_device_allowed, is_block_device
from ..errors import ImageIOError
from .convert import ConvertStats, convert
from .diskhash import CHUNK, DiskHasher, hash_device
from .imaging import IntegrityRecord, Prefix, record_path


@dataclass
class RestoreResult:
    """What a restore wrote."""
    stats: ConvertStats
    sha256: str
    verified: bool


def read_back_hash(path: str, size: int, *, chunk: int = CHUNK) -> str:
    """sha256 of the first ``size`` bytes of ``path`` as the medium holds them: synced,
    then the page cache dropped, so the bytes come from the device or file system."""
    from ..registry import get
    with FileBackend(path) as f:
        try:
            os.fsync(f.fd)
        except OSError:
            pass
        os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with get("raw").open(path) as dev:
        view = Prefix(dev, size)
        return hash_device(view, chunk=chunk)[0]


def restore(image: BlockDevice, target: str, *, force: bool = False, verify: bool = True,
            progress=None, workers: int | None = None) -> RestoreResult:
    """Write ``image``'s composed disk to ``target`` (a block device, written in place,
    or a file, created atomically as a sparse raw disk) and verify it."""
    from ..atomic import refuse_overwrite
    from ..registry import get
    raw = get("raw")
    refuse_overwrite(target, image.files(), "the image being restored")
    is_device = is_block_device(target)
    record = None
    rec_file = record_path(image.path) if image.path else None
    if verify and rec_file and os.path.exists(rec_file):
        record = IntegrityRecord.load(rec_file)
    hasher = DiskHasher()
    # a device is checked (mounted, swap, held, size) and claimed by the writer
    with busy_device_allowed() if force else contextlib.nullcontext():
        writer = raw.writer(target, image.size, raw.options.parse(""))
    try:
        stats = convert(image, writer, progress=progress, workers=workers,
                        tap=hasher.feed, finish=False)
        written, _ = hasher.finish()
    finally:
        hasher.close()
    if record is not None and record.sha256 != written:
        # a file target is never put in place; a device has been written already
        writer.abort()
        raise ImageIOError("the image no longer matches its integrity record (run"
                           " 'diskforge verify' on it)" + (
                               f"; {target} now holds the damaged contents"
                               if is_device else ""), image.path)
    writer.finish()
    verified = False
    if verify:
        if read_back_hash(target, image.size) != written:
            raise ImageIOError("read-back verification failed: the target does not"
                               " hold what was written", target)
        verified = True
    return RestoreResult(stats, written, verified)
