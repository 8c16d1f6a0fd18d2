"""QEMU's image locks: the byte-range locks that keep two programs from writing (or one
from reading while another writes) the same image file.

Why: a VM, ``qemu-nbd`` or ``qemu-img`` that has an image open announces it with OFD
byte-range locks on the image file, and refuses to open a file whose locks say someone
else is writing it. diskforge takes and checks the same locks, so neither side changes
an image under the other's feet (``diskforge resize`` of a live VM's disk, or
``qemu-img resize`` of a disk ``diskforge serve`` exports, are refused).

The protocol, as QEMU 7.2's ``block/file-posix.c`` implements it (facts taken from
there, code our own). There are four permissions (``include/block/block-common.h``):
consistent read (0x1), write (0x2), write unchanged (0x4) and resize (0x8). A holder
takes a *shared* (F_RDLCK) open-file-description lock on byte ``100 + bit`` for each
permission it holds (``raw_apply_lock_bytes``) and on byte ``200 + bit`` for each
permission it does not let others have. Before going ahead it tests (F_OFD_GETLK,
asking for an exclusive lock) byte ``200 + bit`` for each permission it wants (someone
refuses to share it: ``Failed to get "write" lock``) and byte ``100 + bit`` for each it
refuses to share (someone holds it: ``Failed to get shared "write" lock``), in that
order (``raw_check_lock_bytes``). Shared locks never conflict with each other, so only
the tests can fail. OFD locks belong to the open file description, so they last while
it is open, and closing it (or the process dying) drops them.

Which permissions each open takes, as ``qemu-img`` takes them (checked with strace
against qemu-img 7.2 and with /proc/locks against qemu-nbd):

- a reader (info, map, check, compare, convert's source, a backing file): consistent
  read, and others may not write or resize (:data:`READER`). With ``-U``
  (``OpenPolicy(force_share=True)``) everything is shared (:data:`SHARED_READER`);
  qemu-img refuses ``-U`` with a write, and so does diskforge, with its message.
- a writer (resize, commit, snapshot -c, amend, rebase, check -r, a writable export):
  consistent read, write and resize; a format with metadata (qcow2, VHD, VHDX...) lets
  nobody else write or resize (:data:`WRITER`), the raw driver shares everything
  (:data:`RAW_WRITER`), as QEMU's format drivers do.
- a glance that needs no consistency (probing the first and last 64 KiB) takes none.

Where diskforge differs: qemu-img's info, map, check and compare of a *raw* file share
writes (its raw driver passes its parent's sharing through) while its convert does not;
diskforge's readers never share writes, whatever the format, because a disk changing
under a read gives a torn result; ``-U`` says that is acceptable. ``info`` takes
consistent read although qemu-img's (which reads no data) takes none; nobody refuses to
share consistent read, so this never changes an answer. And diskforge's ``info`` opens
the backing chain (it shows the composed disk's partition table), so a backing file
someone writes stops it where qemu-img's (which opens no backing file) goes on.

Inside one process, QEMU decides conflicts between its own users of a file in its block
graph, not with locks. diskforge does the same: all its opens of one file (one inode)
share one lock holder, a duplicate of the first descriptor, whose locks are the union
of what every open needs, and its own opens never refuse each other (``commit`` reads
the chain and writes the base at once). Other processes see the union.

A file system that cannot lock (F_OFD_SETLK fails with something other than a
conflict) fails the open with QEMU's ``Failed to lock byte N`` message, as QEMU does.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import struct
import threading

from .errors import ImageIOError, SafetyError
from .records import FrozenRecord

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL = 0x0F
PERMISSIONS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)
# bdrv_perm_names(): the names qemu-img's messages use
NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write",
         WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}
PERM_BASE = 100    # RAW_LOCK_PERM_BASE: byte 100+bit while holding the permission
SHARED_BASE = 200  # RAW_LOCK_SHARED_BASE: byte 200+bit while not sharing it

FORCE_SHARE_WRITE = "force-share=on can only be used with read-only images"


class Access(FrozenRecord):
    """What one open holds (``perm``) and what it lets other users do (``shared``)."""
    __slots__ = ("perm", "shared")

    def __init__(self, perm: int, shared: int):
        self.perm = perm
        self.shared = shared


READER = Access(CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED)
SHARED_READER = Access(CONSISTENT_READ, ALL)
WRITER = Access(CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
RAW_WRITER = Access(CONSISTENT_READ | WRITE | RESIZE, ALL)


class ImageLockedError(SafetyError):
    """Another process holds the image in a way this open cannot share (qemu-img's
    "Failed to get ... lock. Is another process using the image?")."""


# -- which access an open gets --------------------------------------------------------

_force_share: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "diskforge_force_share", default=False)


@contextlib.contextmanager
def force_share(on: bool):
    """Read-only files opened inside this block share everything (``-U``).
    ``registry.open_image`` sets it from ``OpenPolicy.force_share`` around the whole
    open, backing chain included, so format plugins need not know about locks."""
    token = _force_share.set(bool(on))
    try:
        yield
    finally:
        _force_share.reset(token)


def access_for(writable: bool, *, shares_writes: bool = False) -> Access:
    """The access an open gets: see the module docstring. ``shares_writes`` is the raw
    driver's way (other writers are let in)."""
    if writable:
        return RAW_WRITER if shares_writes else WRITER
    return SHARED_READER if _force_share.get() else READER


