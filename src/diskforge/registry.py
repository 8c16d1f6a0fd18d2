"""Format plugins: discovery, probing, lookup by name and by extension.

Every format, built-in or not, is an object registered in the ``diskforge.formats``
entry-point group (see pyproject.toml), so a third party adds a format by installing a
package, and adding a built-in format means one module and one entry-point line (and
one line in ``BUILTIN`` below).

The formats this package ships are also listed in ``BUILTIN``, so that a command that
names or probes one of them never scans the installed distributions: the scan (every
``*.dist-info`` on sys.path) is done only when a name, an extension or a probe misses
the built-in formats — an unknown name, an extension none of them has, a file none of
them is certain of (score below 100, raw's fallback included), and ``diskforge
formats``. A third-party plugin therefore still opens its files and answers its names;
the one difference from scanning first is that a built-in format certain of a file
(100) keeps it, whatever a plugin would say.

Probing reads the first and last 64 KiB once and asks every plugin for a 0..100
confidence; the highest wins. ``raw`` answers 1 to anything, so it is the fallback when
reading — but a write target's format is never guessed: it comes from ``-O`` or a known
extension.

Start-up (issue 17): a built-in is imported to be asked only when its signature (its
magic number, as data in ``SIGNATURES`` below: a necessary condition of its probe) is
in the probe window, and raw is counted without being imported. Before, a probe
imported every built-in ahead (in name order) of the one certain of the file: all
fourteen format packages for a raw file, with qcow2's construct structures and vmdk's
descriptor parser. Instructions of ``diskforge info``
on small files made by qemu-img (callgrind, bytecode cached, Python 3.11; the
interpreter alone, ``python -c pass``, is 39 M), before this table and the lazy
imports that came with it (construct_import's ``inspect``, qcow2's write path and
bitmaps, blockdev's ``checks``) and after::

    raw 290 M -> 169 M    qcow2 293 M -> 240 M    vpc 298 M -> 223 M
    vmdk 291 M -> 229 M   vdi 270 M -> 212 M      vhdx 308 M -> 248 M   iso 320 M -> 232 M

Re-measure with ``valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python -m
diskforge info FILE`` (the total is on its "Collected" line).
"""

from __future__ import annotations

import errno
import os
import sys

from .devices import is_block_device
from .errors import ImageIOError, UnknownFormatError, UnsupportedError, UsageError
from .policy import OpenPolicy
from .records import FrozenRecord

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from collections.abc import Iterable

    from .blockdev import Backing, BlockDevice, Extent, ImageWriter
    from .options import Options


ENTRY_POINT_GROUP = "diskforge.formats"
PROBE_BYTES = 64 * 1024

# The formats this package ships: the [project.entry-points."diskforge.formats"] table
# of pyproject.toml (tests/test_startup.py keeps the two equal).
BUILTIN = {
    "raw": "diskforge.formats.raw:FORMAT",
    "qcow2": "diskforge.formats.qcow2:FORMAT",
    "iso": "diskforge.formats.iso:FORMAT",
    "vhdx": "diskforge.formats.vhdx:FORMAT",
    "vpc": "diskforge.formats.vhd:FORMAT",
    "vdi": "diskforge.formats.vdi:FORMAT",
    "vmdk": "diskforge.formats.vmdk:FORMAT",
    "dmg": "diskforge.formats.dmg:FORMAT",
    "sparseimage": "diskforge.formats.dmg:SPARSEIMAGE",
    "sparsebundle": "diskforge.formats.dmg:SPARSEBUNDLE",
    "ova": "diskforge.formats.ova:FORMAT",
    "qcow": "diskforge.formats.qcow1:FORMAT",
    "qed": "diskforge.formats.qed:FORMAT",
    "parallels": "diskforge.formats.parallels:FORMAT",
    "luks": "diskforge.formats.luks:FORMAT",
    "asif": "diskforge.formats.asif:FORMAT",
}
CERTAIN = 100  # a probe score no other format can beat


def at(offset: int, magic: bytes) -> tuple:
    """A signature: ``magic`` at ``offset`` of the file (negative: from its end)."""
    return ("at", offset, magic)


