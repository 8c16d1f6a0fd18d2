"""Google Cloud (Compute Engine image import): ``disk.raw`` in a gzip'd GNU tar.

Rules, from Google's "Manually import boot disks" / "Import a custom image" pages
(https://cloud.google.com/compute/docs/import/import-existing-image) and the image
management guide (https://cloud.google.com/compute/docs/images/image-management-best-practices):

- the disk is a raw file named exactly ``disk.raw``;
- its size is a whole number of GB (GiB: the import rounds nothing, a partial last
  GiB is refused), so the export rounds the disk up to a whole GiB with zeros at the
  end (never shrinking data);
- it is archived with ``tar --format=oldgnu -Sczf``: a tar in GNU's old format, the
  file stored sparse (so an archive of a mostly empty disk stays small), gzip'd.

How it is written (``write_sparse_targz``): a first pass over the source's extent map
finds the data regions (allocated extents, with runs of 64 KiB zero granules taken out,
as ``tar -S`` takes holes out), because an oldgnu sparse header lists every region
before the data; the second pass streams the header blocks and the regions' bytes
through ``pgzip.ParallelGzip`` (pigz-style blocks on every core) into the output,
which appears atomically. GNU tar lists the member as ``disk.raw`` and extracts it bit
for bit (tests/test_export_gcp.py).
"""

from __future__ import annotations

import os
import time
from array import array

from ..atomic import AtomicFile
from ..blockdev import BlockDevice, ExtentKind, pieces, zero_runs
from ..limits import check_alloc
from . import tarfmt
from .base import GiB, ExportOptions, Progress, round_up, size_text

NAME = "gcp"
SUMMARY = "Google Cloud: disk.raw (whole GiB) in a gzip'd oldgnu sparse tar (.tar.gz)"
MEMBER = "disk.raw"
UNIT = GiB
GRANULE = 64 << 10
BATCH = 1 << 20


def export(source: BlockDevice, out: str, opts: ExportOptions,
           progress: Progress | None = None) -> list[str]:
    size = round_up(max(source.size, 1), UNIT)
    write_sparse_targz(source, out, size, MEMBER, progress)
    return [out]


def data_regions(source: BlockDevice, progress: Progress | None = None,
                 total: int = 0) -> array:
    """``(offset, length)`` pairs, flattened, of the source's non-zero data: its
    allocated extents less runs of whole zero granules, coalesced."""
    regions = array("Q")
    buf = bytearray(BATCH)
    for ext in source.extents():
        if ext.kind is ExtentKind.ZERO:
            continue
        for off, n in pieces(ext.offset, ext.length, BATCH):
            view = memoryview(buf)[:n]
            source.readinto(off, view)
            for run_off, run_len, zero in zero_runs(buf, off, GRANULE, n):
                if zero:
                    continue
                if regions and regions[-2] + regions[-1] == run_off:
                    regions[-1] += run_len
                else:
                    regions.extend((run_off, run_len))
            if progress:
                progress(off + n, total)
    return regions


def write_sparse_targz(source: BlockDevice, out: str, size: int, member: str,
                       progress: Progress | None = None, *,
                       workers: int | None = None) -> None:
    """A ``.tar.gz`` at ``out`` holding ``source`` (zero-extended to ``size``) as the
    oldgnu sparse member ``member``."""
    from .pgzip import ParallelGzip
    total = 2 * size
    regions = data_regions(source, progress, total)
    # the header lists every region (24 bytes each, held with its Python pair): a disk
    # fragmented beyond the command's memory budget is refused rather than swapped
    check_alloc(len(regions) // 2 * 128, out, "GNU sparse map", "regions")
    pairs = [(regions[i], regions[i + 1]) for i in range(0, len(regions), 2)]
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    f = AtomicFile(out, stream=True)
    try:
        pos = [0]

        def sink(data: bytes) -> None:
            f.pwrite(pos[0], data)
            pos[0] += len(data)

        gz = ParallelGzip(sink, workers=workers, mtime=0)
        try:
            head = tarfmt.sparse_headers(member, size, pairs, mtime)
            gz.write(head)
            stored = 0
            buf = bytearray(BATCH)
            for off, length in pairs:
                for p, n in pieces(off, length, BATCH):
                    view = memoryview(buf)[:n]
                    source.readinto(p, view)
                    gz.write(view)
                    if progress:
                        progress(size + p + n, total)
                stored += length
            tail = tarfmt.padding(stored)
            gz.write(tail + tarfmt.end_of_archive(len(head) + stored + len(tail)))
            gz.close()
        except BaseException:
            gz.abort()
            raise
        if progress:
            progress(total, total)
        f.commit()
    except BaseException:
        f.discard()
        raise


# -- check ---------------------------------------------------------------------------------

def check(f, policy=None) -> list[str]:
    """(``f``: a ``checkfile.CheckFile``; the archive is read once, front to back, to
    its gzip CRC: over a URL that is one streamed read, with readahead.)"""
    import gzip
    import tarfile
    import zlib
    problems: list[str] = []
    with f.open() as raw:
        if raw.read(2) != b"\x1f\x8b":
            return ["not gzip-compressed: Google's import takes a .tar.gz (tar"
                    " --format=oldgnu -Sczf) holding disk.raw"]
        raw.seek(0)
        members: list[tuple[str, int, bool]] = []
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                first = gz.read(tarfmt.BLOCK)
                if len(first) == tarfmt.BLOCK and first[257:265] != tarfmt.OLDGNU_MAGIC:
                    kind = "POSIX ustar/pax" if first[257:263] == b"ustar\x00" else \
                        "not a tar header"
                    problems.append(f"tar format is {kind}, not GNU oldgnu (tar"
                                    " --format=oldgnu)")
                gz.seek(0)
                with tarfile.open(fileobj=gz, mode="r|") as tar:
                    for m in tar:
                        members.append((m.name, m.size, m.isreg()))
                while gz.read(1 << 20):   # to the end: the gzip CRC is checked there
                    pass
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            problems.append(f"not a valid gzip'd tar archive ({e})")
            return problems
    from ..errors import printable
    names = [n for n, _, _ in members]
    if MEMBER not in names:
        shown = ", ".join(printable(n) for n in names[:5]) or "nothing"
        problems.append(f"no member named {MEMBER} (the archive holds {shown}): the"
                        " import reads only disk.raw")
    others = [n for n in names if n != MEMBER]
    if others and MEMBER in names:
        problems.append(f"members other than {MEMBER}: "
                        + ", ".join(printable(n) for n in others[:5]))
    for name, size, regular in members:
        if name != MEMBER:
            continue
        if not regular:
            problems.append(f"{MEMBER} is not a regular file")
        if size == 0 or size % UNIT:
            up = round_up(max(size, 1), UNIT)
            problems.append(f"{MEMBER} is {size} bytes ({size_text(size)}), not a whole"
                            f" number of GiB: round it up to {up}")
    return problems
