"""image: a full or differential image of a disk, with an integrity record.

The source (a block device or any readable image) goes through the convert pipeline
into any format's writer, while a tap hashes every byte of the virtual disk in order:
the whole-disk sha256 and one sha256 per chunk (64 MiB) go into an integrity record
beside the image (``IMAGE.integrity.json``), so ``verify`` can later prove the image
still holds what was read, and say where it does not.

A failing disk must not stop a backup: reads that fail with a media error are retried,
then narrowed down to the failing sectors, which are recorded and read as zeros. The
bad ranges go into the record and into a map beside the image in GNU ddrescue's mapfile
format (``IMAGE.badmap``), which ddrescue and its viewers understand.

A differential image is the same run with a ``base``: the pipeline writes only what
differs from the base, into an overlay whose backing file is the base.

A run is resumable where the output format's writer can checkpoint (raw, qcow2): every
1 GiB the writer makes its partial output durable and the run's state (offset, chunk
hashes, bad ranges, the writer's counters, the source's identity) goes into
``IMAGE.resume.json``. Interrupted, the partial output stays; ``--resume`` continues from
the last checkpoint without reading the source before it. The whole-disk hash cannot
be carried across processes, so a resumed run computes it by reading the finished image
once, and checks that image's chunk hashes against those taken from the source.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field

from ..atomic import RESUME_SUFFIX, AtomicFile, unlink_regular
from ..blockdev import BlockDevice, Extent, FilterDevice, ImageWriter, chain_extents, fill_zero
from ..devices import open_input_file
from ..errors import DiskforgeError, FormatError, ImageIOError, UnsupportedError, UsageError
from ..registry import open_image
from .convert import ConvertStats, convert
from .diskhash import CHUNK, DiskHasher, hash_device

CHECKPOINT = 1 << 30  # a multiple of CHUNK: checkpoints fall on chunk boundaries
RECORD_SUFFIX = ".integrity.json"
BADMAP_SUFFIX = ".badmap"
RESUME_VERSION = 1
RECORD_VERSION = 1
# what a record read back may ask for (see IntegrityRecord.load): 2^19 chunks of 64 MiB
# cover 32 TiB; 64 KiB chunks are already hashed at memory speed, not per Python step
MIN_RECORD_CHUNK = 64 << 10
MAX_RECORD_CHUNKS = 1 << 19
MAX_RECORD_BYTES = 48 << 20
MAX_RECORD_VALUES = 1 << 20
SECTOR = 512
# errno values that mean "the medium could not deliver these bytes", not a bug of ours
MEDIA_ERRORS = {errno.EIO, errno.ENODATA, errno.EREMOTEIO, errno.EILSEQ, errno.ENOMEDIUM,
                errno.ETIMEDOUT}


def record_path(image_path: str) -> str:
    """The integrity record beside ``image_path``: its name with ``.integrity.json``
    after it. For a URL the suffix goes on the URL's path, under the same prefix
    (``s3://b/x.qcow2.integrity.json``); an http(s) URL's query is not carried over,
    since a presigned URL's signature is for the image only (give ``--record``)."""
    name = os.fspath(image_path)
    if "://" in name:
        from ..remote import is_remote
        if is_remote(name):
            from urllib.parse import urlsplit, urlunsplit
            p = urlsplit(name)
            return urlunsplit((p.scheme, p.netloc, p.path + RECORD_SUFFIX, "", ""))
    return name + RECORD_SUFFIX


def find_record(path: str, *, required: bool = False) -> "IntegrityRecord | None":
    """The integrity record at ``path`` (a file or a URL), or None when there is none
    there and it is not ``required`` (the one beside an image is looked for; one named
    with ``--record`` must exist). A remote record is one object read with range
    requests; only "no such object" (HTTP 404, S3 NoSuchKey) counts as absent, any
    other failure (403, unreachable) is an error, as an unreadable local record is."""
    from ..remote import is_remote
    if not is_remote(path):
        if not os.path.exists(path):
            if required:
                raise UnsupportedError("no such integrity record", path)
            return None
        return IntegrityRecord.load(path)
    try:
        return IntegrityRecord.load(path)
    except ImageIOError as e:
        if getattr(e, "errno", None) == errno.ENOENT and not required:
            return None
        raise


def _read_record_bytes(path: str) -> bytes:
    """At most ``MAX_RECORD_BYTES + 1`` bytes of a record, local or remote."""
    from ..remote import is_remote
    if is_remote(path):
        from ..remote import open_backend
        with open_backend(path) as backend:
            return backend.pread(0, min(backend.size, MAX_RECORD_BYTES + 1))
    try:
        with open_input_file(path) as f:  # a FIFO is refused, not read
            return f.read(MAX_RECORD_BYTES + 1)
    except OSError as e:
        raise ImageIOError.from_os(e, path) from None


def badmap_path(image_path: str) -> str:
    return os.fspath(image_path) + BADMAP_SUFFIX


def resume_path(image_path: str) -> str:
    return os.fspath(image_path) + RESUME_SUFFIX


def _is_media_error(exc: BaseException) -> bool:
    return isinstance(exc, (ImageIOError, OSError)) and getattr(exc, "errno", None) \
        in MEDIA_ERRORS


class RescueReader(FilterDevice):
    """A source whose unreadable sectors read as zeros and are recorded: a filter over
    the source (everything but reads is forwarded to it, and closing closes it).

    A failed read is retried ``retries`` times, then split in halves down to single
    sectors, so one bad sector costs one sector, not a whole batch. Other errors (a
    closed file, a bug) are not media errors and propagate.
    """

    def __init__(self, inner: BlockDevice, *, retries: int = 2, sector: int = SECTOR):
        super().__init__(inner)
        self.retries = retries
        self.sector = sector
        self.bad: list[tuple[int, int]] = []

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        self._read(offset, mv, self.retries)
        return len(mv)

    def _read(self, offset: int, mv: memoryview, retries: int) -> None:
        for attempt in range(retries + 1):
            try:
                self.inner.readinto(offset, mv)
                return
            except Exception as e:
                if not _is_media_error(e):
                    raise
        n = len(mv)
        if n <= self.sector:
            fill_zero(mv)
            self._record(offset, n)
            return
        # split at a sector boundary near the middle; each half gets one try before it
        # is split again, and single sectors get the full retries
        half = max(self.sector, (n // 2) // self.sector * self.sector)
        for off, part in ((offset, mv[:half]), (offset + half, mv[half:])):
            self._read(off, part, 0 if len(part) > self.sector else self.retries)

    def _record(self, offset: int, length: int) -> None:
        if self.bad and self.bad[-1][0] + self.bad[-1][1] == offset:
            self.bad[-1] = (self.bad[-1][0], self.bad[-1][1] + length)
        else:
            self.bad.append((offset, length))


class Prefix(FilterDevice):
    """The first ``size`` bytes of a larger device: a disk restored onto a bigger drive,
    or an image whose format rounded the size up (qcow2 to whole sectors). A view: the
    callers close the device they opened, not this filter."""

    def __init__(self, inner: BlockDevice, size: int):
        super().__init__(inner)
        self.size = size

    def extents(self, offset: int = 0, length: int | None = None):
        """The inner device's extents, its backing chain resolved (``chain_extents``):
        this view reads through ``inner.readinto``, which composes the chain, and has
        no backing of its own to defer to. Lower layers' host offsets are dropped."""
        if length is None:
            length = self.size - offset
        for le in chain_extents(self.inner, offset, length):
            e = le.extent
            yield e if le.depth == 0 else Extent(e.offset, e.length, e.kind, e.allocated)


def padding_problem(dev: BlockDevice, size: int) -> str | None:
    """Bytes past ``size`` that a format's rounding added must read as zeros."""
    if dev.size < size:
        return f"virtual size is {dev.size}, the record says {size}"
    if dev.size - size > 1 << 20:
        return f"virtual size is {dev.size}, far beyond the recorded {size}"
    if dev.size > size and any(dev.read(size, dev.size - size)):
        return f"bytes past the recorded size {size} are not zero"
    return None


@dataclass
class IntegrityRecord:
    """What an image held when it was made (``IMAGE.integrity.json``)."""
    image: str
    format: str
    virtual_size: int
    sha256: str
    chunk_size: int
    chunks: list[str]
    source: str = ""
    created: str = ""
    bad_ranges: list[tuple[int, int]] = field(default_factory=list)
    base: dict | None = None

    def to_json(self) -> dict:
        return {"diskforge-integrity": RECORD_VERSION, "image": self.image,
                "format": self.format, "virtual-size": self.virtual_size,
                "sha256": self.sha256, "chunk-size": self.chunk_size,
                "chunks": self.chunks, "source": self.source, "created": self.created,
                "bad-ranges": [list(r) for r in self.bad_ranges], "base": self.base}

    def save(self, path: str) -> None:
        with AtomicFile(path, sidecar=True) as f:
            f.pwrite(0, (json.dumps(self.to_json(), indent=1) + "\n").encode())
            f.commit()

    @classmethod
    def load(cls, path: str) -> "IntegrityRecord":
        """Read and check a record. It sits beside an image and may come with it from
        elsewhere, so every number in it is bounded before it sizes work: the file's
        length and its count of JSON values (what parsing may allocate), the chunk
        size (a 1-byte chunk would hash the disk a byte per step) and the number of
        chunks (what the chunk list and ``verify``'s loop cost)."""
        where = {"structure": "integrity record"}
        raw = _read_record_bytes(path)
        if len(raw) > MAX_RECORD_BYTES:
            raise FormatError(f"larger than {MAX_RECORD_BYTES >> 20} MiB (a record of"
                              f" {MAX_RECORD_CHUNKS} chunks needs about 35 MiB)", path,
                              **where)
        values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        if values > MAX_RECORD_VALUES:
            raise FormatError(f"holds about {values} JSON values, more than the"
                              f" {MAX_RECORD_VALUES} a record may have", path, **where)
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:   # RecursionError: nested too deeply
            raise FormatError(f"not a valid integrity record: {e}", path) from None
        if not isinstance(d, dict):
            raise FormatError("not a valid integrity record: not a JSON object", path)
        try:
            if d.get("diskforge-integrity") != RECORD_VERSION:
                raise FormatError("unknown integrity record version", path)
            rec = cls(image=str(d["image"]), format=str(d["format"]),
                      virtual_size=int(d["virtual-size"]), sha256=str(d["sha256"]),
                      chunk_size=int(d["chunk-size"]), chunks=[str(c) for c in d["chunks"]],
                      source=str(d.get("source", "")), created=str(d.get("created", "")),
                      bad_ranges=[(int(a), int(b)) for a, b in d.get("bad-ranges", [])],
                      base=d.get("base"))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"integrity record is missing or has a bad field: {e}",
                              path) from None
        if not 0 <= rec.virtual_size < 1 << 63:
            raise FormatError(f"{rec.virtual_size} bytes is not a disk size", path,
                              field="virtual-size", **where)
        if rec.chunk_size < MIN_RECORD_CHUNK or rec.chunk_size % SECTOR:
            raise FormatError(f"{rec.chunk_size} is not a chunk size (a multiple of"
                              f" {SECTOR}, at least {MIN_RECORD_CHUNK}; diskforge writes"
                              f" {CHUNK})", path, field="chunk-size", **where)
        count = -(-rec.virtual_size // rec.chunk_size)
        if count > MAX_RECORD_CHUNKS:
            raise FormatError(f"{rec.virtual_size} bytes in chunks of {rec.chunk_size} is"
                              f" {count} chunks, more than {MAX_RECORD_CHUNKS}", path,
                              field="chunk-size", **where)
        if len(rec.chunks) != count:
            raise FormatError("integrity record's chunk list does not cover the disk", path)
        if not all(_is_sha256(h) for h in rec.chunks) or not _is_sha256(rec.sha256):
            raise FormatError("a hash is not 64 hexadecimal digits", path, field="chunks",
                              **where)
        for a, b in rec.bad_ranges:
            if a < 0 or b <= 0 or a + b > rec.virtual_size:
                raise FormatError(f"bad range {a}+{b} is outside the disk", path,
                                  field="bad-ranges", **where)
        return rec


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def write_badmap(path: str, size: int, bad: list[tuple[int, int]]) -> None:
    """The bad ranges as a GNU ddrescue mapfile: finished ('+') and bad ('-') blocks."""
    lines = ["# Mapfile. Created by diskforge image",
             "# current_pos  current_status  current_pass", f"0x{size:08X}     +               1",
             "#      pos        size  status"]
    pos = 0
    for start, length in bad:
        if start > pos:
            lines.append(f"0x{pos:08X}  0x{start - pos:08X}  +")
        lines.append(f"0x{start:08X}  0x{length:08X}  -")
        pos = start + length
    if pos < size:
        lines.append(f"0x{pos:08X}  0x{size - pos:08X}  +")
    with AtomicFile(path, sidecar=True) as f:
        f.pwrite(0, ("\n".join(lines) + "\n").encode())
        f.commit()


@dataclass
class ImageResult:
    """What imaging a disk wrote and found."""
    stats: ConvertStats
    sha256: str
    bad_ranges: list[tuple[int, int]]
    record_path: str
    resumed_from: int = 0


def source_identity(source: BlockDevice, name: str) -> dict:
    """What must not have changed for a resume to be honest: size, the file's inode and
    modification time (regular files), and a hash of the first 64 KiB (any source)."""
    ident: dict = {"name": name, "size": source.size}
    if source.path:
        try:
            st = os.stat(source.path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISBLK(st.st_mode):
            ident.update(dev=st.st_dev, ino=st.st_ino, mtime_ns=st.st_mtime_ns)
    head = min(source.size, 65536)
    try:
        ident["head-sha256"] = hashlib.sha256(source.read(0, head)).hexdigest()
    except (ImageIOError, OSError):
        ident["head-sha256"] = None  # unreadable start: size and inode must do
    return ident


def load_resume(out_path: str) -> dict:
    path = resume_path(out_path)
    try:
        with open_input_file(path) as f:
            state = json.loads(f.read(64 << 20))
    except FileNotFoundError:
        raise UsageError("nothing to resume: no interrupted run of this image (no"
                         f" {os.path.basename(path)})", out_path) from None
    except (OSError, ValueError) as e:
        raise FormatError(f"unreadable resume state: {e}", path) from None
    if not isinstance(state, dict) or state.get("diskforge-resume") != RESUME_VERSION:
        raise FormatError("not a resume state of this diskforge version", path)
    return state


def discard_resume(out_path: str) -> None:
    """Forget an interrupted run: its partial output and its state file."""
    path = resume_path(out_path)
    try:
        state = load_resume(out_path)
        partial = (state.get("writer") or {}).get("partial")
        if partial and os.path.basename(partial).endswith(".diskforge-tmp") and \
                os.path.dirname(os.path.abspath(partial)) == \
                os.path.dirname(os.path.abspath(out_path)):
            unlink_regular(partial)
    except (OSError, DiskforgeError):
        pass
    unlink_regular(path)


class _Suspending(ImageWriter):
    """Hands every call to the real writer, but after a checkpoint an abort suspends
    instead (the partial output is kept for ``--resume``)."""

    def __init__(self, inner: ImageWriter):
        self.inner = inner
        self.granularity, self.parallel = inner.granularity, inner.parallel
        self.checkpointed = False

    def prepare(self, offset, data):
        return self.inner.prepare(offset, data)

    def write_prepared(self, offset, prepared) -> None:
        self.inner.write_prepared(offset, prepared)

    def write(self, offset, data) -> None:
        self.inner.write(offset, data)

    def zero(self, offset, length) -> None:
        self.inner.zero(offset, length)

    def finish(self) -> None:
        self.inner.finish()

    def abort(self) -> None:
        if self.checkpointed:
            self.inner.suspend()
        else:
            self.inner.abort()

    def checkpoint(self) -> dict:
        state = self.inner.checkpoint()
        self.checkpointed = True
        return state


def image(source: BlockDevice, writer: ImageWriter, out_path: str, *, fmt_name: str,
          options: str = "", base: BlockDevice | None = None, progress=None,
          workers: int | None = None, retries: int = 2, chunk: int = CHUNK,
          source_name: str = "", resume: dict | None = None,
          checkpoint_every: int | None = None) -> ImageResult:
    """Image ``source`` into ``writer`` (whose final name is ``out_path``), then write the
    integrity record and, when sectors could not be read, the bad-range map.

    ``resume``: the state an interrupted run left (``load_resume``), with ``writer``
    made by the format's ``resume_writer`` from it."""
    if base is not None and base.size != source.size:
        raise UsageError(f"the base is {base.size} bytes but the source is {source.size}:"
                         " not the same disk", out_path)
    if checkpoint_every is None:
        checkpoint_every = CHECKPOINT
    if chunk < MIN_RECORD_CHUNK or chunk % SECTOR:
        raise UsageError(f"chunk size {chunk} is not a multiple of {SECTOR} of at least"
                         f" {MIN_RECORD_CHUNK}")
    if checkpoint_every % chunk:
        raise UsageError("checkpoints must fall on chunk boundaries")
    name = source_name or (source.path or "")
    identity = source_identity(source, name)
    rescue = RescueReader(source, retries=retries)
    start = 0
    if resume is not None:
        if resume.get("source") != identity:
            raise UsageError("the source is not what the interrupted run was reading"
                             " (size, file or first bytes changed); start again without"
                             " --resume", name)
        start = int(resume["offset"])
        rescue.bad = [(int(a), int(b)) for a, b in resume.get("bad-ranges", [])]
    hasher = DiskHasher(chunk, position=start,
                        chunks=None if resume is None else list(resume["chunks"]))
    try:
        proxy = _Suspending(writer)
        proxy.checkpointed = resume is not None
        resumable = True
        stats = ConvertStats(virtual_size=source.size)
        pos = start
        while True:
            end = min(source.size, (pos // checkpoint_every + 1) * checkpoint_every)
            seg = convert(rescue, proxy, base=base, progress=progress, workers=workers,
                          tap=hasher.feed, start=pos, end=end, finish=False)
            for f in ("bytes_read", "bytes_written", "bytes_zero", "bytes_skipped"):
                setattr(stats, f, getattr(stats, f) + getattr(seg, f))
            pos = end
            if pos >= source.size:
                break
            if resumable:
                try:
                    state = proxy.checkpoint()
                except UnsupportedError:
                    resumable = False  # this format cannot resume: the run just goes on
                    continue
                _save_resume(out_path, {
                    "diskforge-resume": RESUME_VERSION, "format": fmt_name,
                    "options": options, "base": None if base is None else base.path,
                    "source": identity, "offset": pos, "chunk-size": chunk,
                    "chunks": hasher.chunk_digests(),
                    "bad-ranges": [list(r) for r in rescue.bad], "writer": state})
        try:
            proxy.finish()
        except BaseException:
            proxy.abort()
            raise
        digest, chunks = hasher.finish()
    finally:
        hasher.close()  # its threads, when the run fails
    if resume is not None:
        digest = _check_resumed(out_path, fmt_name, chunks, chunk, source.size)
    base_info = None
    if base is not None:
        base_info = {"image": base.path, "format": base.format}
        base_record = record_path(base.path) if base.path else None
        if base_record and os.path.exists(base_record):
            base_info["sha256"] = IntegrityRecord.load(base_record).sha256
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
        int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))
    rec = IntegrityRecord(image=os.path.basename(out_path), format=fmt_name,
                          virtual_size=source.size, sha256=digest, chunk_size=chunk,
                          chunks=chunks, source=name, created=created,
                          bad_ranges=rescue.bad, base=base_info)
    rec.save(record_path(out_path))
    from ..remote import is_remote
    if rescue.bad:
        write_badmap(badmap_path(out_path), source.size, rescue.bad)
    elif not is_remote(out_path):  # (an upload leaves no resume state; a stale remote
        unlink_regular(badmap_path(out_path))  # map stays: there is no delete here yet)
    if not is_remote(out_path):
        unlink_regular(resume_path(out_path))
    return ImageResult(stats, digest, rescue.bad, record_path(out_path), start)


def _save_resume(out_path: str, state: dict) -> None:
    with AtomicFile(resume_path(out_path), sidecar=True) as f:
        f.pwrite(0, json.dumps(state).encode())
        f.commit(durable=True)


def _check_resumed(out_path: str, fmt_name: str, chunks: list[str], chunk: int,
                   size: int) -> str:
    """The finished image, read once: its chunk hashes must be those taken from the
    source (before and after the interruption); returns its whole-disk sha256."""
    with open_image(out_path, fmt_name) as dev:
        problem = padding_problem(dev, size)
        if problem:
            raise ImageIOError(f"after resuming: {problem}", out_path)
        digest, ours = hash_device(Prefix(dev, size), chunk=chunk)
    for i, (a, b) in enumerate(zip(ours, chunks)):
        if a != b:
            raise ImageIOError(f"after resuming, chunk {i} of the image differs from what"
                               " was read from the source", out_path)
    return digest


@dataclass
class VerifyResult:
    """Whether an image file still matches its record."""
    ok: bool
    problems: list[str]
    sha256: str | None = None


def verify_record(dev: BlockDevice, rec: IntegrityRecord, *, progress=None) -> VerifyResult:
    """Re-hash the image's virtual disk and compare with its integrity record."""
    problems = []
    problem = padding_problem(dev, rec.virtual_size)
    if problem:
        return VerifyResult(False, [problem])
    digest, chunks = hash_device(Prefix(dev, rec.virtual_size), chunk=rec.chunk_size,
                                 progress=progress)
    for i, (ours, theirs) in enumerate(zip(chunks, rec.chunks)):
        if ours != theirs:
            start = i * rec.chunk_size
            end = min(start + rec.chunk_size, dev.size)
            problems.append(f"bytes {start}-{end - 1} differ from what was imaged"
                            f" (chunk {i})")
    if digest != rec.sha256 and not problems:
        problems.append("whole-disk sha256 differs from the record")
    return VerifyResult(not problems, problems, digest)