def within(magic: bytes, start: int = 0, end: int | None = None, *,
           anycase: bool = False) -> tuple:
    """A signature: ``magic`` anywhere in bytes ``start:end`` of the probe window
    (the head; the tail when ``start`` is negative), in any case when ``anycase``
    (``magic`` then written in lower case)."""
    return ("in", start, end, magic, anycase)


# What each built-in format's probe must see before it can answer more than 0: its
# magic numbers, as data, so that probing a file imports only the plugins whose
# signature is there (importing all of them, and the construct structures some pull
# in, was most of ``diskforge info``'s start-up). A signature is a necessary
# condition, never a verdict: the plugin's own probe still decides (qcow2 and qcow
# share their magic and tell versions apart; a VHD footer at the end scores 90).
# The formats without one fixed magic at a fixed offset are here by the weaker test
# their probe starts with: iso (a volume descriptor identifier at 32769), vpc (the
# cookie at 0, or in the footer at the end: 512 or 511 bytes before it), dmg (the
# koly trailer in the last 512 bytes, or an encrypted wrapper), vmdk (a text
# descriptor starts with '#'), ova ("ovf" in any case: a tar's first member name or an
# OVF namespace), parallels (a DiskDescriptor.xml names its root element in its first
# 4 KiB). An empty tuple: never probed by its bytes (a directory format). Plugins not
# built in, and a built-in name replaced by ``register()``, are always asked.
# tests/test_startup.py checks every signature against its plugin's probe on real
# files of every format.
SIGNATURES: dict[str, tuple[tuple, ...]] = {
    "asif": (at(0, b"shdw"),),
    "dmg": (within(b"koly", -512), at(0, b"encrcdsa"), at(0, b"AEA1"),
            at(-8, b"cdsaencr")),
    "iso": tuple(at(32769, ident) for ident in (b"CD001", b"BEA01", b"NSR02", b"NSR03",
                                                b"TEA01", b"BOOT2", b"CDW02")),
    "luks": (at(0, b"LUKS\xba\xbe"),),
    "ova": (within(b"ovf", anycase=True),),
    "parallels": (at(0, b"WithoutFreeSpace"), at(0, b"WithouFreSpacExt"),
                  within(b"<Parallels_disk_image", 0, 4096)),
    "qcow": (at(0, b"QFI\xfb\x00\x00\x00\x01"),),
    "qcow2": (at(0, b"QFI\xfb"),),
    "qed": (at(0, b"QED\x00"),),
    "sparsebundle": (),
    "sparseimage": (at(0, b"sprs"),),
    "vdi": (at(64, b"\x7f\x10\xda\xbe"),),
    "vhdx": (at(0, b"vhdxfile"),),
    "vmdk": (at(0, b"KDMV"), at(0, b"COWD"), at(0, b"\xbe\xba\xfe\xca\x00\x00\x00\x00"),
             at(0, b"#")),
    "vpc": (at(0, b"conectix"), at(-512, b"conectix"), at(-511, b"conectix")),
}
# raw answers every file with FALLBACK_SCORE, so it is not imported to be asked: it is
# counted at its place in the probing order, and opened only when it wins
FALLBACK, FALLBACK_SCORE = "raw", 1
# the built-in formats that are directories (``probe_directory``)
DIRECTORY_FORMATS = ("parallels", "sparsebundle")


class Measurement(FrozenRecord):
    """``qemu-img measure``: bytes needed for the given contents, and when fully written."""
    __slots__ = ("required", "fully_allocated", "bitmaps")

    def __init__(self, required: int, fully_allocated: int, bitmaps: int | None = None):
        self.required = required
        self.fully_allocated = fully_allocated
        self.bitmaps = bitmaps


