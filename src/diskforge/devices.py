"""What diskforge may read from and write to: regular files and block devices, nothing
else.

Inputs. A FIFO, socket or character device named as an image (or named *by* an image:
a backing file, a data file, a parent, a bundle's ``Info.plist``) would make the first
read block forever or consume someone else's stream, so :func:`open_input` refuses
them before any read: it looks first (``stat``), then opens with ``O_NONBLOCK`` (an
open of a FIFO without a writer would itself block), checks again on the descriptor
(the name may have been swapped in between), and only then clears ``O_NONBLOCK``.

Outputs. An existing target that is a block device is written in place, whatever the
format (a qcow2 on an LVM volume is normal for qemu-img), but only after checking that
it is not mounted, not used as swap and not held by device-mapper or md, and it is
opened ``O_EXCL`` so the kernel refuses it while anything else claims it (and nobody
can mount it while we write). It must also be large enough: ``ops.measure.
require_room`` refuses before writing, where the size the image needs is known up front
(``measure``), with "device is N bytes, image needs M". Any other existing target that
is not a regular file (character device, FIFO, socket, directory) is refused with one
line (:func:`refuse_special_output`).

``/dev/null``-like sinks are refused too, as character devices. qemu-img 7.2 on our
machines refuses them as well ("Cannot grow device files" for ``-O raw``, "Image is
not in qcow2 format" for qcow2), and a sink cannot hold an image anyway: to read an
image through without keeping the bytes, ``compare``, ``check`` or ``verify`` do that.
One rule ("only regular files and block devices") also keeps ``/dev/full``, a tty or
``/dev/mem`` out without a list of exceptions.

The mount/swap/holder checks moved here from ``ops/restore.py`` so that every writer
shares them through ``atomic.AtomicFile``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
import stat

from .errors import ImageIOError, SafetyError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory"))

# set while opening a file that another image names (``referenced_files``)
_referenced: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "diskforge_referenced_file", default=False)

# restore --force: write onto a device even when it is mounted or busy (the user's call)
_busy_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "diskforge_busy_device_allowed", default=False)


def special_kind(mode: int) -> str | None:
    """What a file is when it is neither a regular file nor a block device, else None."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return None


# -- inputs ------------------------------------------------------------------------------

@contextlib.contextmanager
def referenced_files() -> "Iterator[None]":
    """Within this block every input opened is a file another image names (a backing
    file, data file, extent, parent, band): only a regular file whose real path is
    outside ``policy.SYSTEM_ROOTS`` is accepted, checked on the open descriptor.
    ``registry.open_image`` sets it around the opening of every image deeper in a
    chain, so each format's own opens are covered without each format knowing."""
    token = _referenced.set(True)
    try:
        yield
    finally:
        _referenced.reset(token)


def open_input(path: str | os.PathLike, *, writable: bool = False,
               referenced: bool = False) -> int:
    """Open ``path`` for reading (or reading and writing), refusing anything that is not
    a regular file or a block device before a single byte is read; the descriptor is
    blocking again when returned. OS failures become one-line ImageIOErrors. A block
    device opened for writing (``convert -n``, ``resize``, ``commit`` ... of an image
    on a device) gets the output checks: not mounted, swap or held, and O_EXCL.
    ``referenced`` (or being inside :func:`referenced_files`): the file is one an image
    names, so it must also be a regular file outside ``/proc``, ``/sys`` and ``/dev``
    (``policy.referenced_file_problem``), checked on the descriptor itself."""
    try:
        return _open_checked(os.fspath(path), writable, referenced or _referenced.get())
    except OSError as e:
        raise ImageIOError.from_os(e, os.fspath(path)) from None


def open_input_file(path: str | os.PathLike) -> "BinaryIO":
    """A drop-in for ``open(path, "rb")`` (OS failures stay OSErrors, so callers'
    ``except FileNotFoundError`` still works) that refuses special files as
    :func:`open_input` does."""
    return os.fdopen(_open_checked(os.fspath(path), False), "rb")


def _open_checked(path: str, writable: bool, referenced: bool = False) -> int:
    mode = os.stat(path).st_mode
    kind = special_kind(mode)  # look before opening: nothing blocks
    if kind and kind != "a directory":  # directories: the caller's own message
        raise _refused_input(path, kind)
    if referenced:
        _check_referenced(path, os.path.realpath(path), mode)
    if writable and stat.S_ISBLK(mode):  # an image on a device, changed in place
        return open_output_device(path)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        kind = special_kind(mode)  # the name may have been swapped
        if kind and kind != "a directory":
            raise _refused_input(path, kind)
        if referenced:  # what was opened, whatever the name leads to by now
            _check_referenced(path, _real_path_of(fd, path), mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_referenced(path: str, real: str, mode: int) -> None:
    from .policy import referenced_file_problem
    problem = referenced_file_problem(real, mode)
    if problem:
        raise SafetyError(problem, path)


def _real_path_of(fd: int, path: str) -> str:
    """The real path of the file open on ``fd`` (the kernel's, from /proc/self/fd), or
    of ``path`` when /proc is not mounted."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _refused_input(path: str, kind: str) -> ImageIOError:
    return ImageIOError(f"is {kind}, not a regular file or block device; refused before"
                        " reading (nothing is read from special files)", path)


# -- outputs -----------------------------------------------------------------------------

def refuse_special_output(path: str, mode: int) -> None:
    """Raise for an existing output target that is neither a regular file nor a block
    device: it is never written through, renamed over or deleted."""
    kind = special_kind(mode)
    if kind == "a directory":
        raise ImageIOError("is a directory; cannot write an image there", path)
    if kind:
        raise SafetyError(f"is {kind}; diskforge writes images only to regular files and"
                          " block devices, and never replaces anything else", path)


def is_block_device(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def busy_device_allowed() -> "Iterator[None]":
    """Within this block, a block device target that is mounted, swap or held is
    written anyway, and not opened O_EXCL (``restore --force``)."""
    token = _busy_allowed.set(True)
    try:
        yield
    finally:
        _busy_allowed.reset(token)


def open_output_device(path: str) -> int:
    """Open a block device to write an image onto it in place: refused when mounted,
    swap or held (unless :func:`busy_device_allowed`), and opened O_EXCL so the kernel
    refuses it while anything else claims it."""
    force = _busy_allowed.get()
    if not force:
        reason = device_in_use(path)
        if reason:
            raise SafetyError(f"refusing to overwrite the device: {reason}"
                              " (restore --force overrides)", path)
    flags = os.O_RDWR | os.O_CLOEXEC | (0 if force else os.O_EXCL)
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise SafetyError(f"the device is busy ({e.strerror}): mounted or in use",
                              path) from None
        raise ImageIOError.from_os(e, path) from None


def too_small(path: str, have: int, need: int) -> UsageError:
    """The one message for an image that does not fit its device."""
    return UsageError(f"device is {have} bytes, image needs {need}", path)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


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
                    numbers = _dev_numbers(swap)
                except OSError:
                    continue
                if numbers and "%d:%d" % numbers in family:
                    return "it (or one of its partitions) is in use as swap"
    except OSError:
        pass
    for number in family:
        holders = f"/sys/dev/block/{number}/holders"
        if os.path.isdir(holders) and os.listdir(holders):
            return f"it is held by {', '.join(os.listdir(holders))} (device-mapper/md)"
    return None
