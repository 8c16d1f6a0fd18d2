"""Outputs that are uploads: what ``AtomicFile(target)`` gives when ``target`` is a
remote name (``s3://bucket/key``), with AtomicFile's interface, so every writer, export
target and ``dd``/``image`` output writes to object storage without knowing.

Two kinds, chosen by the writer (``AtomicFile(path, stream=True)``):

- :class:`StreamUpload`, for writers that only append (raw, streamOptimized VMDK, fixed
  VHD, DMG, the tar/tar.gz/OVA packages): parts go up as they fill, a bounded number in
  flight, so memory is a few parts whatever the output's size and no scratch disk is
  used. The first part stays in memory until ``commit()`` and is uploaded last (S3
  assembles parts by number, not by arrival), so a writer may still patch anything in
  its first part — the VMDK header and descriptor written at the end. A write further
  back than that is a writer bug and fails the upload rather than corrupting it.
- :class:`SpoolUpload`, for formats that seek back (qcow2's tables, dynamic VHD's BAT,
  VHDX, VDI, sparse VMDK): a temporary file in ``$TMPDIR`` (unlinked at once, so even a
  ``kill -9`` leaves nothing; its size is the output's), uploaded part by part at
  ``commit()``.

Either way the object appears only at ``commit()`` (CompleteMultipartUpload or one PUT)
and an existing object is replaced only then; ``discard()`` — called for any failure,
Ctrl-C or SIGTERM (``atomic.discard_unfinished``) — aborts the multipart upload, so no
half object and no pending upload remain. After a ``kill -9`` the pending upload cannot
be aborted by the dead process: a bucket lifecycle rule (AbortIncompleteMultipartUpload)
removes it; the object itself never appears.
"""

from __future__ import annotations

import os

from ..blockdev import FileBackend
from ..readbytes import ReadsBytes
from ..errors import ImageIOError, UnsupportedError

# S3's rules on part sizes (remote/s3.py has them; kept scheme-neutral here)
MAX_PARTS = 10_000


def _no_checkpoints(durable: bool, target: str) -> None:
    """A durable flush is a writer's checkpoint (``image``'s resumable runs): nothing of
    an upload lasts before it completes, so say so, and imaging goes on without
    checkpoints (``ops/imaging.py`` takes UnsupportedError so)."""
    if durable:
        raise UnsupportedError("not supported yet: checkpoints of an upload (an"
                               " interrupted run to object storage starts again)", target)


def open_output(target: str, *, unfinished: set, stream: bool = False, **kwargs):
    """The output ``AtomicFile(target, stream=...)`` stands for (``atomic.py``).
    ``unfinished`` is atomic's set of outputs to discard if the process is ended
    before they are (passed in, so this module does not import ``atomic``)."""
    cls = StreamUpload if stream else SpoolUpload
    return cls(target, unfinished)


def _open_upload(target: str):
    from . import open_upload
    return open_upload(target)


def _part_size() -> int:
    from .s3 import part_size_from_environment
    return part_size_from_environment()


