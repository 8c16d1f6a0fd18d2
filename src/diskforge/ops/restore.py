"""restore: write an image's composed disk onto a device or into a file, then prove it.

Refuses a target smaller than the virtual size, and a device that is mounted, used as
swap or held by another driver (device-mapper, md) unless forced; the device is also
opened O_EXCL, so the kernel refuses it while anything else claims it. Zero extents are
zeroed efficiently (BLKZEROOUT on devices, holes in files), never read. Afterwards the
target is read back — from the medium, not the page cache — and its sha256 compared with
what was written and with the image's integrity record when it has one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..blockdev import BlockDevice, FileBackend
from ..errors import ImageIOError, SafetyError, UsageError
from .convert import ConvertStats, convert
from .imaging import CHUNK, DiskHasher, IntegrityRecord, Prefix, hash_device, record_path


@dataclass
class RestoreResult:
    stats: ConvertStats
    sha256: str
    verified: bool


def _dev_numbers(path: str) -> tuple[int, int] | None:
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def device_in_use(path: str) -> str | None:
    """Why a block device must not be overwritten (mounted, swap, held), or None."""
    numbers = _dev_numbers(path)
    if numbers is None:
        return None
    major, minor = numbers
    sysdir = f"/sys/dev/block/{major}:{minor}"
    family = {f"{major}:{minor}"}
    try:
        for entry in os.listdir(sysdir):  # partitions appear as subdirectories
            dev_file = os.path.join(sysdir, entry, "dev")
            if os.path.exists(os.path.join(sysdir, entry, "partition")):
                with open(dev_file) as f:
                    family.add(f.read().strip())
    except OSError:
        pass
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] in family:
                    return f"it (or one of its partitions) is mounted on {fields[4]}"
    except OSError:
        pass
    try:
        with open("/proc/swaps") as f:
            for line in list(f)[1:]:
                swap = line.split()[0]
                try:
                    if _dev_numbers(swap) and "%d:%d" % _dev_numbers(swap) in family:
                        return "it (or one of its partitions) is in use as swap"
                except OSError:
                    pass
    except OSError:
        pass
    for number in family:
        holders = f"/sys/dev/block/{number}/holders"
        if os.path.isdir(holders) and os.listdir(holders):
            return f"it is held by {', '.join(os.listdir(holders))} (device-mapper/md)"
    return None


def _claim(path: str) -> int:
    """Open a block device O_EXCL: the kernel refuses while it is mounted or claimed,
    and nobody can mount it while we hold this descriptor."""
    try:
        return os.open(path, os.O_RDONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SafetyError(f"the device is busy ({e.strerror}): mounted or in use"
                          " (--force overrides)", path) from None


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
    claim = None
    is_device = os.path.exists(target) and stat.S_ISBLK(os.stat(target).st_mode)
    if is_device:
        reason = device_in_use(target)
        if reason and not force:
            raise SafetyError(f"refusing to overwrite the device: {reason}"
                              " (--force overrides)", target)
        if not force:
            claim = _claim(target)
        with FileBackend(target) as dev:
            if dev.size < image.size:
                raise UsageError(f"the device ({dev.size} bytes) is smaller than the image"
                                 f" ({image.size} bytes)", target)
    elif os.path.isdir(target):
        raise UsageError("the target is a directory", target)
    try:
        record = None
        rec_file = record_path(image.path) if image.path else None
        if verify and rec_file and os.path.exists(rec_file):
            record = IntegrityRecord.load(rec_file)
        hasher = DiskHasher()
        writer = raw.writer(target, image.size, raw.options.parse(""))
        stats = convert(image, writer, progress=progress, workers=workers,
                        tap=hasher.feed, finish=False)
        written, _ = hasher.finish()
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
    finally:
        if claim is not None:
            os.close(claim)
    return RestoreResult(stats, written, verified)