class OptionsFrom:
    """A format's ``options`` class, named as an entry point names an object
    (``"package.module:Class"``) and imported the first time it is asked for.

    Why: option classes are dataclasses (``options.py``: ``-o help`` and the parser
    read their fields), and defining them cost every command that only opens an image
    (``info``, ``map``, ``check``) the import of ``dataclasses`` and 2-4 M
    instructions per class (records.py), for a class it never uses. A format may still
    name its class directly (``options = MyOptions``)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.cls: "type[Options] | None" = None

    def __get__(self, obj, owner=None) -> "type[Options]":
        cls = self.cls
        if cls is None:
            import importlib
            module, _, name = self.spec.partition(":")
            cls = self.cls = getattr(importlib.import_module(module), name)
        return cls


class Format:
    """Base class of format plugins. Override what the format can do; the capability
    flags below are derived from what is overridden, so ``diskforge formats`` cannot
    claim more than the code does."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    description: str = ""
    options: "type[Options]" = OptionsFrom("diskforge.options:NoOptions")  # type: ignore
    # True when open(writable=True) gives a random-access writable device
    random_write: bool = False
    # True when open() takes ``snapshot=`` (a read-only view of an internal snapshot)
    snapshots: bool = False
    # True when open() takes ``key=`` (the passphrase of an encrypted image, bytes)
    takes_key: bool = False
    # True when the file holds several disks and open() takes ``member=`` (a name, or
    # a 1-based number): an OVA's disks, picked by ``vm.ova:NAME`` or ``--disk N``
    members: bool = False

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        """Confidence 0..100 that a file with this head and tail is in this format."""
        return 0

    def open(self, path: str, *, writable: bool = False,
             policy: OpenPolicy | None = None, backend=None) -> "BlockDevice":
        """The image at ``path`` as a BlockDevice. ``backend`` (an open backend with
        FileBackend's reading interface) is where its bytes are when they are not the
        file ``path`` itself: a disk inside an OVA, a remote object (see FileDevice)."""
        raise UnsupportedError(f"not supported yet: reading {self.name} images", path)

    def writer(self, path: str, size: int, options: Options, *,
               backing: "Backing | None" = None) -> "ImageWriter":
        raise UnsupportedError(f"not supported yet: writing {self.name} images", path)

    def resume_writer(self, path: str, size: int, options: Options, *,
                      backing: "Backing | None" = None,
                      state: dict) -> "ImageWriter":
        """A writer continuing an interrupted output from ``state`` (what the writer's
        ``checkpoint()`` returned); everything after that checkpoint is discarded."""
        raise UnsupportedError(f"not supported yet: resuming {self.name} output", path)

    def compressed(self, options: Options) -> Options:
        """What ``convert -c`` means for this format (qcow2: compressed clusters)."""
        raise UnsupportedError(f"{self.name} images cannot be compressed (-c)")

    def measure(self, size: int, options: Options,
                allocated: "Iterable[Extent] | None") -> Measurement:
        """Space needed for a disk of ``size`` whose allocated extents are ``allocated``
        (None: measure an empty disk)."""
        raise UnsupportedError(f"not supported yet: measure for {self.name}")

    def qemu_driver(self, device: "BlockDevice") -> str | None:
        """QEMU's block driver for this opened image ("qcow2", "vpc") when QEMU reads
        the file exactly as diskforge does, so ``diskforge boot``/``attach`` hand it
        to QEMU directly; None (the default) serves it through diskforge's NBD export
        instead. Decided per file, because QEMU misreads or refuses some files of
        formats it otherwise reads (a VHDX with a pending log, a DMG with LZFSE
        chunks); only the image itself is asked, ``hypervisor.drives`` asks each
        layer of a backing chain."""
        return None

    # -- capabilities, derived from the overrides ------------------------------------
    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Format, method)

    @property
    def can_probe(self) -> bool:
        return self._overrides("probe")

    @property
    def can_read(self) -> bool:
        return self._overrides("open")

    @property
    def can_write(self) -> bool:
        return self._overrides("writer")

    @property
    def can_measure(self) -> bool:
        return self._overrides("measure")


# -- discovery ---------------------------------------------------------------------------

_entry_points = None
_loaded: dict[str, Format] = {}
_all_loaded = False


