"""Finding the parent of a differencing VDI.

A VDI records no parent file name: only ``uuidLinkage``, the parent's ``uuidCreate``
(and ``uuidParentModify``, the parent's ``uuidModify`` when the child was made).
VirtualBox finds parents through its media registry (VirtualBox.xml, the .vbox
file); a lone file has no registry, so diskforge looks where VirtualBox puts them:
differencing images live in the VM's ``Snapshots/`` folder and their base in the VM
folder above it. The rule:

1. The ``*.vdi`` files (any case) of the image's own directory, then of its parent
   directory, in name order; at most ``MAX_CANDIDATES`` per directory are looked at.
   Only regular files, and only where the open policy lets the image name a file
   (by default anywhere, as for every backing file; in untrusted mode its own
   directory, and ``--allow-root DIR`` adds more), so in untrusted mode the parent
   directory is searched only when allowed.
2. A candidate matches when its ``uuidCreate`` is the child's ``uuidLinkage``. The
   first directory with a match wins; two matches there are told apart by
   ``uuidParentModify``, and are an error if that does not settle it.
3. The match is opened through the open policy as a ``vdi`` (never probed), so
   chain depth and loops are refused as for every backing file; a file that names
   itself is a loop too.

A parent whose ``uuidModify`` differs from the child's ``uuidParentModify`` was
changed after the child was made; it is used, with a warning in ``check`` and
``info``.
"""

from __future__ import annotations

import errno
import os

from ...blockdev import FileBackend
from ...errors import DiskforgeError, ImageIOError, SafetyError, UnsupportedError
from ...policy import OpenPolicy, beside
from ...registry import open_image
from .structs import (HEADER0_SIZE, HEADER1_SIZE, NULL_UUID, PREHEADER_SIZE,
                      VDI_IMAGE_SIGNATURE, VDI_IMAGE_VERSION, VDI_IMAGE_VERSION_OLD,
                      VDIHEADER0, VDIHEADER1, VDIPREHEADER, uuid_text)

MAX_CANDIDATES = 256


def _ids(path: str) -> tuple[bytes, bytes] | None:
    """``(uuidCreate, uuidModify)`` of a VDI file, or None when it is not one (a
    glance: nothing locked, only the headers read)."""
    try:
        with FileBackend(path, lock=False, referenced=True) as f:
            head = f.pread(0, PREHEADER_SIZE + HEADER1_SIZE)
    except DiskforgeError:
        return None
    if len(head) < PREHEADER_SIZE + HEADER0_SIZE:
        return None
    pre = VDIPREHEADER.parse(head)
    if pre.u32Signature != VDI_IMAGE_SIGNATURE:
        return None
    if pre.u32Version == VDI_IMAGE_VERSION and len(head) == PREHEADER_SIZE + HEADER1_SIZE:
        h = VDIHEADER1.parse(head[PREHEADER_SIZE:])
    elif pre.u32Version == VDI_IMAGE_VERSION_OLD:
        h = VDIHEADER0.parse(head[PREHEADER_SIZE:])
    else:
        return None
    return bytes(h.uuidCreate), bytes(h.uuidModify)


def search_dirs(image: str) -> list[str]:
    """Where a parent is looked for: the image's directory, then the one above."""
    own = os.path.dirname(os.path.abspath(image))
    up = os.path.dirname(own)
    return [own] if up == own else [own, up]


def _candidates(folder: str) -> tuple[list[str], bool]:
    """The ``*.vdi`` regular files of ``folder`` in name order (at most
    MAX_CANDIDATES), and whether more were left out."""
    try:
        entries = sorted((e for e in os.scandir(folder) if e.name.lower().endswith(".vdi")),
                         key=lambda e: e.name)
    except OSError:
        return [], False
    out = []
    for e in entries:
        try:
            if e.is_file():
                out.append(e.path)
        except OSError:
            continue
        if len(out) >= MAX_CANDIDATES:
            return out, True
    return out, False


