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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from ..blockdev import ZERO_BUFFER_SIZE, ZEROES, BlockDevice, ImageWriter
from ..errors import FormatError, ImageIOError, UsageError
from .convert import ConvertStats, convert

CHUNK = 64 << 20
RECORD_SUFFIX = ".integrity.json"
BADMAP_SUFFIX = ".badmap"
RECORD_VERSION = 1
SECTOR = 512
# errno values that mean "the medium could not deliver these bytes", not a bug of ours
MEDIA_ERRORS = {errno.EIO, errno.ENODATA, errno.EREMOTEIO, errno.EILSEQ, errno.ENOMEDIUM,
                errno.ETIMEDOUT}


def record_path(image_path: str) -> str:
    return os.fspath(image_path) + RECORD_SUFFIX


def badmap_path(image_path: str) -> str:
    return os.fspath(image_path) + BADMAP_SUFFIX


def _is_media_error(exc: BaseException) -> bool:
    return isinstance(exc, (ImageIOError, OSError)) and getattr(exc, "errno", None) \
        in MEDIA_ERRORS


class RescueReader(BlockDevice):
    """A source whose unreadable sectors read as zeros and are recorded.

    A failed read is retried ``retries`` times, then split in halves down to single
    sectors, so one bad sector costs one sector, not a whole batch. Other errors (a
    closed file, a bug) are not media errors and propagate.
    """

    def __init__(self, inner: BlockDevice, *, retries: int = 2, sector: int = SECTOR):
        self.inner = inner
        self.size, self.format, self.path = inner.size, inner.format, inner.path
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
            mv[:] = ZEROES[:n]
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

    def extents(self, offset: int = 0, length: int | None = None):
        return self.inner.extents(offset, length)

    def files(self) -> list[str]:
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()
        super().close()


class DiskHasher:
    """sha256 of the whole virtual disk and of each chunk, fed in order by the
    convert tap (``None`` data means zeros, fed without being read)."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.whole = hashlib.sha256()
        self.current = hashlib.sha256()
        self.chunks: list[str] = []
        self.position = 0

    def feed(self, offset: int, data, length: int) -> None:
        if offset != self.position:
            raise AssertionError(f"hash fed out of order: {offset} != {self.position}")
        pos = 0
        while pos < length:
            room = self.chunk - self.position % self.chunk
            n = min(room, length - pos)
            if data is None:
                left = n
                while left:
                    k = min(left, ZERO_BUFFER_SIZE)
                    self.whole.update(ZEROES[:k])
                    self.current.update(ZEROES[:k])
                    left -= k
            else:
                piece = data[pos:pos + n]
                self.whole.update(piece)
                self.current.update(piece)
            pos += n
            self.position += n
            if self.position % self.chunk == 0:
                self.chunks.append(self.current.hexdigest())
                self.current = hashlib.sha256()

    def finish(self) -> tuple[str, list[str]]:
        if self.position % self.chunk:
            self.chunks.append(self.current.hexdigest())
            self.current = hashlib.sha256()
        return self.whole.hexdigest(), self.chunks


def hash_device(dev: BlockDevice, *, chunk: int = CHUNK, progress=None,
                batch: int = 1 << 20) -> tuple[str, list[str]]:
    """Whole-disk and per-chunk sha256 of a device, reading only what is not zero."""
    from ..blockdev import ExtentKind, aligned_buffer
    from .convert import batches
    hasher = DiskHasher(chunk)
    buf, start = aligned_buffer(batch)
    view = memoryview(buf)[start:start + batch]
    for e in dev.extents():
        if e.kind is ExtentKind.ZERO or (e.kind is ExtentKind.BACKING and dev.backing is None):
            hasher.feed(e.offset, None, e.length)
        else:
            for off, n in batches(e.offset, e.length, batch):
                dev.readinto(off, view[:n])
                hasher.feed(off, view[:n], n)
        if progress:
            progress(e.offset + e.length, dev.size)
    return hasher.finish()


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
        from ..atomic import AtomicFile
        with AtomicFile(path) as f:
            f.pwrite(0, (json.dumps(self.to_json(), indent=1) + "\n").encode())
            f.commit()

    @classmethod
    def load(cls, path: str) -> "IntegrityRecord":
        try:
            with open(path, "rb") as f:
                raw = f.read(64 << 20)
            d = json.loads(raw)
        except OSError as e:
            raise ImageIOError.from_os(e, path) from None
        except ValueError as e:
            raise FormatError(f"not a valid integrity record: {e}", path) from None
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
        if rec.chunk_size <= 0 or len(rec.chunks) != -(-rec.virtual_size // rec.chunk_size):
            raise FormatError("integrity record's chunk list does not cover the disk", path)
        return rec


def write_badmap(path: str, size: int, bad: list[tuple[int, int]]) -> None:
    """The bad ranges as a GNU ddrescue mapfile: finished ('+') and bad ('-') blocks."""
    from ..atomic import AtomicFile
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
    with AtomicFile(path) as f:
        f.pwrite(0, ("\n".join(lines) + "\n").encode())
        f.commit()


@dataclass
class ImageResult:
    stats: ConvertStats
    sha256: str
    bad_ranges: list[tuple[int, int]]
    record_path: str


def image(source: BlockDevice, writer: ImageWriter, out_path: str, *, fmt_name: str,
          base: BlockDevice | None = None, progress=None, workers: int | None = None,
          retries: int = 2, chunk: int = CHUNK, source_name: str = "") -> ImageResult:
    """Image ``source`` into ``writer`` (whose final name is ``out_path``), then write the
    integrity record and, when sectors could not be read, the bad-range map."""
    if base is not None and base.size != source.size:
        raise UsageError(f"the base is {base.size} bytes but the source is {source.size}:"
                         " not the same disk", out_path)
    rescue = RescueReader(source, retries=retries)
    hasher = DiskHasher(chunk)
    stats = convert(rescue, writer, base=base, progress=progress, workers=workers,
                    tap=hasher.feed)
    digest, chunks = hasher.finish()
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
                          chunks=chunks, source=source_name or (source.path or ""),
                          created=created, bad_ranges=rescue.bad, base=base_info)
    rec.save(record_path(out_path))
    if rescue.bad:
        write_badmap(badmap_path(out_path), source.size, rescue.bad)
    elif os.path.exists(badmap_path(out_path)):
        os.unlink(badmap_path(out_path))  # a stale map from an earlier run would mislead
    return ImageResult(stats, digest, rescue.bad, record_path(out_path))


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str]
    sha256: str | None = None


def verify_record(dev: BlockDevice, rec: IntegrityRecord, *, progress=None) -> VerifyResult:
    """Re-hash the image's virtual disk and compare with its integrity record."""
    problems = []
    if dev.size != rec.virtual_size:
        return VerifyResult(False, [f"virtual size is {dev.size}, the record says"
                                    f" {rec.virtual_size}"])
    digest, chunks = hash_device(dev, chunk=rec.chunk_size, progress=progress)
    for i, (ours, theirs) in enumerate(zip(chunks, rec.chunks)):
        if ours != theirs:
            start = i * rec.chunk_size
            end = min(start + rec.chunk_size, dev.size)
            problems.append(f"bytes {start}-{end - 1} differ from what was imaged"
                            f" (chunk {i})")
    if digest != rec.sha256 and not problems:
        problems.append("whole-disk sha256 differs from the record")
    return VerifyResult(not problems, problems, digest)