class _EntryPoint:
    """``name = module:attr`` from an installed distribution's entry_points.txt."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def load(self):
        import importlib
        module, _, attr = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for part in attr.strip().split(".") if attr.strip() else ():
            obj = getattr(obj, part)
        return obj


def _eps() -> dict[str, _EntryPoint]:
    """The ``diskforge.formats`` entry points of every installed distribution.

    Read straight from ``*.dist-info/entry_points.txt`` on sys.path, as
    importlib.metadata would (first distribution of a name wins), because importing
    importlib.metadata (and the email package under it) costs 25 ms of start-up.
    """
    global _entry_points
    if _entry_points is not None:
        return _entry_points
    found: dict[str, _EntryPoint] = {}
    seen_dists: set[str] = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for d in sorted(names):
            if not d.endswith((".dist-info", ".egg-info")):
                continue
            dist = d.rsplit(".", 1)[0].split("-")[0].lower()  # name-version.dist-info
            if dist in seen_dists:
                continue
            seen_dists.add(dist)
            try:
                with open(os.path.join(entry or ".", d, "entry_points.txt"),
                          encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            if ENTRY_POINT_GROUP not in text:  # most distributions: not parsed line by line
                continue
            for name, value in _parse_group(text, ENTRY_POINT_GROUP):
                found.setdefault(name, _EntryPoint(name, value))
    _entry_points = found
    return found


def _parse_group(text: str, group: str):
    """``(name, value)`` pairs of one ``[group]`` section of an entry_points.txt."""
    inside = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            inside = line[1:-1].strip() == group
        elif inside and "=" in line:
            name, value = line.split("=", 1)
            yield name.strip(), value.strip()


def _load(name: str) -> Format | None:
    if name in _loaded:
        return _loaded[name]
    ep = _EntryPoint(name, BUILTIN[name]) if name in BUILTIN else _eps().get(name)
    if ep is None:
        return None
    try:
        plugin = ep.load()
    except Exception as e:  # a broken third-party plugin must not break the others
        raise UnknownFormatError(f"format plugin '{name}' ({ep.value}) failed to load: {e}")
    if isinstance(plugin, type):
        plugin = plugin()
    if not plugin.name:
        plugin.name = name
    _loaded[name] = plugin
    return plugin


def all_formats() -> dict[str, Format]:
    """Every registered plugin, by name, in name order."""
    global _all_loaded
    if not _all_loaded:
        for name in BUILTIN:
            _load(name)
        for name in _eps():
            _load(name)
        _all_loaded = True
    return dict(sorted(_loaded.items()))


def known_formats() -> dict[str, Format]:
    """The built-in plugins and those registered or loaded so far, in name order: what
    can be asked without scanning the installed distributions (see the module
    docstring; ``all_formats()`` is the full set)."""
    if not _all_loaded:
        for name in BUILTIN:
            _load(name)
    return dict(sorted(_loaded.items()))


def register(plugin: Format) -> None:
    """Register a plugin object directly (tests, embedding applications)."""
    _loaded[plugin.name] = plugin


def get(name: str) -> Format:
    """The plugin called ``name`` (or with that alias)."""
    key = name.strip().lower()
    plugin = _load(key)
    if plugin is not None:
        return plugin
    for formats in (known_formats, all_formats):
        for plugin in formats().values():
            if key == plugin.name or key in plugin.aliases:
                return plugin
    known = ", ".join(all_formats())
    raise UnknownFormatError(f"unknown format '{name}' (known formats: {known})")


def by_extension(path: str) -> Format | None:
    """The plugin whose extension list has ``path``'s extension, if exactly one does."""
    lower = os.fspath(path).lower()
    best: Format | None = None
    best_len = 0
    for formats in (known_formats, all_formats):  # scan only when no built-in has it
        for plugin in formats().values():
            for ext in plugin.extensions:
                dotted = "." + ext.lstrip(".").lower()
                if lower.endswith(dotted) and len(dotted) > best_len:
                    best, best_len = plugin, len(dotted)
        if best is not None:
            break
    return best


