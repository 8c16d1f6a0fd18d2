"""raw: the disk bytes as they are, in a regular file or a block device.

Sparse-aware both ways: extents come from SEEK_DATA/SEEK_HOLE (holes report as ZERO,
"present", like qemu's file driver), and the writer leaves zero runs as holes, then
sets the final size with ftruncate. Written to a block device, the writer writes in
place (``AtomicFile``'s rule for devices) and zeroes zero runs with BLKZEROOUT.

Options follow qemu-img: ``preallocation=off|falloc|full``.
"""

from __future__ import annotations

import os

from ...atomic import AtomicFile, reserve_ahead
from ...devices import is_block_device
from ...blockdev import FileBackend, FileBytesDevice, ImageInfo, ImageWriter
from ...errors import UnsupportedError, UsageError
from ...registry import Format, Measurement, OptionsFrom

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    from ...options import Options
    from .options import RawOptions

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device


def _zero_out(backend: FileBackend, offset: int, length: int) -> None:
    """Make a range read as zeros: a hole in a file, BLKZEROOUT on a device, else writes."""
    if length <= 0:
        return
    if backend.is_block_device:
        import fcntl
        import struct
        try:
            fcntl.ioctl(backend.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
    elif backend.punch_hole(offset, length):
        return
    backend.write_zeroes(offset, length)


class RawDevice(FileBytesDevice):
    format = "raw"

    def _write(self, offset: int, mv: memoryview) -> None:
        self.backend.pwrite(offset, mv)

    def _write_zeroes(self, offset: int, length: int) -> None:
        _zero_out(self.backend, offset, length)

    def flush(self) -> None:
        if self.writable:
            self.backend.flush()

    def resize(self, size: int, *, shrink: bool = False) -> None:
        self.check_writable(0, 0)
        if self.backend.is_block_device:
            raise UnsupportedError("cannot resize a block device", self.path)
        if size < self.size and not shrink:
            raise UsageError("shrinking needs --shrink", self.path)
        self.backend.truncate(size)
        self.size = size

    def preallocate(self, offset: int, length: int, mode: str) -> None:
        """``resize --preallocation``: ``falloc`` reserves the range with fallocate,
        ``full`` writes zeros, as qemu's file driver; raw has no metadata to make."""
        self.check_writable(offset, length)
        if mode == "off":
            return
        if mode not in ("falloc", "full"):
            raise UsageError(f"Unsupported preallocation mode: {mode}", self.path)
        if self.backend.is_block_device:
            raise UnsupportedError(f"not supported yet: --preallocation={mode} on a"
                                   " block device", self.path)
        if length <= 0:
            return
        if mode == "full":
            self.backend.write_zeroes(offset, length)
            return
        from ..._fallocate import allocate
        allocate(self.backend.fd, offset, length)

    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path, format="raw", virtual_size=self.size,
                         actual_size=self.backend.allocated_bytes())

class RawWriter(ImageWriter):
    granularity = 4096

    def __init__(self, path: str, size: int, options: RawOptions,
                 resume_from: str | None = None):
        self.size = size
        self.options = options
        if resume_from is not None:  # an interrupted run's partial file, as it was
            self.out = AtomicFile.reopen(path, resume_from)
        else:  # a block device is written in place; this writer zeroes its zero runs
            self.out = AtomicFile(path, zero_fill=False, stream=True)
        self.in_place = self.out.in_place
        self.reserve = None
        try:
            self.out.truncate(size)  # on a device: refused when it is too small
            if resume_from is None and not self.in_place \
                    and options.preallocation == "falloc" and size \
                    and not getattr(self.out, "remote", False):
                from ..._fallocate import allocate
                allocate(self.out.fd, 0, size)
            elif resume_from is None and options.preallocation == "off":
                self.reserve = reserve_ahead(self.out, limit=size)
        except BaseException:
            self.out.discard()
            raise

    def write_prepared(self, offset: int, data) -> None:
        if self.reserve:
            self.reserve.write(offset, memoryview(data).nbytes)
        self.out.pwrite(offset, data)

    def zero(self, offset: int, length: int) -> None:
        if self.in_place:
            _zero_out(self.out, offset, length)
        elif self.options.preallocation == "full":
            self.out.write_zeroes(offset, length)
        elif self.reserve:
            self.reserve.zeros(offset, length)
        # else: a new sparse file already reads zeros there (falloc'd blocks too)

    def _finish(self) -> None:
        if self.reserve:
            self.reserve.punch_rest()
        if self.options.preallocation == "full" and not self.in_place:
            for o, n, data in list(self.out.data_ranges(0, self.size)):
                if not data:
                    self.out.write_zeroes(o, n)

    def abort(self) -> None:
        self.out.discard()  # on a device: closes it (what was written stays)

    def checkpoint(self) -> dict:
        self.out.flush(durable=True)
        return {"partial": None if self.in_place else self.out.tmp_path}

    def suspend(self) -> None:
        self.out.detach()


class RawFormat(Format):
    name = "raw"
    extensions = ("raw", "img", "bin")
    description = "raw disk bytes (regular file or block device), sparse-aware"
    options = OptionsFrom("diskforge.formats.raw.options:RawOptions")
    random_write = True

    def probe(self, head: bytes, tail: bytes, file_size: int) -> int:
        return 1  # anything is a raw disk; every real format outbids this

    def open(self, path: str, *, writable: bool = False, policy=None,
             backend=None) -> RawDevice:
        return RawDevice(path, writable=writable, backend=backend)

    def qemu_driver(self, device) -> str:
        return "raw"

    def writer(self, path: str, size: int, options: Options, *, backing=None) -> RawWriter:
        if backing is not None:
            raise UnsupportedError("raw images cannot have a backing file", path)
        if not isinstance(options, self.options):
            raise UsageError("internal: raw writer given foreign options", path)
        return RawWriter(os.fspath(path), size, options)

    def resume_writer(self, path: str, size: int, options: Options, *, backing=None,
                      state: dict) -> RawWriter:
        partial = state.get("partial")
        if partial is None and not is_block_device(path):
            raise UsageError("the saved state names no partial file", path)
        return RawWriter(os.fspath(path), size, options, resume_from=partial)

    def measure(self, size: int, options: Options, allocated) -> Measurement:
        return Measurement(required=size, fully_allocated=size)


FORMAT = RawFormat()
