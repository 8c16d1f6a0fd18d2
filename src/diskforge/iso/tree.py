"""The shared model of an ISO's file trees: ``Entry`` (one file, directory or link) and
``Tree`` (a namespace's directories, with lookup and a bounded walk).

Why a module of its own: the ISO 9660/Joliet/Rock Ridge reader (``filesystem``), the UDF
reader (``udf``) and extraction (``extract``) all speak in these two types, and the
readers are chosen by ``filesystem``. Keeping them here, importing nothing from the
package, lets imports run one way: ``filesystem`` -> ``udf`` -> ``tree``, never back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..blockdev import BlockDevice
from ..errors import FormatError, UsageError

# Rock Ridge sets no depth limit and extraction works through directory descriptors at
# any depth (1,500 nested directories from xorriso extract under `ulimit -n 256`); the
# bound only ends a hostile chain that the visited set has not caught.
MAX_DEPTH = 4096
MAX_ENTRIES = 10_000_000

S_IFMT = 0o170000
KINDS = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink", 0o020000: "char",
         0o060000: "block", 0o010000: "fifo", 0o140000: "socket"}


@dataclass(slots=True)
class Entry:
    """One file, directory or link in a namespace."""
    name: str
    kind: str                      # dir, file, symlink, char, block, fifo, socket
    size: int = 0
    mode: int | None = None        # permission bits (0o7777) when the namespace has them
    uid: int | None = None
    gid: int | None = None
    mtime: float | None = None
    target: str | None = None      # symlink target, as recorded
    extents: tuple = ()            # file data: ((image offset | None for zeros, length),)
    node: object = None            # directories: where to read the children
    iso_name: str | None = None    # the ISO 9660 identifier behind a Rock Ridge name
    nlink: int | None = None
    interleaved: bool = False

    def to_json(self) -> dict:
        d: dict = {"name": self.name, "type": self.kind, "size": self.size}
        if self.mode is not None:
            d["mode"] = f"{self.mode:04o}"
        if self.uid is not None:
            d["uid"] = self.uid
        if self.gid is not None:
            d["gid"] = self.gid
        if self.mtime is not None:
            d["mtime"] = self.mtime
        if self.target is not None:
            d["target"] = self.target
        if self.iso_name is not None and self.iso_name != self.name:
            d["iso9660-name"] = self.iso_name
        return d


class Tree:
    """A namespace's directory tree; subclasses say how to list one directory."""

    namespace = ""
    dev: BlockDevice

    def root(self) -> Entry:
        raise NotImplementedError

    def children(self, entry: Entry) -> list[Entry]:
        raise NotImplementedError

    def key(self, entry: Entry) -> object:
        """What identifies a directory's contents (to detect loops)."""
        return entry.node

    def lookup(self, path: str) -> Entry:
        """The entry at ``path`` ("/" or "a/b")."""
        chain = self.resolve(path)
        return chain[-1] if chain else self.root()

    def resolve(self, path: str) -> list[Entry]:
        """The entries along ``path`` below the root (empty for the root). ISO 9660 and
        Joliet names also match without regard to case, as their readers do."""
        cur = self.root()
        chain: list[Entry] = []
        for comp in [c for c in path.split("/") if c and c != "."]:
            if cur.kind != "dir":
                raise UsageError(f"'{path}': '{cur.name}' is not a directory", self.dev.path)
            if len(chain) >= MAX_DEPTH:
                raise UsageError(f"'{path}' is nested too deeply", self.dev.path)
            kids = self.children(cur)
            match = next((k for k in kids if k.name == comp), None)
            if match is None and self.namespace in ("iso9660", "joliet"):
                match = next((k for k in kids if k.name.lower() == comp.lower()), None)
            if match is None:
                raise UsageError(f"no such file or directory in the ISO: {path}",
                                 self.dev.path)
            chain.append(match)
            cur = match
        return chain

    def walk(self, top: Entry, prefix: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], Entry]]:
        """Every entry under ``top`` in pre-order as (path components, entry), refusing
        loops, excessive depth and excessive entry counts."""
        visited = {self.key(top)}
        stack = [(prefix, iter(self.children(top)))]
        count = 0
        while stack:
            parts, it = stack[-1]
            child = next(it, None)
            if child is None:
                stack.pop()
                continue
            count += 1
            if count > MAX_ENTRIES:
                raise FormatError(f"more than {MAX_ENTRIES} entries", self.dev.path,
                                  structure="DirectoryRecord")
            cparts = parts + (child.name,)
            yield cparts, child
            if child.kind == "dir":
                k = self.key(child)
                if k in visited:
                    raise FormatError(f"directory loop: /{'/'.join(cparts)} leads back to a"
                                      f" directory already visited ({self._where(child)})",
                                      self.dev.path, structure="DirectoryRecord")
                visited.add(k)
                if len(stack) >= MAX_DEPTH:
                    raise FormatError(f"directories nested deeper than {MAX_DEPTH} levels",
                                      self.dev.path, structure="DirectoryRecord")
                stack.append((cparts, iter(self.children(child))))

    def _where(self, entry: Entry) -> str:
        return f"block {entry.node}"