def target_format(path: str, name: str | None) -> Format:
    """The format to write ``path`` in: ``name`` when given, else the extension's; never
    a silent raw guess — except for an NBD export, whose bytes are the disk (raw, as
    qemu-img's default output format)."""
    if name:
        return get(name)
    if "://" in path:
        from . import remote
        if remote.is_remote(path) and remote.writes_in_place(path):
            return get("raw")
    plugin = by_extension(path)
    if plugin is None:
        raise UsageError(f"cannot tell the output format from the name '{path}'; give it"
                         " with -O FORMAT (see 'diskforge formats')")
    return plugin


# -- probing and opening -----------------------------------------------------------------

def read_probe_window(path: str) -> tuple[bytes, bytes, int]:
    """The first and last 64 KiB of ``path`` and its size."""
    from .blockdev import FileBackend
    with FileBackend(path, lock=False) as f:  # a glance: QEMU's probe locks nothing
        size = f.size
        head = f.pread(0, min(size, PROBE_BYTES))
        tail_start = max(0, size - PROBE_BYTES)
        # the head holds the tail only when it holds the whole file (a file between 64
        # and 128 KiB would otherwise lose its last bytes, where fixed VHDs keep
        # their footer)
        tail = head[tail_start:] if size <= len(head) else f.pread(tail_start,
                                                                  size - tail_start)
    return head, tail, size


# Encrypted containers: read by the luks plugin when a key is given, and never silently
# read as a raw disk (``-f raw`` reads the ciphertext on purpose).
# LUKS1 and LUKS2 (cryptsetup's on-disk format specifications): magic "LUKS\xba\xbe" and
# a big-endian version. LUKS2 keeps a second copy of its binary header ("SKUL\xba\xbe")
# right after the first, at one of the offsets its hdr_size allows (16 KiB - 4 MiB), so
# a file whose primary header was wiped is still recognised by that copy. The copy's
# hdr_size field (8 bytes after the version) equals its own offset: part of its
# signature, so that stray bytes in a raw disk are not taken for one.
LUKS2_SECONDARY_OFFSETS = tuple(16384 << i for i in range(9))
ENCRYPTED_SIGNATURES = (
    (0, b"LUKS\xba\xbe\x00\x01", "LUKS1"),
    (0, b"LUKS\xba\xbe\x00\x02", "LUKS2"),
) + tuple((off, b"SKUL\xba\xbe\x00\x02" + off.to_bytes(8, "big"),
           "LUKS2, by its secondary header") for off in LUKS2_SECONDARY_OFFSETS)


def encrypted_format(path: str, head: bytes, size: int, reader=None) -> str | None:
    """The kind of encrypted container ``path`` is ("LUKS1"), or None. Signatures past
    the probe window are read with one small read each (only a file that would
    otherwise be read as raw gets here), through ``reader`` when the image is read
    through an open backend."""
    from .blockdev import FileBackend
    backend = reader
    try:
        for offset, magic, name in ENCRYPTED_SIGNATURES:
            if offset + len(magic) > size:
                continue
            if offset + len(magic) <= len(head):
                found = head[offset:offset + len(magic)]
            else:
                backend = backend or FileBackend(path, lock=False)  # a glance
                found = backend.pread(offset, len(magic))
            if found == magic:
                return name
    finally:
        if backend is not None and backend is not reader:
            backend.close()
    return None


def probe(path: str) -> Format:
    """Guess the format of an existing file (highest confidence wins; raw is the fallback)."""
    if "://" in path:
        from . import remote
        if remote.is_remote(path):  # read through its backend, as open_image does
            backend = remote.open_backend(path)
            try:
                return probe_backend(backend, path)
            finally:
                backend.close()
    check_readable(path)
    if os.path.isdir(path):
        plugin = _probe_directory(path)
        if plugin is None:
            raise ImageIOError("is a directory, not an image", path)
        return plugin
    head, tail, size = read_probe_window(path)
    if size == 0 and not is_block_device(path):
        raise UnknownFormatError("empty file (0 bytes), not a disk image; use -f raw to"
                                 " treat it as an empty raw disk", path)
    return _best(path, head, tail, size)


