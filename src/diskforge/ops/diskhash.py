"""The integrity record's digests: sha256 of the whole virtual disk and of each chunk.

Why threads: image, verify and restore's read-back hash every byte twice (the
whole-disk digest and its chunk's), and sha256 (1.9 GB/s a core here) is slower than
the copy around it: a 2 GiB disk imaged to raw spent 2.5 s of its 3.1 s hashing in
the main thread. The two digests are independent streams of the same bytes, and
hashlib releases the GIL, so each gets a thread of its own (a *lane*) that takes the
pieces in order, while the caller reads on. The caller's buffer is reused as soon as
the convert tap returns, so a lane hashes a copy of each piece; at most ``DEPTH``
pieces wait per lane. With one thread (``parallel.threads()``: ``-m 1``), and for
pieces too small to be worth a hand-off, everything is hashed in the caller.

A whole chunk fed as zeros has a known digest (computed once per chunk size), so only
the whole-disk digest reads through a sparse disk's zeros. It must: sha256 has no
shortcut over a run of zero blocks.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import weakref

from .. import parallel
from ..blockdev import (ZERO_BUFFER_SIZE, ZEROES, BlockDevice, ExtentKind, aligned_buffer,
                        chain_extents, pieces)

CHUNK = 64 << 20
# lanes start with the first piece of data at least this large: a small image's
# hashing is not worth two threads
LANE_MIN = 256 << 10
DEPTH = 8   # pieces waiting per lane: the copies held are at most 2 * DEPTH pieces
_ZERO_CHUNK_DIGESTS: dict[int, str] = {}   # chunk size -> sha256 of that many zeros


def _hash_into(h, piece, zeros: int) -> None:
    """``h.update(piece)``, or ``zeros`` zero bytes when ``piece`` is None."""
    if piece is not None:
        h.update(piece)
        return
    for _, k in pieces(0, zeros, ZERO_BUFFER_SIZE):
        h.update(ZEROES[:k])


def _call(fn, *args) -> None:
    """Do a lane's task in the caller (no lanes)."""
    fn(*args)


def _zero_chunk_digest(size: int) -> str:
    digest = _ZERO_CHUNK_DIGESTS.get(size)
    if digest is None:
        h = hashlib.sha256()
        _hash_into(h, None, size)
        digest = _ZERO_CHUNK_DIGESTS[size] = h.hexdigest()
    return digest


class _Chunks:
    """The chunk digests so far and the running one: used by one thread at a time
    (the chunk lane, or the caller when there are no lanes)."""

    __slots__ = ("size", "current", "digests")

    def __init__(self, size: int, digests: list[str]):
        self.size, self.current, self.digests = size, hashlib.sha256(), digests

    def update(self, piece, n: int) -> None:
        _hash_into(self.current, piece, n)

    def cut(self) -> None:
        self.digests.append(self.current.hexdigest())
        self.current = hashlib.sha256()

    def zero_chunk(self) -> None:
        self.digests.append(_zero_chunk_digest(self.size))


