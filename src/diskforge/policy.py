"""Which files an image may make us open.

Images name other files: backing files, external data files, VMDK extents, VHD/VHDX/VDI
parents, bundle bands. A hostile image could name ``/dev/sda`` or ``/proc/self/environ``
and have its bytes appear as disk contents, name a FIFO and hang the reader, or name
itself and loop. The user's own command-line choices (``-B base``, the image opened)
are not checked: the policy guards what *files* name, not what *people* name.

Two modes, both explicit here:

- **default** (``OpenPolicy.default()``, what ``OpenPolicy()`` gives): a user naming an
  image on the command line. Referenced files are followed wherever they are, as
  qemu-img follows them, because that is where real chains put them: libvirt pools and
  oVirt write absolute backing paths into other directories, OpenStack's image cache
  writes ``../_base/HASH``. What is refused is what no real chain names: anything that
  is not a regular file (a block or character device, FIFO, socket, directory), and
  anything whose real path is under ``/proc``, ``/sys`` or ``/dev`` (``SYSTEM_ROOTS``;
  a symlink to ``/proc/self/environ`` is refused by where it leads). Both are checked
  twice: when the name is resolved (``resolve``), and again on the descriptor when the
  file is opened (``devices.open_input`` under ``devices.referenced_files``), so a
  name swapped in between does not get through. Chains are depth-limited
  (``DEFAULT_MAX_DEPTH``) and loop-checked (``descend``). Backing files of any format
  are followed, probing one whose format the image does not name, as qemu-img does.
- **untrusted** (``OpenPolicy.untrusted()``, ``diskforge --untrusted``,
  ``DISKFORGE_UNTRUSTED=1``; ``serve`` and every remote image use it unless told
  otherwise): for services converting images uploaded by others. Everything above,
  and references confined to the image's own directory and the roots the operator
  allowed (``--allow-root DIR``, ``allowed_roots``), chains at most
  ``UNTRUSTED_MAX_DEPTH`` deep, and no raw backing files — a backing file the image
  names as raw, or whose format the image does not name (so it would be probed, and a
  raw guess could expose any file's bytes or let a crafted header pick the format), is
  refused, as OpenStack's image checks refuse them. The policy is only about which
  files are opened; the resource limits of untrusted mode (address space, CPU time, a
  lower memory budget) are in ``untrusted.py``, because they belong to a process, not
  to one open.

``allowed_roots`` only widen untrusted mode; the default mode has no confinement to
widen. (``allow_any_root``, the switch that relaxed confinement before the default
did, is still accepted and changes nothing: untrusted mode ignores it, as it did.)

``force_share`` is qemu-img's ``-U``: read-only opens under this policy take QEMU's
image locks without refusing to share anything (so an image a VM is writing can still
be read, accepting that it may change underneath); a writable open under it is refused
(``registry.open_image``, ``locks.py``).
"""

from __future__ import annotations

import os

from .errors import SafetyError
from .records import FrozenRecord

DEFAULT_MAX_DEPTH = 32
# an uploaded image has no business with a deep chain; 8 still covers an image
# with a few snapshots' worth of overlays
UNTRUSTED_MAX_DEPTH = 8

DEFAULT = "default"
UNTRUSTED = "untrusted"
# DISKFORGE_UNTRUSTED values that leave untrusted mode off; anything else turns it on,
# so a typo errs on the strict side
_ENV_OFF = ("", "0", "false", "no", "off")


def untrusted_from_environment() -> bool:
    """True when ``DISKFORGE_UNTRUSTED`` asks for untrusted mode."""
    return os.environ.get("DISKFORGE_UNTRUSTED", "").strip().lower() not in _ENV_OFF