def probe_backend(backend, name: str) -> Format:
    """Guess the format of an image read through an open backend (a disk inside an
    OVA, see blockdev.WindowBackend) by the same rules as a file: ``name`` names it in
    messages."""
    size = backend.size
    if size == 0:
        raise UnknownFormatError("empty (0 bytes), not a disk image", name)
    head = backend.pread(0, min(size, PROBE_BYTES))
    tail_start = max(0, size - PROBE_BYTES)
    tail = head[tail_start:] if size <= len(head) else backend.pread(tail_start,
                                                                     size - tail_start)
    return _best(name, head, tail, size, backend)


def signature_matches(signatures: tuple[tuple, ...], head: bytes, tail: bytes) -> bool:
    """True when any of ``signatures`` (``at``, ``within``) is in these bytes."""
    for sig in signatures:
        if sig[0] == "at":
            _, offset, magic = sig
            if offset < 0:
                offset += len(tail)
                window = tail
            else:
                window = head
            if offset >= 0 and window[offset:offset + len(magic)] == magic:
                return True
        else:
            _, start, end, magic, anycase = sig
            window = (tail if start < 0 else head)[start:end]
            if magic in (window.lower() if anycase else window):
                return True
    return False


def _is_builtin(name: str) -> bool:
    """``name`` is a built-in format not replaced by ``register()``: its entry in
    SIGNATURES speaks for its probe."""
    if name not in BUILTIN:
        return False
    plugin = _loaded.get(name)
    return plugin is None or type(plugin).__module__ == BUILTIN[name].partition(":")[0]


def _ask(names, head: bytes, tail: bytes, size: int, best, best_score: int):
    """Ask the plugins called ``names``, in order, for their confidence: the highest
    wins, ties go to the first, and the first certain one ends the asking. Built-ins
    whose signature is not in these bytes are not imported (their probe would answer
    0); raw is counted at its place without being imported."""
    for name in names:
        if _is_builtin(name):
            if name == FALLBACK:
                if FALLBACK_SCORE > best_score:
                    best, best_score = FALLBACK, FALLBACK_SCORE
                continue
            if not signature_matches(SIGNATURES.get(name, ()), head, tail):
                continue
        plugin = _load(name)
        if plugin is None or not plugin.can_probe:
            continue
        score = plugin.probe(head, tail, size)
        if score > best_score:
            best, best_score = plugin, score
            if score >= CERTAIN:
                break
    return best, best_score


def _best(path: str, head: bytes, tail: bytes, size: int, backend=None) -> Format:
    """The plugin most confident about these bytes; raw only when no format claims
    them and they are not an encrypted container."""
    # In name order, the first to score CERTAIN wins whatever follows (ties go to the
    # first), so the built-ins after it are not even imported; a miss asks the
    # installed plugins too (those not asked already: the built-ins answer the same).
    asked = sorted(set(BUILTIN) | set(_loaded))
    best, best_score = _ask(asked, head, tail, size, None, 0)
    if best_score < CERTAIN and not _all_loaded:
        others = sorted(set(_eps()) - set(asked))
        best, best_score = _ask(others, head, tail, size, best, best_score)
    if best is None or isinstance(best, str) or best.name == "raw":
        encrypted = encrypted_format(path, head, size, backend)
        if encrypted and _load("luks") is not None:  # by LUKS2's secondary header copy
            return get("luks")
        if encrypted:
            raise UnsupportedError(f"encrypted ({encrypted}); not supported yet: reading"
                                   " encrypted images (give -f raw to read the encrypted"
                                   " bytes as they are)", path)
        return get("raw")
    return best


def _probe_directory(path: str) -> Format | None:
    """Some formats are directories (DMG sparse bundles): plugins probe them by a
    ``probe_directory(path)`` method when they have one."""
    # the built-in directory formats and the plugins loaded so far (the other
    # built-ins are not imported), then every plugin
    names = sorted(name for name in set(BUILTIN) | set(_loaded)
                   if name in DIRECTORY_FORMATS or not _is_builtin(name))
    for formats in (lambda: {name: _load(name) for name in names}, all_formats):
        for plugin in formats().values():
            fn = getattr(plugin, "probe_directory", None)
            if fn is not None and fn(path):
                return plugin
    return None