class _Lane:
    """A thread doing one digest's work in the order it was queued. Its tasks refer
    to the digests, never to the DiskHasher, so a hasher dropped without ``close``
    is collected and its finalizer stops the lanes."""

    def __init__(self, name: str):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.room = threading.Semaphore(DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, fn, *args) -> None:
        self.room.acquire()
        self.tasks.put((fn, args))

    def _run(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            fn, args = task
            del task
            try:
                if self.error is None:   # after a failure the rest is skipped
                    fn(*args)
            except BaseException as e:  # re-raised in the caller's thread
                self.error = e
            finally:
                del fn, args
                self.room.release()

    def stop(self) -> None:
        self.tasks.put(None)
        self.thread.join()


def _stop(lanes: tuple[_Lane, ...]) -> None:
    for lane in lanes:
        lane.stop()


class DiskHasher:
    """sha256 of the whole virtual disk and of each ``chunk``-byte chunk, fed in order
    (the convert tap: ``None`` data means zeros, fed without being read).

    ``finish()`` gives ``(whole-disk digest, chunk digests)``; ``close()`` (or
    ``finish``) stops the lanes. ``position``/``chunks``: where an interrupted run
    resumes, with the digests of the chunks before it."""

    def __init__(self, chunk: int = CHUNK, *, position: int = 0,
                 chunks: list[str] | None = None):
        self.chunk = chunk
        self.position = position
        self.whole = hashlib.sha256()
        self._chunks = _Chunks(chunk, list(chunks or []))
        self._lanes: tuple[_Lane, ...] = ()
        self._finalizer = None

    def feed(self, offset: int, data, length: int) -> None:
        if offset != self.position:
            raise AssertionError(f"hash fed out of order: {offset} != {self.position}")
        lanes = self._lanes
        if not lanes and data is not None and length >= LANE_MIN and \
                parallel.threads() > 1:
            lanes = self._start()
        for lane in lanes:
            if lane.error is not None:
                raise lane.error
        whole, chunks = self.whole, self._chunks
        do_whole, do_chunk = (lanes[0].put, lanes[1].put) if lanes else (_call, _call)
        pos = 0
        while pos < length:
            n = min(self.chunk - self.position % self.chunk, length - pos)
            piece = None
            if data is not None:
                piece = data[pos:pos + n]
                if lanes:
                    piece = bytes(piece)   # the caller reuses its buffer on return
            do_whole(_hash_into, whole, piece, n)
            if data is None and n == self.chunk:   # a whole chunk of zeros
                do_chunk(chunks.zero_chunk)
            else:
                do_chunk(chunks.update, piece, n)
                if (self.position + n) % self.chunk == 0:
                    do_chunk(chunks.cut)
            pos += n
            self.position += n

    def chunk_digests(self) -> list[str]:
        """The digests of the chunks hashed so far (waits for the lanes to catch up)."""
        self._sync()
        return list(self._chunks.digests)

    def finish(self) -> tuple[str, list[str]]:
        self._sync()
        self.close()
        if self.position % self.chunk:
            self._chunks.cut()
        return self.whole.hexdigest(), self._chunks.digests

    def close(self) -> None:
        """Stop the lanes once they have done the work queued (a few pieces); the
        hasher is of no use after."""
        if self._finalizer is not None:
            self._finalizer()
        self._lanes = ()

    def _start(self) -> tuple[_Lane, ...]:
        lanes = self._lanes = (_Lane("diskforge-hash-disk"), _Lane("diskforge-hash-chunks"))
        self._finalizer = weakref.finalize(self, _stop, lanes)
        return lanes

    def _sync(self) -> None:
        """Wait until every lane has done what it was given; raise a lane's error."""
        lanes = self._lanes
        if not lanes:
            return
        done = [threading.Event() for _ in lanes]
        for lane, event in zip(lanes, done):
            lane.put(event.set)
        for event in done:
            event.wait()
        for lane in lanes:
            if lane.error is not None:
                raise lane.error


def hash_device(dev: BlockDevice, *, chunk: int = CHUNK, progress=None,
                batch: int = 1 << 20) -> tuple[str, list[str]]:
    """Whole-disk and per-chunk sha256 of a device, reading only what is not zero
    (the backing chain resolved by ``blockdev.chain_extents``)."""
    hasher = DiskHasher(chunk)
    try:
        buf, start = aligned_buffer(batch)
        view = memoryview(buf)[start:start + batch]
        for le in chain_extents(dev):
            e = le.extent
            if e.kind is ExtentKind.ZERO:
                hasher.feed(e.offset, None, e.length)
            else:
                for off, n in pieces(e.offset, e.length, batch):
                    dev.readinto(off, view[:n])
                    hasher.feed(off, view[:n], n)
            if progress:
                progress(e.offset + e.length, dev.size)
        return hasher.finish()
    finally:
        hasher.close()
