"""Blocks reserved ahead of the raw, qcow2 and DMG writers' writes
(``_fallocate.ReserveAhead``).

On ext4 the writers fallocate a window ahead of their writes; raw punches back the
holes it leaves, and every writer frees what is left past the end. The output must be
the file it would have been without: the same bytes, the same holes, the same data
blocks, and no block left reserved (``filefrag`` from e2fsprogs sees FIEMAP's
"unwritten" flag, which SEEK_DATA does not show). The comparison is the same
conversion with the reserving turned off; qemu-img reads and checks both."""

import os

import pytest
from conftest import need, qemu_img_json, run, sha256_file

import diskforge
from diskforge import _fallocate

MIB = 1 << 20
EXT4 = 0xEF53


def _fs_type(path: str) -> int:
    return int(run("stat", "-f", "-c", "%t", path).stdout.strip(), 16)  # GNU stat, hex


@pytest.fixture
def ext4_dir(workdir):
    """The test directory, when it is on ext4 (the only file system reserving is
    used on); checks ``reserving_pays`` against GNU stat's answer either way."""
    need("filefrag")
    need("qemu-img")
    fd = os.open(workdir, os.O_RDONLY)
    try:
        assert _fallocate.reserving_pays(fd) == (_fs_type(workdir) == EXT4)
    finally:
        os.close(fd)
    if _fs_type(workdir) != EXT4:
        pytest.skip("the test directory is not on ext4")
    return workdir


def _source(workdir: str) -> str:
    """100 MiB: a data run with written zeros inside it, a small write alone, a data
    run longer than a window reaching into the last one, a hole at the end."""
    path = os.path.join(workdir, "src.raw")
    rng = __import__("random").Random(5)
    with open(path, "wb") as f:
        f.truncate(100 * MIB)
        f.write(rng.randbytes(2 * MIB) + bytes(192 << 10) + rng.randbytes(3 * MIB))
        f.seek(33 * MIB)
        f.write(rng.randbytes(4096))
        f.seek(50 * MIB + 4096)
        f.write(rng.randbytes(40 * MIB))
    return path


def _convert(src: str, out: str, fmt: str, monkeypatch, *, reserving: bool) -> list:
    """Convert in this process; the calls that reached fallocate's reserve."""
    calls: list = []
    real = _fallocate.reserve

    def spy(fd, offset, length, mode=0):
        calls.append((offset, length, mode))
        return real(fd, offset, length, mode)
    with monkeypatch.context() as m:
        m.setattr(_fallocate, "reserve", spy)
        if not reserving:
            m.setattr(_fallocate, "reserving_pays", lambda fd: False)
        diskforge.convert(src, out, target_fmt=fmt)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back: reserved blocks become written or stay unwritten
    finally:
        os.close(fd)
    return calls


def _blocks(path: str) -> tuple[list[list[int]], list[str]]:
    """The file's allocated blocks as merged logical ranges, and the extents still
    flagged unwritten, from ``filefrag -v`` (FIEMAP). Not ``st_blocks``: that counts
    the extent tree's own blocks too, and a file whose extents do not fit in the inode
    has one more of those (the windows may be placed apart, which is no loss)."""
    import re
    ranges: list[list[int]] = []
    unwritten = []
    for line in run("filefrag", "-v", path).stdout.splitlines():
        m = re.match(r"\s*\d+:\s+(\d+)\.\.\s*(\d+):", line)
        if not m:
            continue
        if "unwritten" in line:
            unwritten.append(line)
        lo, hi = int(m.group(1)), int(m.group(2))
        if ranges and ranges[-1][1] + 1 == lo:
            ranges[-1][1] = hi
        else:
            ranges.append([lo, hi])
    return ranges, unwritten


def _contents(path: str, fmt: str) -> bytes:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if fmt == "dmg":  # the UDIF trailer's SegmentID (koly + 64, 16 bytes) is random
        data[-512 + 64:-512 + 80] = bytes(16)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "dmg"])
def test_reserved_output_is_the_file_it_would_have_been(ext4_dir, monkeypatch, fmt):
    src = _source(ext4_dir)
    ours = os.path.join(ext4_dir, f"reserved.{fmt}")
    plain = os.path.join(ext4_dir, f"plain.{fmt}")
    calls = _convert(src, ours, fmt, monkeypatch, reserving=True)
    assert len(calls) >= 2  # a window for each long data run, or each 32 MiB of DMG
    assert _convert(src, plain, fmt, monkeypatch, reserving=False) == []

    assert _contents(ours, fmt) == _contents(plain, fmt)
    assert os.stat(ours).st_size == os.stat(plain).st_size
    assert _blocks(ours) == (_blocks(plain)[0], [])
    run("qemu-img", "compare", "-f", fmt, "-F", "raw", ours, src)
    if fmt == "raw":
        assert qemu_img_json("map", "-f", fmt, ours) == \
            qemu_img_json("map", "-f", fmt, plain)
        assert all(mode == 0 and off + n <= 100 * MIB for off, n, mode in calls)
    else:  # appended: reserved past the end, which stays where the format put it
        assert all(mode == _fallocate.FALLOC_FL_KEEP_SIZE for _, _, mode in calls)
    if fmt == "qcow2":
        run("qemu-img", "check", ours)  # no leaks, no errors: exits 0


def test_a_refused_reservation_turns_reserving_off(ext4_dir, monkeypatch):
    """No space for a window, a file without extents: fallocate fails, the writer
    stops asking and writes as it would have."""
    src = _source(ext4_dir)
    out = os.path.join(ext4_dir, "out.raw")
    asked: list = []
    monkeypatch.setattr(_fallocate, "reserve",
                        lambda fd, off, n, mode=0: asked.append(off) and False)
    diskforge.convert(src, out, target_fmt="raw")
    assert asked == [0]
    theirs = os.path.join(ext4_dir, "theirs.raw")
    run("qemu-img", "convert", "-O", "raw", src, theirs)
    assert sha256_file(out) == sha256_file(src)
    assert qemu_img_json("map", "-f", "raw", out) == \
        qemu_img_json("map", "-f", "raw", theirs)


def test_what_a_raw_writer_reserved_past_its_last_write_is_given_back(ext4_dir):
    """A caller that writes data and no zero calls (the window's rest is never
    punched by ``zero``) still gets a file holding only what it wrote."""
    from diskforge.formats.raw import RawWriter
    from diskforge.formats.raw.options import RawOptions
    path = os.path.join(ext4_dir, "w.raw")
    data = os.urandom(MIB)
    w = RawWriter(path, 64 * MIB, RawOptions())
    w.write(4 * MIB, data)
    w.finish()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _blocks(path) == ([[1024, 1279]], [])  # 4 KiB blocks of the 1 MiB at 4 MiB
    with diskforge.open(path) as dev:
        assert dev.read(4 * MIB, MIB) == data and dev.size == 64 * MIB
