"""Extracting an ISO's files under a destination directory, and nowhere else.

An ISO is untrusted input: its names may be "..", contain "/", or repeat; its symlinks
may point at "/etc" or climb out with "../..". The rules here:

- Every file and directory is created relative to an open directory descriptor
  (``openat``-style ``dir_fd``), with ``O_NOFOLLOW | O_EXCL`` for files and
  ``O_NOFOLLOW | O_DIRECTORY`` for directories, so nothing is ever written through a
  symbolic link, whether the ISO made it or it was there before.
- A name that is empty, ".", "..", or holds "/" or NUL is refused.
- A symbolic link is created only when its target stays inside DEST: a relative target
  may climb with leading ".." no higher than DEST, and may not climb again once it has
  descended (so no chain of links can lead out); an absolute target is refused, or with
  ``symlinks="reroot"`` rewritten relative to DEST, or with ``symlinks="keep"`` created
  as it is (diskforge itself never follows it).
- Refused entries are skipped and reported; the rest is extracted.

The whole plan (the walk of the tree) is made before anything is written, so a
malformed ISO (a loop, a bad record) fails before DEST is touched. File data is copied
with ``copy_file_range`` straight from the image file when the device says where its
bytes live (``Extent.host_offset``), else read through the BlockDevice; ranges that
read as zeros become holes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ..blockdev import ExtentKind, FileBackend, aligned_buffer, is_zero
from ..devices import special_kind
from ..errors import FormatError, ImageIOError, UnsupportedError, UsageError
from .tree import Entry, Tree

SYMLINK_POLICIES = ("refuse", "reroot", "keep")
COPY_CHUNK = 8 << 20
MAX_OPEN_DIRS = 32   # directory descriptors held at once, whatever the tree's shape


@dataclass
class ExtractResult:
    """What extracting an ISO wrote."""
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)


def unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be a single path component, or None when it can."""
    if name in ("", ".", ".."):
        return f"the name '{name}' is not a file name"
    if "/" in name or "\0" in name:
        return "the name contains '/' or NUL"
    return None


def symlink_target(target: str, depth: int, policy: str) -> tuple[str | None, str]:
    """The target to create for a link ``depth`` directories below DEST, or None and
    the reason it is refused."""
    if "\0" in target or target == "":
        return None, "empty or NUL in the symlink target"
    if target.startswith("/"):
        if policy == "keep":
            return target, ""
        if policy == "refuse":
            return None, f"symlink to the absolute path '{target}'"
        rel = [c for c in target.split("/") if c not in ("", ".")]
        target = "/".join([".."] * depth + rel) or "."
    parts = [c for c in target.split("/") if c not in ("", ".")]
    climb = 0
    descended = False
    for c in parts:
        if c == "..":
            if descended:
                if policy == "keep":
                    return target, ""
                return None, f"symlink target '{target}' climbs back up after descending"
            climb += 1
        else:
            descended = True
    if climb > depth and policy != "keep":
        return None, f"symlink target '{target}' points outside the destination"
    return target, ""


def plan(tree: Tree, paths: list[str] | None) -> list[tuple[tuple[str, ...], Entry]]:
    """(path components under DEST, entry) for everything to extract, parents first.
    ``paths`` selects subtrees (default: everything); the directories above a selected
    path come along, so it lands at DEST/its/path as tar does. Two entries of one name
    in a directory both stay in the plan: extraction refuses the second, visibly."""
    out: list[tuple[tuple[str, ...], Entry]] = []
    chains: set[tuple[str, ...]] = set()
    selected: list[tuple[str, ...]] = []
    def depth(p: str) -> int:
        return len([c for c in p.split("/") if c and c != "."])

    for p in sorted(paths or ["/"], key=depth):   # parents before what they hold
        chain = tree.resolve(p)
        parts = tuple(e.name for e in chain)
        if any(parts[:len(s)] == s for s in selected):
            continue   # inside a subtree already selected
        selected.append(parts)
        for i, e in enumerate(chain):
            if parts[:i + 1] not in chains:
                chains.add(parts[:i + 1])
                out.append((parts[:i + 1], e))
        top = chain[-1] if chain else tree.root()
        if top.kind == "dir":
            out.extend(tree.walk(top, parts))
    if len(selected) > 1:   # one pre-order sequence (a walk is one already)
        out.sort(key=lambda item: item[0])
    return out