class OpenPolicy(FrozenRecord):
    """What opening an image may follow and touch (see the module docstring).

    A frozen value: ``policy.replace(force_share=True)`` makes a changed copy. Written
    out rather than a dataclass, because every command builds one on its way to the
    first byte and a frozen dataclass costs ``dataclasses``' import and ~4 M
    instructions of start-up (records.py)."""

    __slots__ = ("allowed_roots", "allow_any_root", "max_depth", "force_share", "mode",
                 "open_backing", "open_data", "chain")

    def __init__(self, allowed_roots: tuple[str, ...] = (), allow_any_root: bool = False,
                 max_depth: int = DEFAULT_MAX_DEPTH, force_share: bool = False,
                 mode: str = DEFAULT, open_backing: bool = True, open_data: bool = True,
                 chain: tuple[str, ...] = ()) -> None:
        if mode not in (DEFAULT, UNTRUSTED):  # a typo must not fall back to lax
            raise ValueError(f"OpenPolicy.mode must be '{DEFAULT}' or '{UNTRUSTED}',"
                             f" not {mode!r}")
        setattr_ = object.__setattr__
        setattr_(self, "allowed_roots", allowed_roots)
        setattr_(self, "allow_any_root", allow_any_root)
        setattr_(self, "max_depth", max_depth)
        setattr_(self, "force_share", force_share)
        setattr_(self, "mode", mode)  # DEFAULT or UNTRUSTED (see the module docstring)
        # False: backing files are not opened at all, only named (qemu's
        # BDRV_O_NO_BACKING, what ``qemu-img info`` without --backing-chain and
        # ``rebase -u`` use: the file may be missing or moved). The formats whose
        # backing files qemu follows (qcow2, qed, qcow, vmdk) honour it, and so do VHD,
        # VHDX and VDI differencing disks; a device opened so reads its unallocated
        # parts as zeros, so it is for looking at headers and rewriting names, never
        # for reading. The CLI never sets it in untrusted mode, where every command
        # checks the chain.
        setattr_(self, "open_backing", open_backing)
        # False: no guest data will be read (qemu's BDRV_O_NO_IO, what ``qemu-img
        # info`` opens with), so an encrypted image (LUKS, qcow2 encrypt.format=luks)
        # opens without its key: its header is parsed and shown, and a read of its data
        # is refused with the message that says how to give the key.
        setattr_(self, "open_data", open_data)
        # real paths of the images already opened above this one in the chain
        setattr_(self, "chain", chain)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"OpenPolicy is frozen: use .replace({name}=...)")

    __delattr__ = __setattr__

    def __reduce__(self):  # pickle and copy: through __init__, not attribute by attribute
        return (type(self), self._values())

    def __repr__(self) -> str:  # the chain is the open's state, not the policy's
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields()
                          if n != "chain")
        return f"OpenPolicy({inner})"

    @classmethod
    def default(cls, allowed_roots: "tuple[str, ...] | list[str]" = ()) -> "OpenPolicy":
        """The policy for an image a user names: references followed anywhere as
        qemu-img follows them (regular files outside ``SYSTEM_ROOTS`` only), any
        backing format. ``allowed_roots`` are kept for a later ``untrusted`` copy."""
        return cls(allowed_roots=tuple(allowed_roots))

    @classmethod
    def untrusted(cls, allowed_roots: "tuple[str, ...] | list[str]" = ()) -> "OpenPolicy":
        """The policy for images uploaded by others: confined references, no raw or
        unnamed backing formats, chains at most ``UNTRUSTED_MAX_DEPTH`` deep."""
        return cls(allowed_roots=tuple(allowed_roots), max_depth=UNTRUSTED_MAX_DEPTH,
                   mode=UNTRUSTED)

    @classmethod
    def from_environment(cls, allowed_roots: "tuple[str, ...] | list[str]" = ()
                         ) -> "OpenPolicy":
        """``untrusted()`` when ``DISKFORGE_UNTRUSTED`` is set, else ``default()``: what
        ``diskforge.open`` and friends use when no policy is given, so a service can
        turn untrusted mode on for its whole environment."""
        if untrusted_from_environment():
            return cls.untrusted(allowed_roots)
        return cls.default(allowed_roots)

    def _with_chain(self, other: "OpenPolicy") -> "OpenPolicy":
        """This policy, continuing ``other``'s chain and force-share choice."""
        return self.replace(chain=other.chain, force_share=other.force_share)

    @property
    def is_untrusted(self) -> bool:
        return self.mode == UNTRUSTED

    def resolve(self, referrer: str, reference: str, what: str = "backing file", *,
                confine: bool = False) -> str:
        """Turn ``reference`` (as written inside ``referrer``) into a path we may open.

        Relative names are relative to the referrer's directory, as qemu does. In both
        modes the real path must not be under ``SYSTEM_ROOTS`` and, when it exists,
        must be a regular file (or, for the directories some formats name, such as a
        bundle's ``bands``, a directory); untrusted mode also confines it to the
        image's directory and the allowed roots. ``confine`` asks for that confinement
        in the default mode too, for references that by their specification stay
        beside the referrer and that no tool writes elsewhere (an OVF descriptor's
        files). A name that does not exist yet passes here: opening it fails with the
        usual "No such file" line.
        """
        if not reference:
            raise SafetyError(f"empty {what} name", referrer)
        if "\0" in reference:
            raise SafetyError(f"{what} name contains a NUL byte", referrer)
        if "://" in referrer:  # a remote image names only objects beside it
            from .remote import is_remote, names
            if is_remote(referrer):
                return names.resolve_reference(referrer, reference, what)
        path = beside(referrer, reference)
        real = os.path.realpath(path)
        if self.is_untrusted or confine:
            base_dir = os.path.dirname(os.path.abspath(referrer))
            roots = [os.path.realpath(base_dir)] + [os.path.realpath(r)
                                                    for r in self.allowed_roots]
            if not any(_inside(real, r) for r in roots):
                raise SafetyError(
                    f"{what} '{reference}' resolves to {real}, outside the image's directory"
                    " and the allowed roots"
                    f"{' (untrusted mode' if self.is_untrusted else ' ('}; allow it with"
                    " --allow-root DIR)", referrer)
        problem = referenced_file_problem(real)
        if problem:
            raise SafetyError(f"{what} '{reference}' {problem}", referrer)
        return path

    def check_backing_format(self, referrer: str, reference: str, fmt: str | None,
                             where: str) -> None:
        """In untrusted mode, refuse a backing file whose format ``referrer`` leaves
        unnamed (``fmt`` None or empty) or names as raw. ``where`` is the structure and
        field that holds the format name, for the error line."""
        if not self.is_untrusted:
            return
        if not fmt:
            raise SafetyError(f"{where}: not given for backing file '{reference}'; untrusted"
                              " mode refuses to probe a backing file's format", referrer)
        if fmt.strip().lower() == "raw":
            raise SafetyError(f"{where}: backing file '{reference}' is raw; untrusted mode"
                              " refuses raw backing files", referrer)

    def check_referenced_format(self, path: str, format_name: str) -> None:
        """In untrusted mode, refuse a file another image named that opened as raw
        (whatever format plugin named it: the last line of defence under the
        per-format checks)."""
        if self.is_untrusted and self.chain and format_name == "raw":
            raise SafetyError(f"opened as raw, as the backing file of {self.chain[-1]};"
                              " untrusted mode refuses raw backing files", path)

    def descend(self, path: str) -> "OpenPolicy":
        """The policy for opening ``path`` one level further down the chain."""
        real = path if "://" in path else os.path.realpath(path)  # a URL is its own name
        if real in self.chain:
            raise SafetyError("backing chain loop: this file is already in the chain", path)
        if len(self.chain) >= self.max_depth:
            raise SafetyError(f"backing chain deeper than {self.max_depth} images", path)
        return self.replace(chain=self.chain + (real,))


