"""``convert -C``: copy offloading, as qemu-img's ``-C`` asks for.

The data moves inside the kernel (``copy_file_range``: no copy through user space, and
on file systems that share extents — XFS, Btrfs, NFS 4.2 — no data copy at all), one
call per run of the source whose bytes lie unchanged in a host file: raw files, fixed
and dynamic VHD, VHDX, flat extents and uncompressed grains of VMDK, uncompressed
clusters of qcow2 (``BlockDevice.host_backend`` says which), through the whole backing
chain. Holes stay holes: zero runs are never copied.

What qemu-img 7.2 accepts, diskforge accepts (``cli/image.py`` has the refusals: ``-c``,
``-S``, ``--salvage``). qemu-img tries ``copy_range`` and, when the target or the
source cannot take it, silently copies the ordinary way; so does diskforge:
- the target must be a raw regular file (a new one, or ``-n``'s existing one): there
  the disk's bytes are the file's. Any other target format is written by the ordinary
  convert pipeline (``offload_target`` returns None);
- a run whose bytes are not in a host file (compressed, encrypted, generated) is read
  and written, all-zero pieces left as holes;
- where the kernel refuses copy_file_range between the two files (EXDEV on old
  kernels, EINVAL for a block device, EOPNOTSUPP), the rest is read and written.
"""

from __future__ import annotations

import os
import stat

from ..blockdev import (BlockDevice, ExtentKind, FileBackend, ImageWriter,
                        chain_extents, is_zero)
from ..errors import ImageIOError

CHUNK = 64 << 20   # one copy_file_range call at most (progress between calls)
READ_CHUNK = 8 << 20  # pieces read and written where the kernel cannot copy
_CANNOT_OFFLOAD = {18, 22, 38, 95}  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP


def offload_target(writer: ImageWriter, target_format: str) -> int | None:
    """The descriptor of the raw regular file ``writer`` writes the disk into, byte for
    byte, or None when copy offloading cannot write it (another format, a device).
    ``target_format``: the format ``writer`` writes (its file is the disk only for
    raw)."""
    if not hasattr(os, "copy_file_range") or target_format != "raw":
        return None
    dev = getattr(writer, "device", None)  # convert -n: the open target image
    if dev is not None:
        if dev.format != "raw" or dev.backing is not None:
            return None
        out = getattr(dev, "backend", None)
    else:
        out = getattr(writer, "out", None)  # the raw writer's new file
    if not isinstance(out, FileBackend) or getattr(writer, "in_place", False) \
            or getattr(out, "in_place", False) or out.fd < 0:
        return None
    if not stat.S_ISREG(os.fstat(out.fd).st_mode):
        return None
    return out.fd


def offload_copy(src: BlockDevice, writer: ImageWriter, out_fd: int,
                 progress=None) -> None:
    """Copy ``src`` into ``writer`` (whose raw file is ``out_fd``, from
    :func:`offload_target`): host-file runs with copy_file_range, other data read and
    written, zero runs through ``writer.zero``; then ``writer.finish()``. The writer is
    aborted (nothing left behind) on failure."""
    total, done = src.size, 0
    state = {"kernel": True}
    try:
        for le in chain_extents(src):
            ext = le.extent
            if ext.kind is ExtentKind.DATA:
                host = le.device.host_backend(ext) if state["kernel"] else None
                if host is not None:
                    _copy_range(src, writer, host, ext.host_offset, out_fd, ext.offset,
                                ext.length, state, done, total, progress)
                else:
                    _copy_read(src, writer, ext.offset, ext.length)
            else:  # ZERO, or a BACKING run beyond the chain: reads as zeros
                writer.zero(ext.offset, ext.length)
            done += ext.length
            if progress:
                progress(done, total)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def _copy_range(src: BlockDevice, writer: ImageWriter, host: FileBackend, host_off: int,
                out_fd: int, offset: int, length: int, state: dict, done: int,
                total: int, progress) -> None:
    pos, end = offset, offset + length
    while pos < end:
        try:
            n = os.copy_file_range(host.fd, out_fd, min(CHUNK, end - pos),
                                   host_off + pos - offset, pos)
        except OSError as e:
            if e.errno not in _CANNOT_OFFLOAD:
                raise ImageIOError.from_os(e, host.path) from None
            state["kernel"] = False  # as qemu-img: stop trying, copy the ordinary way
            n = 0
        if n == 0:  # refused, or the host file ends early (a truncated image): read
            _copy_read(src, writer, pos, end - pos)
            return
        pos += n
        if progress:
            progress(done + pos - offset, total)


def _copy_read(src: BlockDevice, writer: ImageWriter, offset: int, length: int) -> None:
    """The ordinary copy of a run: read it, write what is not all zeros."""
    buf = bytearray(min(READ_CHUNK, length))
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(buf), end - pos)
        mv = memoryview(buf)[:n]
        src.readinto(pos, mv)
        if is_zero(buf, 0, n):
            writer.zero(pos, n)
        else:
            writer.write(pos, mv)
        pos += n
