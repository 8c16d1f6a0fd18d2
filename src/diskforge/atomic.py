"""Outputs appear atomically: written beside the target under a temporary name,
flushed, then renamed into place. A failed or interrupted run leaves nothing under the
final name, and its temporary file is removed.

"Flushed" means handed to the operating system. Forcing the bytes to stable storage
(fdatasync before the rename, so the new name survives a power cut with its contents)
costs the whole write-back time — 1.5 s per GB on our CI machines — and neither
qemu-img nor cp does it by default, so it is opt-in: ``diskforge --sync``, or
``set_durable(True)`` from Python. Without it, an interrupted or failed run still leaves
nothing under the final name.

Targets that are not regular files (``devices.py`` has the rule and why): an existing
block device is written in place, for every format — there is no temporary file and
nothing to rename, so ``commit()`` flushes to the device and ``discard()`` cannot undo
what was written. So that every writer can treat the device like the new, empty file
it would otherwise get, the device behaves as one: its size is the highest offset
written so far, reads stop there, and whatever a write or ``truncate`` skips over is
zeroed first (as a file's hole would read), and nothing may go past the device's end
("device is N bytes, image needs M"). Anything else that is not a regular file is
refused, never renamed over.

Leftovers of a killed run (``kill -9``, a power cut): the owner of a temporary file
holds ``flock(LOCK_EX)`` on it for its whole life, so a temporary file of ours whose
flock can be taken has no live owner. Creating a temporary file for a target first
removes such stale ``.NAME.XXXXXXXX.diskforge-tmp`` files of the same target, saying so
on stderr; nothing else is ever deleted, and the partial output that ``image --resume``
can continue (named in ``NAME.resume.json``) is kept. A flock, unlike a PID, cannot be
confused with a new process that reused the PID; flock locks are also independent of
the fcntl (OFD) byte-range locks QEMU uses, so they never interfere with those.

Also here: the check that refuses to write an output onto one of the inputs (the same
file, or the same inode through a symlink or a hard link).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys

from .blockdev import FileBackend
from .devices import open_output_device, refuse_special_output, too_small
from .errors import ImageIOError, SafetyError, UnsupportedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._fallocate import ReserveAhead

__all__ = ["AtomicFile", "final_path", "refuse_overwrite", "remove_stale",
           "reserve_ahead", "set_direct", "set_durable", "unlink_regular"]

_durable = False
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
_TMP_SUFFIX = ".diskforge-tmp"


def set_durable(on: bool) -> None:
    """Make every later commit fdatasync before renaming (``diskforge --sync``)."""
    global _durable
    _durable = bool(on)


_direct = False


def set_direct(on: bool) -> None:
    """Write every later output image (not its sidecar records) with O_DIRECT where
    aligned (qemu-img's ``-t none``/``directsync``; ``FileBackend.use_direct_io``). A
    file system that refuses O_DIRECT fails the output, as qemu-img fails there."""
    global _direct
    _direct = bool(on)


def final_path(target: str | os.PathLike) -> str:
    """Where the output will really live: a symlinked target is written through."""
    target = os.fspath(target)
    return os.path.realpath(target) if os.path.islink(target) else target


class AtomicFile(FileBackend):
    """A new file under a temporary name beside ``target``; ``commit()`` renames it into
    place, ``discard()`` deletes it. Usable as a context manager: an exception discards.

    When ``target`` is an existing block device, it is written in place instead (see
    the module docstring; ``in_place`` is True and ``tmp_path`` None). ``zero_fill``:
    whether skipped-over ranges of a device are zeroed first; the raw writer, which
    zeroes every zero extent itself, turns it off. ``trailer``: the structure that
    must end the file (VHD footer, UDIF koly), for formats that therefore cannot be
    written onto a device. ``sidecar``: a small record beside an image (integrity
    record, bad-sector map, resume state, manifest), never written onto a device.

    A ``target`` that is a remote name (``s3://bucket/key``) gives an upload with the
    same interface instead (``remote/upload.py``): ``stream=True`` says the writer
    only appends (apart from rewriting its first few MiB, headers patched at the
    end), so the output is uploaded as it is produced; otherwise it is spooled to a
    temporary file in ``$TMPDIR`` and uploaded at ``commit()``. Locally ``stream``
    changes nothing.
    """

    def __new__(cls, target: "str | os.PathLike | None" = None, *args, **kwargs):
        if cls is AtomicFile and isinstance(target, str) and "://" in target:
            from .remote import is_remote
            if is_remote(target):  # not an AtomicFile, so __init__ is not run on it
                from .remote.upload import open_output
                return open_output(target, unfinished=_UNFINISHED, **kwargs)
        return object.__new__(cls)

    def __init__(self, target: str | os.PathLike, *, mode: int = 0o644,
                 zero_fill: bool = True, trailer: str | None = None,
                 sidecar: bool = False, stream: bool = False):
        if "://" in os.fspath(target):
            _refuse_remote_target(os.fspath(target))
        self.target = final_path(target)
        self.committed = False
        self.in_place = False
        directory, name = os.path.split(os.path.abspath(self.target))
        try:
            st = os.stat(self.target)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise ImageIOError.from_os(e, self.target) from None
        if st is not None and stat.S_ISBLK(st.st_mode):
            if sidecar:
                raise SafetyError("is a block device; records and maps beside an image"
                                  " are written only as regular files", self.target)
            if trailer:
                raise UnsupportedError(
                    f"not supported yet: writing this format in place on a block device"
                    f" (its {trailer} must end the file, and a device does not end where"
                    " the image does)", self.target)
            self._open_device(zero_fill)
            return
        if st is not None and not stat.S_ISREG(st.st_mode):
            refuse_special_output(self.target, st.st_mode)
        if not os.path.isdir(directory):
            raise ImageIOError("the directory to write into does not exist", self.target)
        remove_stale(self.target)
        self.tmp_path, fd = _create_locked(directory, name, mode, self.target)
        _UNFINISHED.add(self)
        super().__init__(self.tmp_path, writable=True, fd=fd)
        if _direct and not sidecar:
            try:
                self.use_direct_io()
            except BaseException:
                self.discard()
                raise

    def _open_device(self, zero_fill: bool) -> None:
        fd = open_output_device(self.target)
        self.tmp_path = None
        self.in_place = True
        self.zero_fill = zero_fill
        self.device_size = os.lseek(fd, 0, os.SEEK_END)
        self.end = 0  # the highest offset written: the "file size" writers see
        super().__init__(self.target, writable=True, fd=fd)

    @classmethod
    def reopen(cls, target: str | os.PathLike, tmp_path: str) -> "AtomicFile":
        """The temporary file of an interrupted run, opened again to continue it
        (resumable imaging). It must sit beside ``target`` under our naming scheme."""
        self = cls.__new__(cls)
        self.target = final_path(target)
        self.in_place = False
        directory, name = os.path.split(os.path.abspath(self.target))
        tmp_dir, tmp_name = os.path.split(os.path.abspath(tmp_path))
        if tmp_dir != directory or not (tmp_name.startswith(f".{name}.")
                                        and tmp_name.endswith(_TMP_SUFFIX)):
            raise SafetyError(f"'{tmp_path}' is not a partial output of this target",
                              self.target)
        try:
            fd = os.open(tmp_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ImageIOError.from_os(e, tmp_path) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SafetyError("the partial output is not a regular file", tmp_path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SafetyError("another diskforge is writing this partial output",
                              tmp_path) from None
        except BaseException:
            os.close(fd)
            raise
        self.tmp_path = os.path.join(directory, tmp_name)
        self.committed = False
        _UNFINISHED.add(self)
        FileBackend.__init__(self, self.tmp_path, writable=True, fd=fd)
        return self

    # -- a device written in place behaves as a new file -----------------------------
    @property
    def size(self) -> int:
        return self.end if self.in_place else super().size

    def _grow(self, end: int, start: int | None = None) -> None:
        """Make the device "file" ``end`` bytes long, zeroing from the old end up to
        ``start`` (where a write begins; default ``end``)."""
        if end > self.device_size:
            raise too_small(self.target, self.device_size, end)
        gap_end = min(end if start is None else start, end)
        old, self.end = self.end, max(self.end, end)
        if self.zero_fill and gap_end > old:
            _zero_device(self, old, gap_end)

    def readinto(self, offset: int, buf) -> int:
        if self.in_place:
            n = max(0, min(len(memoryview(buf).cast("B")), self.end - offset))
            return super().readinto(offset, memoryview(buf).cast("B")[:n]) if n else 0
        return super().readinto(offset, buf)

    def pwrite(self, offset: int, data) -> None:
        if self.in_place:
            self._grow(offset + memoryview(data).nbytes, offset)
        super().pwrite(offset, data)

    def truncate(self, size: int) -> None:
        if self.in_place:
            if size > self.end:
                self._grow(size)
            else:
                self.end = size  # the device keeps its bytes; a later growth zeroes them
            return
        super().truncate(size)

    # -- the end of the output ------------------------------------------------------------
    def detach(self) -> None:
        """Close, keeping the temporary file for a later ``reopen`` (resume)."""
        _UNFINISHED.discard(self)
        self.close()

    def commit(self, *, durable: bool | None = None) -> None:
        """Close and rename into place (syncing first when durability is on). On a
        device: flush it to the medium and close; there is nothing to rename."""
        if self.in_place:
            try:
                self.flush(durable=True)
            finally:
                self.close()
            self.committed = True
            return
        try:
            self.flush(durable=_durable if durable is None else durable)
        finally:
            self.close()
        try:
            os.replace(self.tmp_path, self.target)
        except OSError as e:
            self.discard()
            raise ImageIOError.from_os(e, self.target) from None
        self.committed = True
        _UNFINISHED.discard(self)

    def discard(self) -> None:
        """Delete the temporary file. On a device written in place this only closes it:
        what was written there cannot be undone."""
        _UNFINISHED.discard(self)
        self.close()
        if not self.committed and not self.in_place:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


# Temporary outputs neither committed, discarded nor detached. A signal can land after a
# writer made its temporary file but before the operation's own clean-up is armed (in
# the writer's constructor, say); the command line discards what is left here on its
# way out, so an interrupted run never leaves a temporary file behind.
_UNFINISHED: "set[AtomicFile]" = set()


def reserve_ahead(out, limit: int | None = None) -> "ReserveAhead | None":
    """Blocks reserved ahead of the writes of a new output ``out``
    (``_fallocate.ReserveAhead``), or None where that does not apply: an upload (not
    an AtomicFile), a device written in place, O_DIRECT."""
    if not isinstance(out, AtomicFile) or out.in_place or out._direct_fd >= 0:
        return None
    from ._fallocate import ReserveAhead
    return ReserveAhead(out.fd, limit)


def _refuse_remote_target(target: str) -> None:
    """An output named by an http(s):// URL: a web server takes no writes."""
    from .remote import scheme_of
    if scheme_of(target) in ("http", "https"):
        raise UnsupportedError("not supported yet: writing to http:// (use s3:// or a"
                               " local file)", target)


def discard_unfinished() -> None:
    """Discard every temporary output of this process that was not finished."""
    for f in list(_UNFINISHED):
        f.discard()


def _create_locked(directory: str, name: str, mode: int, target: str) -> tuple[str, int]:
    """A new temporary file for ``name``, flock'ed for our whole life. A concurrent
    :func:`remove_stale` can take the lock in the instant between our create and our
    flock and delete the file: then we find it unlinked once we hold the lock, and
    start again under a new name."""
    for _ in range(8):
        tmp = os.path.join(directory, f".{name}.{os.urandom(4).hex()}{_TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as e:
            raise ImageIOError.from_os(e, target) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return tmp, fd
        except OSError as e:
            os.close(fd)
            raise ImageIOError.from_os(e, tmp) from None
        os.close(fd)
    raise ImageIOError("could not create a temporary file beside the target", target)


_STALE = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}" + re.escape(_TMP_SUFFIX) + r"\Z",
                    re.DOTALL)


def remove_stale(target: str | os.PathLike) -> list[str]:
    """Delete the temporary files an interrupted diskforge left beside ``target``
    (ours by name, and no process holds their flock), except the partial output that
    ``image --resume`` can still continue; say so on stderr, one line each. Returns
    the paths removed."""
    target = os.fspath(target)
    directory, name = os.path.split(os.path.abspath(target))
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    prefix = f".{name}."
    keep = _resumable_partial(target)
    removed = []
    for entry in entries:
        if not entry.startswith(prefix) or not entry.endswith(_TMP_SUFFIX):
            continue
        m = _STALE.match(entry)
        if m is None or m.group("name") != name:
            continue
        path = os.path.join(directory, entry)
        if keep is not None and os.path.abspath(path) == keep:
            continue
        if _remove_if_unowned(path):
            removed.append(path)
            from .errors import printable
            print(f"diskforge: removed {printable(path)}, a temporary file left by an"
                  " interrupted run", file=sys.stderr)
    return removed


def _remove_if_unowned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # its owner is alive
            raise
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced meanwhile: not the file we locked
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# The name of an interrupted image run's resume record, beside its output (written and
# read by ops/imaging.py): the partial output it names is kept for ``image --resume``.
RESUME_SUFFIX = ".resume.json"


def _resumable_partial(target: str) -> str | None:
    """The partial output ``TARGET.resume.json`` names, if there is one."""
    from .devices import open_input_file
    try:
        with open_input_file(target + RESUME_SUFFIX) as f:
            import json
            state = json.loads(f.read(1 << 20))
        partial = state["writer"]["partial"]
    except (OSError, ImageIOError, ValueError, KeyError, TypeError):
        return None
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(target)),
                                        os.path.basename(partial))) if partial else None


