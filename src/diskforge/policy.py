"""Which files an image may make us open.

Images name other files: backing files, external data files, VMDK extents, VHD parent
locators. A hostile image could name ``/etc/shadow`` or ``/dev/sda`` and have its bytes
appear as disk contents, or name itself and loop. So a referenced file is opened only
when it resolves inside the referring image's own directory (or a root the caller
allowed), chains are depth-limited, and a file already in the chain is refused.

The user's own command-line choices (``-B base``, the image opened) are not checked:
the policy guards what *files* name, not what *people* name.

Two modes, both explicit here:

- **default** (``OpenPolicy.default()``, what ``OpenPolicy()`` gives): a user naming an
  image on the command line. Today it confines referenced files as above and follows
  backing files of any format, probing one whose format the image does not name. (A
  later issue relaxes it to follow chains as qemu-img does; ``allow_any_root`` is that
  switch.)
- **untrusted** (``OpenPolicy.untrusted()``, ``diskforge --untrusted``,
  ``DISKFORGE_UNTRUSTED=1``): for services converting images uploaded by others. It
  stays strict whatever the default becomes: references confined to the image's own
  directory and the roots the operator allowed (``allow_any_root`` is ignored), chains
  at most ``UNTRUSTED_MAX_DEPTH`` deep, and no raw backing files — a backing file the
  image names as raw, or whose format the image does not name (so it would be probed,
  and a raw guess could expose any file's bytes or let a crafted header pick the
  format), is refused, as OpenStack's image checks refuse them. The policy is only
  about which files are opened; the resource limits of untrusted mode (address space,
  CPU time, a lower memory budget) are in ``untrusted.py``, because they belong to a
  process, not to one open.

``force_share`` is qemu-img's ``-U``: read-only opens under this policy take QEMU's
image locks without refusing to share anything (so an image a VM is writing can still
be read, accepting that it may change underneath); a writable open under it is refused
(``registry.open_image``, ``locks.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from .errors import SafetyError

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


@dataclass(frozen=True)
class OpenPolicy:
    allowed_roots: tuple[str, ...] = ()
    allow_any_root: bool = False
    max_depth: int = DEFAULT_MAX_DEPTH
    force_share: bool = False
    mode: str = DEFAULT  # DEFAULT or UNTRUSTED (see the module docstring)
    # real paths of the images already opened above this one in the chain
    chain: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.mode not in (DEFAULT, UNTRUSTED):  # a typo must not fall back to lax
            raise ValueError(f"OpenPolicy.mode must be '{DEFAULT}' or '{UNTRUSTED}',"
                             f" not {self.mode!r}")

    @classmethod
    def default(cls, allowed_roots: "tuple[str, ...] | list[str]" = ()) -> "OpenPolicy":
        """The policy for an image a user names: confined references, any backing format."""
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
        return replace(self, chain=other.chain, force_share=other.force_share)

    @property
    def is_untrusted(self) -> bool:
        return self.mode == UNTRUSTED

    def resolve(self, referrer: str, reference: str, what: str = "backing file") -> str:
        """Turn ``reference`` (as written inside ``referrer``) into a path we may open.

        Relative names are relative to the referrer's directory, as qemu does.
        """
        if not reference:
            raise SafetyError(f"empty {what} name", referrer)
        if "\0" in reference:
            raise SafetyError(f"{what} name contains a NUL byte", referrer)
        if "://" in referrer:  # a remote image names only objects beside it
            from .remote import refs
            if refs.is_remote(referrer):
                return refs.resolve_reference(referrer, reference, what)
        base_dir = os.path.dirname(os.path.abspath(referrer))
        path = beside(referrer, reference)
        real = os.path.realpath(path)
        if not self.allow_any_root or self.is_untrusted:
            roots = [os.path.realpath(base_dir)] + [os.path.realpath(r)
                                                    for r in self.allowed_roots]
            if not any(_inside(real, r) for r in roots):
                raise SafetyError(
                    f"{what} '{reference}' resolves to {real}, outside the image's directory"
                    " and the allowed roots (allow it with --allow-root DIR)", referrer)
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
        real = path if "://" in path else os.path.realpath(path)  # URLs: as they are
        if real in self.chain:
            raise SafetyError("backing chain loop: this file is already in the chain", path)
        if len(self.chain) >= self.max_depth:
            raise SafetyError(f"backing chain deeper than {self.max_depth} images", path)
        return replace(self, chain=self.chain + (real,))


def beside(image: str | os.PathLike, name: str) -> str:
    """Where ``name``, written inside ``image`` (a backing file, data file, parent), is:
    an absolute name as it stands, a relative one in the image's directory, as qemu
    resolves them. The one spelling of that rule; ``OpenPolicy.resolve`` adds the
    checks on where it may lead."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image)), name)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