def check_readable(path: str) -> None:
    """Turn the common reasons a file cannot be opened into one clear line, in
    qemu-img's words where scripts grep for them (``Could not open 'X': No such file or
    directory``)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise _could_not_open(path, "No such file or directory", errno.ENOENT) from None
    except OSError as e:
        raise ImageIOError.from_os(e, path) from None
    if not os.access(path, os.R_OK):
        raise _could_not_open(path, "Permission denied", errno.EACCES)


def _could_not_open(path: str, reason: str, code: int) -> ImageIOError:
    err = ImageIOError(f"Could not open '{path}': {reason}")
    err.path = path
    err.errno = code  # as ImageIOError.from_os gives it: callers tell lasting errors apart
    return err


def open_image(path: str | os.PathLike, fmt: str | None = None, *, writable: bool = False,
               policy: OpenPolicy | None = None,
               snapshot: str | None = None, member: "str | int | None" = None,
               key: bytes | None = None) -> "BlockDevice":
    """Open ``path`` as a BlockDevice: with the named format, or by probing.

    ``key`` is the passphrase of an encrypted image (LUKS, qcow2 with LUKS), given to
    the formats that take one (``Format.takes_key``) and ignored by the others, as
    qemu's ``key-secret`` is meaningless to an unencrypted image.

    Block devices (``/dev/...``) open as raw unless a format is named. ``snapshot``
    (an ID or name) opens that internal snapshot as a read-only view. ``member`` picks
    one disk of a file that holds several (an OVA's, by file name or disk id, or its
    1-based number); ``vm.ova:NAME``, a path that does not exist whose part before the
    last ':' is such a file, means the same. Every file of the image holds QEMU's
    image locks while it is open (``locks.py``); a read-only open under
    ``policy.force_share`` shares everything, a writable one is refused.
    """
    from .locks import FORCE_SHARE_WRITE, force_share
    path = os.fspath(path)
    policy = policy or OpenPolicy.from_environment()
    if writable and policy.force_share:
        raise UsageError(FORCE_SHARE_WRITE, path)
    with force_share(policy.force_share):
        return _open_image(path, fmt, writable, policy, snapshot, member, key)


def split_member(path: str, fmt: str | None = None) -> tuple[str, str] | None:
    """``(container, NAME)`` when ``path`` is ``container:NAME``: ``path`` itself does
    not exist, and the part before its last ':' is a regular file in a format that
    holds several disks (an OVA or OVF). A path that exists is always itself."""
    if ":" not in path or os.path.lexists(path):
        return None
    container, _, name = path.rpartition(":")
    if not name or not os.path.isfile(container):
        return None
    try:
        plugin = get(fmt) if fmt else probe(container)
    except (UnknownFormatError, UnsupportedError, ImageIOError):
        return None
    return (container, name) if plugin.members else None


def _open_image(path: str, fmt: str | None, writable: bool, policy: OpenPolicy,
                snapshot: str | None, member: "str | int | None" = None,
                key: bytes | None = None) -> "BlockDevice":
    if "://" in path:
        from . import remote
        if remote.is_remote(path):
            return _open_remote(path, fmt, writable, policy, snapshot, key)
    if policy.chain:  # a file another image names: regular files only, not /proc...
        from .devices import referenced_files
        with referenced_files():
            return _open_local(path, fmt, writable, policy, snapshot, member, key)
    return _open_local(path, fmt, writable, policy, snapshot, member, key)


def _open_local(path: str, fmt: str | None, writable: bool, policy: OpenPolicy,
                snapshot: str | None, member: "str | int | None" = None,
                key: bytes | None = None) -> "BlockDevice":
    inside = split_member(path, fmt)
    if inside is not None:
        if member is not None:
            raise UsageError(f"two disks asked for: '{inside[1]}' in the name and"
                             f" {member!r} (--disk)", path)
        path, member = inside
    try:
        check_readable(path)
    except ImageIOError as e:
        e.backing_missing = bool(policy.chain)  # reported as qemu-img reports it
        raise
    if policy.chain:  # before a block device is taken for raw, or a FIFO probed
        real = os.path.realpath(path)
        from .policy import referenced_file_problem
        problem = referenced_file_problem(real)
        if problem:
            from .errors import SafetyError
            raise SafetyError(f"named by {policy.chain[-1]}: {problem}", path)
    if fmt:
        plugin = get(fmt)
    elif is_block_device(path):
        plugin = get("raw")
    else:
        plugin = probe(path)
    if not plugin.can_read:
        raise UnsupportedError(f"not supported yet: reading {plugin.name} images", path)
    if writable and not plugin.random_write:
        raise UnsupportedError(f"{plugin.name} images cannot be opened for writing"
                               " (convert to a writable format instead)", path)
    if member is not None and not plugin.members:
        raise UsageError(f"{plugin.name} images hold one disk; --disk and FILE:NAME pick"
                         " a disk of a file that holds several (ova, ovf)", path)
    policy.check_referenced_format(path, plugin.name)
    policy = policy.descend(path)
    extra = _open_options(plugin, path, snapshot, key)
    if member is not None:
        extra["member"] = member
    try:
        return plugin.open(path, writable=writable, policy=policy, **extra)
    except ImageIOError as e:
        if not getattr(e, "backing_missing", False):
            raise
        # qemu-img's words, which scripts grep for: each image up the chain adds
        # "Could not open 'IMAGE': Could not open backing file: " to the missing one's
        outer = ImageIOError(f"Could not open '{path}': Could not open backing file:"
                             f" {e.message}")
        outer.path, outer.backing_missing = path, True  # (the path: not in str() twice)
        if hasattr(e, "errno"):  # callers tell lasting errors apart by it
            outer.errno = e.errno
        raise outer from None


def _open_options(plugin: Format, path: str, snapshot: str | None,
                  key: bytes | None) -> dict[str, object]:
    """The keyword arguments ``plugin.open`` takes for this open: the key only for
    formats that take one (qemu's key-secret means nothing to the others), the
    snapshot only for formats that have them."""
    extra: dict[str, object] = {}
    if key is not None and plugin.takes_key:
        extra["key"] = key
    if snapshot is not None:
        if not plugin.snapshots:
            raise UnsupportedError(f"{plugin.name} images have no internal snapshots", path)
        extra["snapshot"] = snapshot
    return extra


def _open_remote(url: str, fmt: str | None, writable: bool, policy: OpenPolicy,
                 snapshot: str | None, key: bytes | None) -> "BlockDevice":
    """An image at a URL (``remote/``): always under the untrusted policy, since what
    it names must not reach local files, read through its scheme's backend. Writable
    only where the scheme writes in place (an NBD export), and then only as raw: the
    export's bytes are the disk, as a block device's are."""
    from . import remote
    if writable and not remote.writes_in_place(url):
        raise UnsupportedError("not supported yet: opening a remote image for writing"
                               " in place (convert to a local file)", url)
    if not policy.is_untrusted:
        policy = OpenPolicy.untrusted(policy.allowed_roots)._with_chain(policy)
    backend = remote.open_backend(url, writable=True) if writable else \
        remote.open_backend(url)
    try:
        plugin = get(fmt) if fmt else probe_backend(backend, url)
        if not plugin.can_read:
            raise UnsupportedError(f"not supported yet: reading {plugin.name} images", url)
        if writable and plugin.name != "raw":
            raise UnsupportedError(f"not supported yet: writing a {plugin.name} image"
                                   f" inside a {remote.scheme_of(url)}:// export in place"
                                   " (raw only: -O raw)", url)
        policy.check_referenced_format(url, plugin.name)
        policy = policy.descend(url)
        extra = _open_options(plugin, url, snapshot, key)
        return plugin.open(url, writable=writable, policy=policy, backend=backend,
                           **extra)
    except BaseException:
        backend.close()
        raise
