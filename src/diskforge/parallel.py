"""Decoding compressed units — qcow2 clusters, DMG chunks, VMDK grains — on every core.

Why: a compressed image is read a unit at a time, and one core inflating units one
after another is what made diskforge slower than qemu-img on compressed sources (whose
reads are one coroutine, one core). zlib, zstandard, bz2 and lzma release the GIL while
they decode, and so does LZFSE (called through ctypes, which drops it), so threads give
real parallelism; ADC is pure Python and gains nothing, but loses nothing either.

Three ways in, one shared pool of worker threads (``diskforge-decode_N``, started on
first use, as many as the CPUs):

- :func:`run` — a read that covers several units: the format gathers them (bounds
  checked, compressed bytes read with one pread per contiguous run of the file), then
  ``run(decode, units)`` decodes them on the pool *and* in the calling thread, each
  unit writing its output straight into its own slice of the caller's buffer. It
  returns only when every unit has finished, so no worker ever touches the buffer
  afterwards. Memory is the caller's buffer plus the compressed bytes of that read.
- :func:`start` and :class:`Ahead` — read-ahead (qcow2, VMDK): when reads walk forward,
  the units of the next read (of the same size) are decoded into a buffer of the
  reader's own while the caller uses this one; the next read copies them from there.
- :func:`submit` — read-ahead by unit (DMG, whose chunks are as large as a read): the
  reader bounds the bytes in flight.

Errors come out in order: when units fail, the one raised is the first failing unit's
(what a loop over the units would have raised), units after a failure are not started,
and the pool never hangs on it — each unit's own error (a ``FormatError`` naming file,
structure and field) is re-raised unchanged in the caller's thread.

How many threads: :func:`threads` — the CPU count, or what :func:`set_threads` set for
the process, or what :func:`limit` set for the code it wraps (a context variable, so
one convert's ``-m 1`` does not slow another thread's; ``convert -m N`` uses it, and
``-m 1`` reads in one thread as before). ``decoded_by`` counts the units each thread
decoded (tests check with it that the pool is really used; it is not a timing).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator, Sequence

_threads: int | None = None          # None: the CPU count
_limit: contextvars.ContextVar = contextvars.ContextVar("diskforge_decode_threads",
                                                        default=None)
_pool = None
_pool_lock = threading.Lock()
_count_lock = threading.Lock()

#: units decoded per thread name (cumulative, for tests; forgotten past 256 names, so a
#: long-running server whose client threads each decode stays bounded)
decoded_by: collections.Counter = collections.Counter()


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads() -> int:
    """How many threads decode at once (the caller's included)."""
    return _limit.get() or _threads or cpu_count()


def _check(n: int | None) -> None:
    if n is not None and n < 1:
        from .errors import UsageError
        raise UsageError(f"invalid thread count {n}: must be at least 1")


def set_threads(n: int | None) -> None:
    """Decode with at most ``n`` threads in this process (None: the CPU count; 1: in
    the caller only)."""
    global _threads
    _check(n)
    _threads = n


@contextlib.contextmanager
def limit(n: int | None) -> Iterator[None]:
    """Decode with at most ``n`` threads inside the ``with`` block, in this thread
    (None: no change)."""
    if n is None:
        yield
        return
    _check(n)
    token = _limit.set(n)
    try:
        yield
    finally:
        _limit.reset(token)


def _executor():
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            pool = _pool
            if pool is None:
                from concurrent.futures import ThreadPoolExecutor
                from ._malloc import keep_freed_memory
                keep_freed_memory()   # decoding churns buffers: see _malloc.py
                pool = _pool = ThreadPoolExecutor(cpu_count(),
                                                  thread_name_prefix="diskforge-decode")
    return pool


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _count(n: int) -> None:
    name = threading.current_thread().name
    with _count_lock:
        if len(decoded_by) > 256 and name not in decoded_by:
            decoded_by.clear()
        decoded_by[name] += n


class _Job:
    """One :func:`run`: items are claimed in order by whichever thread asks next."""

    __slots__ = ("fn", "items", "lock", "next", "left", "failed_at", "error", "done",
                 "cancelled")

    def __init__(self, fn: Callable, items: Sequence):
        self.fn = fn
        self.items = items
        self.lock = threading.Lock()
        self.next = 0
        self.left = len(items)        # items neither finished nor skipped
        self.failed_at = len(items)   # index of the first failure (so far)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancelled = False
        if not items:
            self.done.set()

    def work(self) -> None:
        fn, items, lock = self.fn, self.items, self.lock
        n = len(items)
        ran = 0
        i = -1
        while True:
            with lock:
                if i >= 0:
                    self.left -= 1
                    if not self.left:
                        self.done.set()
                i = self.next
                if i >= n:
                    break
                self.next = i + 1
                skip = self.cancelled or i > self.failed_at
            if skip:
                continue
            try:
                fn(items[i])
                ran += 1
            except BaseException as e:  # re-raised, in order, by run()
                with lock:
                    if i < self.failed_at:
                        self.failed_at, self.error = i, e
        if ran:
            _count(ran)

    def cancel(self) -> None:
        """Start no more items (those running finish; :meth:`wait` waits for them)."""
        with self.lock:
            self.cancelled = True

    def wait(self) -> None:
        """Wait until no item runs any more (cancelled or not), raising nothing."""
        self.done.wait()

    def settle(self) -> None:
        """Help with the items left and wait for all (``failed_at`` and ``error`` then
        say which failed first, if any)."""
        try:
            self.work()
            self.done.wait()
        except BaseException:
            self.cancel()   # interrupted while waiting: stop the helpers claiming more
            raise

    def finish(self) -> None:
        """:meth:`settle`, then raise the first failing item's error."""
        self.settle()
        if self.error is not None:
            raise self.error


def run(fn: Callable[[object], None], items: Sequence) -> None:
    """Call ``fn(item)`` for every item, on up to :func:`threads` threads (this one
    included); return when all are done. ``fn`` must only write where its own item
    says (disjoint slices of a buffer). If any fail, the first failing item's exception
    is raised (items after it may not have run)."""
    n = len(items)
    helpers = min(threads() - 1, n - 1)
    if helpers <= 0:
        for item in items:
            fn(item)
        if n:
            _count(n)
        return
    job = _Job(fn, items)
    pool = _executor()
    for _ in range(helpers):
        pool.submit(job.work)
    job.finish()


def start(fn: Callable[[object], None], items: Sequence) -> _Job:
    """:func:`run` in the background (read-ahead): the pool starts on the items now;
    ``finish()`` later helps with what is left, waits, and raises the first failing
    item's error; ``cancel()`` then ``wait()`` drops it (wait before the buffers or
    files the items use go away)."""
    job = _Job(fn, items)
    pool = _executor()
    for _ in range(min(threads(), len(items))):
        pool.submit(job.work)
    return job


def submit(fn: Callable, *args):
    """Start ``fn(*args)`` on the pool; a ``concurrent.futures.Future``. For read-ahead:
    the caller bounds how much it keeps in flight, and cancels (then waits for) what
    it no longer wants before closing the file the work reads."""
    def counted():
        out = fn(*args)
        _count(1)
        return out
    return _executor().submit(counted)


def coalesce_reads(spans: Sequence[tuple[int, int]], *, gap: int = 4096,
                   limit: int = 16 << 20) -> list[tuple[int, int, list[int]]]:
    """Group ``(offset, length)`` file ranges (in the order the units come) into reads:
    ``(offset, length, indices)``, one pread each, where a range starts no more than
    ``gap`` bytes past the previous one's end (compressed units written one after the
    other — qemu-img's compressed clusters, a DMG's chunks, a stream VMDK's grains — are
    a single read) and a read stays under ``limit`` bytes. Ranges may overlap (qcow2's
    compressed sizes are rounded up to sectors)."""
    out: list[tuple[int, int, list[int]]] = []
    start = end = 0
    members: list[int] = []
    for i, (off, n) in enumerate(spans):
        if members and start <= off <= end + gap and max(end, off + n) - start <= limit:
            end = max(end, off + n)
            members.append(i)
            continue
        if members:
            out.append((start, end - start, members))
        start, end, members = off, off + n, [i]
    if members:
        out.append((start, end - start, members))
    return out


def gather(backend, spans: Sequence[tuple[int, int]]) -> list[memoryview]:
    """The bytes of each ``(offset, length)`` range of ``backend``, read with one pread
    per group of :func:`coalesce_reads`: a view per range, shorter where the file ends
    first (the caller has checked the ranges against the file's size; what is missing
    at its end is the caller's to judge, as a short pread would be)."""
    views: list = [None] * len(spans)
    for start, n, members in coalesce_reads(spans):
        buf = bytearray(n)
        got = backend.readinto(start, buf)
        mv = memoryview(buf)
        for i in members:
            off, length = spans[i]
            a = off - start
            views[i] = mv[a:max(a, min(a + length, got))]
    return views


class Ahead:
    """The units of a reader's next read, being decoded (``start``) into a buffer of
    the reader's own while the caller uses this read: ``keys`` say which units (in
    order), ``dsts`` where each is being decoded; ``count`` of them are decodable and
    ``bad`` is the error of the one after them (refused before decoding), if any.

    Readers start one when a read begins where the last ended (a sequential reader:
    convert, compare), bounded by the read's size; the next read ``serve``s from it
    or drops it. Errors keep their order: a unit failing ahead is raised only by a
    read that covers it."""

    __slots__ = ("keys", "dsts", "job", "count", "bad")

    def __init__(self, keys: list, dsts: list, job: _Job, count: int,
                 bad: BaseException | None = None) -> None:
        self.keys, self.dsts, self.job = keys, dsts, job
        self.count, self.bad = count, bad

    def serve(self, keys: list, dsts: list) -> bool:
        """Copy the units ``keys`` into ``dsts`` when they are the first ones decoded
        ahead (True), helping with what is left; else drop the read-ahead (False). The
        first failing unit's error among them is raised."""
        m = len(keys)
        if self.keys[:m] != keys:
            self.drop()
            return False
        job = self.job
        job.settle()
        if job.cancelled:    # dropped by another thread's read meanwhile: not served
            return False
        if job.failed_at < m:
            raise job.error
        if self.count < m:
            raise self.bad
        for dst, src in zip(dsts, self.dsts):
            dst[:] = src
        return True

    def drop(self) -> None:
        """Start nothing more and wait for what runs (its buffer and file stay ours)."""
        self.job.cancel()
        self.job.wait()
