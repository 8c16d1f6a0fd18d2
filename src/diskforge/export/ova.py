"""OVA for vSphere, VMware Workstation and VirtualBox: an OVF 1.0 package in one tar.

Rules: DSP0243 1.0 (the envelope, ``ovf.py``; the package and the manifest,
``ova_package.py``) and what vSphere enforces: disks are stream-optimized VMDKs named
by the exact ``ovf:format`` URI; manifest lines are exactly ``SHA256(name)= hex``
(ESXi refuses ``SHA1 (name) = hex`` with spaces:
https://communities.vmware.com/t5/Virtual-Appliances-Discussions/Format-of-OVA-manifest-file-depending-on-OVF-or-VMX-version/td-p/2895698);
SHA256 needs vSphere 6.5 or later, older clients take only SHA1 (``--manifest sha1``;
VMware KB 2151537, and
https://williamlam.com/2016/11/default-hashing-algorithm-changed-in-ovftool-4-2-preventing-ovfova-import-using-vsphere-c-client.html);
the tar holds the ``.ovf`` first, then the ``.mf``, then the disks.

The disk is written with the registry's ``vmdk`` writer (``subformat=streamOptimized``)
to a private folder beside ``OUT`` (flock'ed while the export runs), hashed, and
packed; the folder is removed whatever happens, or by the next export to the same
``OUT`` after a ``kill -9``, and ``OUT`` appears atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..blockdev import BlockDevice
from .base import ExportOptions, Progress, round_up, write_disk

NAME = "ova"
SUMMARY = ("OVA (vSphere, Workstation, VirtualBox): OVF 1.0 + SHA256 manifest +"
           " stream-optimized VMDK")
OVF_LIMIT = 4 << 20
MAX_FILES = 4096
STREAM = "streamOptimized"


def export(source: BlockDevice, out: str, opts: ExportOptions,
           progress: Progress | None = None) -> list[str]:
    write_ova_for(source, out, opts, progress)
    return [out]


def write_ova_for(source: BlockDevice, out: str, opts: ExportOptions,
                  progress: Progress | None) -> None:
    from .ova_package import file_digest, manifest, write_ova
    from .ovf import Vm, envelope
    name = opts.vm_name(out)
    capacity = round_up(max(source.size, 1), 512)
    folder, lock = _work_folder(out)
    try:
        disk_name = f"{name}-disk1.vmdk"
        disk = os.path.join(folder, disk_name)
        write_disk("vmdk", f"subformat={STREAM}", source, disk, capacity, progress)
        ovf_name = f"{name}.ovf"
        ovf = envelope(Vm(name=name, disk_file=disk_name,
                          disk_file_size=os.stat(disk).st_size, capacity=capacity,
                          cpus=opts.cpus, memory_mib=opts.memory, firmware=opts.firmware))
        files: list[tuple[str, bytes | str]] = [(ovf_name, ovf)]
        if opts.manifest != "none":
            import hashlib
            digests = [(ovf_name, hashlib.new(opts.manifest, ovf).hexdigest()),
                       (disk_name, file_digest(disk, opts.manifest))]
            files.append((f"{name}.mf", manifest(digests, opts.manifest)))
        files.append((disk_name, disk))
        write_ova(out, files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


WORK_SUFFIX = ".diskforge-work"


def _work_folder(out: str) -> tuple[str, int]:
    """A private folder beside ``out`` for the disk being packed, and the descriptor
    of the lock file inside it, flock'ed for as long as the export runs. Folders a
    killed run left for the same ``out`` (their lock free) are removed first, saying
    so, as ``atomic.remove_stale`` removes a killed run's temporary files."""
    import fcntl
    import sys

    from ..errors import printable
    from ..remote import is_remote
    if is_remote(out):  # an upload: the disk is staged in $TMPDIR, the tar streamed
        folder = tempfile.mkdtemp(prefix=".diskforge-ova.", suffix=WORK_SUFFIX)
        fd = os.open(os.path.join(folder, "lock"), os.O_CREAT | os.O_EXCL | os.O_RDWR,
                     0o600)
        return folder, fd
    directory, base = os.path.split(os.path.abspath(out))
    for entry in os.listdir(directory):
        if not (entry.startswith(f".{base}.") and entry.endswith(WORK_SUFFIX)):
            continue
        stale = os.path.join(directory, entry)
        try:
            fd = os.open(os.path.join(stale, "lock"), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue          # no lock file: being created, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue          # its owner is alive
        else:
            shutil.rmtree(stale, ignore_errors=True)
            print(f"diskforge: removed {printable(stale)}, a work folder left by an"
                  " interrupted run", file=sys.stderr)
        finally:
            os.close(fd)
    folder = tempfile.mkdtemp(prefix=f".{base}.", suffix=WORK_SUFFIX, dir=directory)
    fd = os.open(os.path.join(folder, "lock"), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return folder, fd


# -- check ---------------------------------------------------------------------------------

def check(file, policy=None) -> list[str]:
    """(``policy`` is unused: the package's members are read as bytes, not opened as
    images.)"""
    return check_package(file)


def check_package(file) -> list[str]:
    """Every rule of an OVF package the tar ``file`` (a ``checkfile.CheckFile``)
    breaks: its layout, its descriptor's references, its disks and its manifest.
    Only the tar headers, the descriptor, the manifest and the disks' first sectors
    are read, plus each disk once when the manifest's digests are checked."""
    import tarfile

    from ..errors import printable
    from .ovf import read_envelope
    with file.open() as f:
        try:
            members = []
            for m in tarfile.open(fileobj=f, mode="r:"):
                members.append(m)   # bounded: a package of more files is no OVA
                if len(members) > MAX_FILES:
                    return [f"holds more than {MAX_FILES} files: not an OVF package"]
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            return [f"not an uncompressed tar archive ({e}): an OVA is a plain tar of"
                    " the .ovf, the .mf and the disks"]
        if not members:
            return ["the archive is empty"]
        problems, ovf, mf = _layout(members)
        if ovf is None:
            return problems
        try:
            files, disks = read_envelope(_read_member(f, ovf, OVF_LIMIT))
        except ValueError as e:
            return problems + [f"descriptor {printable(ovf.name)!r}: {e}"]
        by_name = {m.name: m for m in members}
        problems += _references(members, files)
        problems += _disks(f, by_name, disks)
        if mf is not None:
            from .ova_package import check_manifest
            try:
                text = _read_member(f, mf, OVF_LIMIT)
            except ValueError as e:
                problems.append(f"manifest: {e}")
            else:
                problems += check_manifest(text, {m.name: None for m in members},
                                           lambda name, alg: _digest(f, by_name[name], alg))
    return problems


def _layout(members) -> tuple[list[str], object, object]:
    """Problems of the archive's layout, and its descriptor and manifest members."""
    from ..errors import printable
    problems = []
    names = [m.name for m in members]
    if not names[0].endswith(".ovf"):
        problems.append(f"the first file is {printable(names[0])!r}, not the .ovf"
                        " descriptor")
    for m in members:
        if not m.isreg():
            problems.append(f"{printable(m.name)!r} is not a regular file")
        if "/" in m.name.strip("/") or m.name.startswith("/"):
            problems.append(f"{printable(m.name)!r} is in a folder: an OVA's files sit"
                            " at the top of the archive")
    ovfs = [m for m in members if m.name.endswith(".ovf")]
    if len(ovfs) != 1:
        problems.append(f"holds {len(ovfs)} .ovf descriptors, not one")
    mfs = [m for m in members if m.name.endswith(".mf")]
    if len(mfs) > 1:
        problems.append(f"holds {len(mfs)} manifests, not one")
    if ovfs and mfs and names.index(mfs[0].name) != names.index(ovfs[0].name) + 1:
        problems.append(f"the manifest {printable(mfs[0].name)!r} must come right after"
                        " the descriptor")
    return problems, ovfs[0] if ovfs else None, mfs[0] if mfs else None


def _references(members, files) -> list[str]:
    """The descriptor's References against the archive: present, sized, in order."""
    from ..errors import printable
    problems = []
    by_name = {m.name: m for m in members}
    refs = [href for _, href, _ in files]
    for _, href, size in files:
        m = by_name.get(href)
        if m is None:
            problems.append(f"the descriptor references {printable(href)!r}, which is not"
                            " in the archive")
        elif size is not None and size != m.size:
            problems.append(f"File {printable(href)!r}: ovf:size is {size}, the file is"
                            f" {m.size} bytes")
    packed = [m.name for m in members if not m.name.endswith((".ovf", ".mf", ".cert"))]
    for n in packed:
        if n not in refs:
            problems.append(f"{printable(n)!r} is in the archive but not in the"
                            " descriptor's References")
    if [n for n in packed if n in refs] != [r for r in refs if r in by_name]:
        problems.append("the files are not in the order of the descriptor's References")
    return problems


def _disks(f, by_name, disks) -> list[str]:
    """Each Disk: a stream-optimized VMDK, named by the exact format URI, of the
    capacity the descriptor states."""
    from ..errors import printable
    from .ovf import VMDK_STREAM_URI
    from .vmdk_peek import peek_file
    problems = []
    for d in disks:
        label = printable(d.file or d.disk_id)
        m = by_name.get(d.file) if d.file else None
        facts = peek_file(f, m.offset_data, d.file) if m is not None else None
        if facts is not None and d.format != VMDK_STREAM_URI:
            problems.append(f"disk {label}: ovf:format is {printable(d.format)!r}, not"
                            f" exactly '{VMDK_STREAM_URI}'")
        if m is not None and (facts is None or facts.create_type != STREAM):
            kind = "not a VMDK" if facts is None else f"createType={facts.create_type}"
            problems.append(f"disk {label} is not a stream-optimized VMDK ({kind})")
        if facts is not None and facts.capacity is not None and d.capacity is not None \
                and facts.capacity != d.capacity:
            problems.append(f"disk {label}: ovf:capacity says {d.capacity} bytes, the VMDK"
                            f" holds {facts.capacity}")
    return problems


def _read_member(f, m, limit: int) -> bytes:
    if m.size > limit:
        raise ValueError(f"{m.name} is {m.size} bytes, more than {limit}")
    f.seek(m.offset_data)
    return f.read(m.size)


def _digest(f, m, alg: str) -> str:
    import hashlib
    h = hashlib.new(alg)
    f.seek(m.offset_data)
    left = m.size
    while left:
        block = f.read(min(1 << 20, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()
