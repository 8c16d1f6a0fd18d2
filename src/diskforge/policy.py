"""Which files an image may make us open.

Images name other files: backing files, external data files, VMDK extents, VHD parent
locators. A hostile image could name ``/etc/shadow`` or ``/dev/sda`` and have its bytes
appear as disk contents, or name itself and loop. So a referenced file is opened only
when it resolves inside the referring image's own directory (or a root the caller
allowed), chains are depth-limited, and a file already in the chain is refused.

The user's own command-line choices (``-B base``, the image opened) are not checked:
the policy guards what *files* name, not what *people* name.

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


@dataclass(frozen=True)
class OpenPolicy:
    allowed_roots: tuple[str, ...] = ()
    allow_any_root: bool = False
    max_depth: int = DEFAULT_MAX_DEPTH
    force_share: bool = False
    # real paths of the images already opened above this one in the chain
    chain: tuple[str, ...] = field(default=(), repr=False)

    def resolve(self, referrer: str, reference: str, what: str = "backing file") -> str:
        """Turn ``reference`` (as written inside ``referrer``) into a path we may open.

        Relative names are relative to the referrer's directory, as qemu does.
        """
        if not reference:
            raise SafetyError(f"empty {what} name", referrer)
        if "\0" in reference:
            raise SafetyError(f"{what} name contains a NUL byte", referrer)
        base_dir = os.path.dirname(os.path.abspath(referrer))
        path = reference if os.path.isabs(reference) else os.path.join(base_dir, reference)
        real = os.path.realpath(path)
        if not self.allow_any_root:
            roots = [os.path.realpath(base_dir)] + [os.path.realpath(r)
                                                    for r in self.allowed_roots]
            if not any(_inside(real, r) for r in roots):
                raise SafetyError(
                    f"{what} '{reference}' resolves to {real}, outside the image's directory"
                    " and the allowed roots (allow it with --allow-root DIR)", referrer)
        return path

    def descend(self, path: str) -> "OpenPolicy":
        """The policy for opening ``path`` one level further down the chain."""
        real = os.path.realpath(path)
        if real in self.chain:
            raise SafetyError("backing chain loop: this file is already in the chain", path)
        if len(self.chain) >= self.max_depth:
            raise SafetyError(f"backing chain deeper than {self.max_depth} images", path)
        return replace(self, chain=self.chain + (real,))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