# -- the locks themselves ---------------------------------------------------------------

_FLOCK = struct.Struct("hhqqi")  # struct flock: l_type, l_whence, l_start, l_len, l_pid
_FLOCK_SIZE = -(-_FLOCK.size // 8) * 8  # with the C struct's tail padding


def _fcntl(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One F_OFD_SETLK/F_OFD_GETLK on one byte; returns the l_type the kernel answers
    (F_UNLCK from GETLK: nobody conflicts). OFD locks need l_pid = 0."""
    import fcntl
    arg = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0).ljust(_FLOCK_SIZE, b"\0")
    out = fcntl.fcntl(fd, cmd, arg)
    return _FLOCK.unpack_from(out)[0]


def _bits(mask: int):
    return (p for p in PERMISSIONS if mask & p)


def _set_bytes(fd: int, want: set[int], have: set[int], path: str) -> None:
    """Take shared locks on the bytes in ``want`` not yet in ``have``; release those in
    ``have`` no longer wanted. ``have`` is updated as locks are really taken."""
    import fcntl
    for off in sorted(want - have):
        try:
            _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, off)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                # someone holds an exclusive lock on our byte (QEMU never does)
                raise ImageLockedError(f"Failed to lock byte {off}. Is another process"
                                       f" using the image [{path}]?", path) from None
            raise ImageIOError(f"Failed to lock byte {off}: {e.strerror}", path) from None
        have.add(off)
    for off in sorted(have - want):
        try:
            _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, off)
        except OSError:
            pass  # as QEMU: unlocking is best effort
        have.discard(off)


def _check(fd: int, access: Access, path: str) -> None:
    """raw_check_lock_bytes: raise on the first conflict with another process."""
    import fcntl
    tests = [(SHARED_BASE, p, 'Failed to get "{}" lock') for p in _bits(access.perm)]
    tests += [(PERM_BASE, p, 'Failed to get shared "{}" lock')
              for p in _bits(ALL & ~access.shared)]
    for base, p, text in tests:
        off = base + PERMISSIONS.index(p)
        try:
            held = _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, off) != fcntl.F_UNLCK
        except OSError as e:
            raise ImageIOError(text.format(NAMES[p]) + f": {e.strerror}", path) from None
        if held:
            raise ImageLockedError(text.format(NAMES[p]) + ". Is another process using"
                                   f" the image [{path}]?", path)


def _wanted(accesses) -> set[int]:
    perm, shared = 0, ALL
    for a in accesses:
        perm |= a.perm
        shared &= a.shared
    return ({PERM_BASE + PERMISSIONS.index(p) for p in _bits(perm)}
            | {SHARED_BASE + PERMISSIONS.index(p) for p in _bits(ALL & ~shared)})


class _File:
    """This process's lock holder for one inode: a duplicate descriptor (so the locks
    outlive whichever open came first) and the accesses of every open of the file."""

    def __init__(self, fd: int):
        self.fd = os.dup(fd)  # not inheritable: QEMU and other children never get it
        self.accesses: list[Access] = []
        self.locked: set[int] = set()


_files: dict[tuple[int, int], _File] = {}
_mutex = threading.Lock()


class Hold:
    """One open's share of a file's locks; ``release()`` gives it back (idempotent)."""

    def __init__(self, key: tuple[int, int], access: Access):
        self.key = key
        self.access = access
        self.released = False

    def release(self) -> None:
        with _mutex:
            if self.released:
                return
            self.released = True
            holder = _files.get(self.key)
            if holder is None:
                return
            holder.accesses.remove(self.access)
            if not holder.accesses:
                del _files[self.key]
                os.close(holder.fd)  # the last reference: the kernel drops the locks
                return
            try:
                _set_bytes(holder.fd, _wanted(holder.accesses), holder.locked, "")
            except Exception:
                pass  # only releases happen here; best effort, as QEMU


def acquire(fd: int, path: str, access: Access | None) -> Hold | None:
    """Take ``access``'s locks on the file open as ``fd`` (named ``path`` in messages)
    and check that no other process conflicts; raise :class:`ImageLockedError` (with
    qemu-img's message) and hold nothing when one does. None takes no locks."""
    if access is None:
        return None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _mutex:
        holder = _files.get(key)
        new = holder is None
        if new:
            holder = _File(fd)
        wanted = _wanted(holder.accesses + [access])
        before = set(holder.locked)
        try:
            _set_bytes(holder.fd, wanted, holder.locked, path)
            _check(holder.fd, access, path)
        except BaseException:
            _undo(holder, before, new)
            raise
        holder.accesses.append(access)
        if new:
            _files[key] = holder
        return Hold(key, access)


def _undo(holder: _File, before: set[int], new: bool) -> None:
    """Back to the locks held before a failed acquire (RAW_PL_ABORT)."""
    if new:
        os.close(holder.fd)
        return
    try:
        _set_bytes(holder.fd, before, holder.locked, "")
    except Exception:
        pass