class _Copier:
    """Copies byte ranges of the image into an output file descriptor."""

    def __init__(self, tree: Tree):
        self.dev = tree.dev
        backend = getattr(self.dev, "backend", None)
        self.fd = backend.fd if isinstance(backend, FileBackend) else None
        self.buf = None

    def copy(self, extents: tuple, out_fd: int, progress: Callable[[int], None]) -> int:
        pos = 0
        for off, n in extents:
            if off is not None:
                if off < 0 or off + n > self.dev.size:
                    raise FormatError(f"file data at byte {off} (+{n}) is past the end of"
                                      f" the image ({self.dev.size} bytes): truncated",
                                      self.dev.path)
                self._copy_range(off, n, out_fd, pos, progress)
            else:
                progress(n)
            pos += n
        return pos

    def _copy_range(self, off: int, n: int, out_fd: int, dst: int,
                    progress: Callable[[int], None]) -> None:
        for ext in self.dev.extents(off, n):
            if ext.kind is ExtentKind.ZERO:
                progress(ext.length)
                continue
            at = dst + ext.offset - off
            if ext.kind is ExtentKind.DATA and ext.host_offset is not None \
                    and self.fd is not None and self._kernel_copy(ext.host_offset,
                                                                 ext.length, out_fd, at,
                                                                 progress):
                continue
            self._read_copy(ext.offset, ext.length, out_fd, at, progress)

    def _kernel_copy(self, src: int, n: int, out_fd: int, dst: int, progress) -> bool:
        done = 0
        while done < n:
            try:
                got = os.copy_file_range(self.fd, out_fd, min(n - done, 1 << 30),
                                         src + done, dst + done)
            except OSError as e:
                if done == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                                             errno.EINVAL):
                    return False
                raise ImageIOError.from_os(e, self.dev.path) from None
            if got == 0:
                raise FormatError(f"the image ends inside file data at byte {src + done}"
                                  ": truncated", self.dev.path)
            done += got
            progress(got)
        return True

    def _read_copy(self, off: int, n: int, out_fd: int, dst: int, progress) -> None:
        if self.buf is None:
            self.buf = aligned_buffer(COPY_CHUNK)
        raw, start = self.buf
        view = memoryview(raw)[start:start + COPY_CHUNK]
        done = 0
        while done < n:
            k = min(COPY_CHUNK, n - done)
            self.dev.readinto(off + done, view[:k])
            if not is_zero(raw, start, k):
                mv = view[:k]
                w = 0
                while w < k:
                    w += os.pwrite(out_fd, mv[w:], dst + done + w)
            done += k
            progress(k)