class SpoolUpload(FileBackend):
    """A spooled upload (see the module docstring): a real, unnamed temporary file, so
    every writer (and anything it does with ``fd``) works as on a local file."""

    remote = True

    def __init__(self, target: str, unfinished: set) -> None:
        import tempfile
        self.target = target
        self.committed = False
        self.in_place = False
        self.tmp_path = None  # nothing to rename, nothing to resume
        self.upload = _open_upload(target)  # a missing library fails before any work
        self.part_size = _part_size()
        fd, spool = tempfile.mkstemp(prefix="diskforge-spool-")
        os.unlink(spool)
        self._unfinished = unfinished
        unfinished.add(self)
        FileBackend.__init__(self, target, writable=True, fd=fd, lock=False)

    def use_direct_io(self) -> bool:
        return False

    def flush(self, *, durable: bool = True) -> None:
        _no_checkpoints(durable, self.target)

    def commit(self, *, durable: bool | None = None) -> None:
        """Upload the spool, then make the object appear."""
        try:
            size = os.fstat(self.fd).st_size
            part = max(self.part_size, -(-size // MAX_PARTS))
            part = -(-part // (1 << 20)) << 20
            if size <= part:
                self.upload.put(self.pread(0, size))
            else:
                for number, offset in enumerate(range(0, size, part), 1):
                    self.upload.part(number, self.pread(offset, min(part, size - offset)))
                self.upload.complete()
        except BaseException:
            self.discard()
            raise
        self.committed = True
        self._unfinished.discard(self)
        self.close()

    def discard(self) -> None:
        self._unfinished.discard(self)
        self.close()
        if not self.committed:
            self.upload.abort()

    def detach(self) -> None:
        raise UnsupportedError("not supported yet: resuming an upload (an interrupted"
                               " run to object storage starts again)", self.target)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # as AtomicFile: a failure discards
        if exc_type is not None:
            self.discard()


class StreamUpload(ReadsBytes):
    """A streamed upload (see the module docstring). ``size`` is the highest offset
    written or truncated to; what lies between written ranges reads as zeros and is
    sent as zeros when the part holding it is cut."""

    remote = True
    is_block_device = False  # and no ``fd``: what needs a file (-C) says not supported

    def __init__(self, target: str, unfinished: set) -> None:
        self.path = self.target = target
        self.writable = True
        self.committed = False
        self.in_place = False
        self.tmp_path = None
        self.upload = _open_upload(target)
        self.base = _part_size()
        self.head = bytearray()         # part 1: [0, self.base), sent at commit
        self.tail = bytearray()         # not yet sent: [self.tail_at, + len(tail))
        self.tail_at = self.base
        self.number = 2                 # the next part to send
        self.end = 0                    # the output's size so far
        self.closed = False
        self._unfinished = unfinished
        unfinished.add(self)

    def _part_len(self, number: int) -> int:
        """Part ``number``'s size: the base size, doubled every 1,000 parts so an output
        of any size fits S3's 10,000 parts (parts but the last may differ in size)."""
        return min(self.base << ((number - 1) // 1000), 5 << 30)

    @property
    def size(self) -> int:
        return self.end

    def allocated_bytes(self) -> int:
        return self.end

    def _check(self) -> None:
        if self.closed:
            raise ImageIOError("write after the upload ended", self.target)

    def _grow_tail(self, upto: int) -> None:
        """Extend the unsent tail with zeros up to ``upto``, cutting parts as they fill."""
        from ..blockdev import ZEROES
        while self.tail_at + len(self.tail) < upto:
            k = min(upto - self.tail_at - len(self.tail), len(ZEROES))
            self.tail += memoryview(ZEROES)[:k]
            self._cut()

    def _cut(self, final: bool = False) -> None:
        while self.tail and (len(self.tail) >= self._part_len(self.number) or final):
            n = min(len(self.tail), self._part_len(self.number))
            self.upload.part(self.number, bytes(self.tail[:n]))
            del self.tail[:n]
            self.tail_at += n
            self.number += 1

    def pwrite(self, offset: int, data) -> None:
        self._check()
        mv = memoryview(data).cast("B")
        end = offset + len(mv)
        if offset < self.base:  # into the first part, held until commit
            k = min(end, self.base) - offset
            if len(self.head) < offset:
                self.head += bytes(offset - len(self.head))
            self.head[offset:offset + k] = mv[:k]
            mv, offset = mv[k:], offset + k
        if len(mv):
            if offset < self.tail_at:
                raise UnsupportedError(
                    f"internal: the writer went back to offset {offset}, in a part"
                    " already uploaded; this format must be spooled", self.target)
            self._grow_tail(offset)
            at = offset - self.tail_at
            self.tail[at:at + len(mv)] = mv
            self._cut()
        self.end = max(self.end, end)

    def write_zeroes(self, offset: int, length: int) -> None:
        from ..blockdev import ZEROES, pieces
        for pos, n in pieces(offset, length, len(ZEROES)):
            self.pwrite(pos, memoryview(ZEROES)[:n])

    def truncate(self, size: int) -> None:
        """Growing is free (zeros, sent when their part is cut); shrinking works only
        over what has not been sent."""
        self._check()
        if size < self.end:
            if self.number > 2 and size < self.tail_at:
                raise UnsupportedError("internal: truncating a streamed upload below what"
                                       " was already uploaded", self.target)
            del self.head[size:]
            del self.tail[max(0, size - self.tail_at):]
        self.end = size

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self.end - offset))
        if n == 0:
            return 0
        if offset + n <= self.base:
            piece = self.head[offset:offset + n]
            mv[:len(piece)] = piece
            mv[len(piece):n] = bytes(n - len(piece))
            return n
        if offset >= self.tail_at:
            piece = self.tail[offset - self.tail_at:offset - self.tail_at + n]
            mv[:len(piece)] = piece
            mv[len(piece):n] = bytes(n - len(piece))
            return n
        raise UnsupportedError("internal: reading back a part already uploaded",
                               self.target)

    def data_ranges(self, offset: int, end: int):
        end = min(end, self.end)
        if end > offset:
            yield offset, end - offset, True

    def punch_hole(self, offset: int, length: int) -> bool:
        return False

    def use_direct_io(self) -> bool:
        return False

    def flush(self, *, durable: bool = True) -> None:
        _no_checkpoints(durable, self.target)

    def commit(self, *, durable: bool | None = None) -> None:
        """Send what is left and the first part, then make the object appear."""
        self._check()
        try:
            if self.end <= self.base:
                self.upload.put(bytes(self.head) + bytes(self.end - len(self.head)))
            else:
                self._grow_tail(self.end)
                self._cut(final=True)
                self.head += bytes(self.base - len(self.head))
                self.upload.part(1, bytes(self.head))
                self.upload.complete()
        except BaseException:
            self.discard()
            raise
        self.committed = True
        self._unfinished.discard(self)
        self.close()

    def discard(self) -> None:
        self._unfinished.discard(self)
        if not self.committed:
            self.upload.abort()
        self.close()

    def detach(self) -> None:
        raise UnsupportedError("not supported yet: resuming an upload (an interrupted"
                               " run to object storage starts again)", self.target)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # as AtomicFile: a failure discards
        if exc_type is not None:
            self.discard()

    def close(self) -> None:
        self.closed = True
        self.head = bytearray()
        self.tail = bytearray()
