"""Building an ISO from a directory: ``diskforge iso build SRC_DIR OUT.iso``.

pycdlib does the mastering (volume descriptors, path tables, directory records, Rock
Ridge, Joliet, UDF, the El Torito catalog and boot info table); this module decides
what goes in and how it is named, and writes the result:

- **Names.** Rock Ridge keeps the real names; ISO 9660, Joliet and UDF names are
  translated per directory by ``names`` (unique after truncation).
- **Defaults** (documented in ``formats/iso.md``): ISO 9660 level 3, Rock Ridge 1.09 and
  Joliet on, UDF off. Level 3 is what lets files over 4 GiB in (as multi-extent files,
  like ``xorriso -iso-level 3``); Rock Ridge and Joliet carry long names; Rock Ridge
  relocates directories nested deeper than ISO 9660's eight levels.
- **Dates.** pycdlib takes every timestamp from ``time.time()`` and renders it with
  ``time.localtime``. While building, its modules see a clock that we set before each
  file is added, so directory records, Rock Ridge TF and UDF entries get the source
  file's mtime, everything is written in UTC (no dependence on TZ), and the volume
  dates are "now" — or ``SOURCE_DATE_EPOCH``, which also clamps newer file dates and
  seeds the UDF unique ids, so two builds of one tree are byte-identical.
- **Memory** follows the directory listing: pycdlib is given file *paths*; the data is
  copied at the end, file by file, with ``copy_file_range`` (in the kernel; a reflink
  where the file system can), from the offsets pycdlib assigned.
- **Boot.** El Torito BIOS no-emulation (load size 4, boot info table, as isolinux
  wants) and/or a UEFI entry (platform 0xEF) for an EFI system partition image; with
  ``hybrid``, an MBR (``hybrid.py``) so the same image boots from a USB stick.
- Output is atomic (``AtomicFile``); a file that changes size while it is being copied
  is an error, not a silently inconsistent ISO.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import sys
import threading
import time as _time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..atomic import AtomicFile, refuse_overwrite
from ..blockdev import BlockDevice, FileBackend
from ..devices import open_input_file
from ..errors import DiskforgeError, ImageIOError, UnsupportedError, UsageError
from . import hybrid
from .names import iso9660_names, joliet_names, udf_names

MAX_DATE = 4102444800          # 2100-01-01: ISO 9660 dates end in 2155; stay well inside
CATALOG_NAME = "boot.cat"
RR_MOVED = "RR_MOVED"          # where pycdlib relocates deep directories


@dataclass
class BuildOptions:
    """What ``diskforge iso build`` can be asked for (the CLI flags map 1:1)."""
    level: int = 3
    joliet: bool = True
    rock_ridge: bool = True
    udf: bool = False
    rational_rock: bool = False      # uid/gid 0 and tidy modes, like mkisofs -r
    follow_symlinks: bool = False
    volume_id: str = "CDROM"
    system_id: str = "LINUX"
    volume_set_id: str = ""
    publisher: str = ""
    preparer: str = ""
    application: str = "DISKFORGE"
    boot: str | None = None           # BIOS no-emulation image, a path inside SRC_DIR
    boot_load_size: int = 4
    boot_info_table: bool = True
    boot_catalog: str | None = None   # path inside the ISO (default: beside the image)
    efi_boot: str | None = None       # EFI system partition image, a path inside SRC_DIR
    hybrid: bool = False
    hybrid_mbr: str | None = None     # default: syslinux's isohdpfx.bin
    source_date_epoch: int | None = None

    def validate(self) -> None:
        if self.level not in (1, 2, 3, 4):
            raise UsageError(f"ISO 9660 level {self.level}: use 1, 2, 3 or 4")
        for what, value, limit in (("volume id", self.volume_id, 32),
                                   ("system id", self.system_id, 32),
                                   ("volume set id", self.volume_set_id, 128),
                                   ("publisher", self.publisher, 128),
                                   ("preparer", self.preparer, 128),
                                   ("application", self.application, 128)):
            if len(value.encode("utf-8")) > limit:
                raise UsageError(f"the {what} is limited to {limit} bytes: '{value}'")
            if any(ord(c) < 32 for c in value):
                raise UsageError(f"the {what} contains control characters")
        if self.udf:
            try:
                fits = len(self.volume_id.encode("latin-1")) <= 30
            except UnicodeEncodeError:
                fits = len(self.volume_id) <= 15
            if not fits:
                raise UsageError(f"the volume id '{self.volume_id}' is too long for UDF"
                                 " (30 Latin-1 or 15 other characters)")
        if not 1 <= self.boot_load_size <= 0xFFFF:
            raise UsageError("the boot load size is 1 to 65535 sectors of 512 bytes")
        if self.hybrid and not (self.boot or self.efi_boot):
            raise UsageError("a hybrid image needs a boot image (--boot and/or --efi-boot)")
        if self.source_date_epoch is not None and not \
                0 <= self.source_date_epoch <= MAX_DATE:
            raise UsageError(f"SOURCE_DATE_EPOCH {self.source_date_epoch} is out of range")


@dataclass
class BuildResult:
    """What building an ISO wrote."""
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    size: int = 0
    warnings: list[str] = field(default_factory=list)


def source_date_epoch_from_env() -> int | None:
    """``SOURCE_DATE_EPOCH`` as reproducible-builds.org defines it (None when unset)."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH='{value}' is not a whole number of seconds")\
            from None


