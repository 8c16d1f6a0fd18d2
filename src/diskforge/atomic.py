"""Outputs appear atomically: written beside the target under a temporary name,
flushed, then renamed into place. A failed or interrupted run leaves nothing under the
final name, and its temporary file is removed.

"Flushed" means handed to the operating system. Forcing the bytes to stable storage
(fdatasync before the rename, so the new name survives a power cut with its contents)
costs the whole write-back time — 1.5 s per GB on our CI machines — and neither
qemu-img nor cp does it by default, so it is opt-in: ``diskforge --sync``, or
``set_durable(True)`` from Python. Without it, an interrupted or failed run still leaves
nothing under the final name.

Also here: the check that refuses to write an output onto one of the inputs (the same
file, or the same inode through a symlink or a hard link).
"""

from __future__ import annotations

import os
import stat

from .blockdev import FileBackend
from .errors import ImageIOError, SafetyError


_durable = False


def set_durable(on: bool) -> None:
    """Make every later commit fdatasync before renaming (``diskforge --sync``)."""
    global _durable
    _durable = bool(on)


def final_path(target: str | os.PathLike) -> str:
    """Where the output will really live: a symlinked target is written through."""
    target = os.fspath(target)
    return os.path.realpath(target) if os.path.islink(target) else target


class AtomicFile(FileBackend):
    """A new file under a temporary name beside ``target``; ``commit()`` renames it into
    place, ``discard()`` deletes it. Usable as a context manager: an exception discards.
    """

    def __init__(self, target: str | os.PathLike, *, mode: int = 0o644):
        self.target = final_path(target)
        directory, name = os.path.split(os.path.abspath(self.target))
        if os.path.isdir(self.target):
            raise ImageIOError("is a directory; cannot write an image there", self.target)
        if not os.path.isdir(directory):
            raise ImageIOError("the directory to write into does not exist", self.target)
        tmp = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.diskforge-tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         mode)
        except OSError as e:
            raise ImageIOError.from_os(e, self.target) from None
        self.tmp_path = tmp
        self.committed = False
        super().__init__(tmp, writable=True, fd=fd)

    @classmethod
    def reopen(cls, target: str | os.PathLike, tmp_path: str) -> "AtomicFile":
        """The temporary file of an interrupted run, opened again to continue it
        (resumable imaging). It must sit beside ``target`` under our naming scheme."""
        self = cls.__new__(cls)
        self.target = final_path(target)
        directory, name = os.path.split(os.path.abspath(self.target))
        tmp_dir, tmp_name = os.path.split(os.path.abspath(tmp_path))
        if tmp_dir != directory or not (tmp_name.startswith(f".{name}.")
                                        and tmp_name.endswith(".diskforge-tmp")):
            from .errors import SafetyError
            raise SafetyError(f"'{tmp_path}' is not a partial output of this target",
                              self.target)
        try:
            fd = os.open(tmp_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ImageIOError.from_os(e, tmp_path) from None
        self.tmp_path = os.path.join(directory, tmp_name)
        self.committed = False
        FileBackend.__init__(self, self.tmp_path, writable=True, fd=fd)
        return self

    def detach(self) -> None:
        """Close, keeping the temporary file for a later ``reopen`` (resume)."""
        self.close()

    def commit(self, *, durable: bool | None = None) -> None:
        """Close and rename into place (syncing first when durability is on)."""
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

    def discard(self) -> None:
        self.close()
        if not self.committed:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


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


def is_block_device(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