def beside(image: str | os.PathLike, name: str) -> str:
    """Where ``name``, written inside ``image`` (a backing file, data file, parent), is:
    an absolute name as it stands, a relative one in the image's directory, as qemu
    resolves them. The one spelling of that rule; ``OpenPolicy.resolve`` adds the
    checks on where it may lead.

    Spelled as qemu's ``path_combine`` spells it: joined to ``image``'s directory *as
    the image was named* (``top.qcow2`` naming ``base.qcow2`` gives ``base.qcow2``,
    ``./vm/top.qcow2`` gives ``./vm/base.qcow2``), not made absolute, because that
    name is what ``info --backing-chain``, ``map`` and the "Could not open" errors
    print and what scripts compare with qemu-img's output; it names the same file
    from the same working directory."""
    if os.path.isabs(name):
        return name
    image = os.fspath(image)
    if "://" in name or "://" in image:  # remote names: URLs resolve against URLs
        from .remote import is_remote
        if is_remote(name):
            return name
        if is_remote(image):
            import posixpath
            scheme, _, rest = image.partition("://")
            host, _, path = rest.partition("/")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname("/" + path),
                                                       name))
            return f"{scheme}://{host}{joined}"
    return os.path.join(os.path.dirname(image), name)


# Real paths a file named inside an image may never lead to, whatever the mode: their
# "files" are the kernel's (process memory, environment, devices), not disk images.
SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


def referenced_file_problem(real: str, mode: int | None = None) -> str | None:
    """Why the file at real path ``real`` (of type ``mode``, or as ``stat`` finds it
    now) must not be opened as something an image names, or None. A file that does
    not exist has no problem here (opening it reports that)."""
    import stat
    for root in SYSTEM_ROOTS:
        if _inside(real, root):
            return (f"resolves to {real}, under {root}; files an image names are never"
                    f" read from {', '.join(SYSTEM_ROOTS)}")
    if mode is None:
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # directories: bundles' own parts
        return None
    kind = ("a block device" if stat.S_ISBLK(mode) else "a character device"
            if stat.S_ISCHR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"resolves to {real}, {kind}; files an image names must be regular files"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