def extract(tree: Tree, dest: str, paths: list[str] | None = None, *,
            symlinks: str = "refuse", overwrite: bool = False, same_owner: bool = False,
            progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract ``paths`` (default: all) of ``tree`` under ``dest``. Returns counts and the
    entries refused (the caller reports them)."""
    if symlinks not in SYMLINK_POLICIES:
        raise UsageError(f"unknown symlink policy '{symlinks}'")
    items = plan(tree, paths)
    total = sum(e.size for _, e in items if e.kind == "file")
    for parts, e in items:
        if e.kind == "file" and e.interleaved:
            raise UnsupportedError(f"not supported yet: interleaved files"
                                   f" (/{'/'.join(parts)})", tree.dev.path)
    result = ExtractResult()
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    try:
        os.makedirs(dest, exist_ok=True)
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ImageIOError.from_os(e, dest) from None
    copier = _Copier(tree)
    _UMASK[0] = os.umask(0o022)   # read it (there is no other way), then put it back
    os.umask(_UMASK[0])

    def settle(fd: int, e: Entry, settled: bool) -> None:
        # a directory's attributes once everything under it is written: its mode may
        # forbid writing into it, and writing into it would change its mtime
        _apply_attrs(fd, e, same_owner, _final_mode(e, same_owner, 0o755),
                     chmod=not settled)

    stack = _DirStack(root_fd, settle, dest)
    try:
        for parts, e in items:
            shown = "/".join(parts)
            if not stack.climb_to(parts[:-1]):
                continue  # under a refused directory, or one that could not be made
            name = parts[-1]
            why = unsafe_name(name)
            if why:
                result.refused.append((shown, why))
                continue
            parent = stack.top()
            try:
                if e.kind == "dir":
                    fd, settled = _make_dir(parent, name, _final_mode(e, same_owner, 0o755))
                    stack.push(parts, fd, e, settled)
                    result.directories += 1
                elif e.kind == "file":
                    _write_file(parent, name, e, copier, overwrite, same_owner, advance)
                    result.files += 1
                    result.bytes += e.size
                elif e.kind == "symlink":
                    target, why = symlink_target(e.target or "", len(parts) - 1, symlinks)
                    if target is None:
                        result.refused.append((shown, why))
                        continue
                    _make_symlink(parent, name, target, e, overwrite)
                    result.symlinks += 1
                else:
                    result.refused.append((shown, f"{e.kind} device files are not"
                                                  " extracted"))
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                                 errno.ENAMETOOLONG):
                    reason = {errno.ELOOP: "a symbolic link is in the way",
                              errno.ENOTDIR: "something that is not a directory is in the"
                                             " way",
                              errno.EEXIST: "it already exists (use --overwrite)",
                              errno.EISDIR: "a directory is in the way",
                              errno.ENAMETOOLONG: "the name is too long"}[err.errno]
                    reason = getattr(err, "reason", reason)
                    result.refused.append((shown, reason))
                    continue
                raise ImageIOError.from_os(err, os.path.join(dest, shown)) from None
        stack.climb_to(())   # settle every directory still open, deepest first
    finally:
        stack.close()
    return result


class _DirStack:
    """The directories from DEST down to the one being filled (a plan is in pre-order,
    so that is always where the next entry goes).

    Only the deepest ``MAX_OPEN_DIRS`` keep their descriptor open: one descriptor per
    directory ran out at about 565 directories against the usual RLIMIT_NOFILE of
    1024. An ancestor whose descriptor was closed is reopened as ``..`` of its child
    when extraction climbs back to it, and must be the very directory made before
    (same device and inode), so nothing can be swapped in behind our back.
    """

    def __init__(self, root_fd: int, settle, dest: str):
        self.parts: list[tuple[str, ...]] = [()]
        self.fds: list[int | None] = [root_fd]
        self.ids = [_identity(root_fd)]
        self.attrs: list[tuple[Entry, bool] | None] = [None]
        self.low = 1          # the lowest non-root entry whose descriptor is open
        self.settle = settle
        self.dest = dest

    def top(self) -> int:
        fd = self.fds[-1]
        assert fd is not None
        return fd

    def push(self, parts: tuple[str, ...], fd: int, e: Entry, settled: bool) -> None:
        self.parts.append(parts)
        self.fds.append(fd)
        self.ids.append(_identity(fd))
        self.attrs.append((e, settled))
        if len(self.fds) - self.low > MAX_OPEN_DIRS:
            os.close(self.fds[self.low])
            self.fds[self.low] = None
            self.low += 1

    def climb_to(self, parent: tuple[str, ...]) -> bool:
        """Settle and leave directories until ``parent`` is the top; False when it is
        not on the stack (it was refused or could not be made)."""
        while len(self.parts) > 1 and self.parts[-1] != parent[:len(self.parts[-1])]:
            self._pop()
        return self.parts[-1] == parent

    def _pop(self) -> None:
        fd = self.top()
        e, settled = self.attrs[-1]
        try:
            up = len(self.fds) - 2
            if self.fds[up] is None:   # before settling: the mode may forbid search
                pfd = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                self.fds[up], self.low = pfd, up
                if _identity(pfd) != self.ids[up]:
                    raise ImageIOError("a directory was moved or replaced during"
                                       " extraction", os.path.join(self.dest,
                                                                   *self.parts[up]))
            self.settle(fd, e, settled)
        except OSError as err:
            raise ImageIOError.from_os(err, os.path.join(self.dest, *self.parts[-1])) \
                from None
        finally:
            os.close(fd)
            self.fds[-1] = None
        for stack in (self.parts, self.fds, self.ids, self.attrs):
            stack.pop()
        self.low = min(self.low, len(self.fds))

    def close(self) -> None:
        for fd in self.fds:
            if fd is not None:
                os.close(fd)
        self.fds = [None] * len(self.fds)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _make_dir(parent: int, name: str, mode: int) -> tuple[int, bool]:
    """(descriptor, whether its final mode is already set)."""
    # created with its final mode when that still lets us write into it and the umask
    # keeps it whole; else 0700 now and the mode at the end
    settled = mode & 0o7700 == 0o700 and mode & _UMASK[0] == 0
    try:
        os.mkdir(name, mode if settled else 0o700, dir_fd=parent)
    except FileExistsError:
        settled = False
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent), settled


def _write_file(parent: int, name: str, e: Entry, copier: _Copier, overwrite: bool,
                same_owner: bool, advance) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    mode = _final_mode(e, same_owner, 0o644)
    # created with its mode (permissions are checked at open only, so even a read-only
    # mode can be written through this descriptor); fchmod only when the umask or
    # set-id bits need it: each extra inode update costs a journal transaction
    create = mode & 0o777
    fd = _create(parent, name, overwrite,
                 lambda: os.open(name, flags, create, dir_fd=parent))
    try:
        copier.copy(e.extents, fd, advance)
        if os.fstat(fd).st_size != e.size:   # trailing holes (or nothing written)
            os.ftruncate(fd, e.size)
        _apply_attrs(fd, e, same_owner, mode,
                     chmod=mode != create or create & _UMASK[0] != 0)
    finally:
        os.close(fd)


def _create(parent: int, name: str, overwrite: bool, make):
    """``make()``; if the name exists and ``overwrite``, unlink it (never a directory)
    and ``make()`` again."""
    try:
        return make()
    except FileExistsError:
        if not overwrite:
            raise
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory") from None
        kind = special_kind(st.st_mode)
        if kind:  # a FIFO or device node is never written through, nor replaced
            err = FileExistsError(errno.EEXIST, "in the way")
            err.reason = f"{kind} is in the way (only regular files and links are replaced)"
            raise err from None
        os.unlink(name, dir_fd=parent)
        return make()


def _make_symlink(parent: int, name: str, target: str, e: Entry, overwrite: bool) -> None:
    _create(parent, name, overwrite, lambda: os.symlink(target, name, dir_fd=parent))
    if e.mtime is not None and os.utime in os.supports_follow_symlinks:
        try:
            os.utime(name, (e.mtime, e.mtime), dir_fd=parent, follow_symlinks=False)
        except OSError:
            pass


_UMASK = [0o022]


def _final_mode(e: Entry, same_owner: bool, default_mode: int) -> int:
    """The recorded mode, without set-id and sticky bits unless keeping owners."""
    return default_mode if e.mode is None else e.mode & (0o7777 if same_owner else 0o777)


def _apply_attrs(fd: int, e: Entry, same_owner: bool, mode: int, *,
                 chmod: bool = True) -> None:
    """Owner (only when asked and allowed), mode, and the modification time."""
    if same_owner and e.uid is not None and e.gid is not None:
        try:
            os.fchown(fd, e.uid, e.gid)
        except PermissionError:
            pass
    if chmod:
        os.fchmod(fd, mode)
    if e.mtime is not None:
        try:
            os.utime(fd, (e.mtime, e.mtime))
        except (OSError, OverflowError, ValueError):
            pass