def find_parent(dev) -> str:
    """The path of ``dev``'s parent, by the rule in the module docstring."""
    if "://" in dev.path:
        raise UnsupportedError("not supported yet: a differencing VDI read from a URL (its"
                               " parent is found by UUID among the files of a directory,"
                               " which a web server or bucket does not list)", dev.path)
    policy = dev.policy or OpenPolicy()
    want, modify = dev.uuid_linkage, dev.uuid_parent_modify
    me = os.path.realpath(dev.path)
    where = f"{dev.header_name}.uuidLinkage"
    refused = None
    for folder in search_dirs(dev.path):
        matches = []
        names, more = _candidates(folder)
        if more:
            dev.notes.append(f"{folder} holds more than {MAX_CANDIDATES} .vdi files; only"
                             f" the first {MAX_CANDIDATES} were looked at for the parent")
        for cand in names:
            try:
                policy.resolve(dev.path, cand, "VDI parent")
            except SafetyError as e:
                refused = refused or e
                continue
            ids = _ids(cand)
            if ids is not None and ids[0] == want:
                matches.append((cand, ids[1]))
        if len(matches) > 1 and modify != NULL_UUID:
            matches = [m for m in matches if m[1] == modify] or matches
        if len(matches) > 1:
            names = ", ".join(os.path.basename(m[0]) for m in matches)
            raise DiskforgeError(f"{where}: several files in {folder} have uuidCreate"
                                 f" {uuid_text(want)} ({names}); cannot tell which is the"
                                 " parent", dev.path)
        if matches:
            path = matches[0][0]
            if os.path.realpath(path) == me:
                raise SafetyError(f"{where}: the image names itself as its parent"
                                  " (backing chain loop)", dev.path)
            return path
    hint = " (files outside the image's directory were not looked at: allow their" \
        " directory with --allow-root DIR)" if refused is not None and policy.is_untrusted \
        else ""
    # qemu-img's nested words where a backing file is missing (open_image adds "Could
    # not open 'CHILD': Could not open backing file: "); a VDI names no file, so the
    # parent is named by the uuidCreate it must have
    err = ImageIOError(f"Could not open the parent with uuidCreate {uuid_text(want)}"
                       f" ({where}): No such file or directory (parent not found: no .vdi file in"
                       f" {' or '.join(search_dirs(dev.path))} has it){hint}", dev.path)
    err.backing_missing, err.errno = True, errno.ENOENT
    raise err


def open_parent(dev):
    """Open ``dev``'s parent (a VdiDevice) through the open policy. Under
    ``open_backing=False`` (``info`` without ``--backing-chain``, ``rebase -u``) the
    parent is only looked for, by the headers of the files beside the image, never
    opened: ``dev.parent_path`` names it for ``info`` when it is found, and a missing
    one is a warning, not an error (as a qcow2 overlay's missing backing file is
    then); None is returned."""
    policy = dev.policy or OpenPolicy().descend(dev.path)
    if not policy.open_backing:
        try:
            dev.parent_path = find_parent(dev)
        except ImageIOError as e:
            if not getattr(e, "backing_missing", False):
                raise
            dev.notes.append(f"parent not found: no .vdi file in"
                             f" {' or '.join(search_dirs(dev.path))} has uuidCreate"
                             f" {uuid_text(dev.uuid_linkage)}")
        return None
    path = dev.parent_path = find_parent(dev)
    parent = open_image(path, "vdi", policy=policy)
    _note_modified(dev, parent)
    return parent


def _note_modified(dev, parent) -> None:
    modify = dev.uuid_parent_modify
    if modify != NULL_UUID and parent.uuid_modify != modify:
        dev.notes.append(f"the parent {os.path.basename(parent.path)} was modified after"
                         f" this image was made (its uuidModify is"
                         f" {uuid_text(parent.uuid_modify)}, this image's uuidParentModify"
                         f" {uuid_text(modify)})")


def reparent(dev, name: str):
    """Open the new parent ``name`` for ``set_backing``: a VDI that the rule above will
    find again (in the image's directory or the one above it)."""
    path = beside(dev.path, name)
    if os.path.dirname(os.path.realpath(path)) not in {os.path.realpath(d)
                                                       for d in search_dirs(dev.path)}:
        raise SafetyError(f"a VDI records no parent file name, only its UUID, so the"
                          f" parent '{name}' must be in the image's directory or the one"
                          " above it to be found again", dev.path)
    policy = dev.policy or OpenPolicy().descend(dev.path)
    policy.resolve(dev.path, path, "VDI parent")
    return open_image(path, "vdi", policy=policy)