def _zero_device(out: FileBackend, start: int, end: int) -> None:
    """Zero ``[start, end)`` of a block device: BLKZEROOUT for the sector-aligned
    middle (the device does it, often without transferring a byte), writes for the
    unaligned edges or where the ioctl is not supported."""
    a = min(end, -(-start // 512) * 512)
    b = max(a, end // 512 * 512)
    spans = [(start, a), (b, end)]
    if b > a:
        import struct
        try:
            fcntl.ioctl(out.fd, BLKZEROOUT, struct.pack("QQ", a, b - a))
        except OSError:
            spans.append((a, b))
    for lo, hi in spans:
        FileBackend.write_zeroes(out, lo, hi - lo)


def unlink_regular(path: str) -> None:
    """Delete ``path`` when it is a regular file (a stale record of ours); anything
    else under that name (a device node, a FIFO, a directory) is left alone."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_overwrite(target: str | os.PathLike, inputs: list[str],
                     what: str = "the input") -> None:
    """Raise SafetyError when ``target`` is one of ``inputs`` (same inode, or same path)."""
    target = os.fspath(target)
    tid = _identity(target)
    treal = os.path.realpath(target)
    for src in inputs:
        if not src:
            continue
        if os.path.realpath(src) == treal or (tid is not None and _identity(src) == tid):
            raise SafetyError(f"refusing to write onto {what} ({src})", target)