# -- pycdlib's clock ----------------------------------------------------------------------

class _Clock:
    """Stands in for the ``time`` module inside pycdlib while it builds: ``time()``
    returns what we set, ``localtime`` is UTC (memoised: pycdlib asks for the same few
    dates thousands of times)."""

    def __init__(self, now: float):
        self.now = now
        self._memo: dict[float, _time.struct_time] = {}

    def time(self) -> float:
        return self.now

    def localtime(self, t: float | None = None):
        t = self.now if t is None else t
        tm = self._memo.get(t)
        if tm is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            tm = self._memo[t] = _time.gmtime(t)
        return tm

    def __getattr__(self, name: str):
        return getattr(_time, name)


_lock = threading.Lock()


class _PycdlibContext:
    """Patches pycdlib's module globals for the duration of a build: the clock, a
    seeded random source (UDF unique ids), and identifier padding that cuts text to fit
    a Joliet (UCS-2) field and folds non-ASCII to "_" in an ISO 9660 one, instead of
    failing. One build at a time (a lock); restored on exit."""

    def __init__(self, now: float, seed: int | None):
        import random

        import pycdlib.dates
        import pycdlib.headervd
        import pycdlib.pycdlib
        import pycdlib.udf
        import pycdlib.utils
        self.clock = _Clock(now)
        self.modules = [pycdlib.dates, pycdlib.headervd, pycdlib.pycdlib, pycdlib.udf,
                        pycdlib.utils]
        self.utils = pycdlib.utils
        self.udf = pycdlib.udf
        self.rng = random.Random(seed) if seed is not None else random.Random()
        self.saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "_PycdlibContext":
        _lock.acquire()
        try:
            for mod in self.modules:
                self._patch(mod, "time", self.clock)
            self._patch(self.udf, "random", self.rng)
            real_pad = self.utils.encode_space_pad

            def pad(instr: bytes, length: int, encoding: str) -> bytes:
                text = instr.decode("utf-8")
                if encoding == "ascii":
                    text = "".join(c if ord(c) < 128 else "_" for c in text)
                while len(text.encode(encoding, "surrogatepass")) > length and text:
                    text = text[:-1]
                return real_pad(text.encode("utf-8"), length, encoding)
            self._patch(self.utils, "encode_space_pad", pad)
            # every date is UTC here (localtime is gmtime): the offset is always zero
            self._patch(self.utils, "gmtoffset_from_tm", lambda tm, localtime: 0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _patch(self, mod, name: str, value) -> None:
        self.saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    def __exit__(self, *exc) -> None:
        for mod, name, value in reversed(self.saved):
            setattr(mod, name, value)
        self.saved.clear()
        _lock.release()


# -- the walk -----------------------------------------------------------------------------

@dataclass
class _Dir:
    """A directory met in the walk, with its names in each namespace."""
    rel: str          # path under SRC_DIR ("" for the top)
    path: str         # absolute path on disk
    iso: str          # its ISO 9660 path ("/" for the root)
    joliet: str
    udf: str
    ancestors: frozenset = frozenset()   # (st_dev, st_ino) of it and the dirs above


def _join(parent: str, name: str) -> str:
    return ("" if parent == "/" else parent) + "/" + name


def _relative(path: str) -> str:
    """A path inside SRC_DIR or the ISO, spelled one way ("a/b": no ".", no "//")."""
    return "/".join(c for c in path.split("/") if c and c != ".")


class _Builder:
    def __init__(self, src: str, out: str, opts: BuildOptions,
                 warn: Callable[[str], None]):
        self.src = src
        try:
            st = os.stat(out)
            self.out_id: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            self.out_id = None
        self.opts = opts
        self.warn = warn
        self.result = BuildResult()
        self.boot_paths: dict[str, str] = {}   # SRC-relative path → ISO 9660 path
        self.wanted = {p for p in (opts.boot, opts.efi_boot) if p}
        self.catalog = self.catalog_dir = self.catalog_name = None
        if self.wanted:
            cat = opts.boot_catalog
            if cat is None:
                image = opts.boot or opts.efi_boot or ""
                cat = "/".join(image.split("/")[:-1] + [CATALOG_NAME])
            self.catalog = _relative(cat)
            self.catalog_dir, _, self.catalog_name = self.catalog.rpartition("/")
        self.catalog_paths: dict[str, str | None] = {}
        self.dirs: set[str] = {""}
        self.volume_time = 0.0

    def fail(self, rel: str, e: Exception) -> DiskforgeError:
        msg = str(e)
        if "too deep" in msg:
            return UsageError(f"'{rel}' is nested deeper than the 8 levels ISO 9660 allows;"
                              " keep Rock Ridge on (it relocates deep directories) or use"
                              " --level 4", self.src)
        return UsageError(f"cannot add '{rel}' to the ISO: {msg}", self.src)

    def mtime(self, st: os.stat_result) -> float:
        t = min(max(st.st_mtime, 0.0), float(MAX_DATE))
        sde = self.opts.source_date_epoch
        if sde is not None:
            t = min(t, float(sde))
        return float(int(t))

    def mode(self, st: os.stat_result) -> int:
        m = st.st_mode
        if not self.opts.rational_rock:
            return m
        if stat.S_ISDIR(m):
            return stat.S_IFDIR | 0o555
        if stat.S_ISLNK(m):
            return m
        x = 0o111 if m & 0o111 else 0
        return stat.S_IFMT(m) | 0o444 | x

    def run(self, iso, ctx: _PycdlibContext) -> None:
        root_st = os.stat(self.src)
        stack = [_Dir("", self.src, "/", "/", "/",
                      frozenset({(root_st.st_dev, root_st.st_ino)}))]
        while stack:
            d = stack.pop()
            subdirs = self.add_children(iso, ctx, d)
            stack.extend(reversed(subdirs))
        missing = [p for p in self.wanted if p not in self.boot_paths]
        if missing:
            raise UsageError(f"the boot image '{missing[0]}' is not a regular file in the"
                             " source directory", self.src)
        if self.catalog is not None and self.catalog_dir not in self.dirs:
            raise UsageError(f"the boot catalog's directory '{self.catalog_dir}' is not in"
                             " the source directory", self.src)
        self.add_boot(iso, ctx)

    def add_children(self, iso, ctx: _PycdlibContext, d: _Dir) -> list[_Dir]:
        opts = self.opts
        try:
            with os.scandir(d.path) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            raise ImageIOError.from_os(e, d.path) from None
        items = []   # (entry, stat, kind)
        for e in entries:
            rel = f"{d.rel}/{e.name}" if d.rel else e.name
            try:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) and opts.follow_symlinks:
                    st = os.stat(e.path)
            except OSError as err:
                self.warn(f"skipped '{rel}': {err.strerror}")
                continue
            if self.out_id == (st.st_dev, st.st_ino):
                continue  # the output itself, from an earlier run
            if any("\udc80" <= c <= "\udcff" for c in e.name):
                raise UsageError(f"the file name '{rel!r}' is not valid UTF-8", self.src)
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISREG(st.st_mode):
                kind = "file"
            elif stat.S_ISLNK(st.st_mode):
                kind = "symlink"
                if not (opts.rock_ridge or opts.udf):
                    self.warn(f"skipped the symlink '{rel}': symlinks need Rock Ridge or"
                              " UDF (or --follow-symlinks)")
                    continue
            else:
                self.warn(f"skipped '{rel}': device files, FIFOs and sockets are not"
                          " supported")
                continue
            items.append((e, st, kind, rel))
        reserved_iso, reserved_j = set(), set()
        if d.rel == self.catalog_dir:
            if any(e.name == self.catalog_name for e, _, _, _ in items):
                raise UsageError(f"'{self.catalog}' exists in the source directory; choose"
                                 " another --boot-catalog", self.src)
            reserved_iso |= set(iso9660_names([(self.catalog_name, False)],
                                              opts.level).values())
            reserved_j.add(self.catalog_name)
        if d.rel == "" and opts.rock_ridge:
            reserved_iso.add(RR_MOVED)
        pairs = [(e.name, k == "dir") for e, _, k, _ in items]
        isonames = iso9660_names(pairs, opts.level, reserved_iso)
        jnames = joliet_names([n for n, _ in pairs], reserved_j) if opts.joliet else {}
        unames = udf_names([n for n, _ in pairs], reserved_j) if opts.udf else {}
        if d.rel == self.catalog_dir:
            self.catalog_paths = {
                "iso": _join(d.iso, iso9660_names([(self.catalog_name, False)], opts.level,
                                                  set(isonames.values()))[self.catalog_name]),
                "rr": self.catalog_name,
                "joliet": _join(d.joliet, self.catalog_name) if opts.joliet else None,
                "udf": _join(d.udf, self.catalog_name) if opts.udf else None}
        subdirs = []
        for e, st, kind, rel in items:
            isop = _join(d.iso, isonames[e.name])
            jp = _join(d.joliet, jnames[e.name]) if opts.joliet else None
            up = _join(d.udf, unames[e.name]) if opts.udf else None
            rr = e.name if opts.rock_ridge else None
            ctx.clock.now = self.mtime(st)
            try:
                if kind == "dir":
                    key = (st.st_dev, st.st_ino)
                    if key in d.ancestors:
                        self.warn(f"skipped '{rel}': a symlink loop (it leads back to a"
                                  " directory above it)")
                        continue
                    iso.add_directory(isop, rr_name=rr, joliet_path=jp, udf_path=up,
                                      file_mode=self.mode(st) if opts.rock_ridge else None)
                    self.set_owner(iso, isop, st)
                    self.result.directories += 1
                    self.dirs.add(rel)
                    subdirs.append(_Dir(rel, e.path if not opts.follow_symlinks
                                        else os.path.realpath(e.path), isop, jp, up,
                                        d.ancestors | {key}))
                elif kind == "file":
                    if st.st_size >= 1 << 32 and opts.level < 3:
                        raise UsageError(f"'{rel}' is {st.st_size} bytes: files of 4 GiB"
                                         " or more need --level 3 or 4", self.src)
                    path = os.path.realpath(e.path) if opts.follow_symlinks else e.path
                    iso.add_file(path, isop, rr_name=rr, joliet_path=jp, udf_path=up,
                                 file_mode=self.mode(st) if opts.rock_ridge else None)
                    self.set_owner_inode(iso.inodes[-1], st)
                    self.result.files += 1
                    self.result.bytes += st.st_size
                    if rel in self.wanted:
                        self.boot_paths[rel] = isop
                else:
                    target = os.readlink(e.path)
                    kw = {}
                    if opts.rock_ridge:
                        kw.update(symlink_path=isop, rr_symlink_name=rr, rr_path=target)
                    if opts.udf and not opts.rock_ridge:
                        # only where UDF is the sole carrier: 7-Zip refuses a whole UDF
                        # tree that holds a symlink (file type 12)
                        kw.update(udf_symlink_path=up, udf_target=target)
                    iso.add_symlink(**kw)
                    if opts.rock_ridge:
                        self.set_owner(iso, isop, st)
                    self.result.symlinks += 1
            except DiskforgeError:
                raise
            except Exception as err:  # pycdlib's exceptions: one line naming the file
                if not _is_pycdlib_error(err):
                    raise
                raise self.fail(rel, err) from None
        return subdirs

    def set_owner(self, iso, isop: str, st: os.stat_result) -> None:
        if not self.opts.rock_ridge or self.opts.rational_rock or not (st.st_uid or st.st_gid):
            return
        rec = iso.get_record(iso_path=isop)
        _set_px(rec, st)

    def set_owner_inode(self, ino, st: os.stat_result) -> None:
        if not self.opts.rock_ridge or self.opts.rational_rock or not (st.st_uid or st.st_gid):
            return
        for rec, _ in ino.linked_records:
            _set_px(rec, st)

    def add_boot(self, iso, ctx: _PycdlibContext) -> None:
        opts = self.opts
        if not (opts.boot or opts.efi_boot):
            return
        cat = self.catalog_paths
        common = {"bootcatfile": cat["iso"], "rr_bootcatname": cat["rr"] if opts.rock_ridge
                  else None, "joliet_bootcatfile": cat["joliet"],
                  "udf_bootcatfile": cat["udf"]}
        ctx.clock.now = self.volume_time
        try:
            if opts.boot:
                if opts.hybrid:
                    with open_input_file(os.path.join(self.src, opts.boot)) as f:
                        head = f.read(0x44)
                    if head[0x40:0x44] != hybrid.ISOLINUX_HYBRID_SIGNATURE:
                        raise UsageError(f"'{opts.boot}' is not a hybrid-capable"
                                         " isolinux.bin (no signature at offset 0x40), so a"
                                         " hybrid MBR cannot start it", self.src)
                iso.add_eltorito(self.boot_paths[opts.boot], boot_load_size=opts.boot_load_size,
                                 boot_info_table=opts.boot_info_table, media_name="noemul",
                                 **common)
            if opts.efi_boot:
                size = os.stat(os.path.join(self.src, opts.efi_boot)).st_size
                sectors = -(-size // 512)
                load = sectors if sectors <= 0xFFFF else 0  # 0: "to the end", as EDK2 reads it
                if opts.boot:
                    iso.add_eltorito(self.boot_paths[opts.efi_boot], boot_load_size=load,
                                     efi=True, media_name="noemul", **common)
                else:
                    iso.add_eltorito(self.boot_paths[opts.efi_boot], boot_load_size=load,
                                     platform_id=0xEF, media_name="noemul", **common)
        except DiskforgeError:
            raise
        except Exception as err:
            if not _is_pycdlib_error(err):
                raise
            raise UsageError(f"cannot add the El Torito boot entries: {err}", self.src)\
                from None


def _set_px(rec, st: os.stat_result) -> None:
    rr = getattr(rec, "rock_ridge", None)
    if rr is None:
        return
    for entries in (rr.dr_entries, rr.ce_entries):
        px = getattr(entries, "px_record", None) if entries is not None else None
        if px is not None:
            px.posix_user_id = st.st_uid & 0xFFFFFFFF
            px.posix_group_id = st.st_gid & 0xFFFFFFFF


def _is_pycdlib_error(err: Exception) -> bool:
    return type(err).__module__.startswith("pycdlib")


# -- writing ------------------------------------------------------------------------------

def _write(iso, out: AtomicFile, progress: Callable[[int, int], None] | None) -> None:
    """pycdlib writes the metadata; the file data is copied here, in the kernel.

    This uses pycdlib internals (``_reshuffle_extents``, ``inodes``, ``Inode.data_fp``)
    when they are there, and pycdlib's own user-space copy when they are not.
    """
    fp = os.fdopen(os.dup(out.fd), "r+b", buffering=1 << 20)
    try:
        if not all(hasattr(iso, a) for a in ("_reshuffle_extents", "_needs_reshuffle",
                                              "inodes")):
            iso.write_fp(fp, blocksize=1 << 20, progress_cb=None if progress is None
                         else lambda done, total: progress(done, total))
            return
        if iso._needs_reshuffle:
            iso._reshuffle_extents()
            iso._needs_reshuffle = False
        # ours: plain files pycdlib would copy from a path; the boot image (its boot
        # info table is patched in as it is written) stays with pycdlib
        ours = [ino for ino in iso.inodes
                if getattr(ino, "manage_fp", False) and ino.boot_info_table is None
                and isinstance(ino.data_fp, str) and ino.get_data_length() > 0]
        mine = {id(i) for i in ours}
        data_total = sum(i.get_data_length() for i in ours)
        totals = [0]

        def meta_progress(done: int, total: int) -> None:
            totals[0] = total
            if progress is not None:
                progress(min(done, max(total - data_total, 0)), total)

        saved = iso.inodes
        iso.inodes = [i for i in saved if id(i) not in mine]
        try:
            iso.write_fp(fp, blocksize=1 << 20, progress_cb=meta_progress)
        finally:
            iso.inodes = saved
        fp.flush()
        total = totals[0]
        done = max(total - data_total, 0)
        bs = iso.logical_block_size
        for ino in ours:
            n = ino.get_data_length()
            _copy_file(ino.data_fp, out.fd, ino.extent_location() * bs, n)
            done += n
            if progress is not None:
                progress(min(done, total), total)
    finally:
        fp.close()


def _copy_file(path: str, out_fd: int, offset: int, length: int) -> None:
    """Copy a source file's ``length`` bytes to ``offset`` of the output: its data
    ranges with ``copy_file_range``, its holes left as holes (the output is a fresh
    sparse file there)."""
    src = FileBackend(path)
    try:
        for start, n, is_data in src.data_ranges(0, length):
            if is_data:
                _copy_range(src.fd, path, out_fd, start, offset + start, n)
        size = src.size
        if size != length:
            raise ImageIOError(f"the file changed size while the ISO was being built"
                               f" ({length} → {size} bytes)", path)
    finally:
        src.close()


def _copy_range(fd: int, path: str, out_fd: int, src: int, dst: int, length: int) -> None:
    done = 0
    use_kernel = True
    while done < length:
        n = length - done
        if use_kernel:
            try:
                got = os.copy_file_range(fd, out_fd, min(n, 1 << 30), src + done, dst + done)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    use_kernel = False
                    continue
                raise ImageIOError.from_os(e, path) from None
        else:
            data = os.pread(fd, min(n, 8 << 20), src + done)
            got = len(data)
            if got:
                os.pwrite(out_fd, data, dst + done)
        if got == 0:
            raise ImageIOError(f"the file shrank while the ISO was being built (it ends"
                               f" before byte {src + done + 1} of {src + length})", path)
        done += got


def build(src: str, out: str, options: BuildOptions | None = None, *,
          progress: Callable[[int, int], None] | None = None,
          warn: Callable[[str], None] | None = None) -> BuildResult:
    """Build ``out`` from the directory ``src``. Warnings (skipped files) go to ``warn``
    (default: stderr) and into the result."""
    opts = options or BuildOptions()
    opts.validate()
    src = os.fspath(src)
    out = os.fspath(out)
    if not os.path.isdir(src):
        raise ImageIOError("not a directory" if os.path.exists(src) else "no such directory",
                           src)
    for p in (opts.boot, opts.efi_boot, opts.boot_catalog):
        if p and (p.startswith("/") or ".." in p.split("/")):
            raise UsageError(f"boot images and the catalog are named relative to the"
                             f" source directory: '{p}'")
    opts = dataclasses.replace(opts, boot=_relative(opts.boot) if opts.boot else None,
                               efi_boot=_relative(opts.efi_boot) if opts.efi_boot else None)
    mbr_code = b""
    if opts.hybrid and opts.boot:
        mbr_path = opts.hybrid_mbr or hybrid.default_mbr()
        if mbr_path is None:
            raise UnsupportedError("no hybrid MBR: install syslinux's isohdpfx.bin (Debian:"
                                   " isolinux) or give --hybrid-mbr FILE")
        try:
            with open_input_file(mbr_path) as f:
                mbr_code = f.read(512)
        except OSError as e:
            raise ImageIOError.from_os(e, mbr_path) from None
        if len(mbr_code) < 432:
            raise UsageError(f"the hybrid MBR must hold at least 432 bytes of boot code"
                             f" ({len(mbr_code)} here)", mbr_path)
    refuse_overwrite(out, [src], "the source directory")
    import pycdlib

    result_messages: list[str] = []

    def note(msg: str) -> None:
        result_messages.append(msg)
        (warn or (lambda m: print(f"diskforge: warning: {m}", file=sys.stderr)))(msg)

    sde = opts.source_date_epoch
    volume_time = float(sde) if sde is not None else float(int(_time.time()))
    builder = _Builder(src, out, opts, note)
    builder.volume_time = volume_time
    with _PycdlibContext(volume_time, sde) as ctx:
        iso = pycdlib.PyCdlib()
        try:
            iso.new(interchange_level=opts.level, sys_ident=opts.system_id,
                    vol_ident=opts.volume_id, vol_set_ident=opts.volume_set_id or " ",
                    pub_ident_str=opts.publisher, preparer_ident_str=opts.preparer,
                    app_ident_str=opts.application or " ",
                    joliet=3 if opts.joliet else None,
                    rock_ridge="1.09" if opts.rock_ridge else None,
                    udf="2.60" if opts.udf else None)
        except Exception as err:
            if not _is_pycdlib_error(err):
                raise
            raise UsageError(f"cannot start the ISO: {err}") from None
        try:
            builder.run(iso, ctx)
            ctx.clock.now = volume_time
            target = AtomicFile(out)
            try:
                if target.in_place:  # a block device: refuse up front when too small
                    planned = _planned_size(iso)  # (and room for the hybrid padding)
                    target.truncate(hybrid.padded_size(planned) if opts.hybrid
                                    else planned)
                    target.truncate(planned)
                _write(iso, target, progress)
                size = target.size if target.in_place else os.fstat(target.fd).st_size
                if opts.hybrid:
                    size = _make_hybrid(target, size, mbr_code)
                target.commit()
            except BaseException:
                target.discard()
                raise
        finally:
            iso.close()
    res = builder.result
    res.size = size
    res.warnings = result_messages
    return res


def _planned_size(iso) -> int:
    """The bytes the ISO will take (its volume space size), known before writing it:
    how a block device target is checked for room."""
    if getattr(iso, "_needs_reshuffle", False):  # pycdlib internals, as in _write
        iso._reshuffle_extents()
        iso._needs_reshuffle = False
    return iso.pvd.space_size * iso.logical_block_size


def _make_hybrid(target: AtomicFile, size: int, boot_code: bytes) -> int:
    """Pad to a whole cylinder and write the MBR, from what the written ISO's own El
    Torito catalog says (read back with our reader, not from pycdlib's internals)."""
    from .volume import read_boot_catalog, read_volume_set  # construct: only for hybrids

    class _View(BlockDevice):
        format = "iso"

        def __init__(self, backend, size):
            self.backend, self.size, self.path = backend, size, target.target

        def readinto(self, offset, buf):
            return self.backend.readinto(offset, buf)

    padded = hybrid.padded_size(size)
    target.truncate(padded)
    view = _View(target, padded)
    vs = read_volume_set(view)
    entries = read_boot_catalog(view, vs)
    bios = next((e for e in entries if e.platform_id == 0), None)
    efi = next((e for e in entries if e.platform_id == 0xEF), None)
    efi_part = None
    if efi is not None:
        # the ESP image's size: its directory record's, via the catalog's load size
        # when that is exact, else up to the end of the volume
        nbytes = efi.sector_count * 512 if efi.sector_count else \
            vs.primary.volume_space_size * vs.block_size - efi.load_rba * 2048
        efi_part = (efi.load_rba, nbytes)
    disk_id = zlib.crc32(view.read(16 * 2048, 2048))
    target.pwrite(0, hybrid.mbr(boot_code if bios else b"", padded, disk_id,
                                bios.load_rba if bios else None, efi_part))
    return padded
