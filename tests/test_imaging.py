"""Imaging: full images with integrity records, restore, verify, bad sectors."""

import errno
import json
import os
import shutil
import subprocess

import pytest
from conftest import cli, need, one_line_error, run, sha256_file

import diskforge
from diskforge import registry
from diskforge.blockdev import BlockDevice, ExtentKind
from diskforge.errors import ImageIOError
from diskforge.ops.imaging import RescueReader, image, record_path
from diskforge.ops.map import map_image


def gpt_disk(path, size=64 << 20):
    """A GPT disk with two partitions and recognisable bytes in each (sgdisk)."""
    need("sgdisk")
    with open(path, "wb") as f:
        f.truncate(size)
    run("sgdisk", "-n", "1:2048:+8M", "-t", "1:ef00", "-c", "1:EFI",
        "-n", "2:0:+24M", "-t", "2:8300", "-c", "2:data", path)
    with open(path, "r+b") as f:
        f.write(b"\xeb\x63\x90BOOTCODE")  # boot code in the protective MBR's first bytes
        for off in (1 << 20, 9 << 20, 20 << 20):
            f.seek(off)
            f.write(os.urandom(300_000))
    return path


def test_image_a_loop_device_and_restore_to_another(workdir, loop_device):
    src_file = gpt_disk(os.path.join(workdir, "disk.raw"))
    dst_file = os.path.join(workdir, "target.raw")
    with open(dst_file, "wb") as f:
        f.truncate(80 << 20)
    src, dst = loop_device(src_file), loop_device(dst_file)
    out = os.path.join(workdir, "backup.qcow2")  # the default: compressed qcow2
    code, stdout, err = cli("image", src, out)
    assert code == 0, err
    rec = json.load(open(record_path(out)))
    assert rec["sha256"] == sha256_file(src_file) and rec["bad-ranges"] == []
    code, _, err = cli("restore", out, dst)
    assert code == 0, err
    with open(dst, "rb") as f:
        restored = f.read(64 << 20)
    assert restored == open(src_file, "rb").read()  # boot sector, both GPTs, partitions
    assert "verified by read-back" in cli("restore", out, dst)[1]


def test_restore_refuses_small_mounted_and_self_targets(workdir, loop_device):
    need("mkfs.ext4")
    img = gpt_disk(os.path.join(workdir, "disk.raw"), 40 << 20)
    small = os.path.join(workdir, "small.raw")
    with open(small, "wb") as f:
        f.truncate(16 << 20)
    code, _, err = cli("restore", img, loop_device(small))
    one_line_error(code, err)
    assert "device is 16777216 bytes, image needs 41943040" in err
    fs = os.path.join(workdir, "fs.raw")
    with open(fs, "wb") as f:
        f.truncate(48 << 20)
    run("mkfs.ext4", "-q", "-F", fs)
    dev = loop_device(fs)
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    if subprocess.run(["mount", dev, mnt], capture_output=True).returncode != 0:
        pytest.skip("cannot mount ext4 here")
    try:
        code, _, err = cli("restore", img, dev)
        one_line_error(code, err)
        assert "mounted on" in err
    finally:
        subprocess.run(["umount", mnt])
    with open(fs, "rb") as f:  # (mounting rewrote the ext4 superblock, so compare ours)
        head = f.read(1024)
    assert b"BOOTCODE" not in head and b"EFI PART" not in head
    code, _, err = cli("restore", img, img)
    one_line_error(code, err)


def test_restore_to_a_file_is_sparse_and_exact(workdir):
    img = gpt_disk(os.path.join(workdir, "disk.raw"))
    out = os.path.join(workdir, "restored.raw")
    assert cli("restore", img, out)[0] == 0
    assert sha256_file(out) == sha256_file(img)
    assert os.stat(out).st_blocks * 512 < 4 << 20


def test_verify_passes_untouched_and_fails_on_one_flipped_byte(workdir):
    img = gpt_disk(os.path.join(workdir, "disk.raw"))
    out = os.path.join(workdir, "b.raw")
    assert cli("image", "-O", "raw", img, out)[0] == 0
    code, stdout, _ = cli("verify", out)
    assert code == 0 and "verify passed (integrity record" in stdout
    with open(out, "r+b") as f:
        f.seek(20 << 20)
        byte = f.read(1)
        f.seek(20 << 20)
        f.write(bytes([byte[0] ^ 1]))
    code, stdout, _ = cli("verify", out)
    assert code == 2 and "bytes 0-67108863 differ" in stdout
    code, _, err = cli("verify", img)  # raw without a record: nothing to verify
    one_line_error(code, err)
    assert code == 1


class FailingDisk(BlockDevice):
    """A disk whose listed sectors fail with EIO, like a dying drive."""

    format = "raw"

    def __init__(self, data, bad_sectors, sector=512):
        self.data, self.size, self.path = data, len(data), None
        self.bad, self.sector = set(bad_sectors), sector
        self.reads = 0

    def readinto(self, offset, buf):
        self.reads += 1
        first, last = offset // self.sector, (offset + len(buf) - 1) // self.sector
        if any(s in self.bad for s in range(first, last + 1)):
            e = ImageIOError("Input/output error", "/dev/fake")
            e.errno = errno.EIO
            raise e
        buf[:] = self.data[offset:offset + len(buf)]
        return len(buf)


def test_bad_sectors_are_reported_exactly_and_the_rest_is_intact(workdir):
    data = bytearray(os.urandom(8 << 20))
    bad = {100, 101, 102, 5000, 16383}
    disk = FailingDisk(bytes(data), bad)
    raw = registry.get("raw")
    out = os.path.join(workdir, "rescued.raw")
    result = image(disk, raw.writer(out, disk.size, raw.options.parse("")), out,
                   fmt_name="raw", retries=1)
    assert result.bad_ranges == [(100 * 512, 3 * 512), (5000 * 512, 512),
                                 (16383 * 512, 512)]
    expected = bytearray(data)
    for s in bad:
        expected[s * 512:(s + 1) * 512] = bytes(512)
    assert open(out, "rb").read() == bytes(expected)
    mapfile = open(out + ".badmap").read().splitlines()
    assert "0x0000C800  0x00000600  -" in mapfile and mapfile[-1].endswith("+") is False
    rec = json.load(open(record_path(out)))
    assert rec["bad-ranges"] == [[51200, 1536], [2560000, 512], [8388096, 512]]


def test_bad_sector_cli_exit_status(workdir, monkeypatch):
    """Through the CLI: non-zero unless --allow-bad-sectors, the image written either way."""
    data = os.urandom(2 << 20)
    src = os.path.join(workdir, "dying.raw")
    open(src, "wb").write(data)

    class Dying(registry.Format):
        name = "dying"

        def open(self, path, *, writable=False, policy=None):
            return FailingDisk(open(path, "rb").read(), {7})
    monkeypatch.setitem(registry._loaded, "dying", Dying())
    out = os.path.join(workdir, "o.raw")
    code, _, err = cli("image", "-f", "dying", "-O", "raw", src, out)
    assert code == 1 and "1 unreadable ranges (512 bytes)" in err and os.path.exists(out)
    code, _, err = cli("image", "-f", "dying", "-O", "raw", "--allow-bad-sectors", src, out)
    assert code == 0


def test_rescue_reader_passes_other_errors_through():
    class Broken(FailingDisk):
        def readinto(self, offset, buf):
            raise ValueError("a bug, not a bad sector")
    with pytest.raises(ValueError):
        RescueReader(Broken(bytes(4096), set())).read(0, 4096)


def test_device_mapper_error_target(workdir, loop_device):
    """The same with a real kernel block device failing on given sectors."""
    if shutil.which("dmsetup") is None or not os.path.exists("/dev/mapper/control"):
        pytest.skip("device-mapper is not available (dmsetup or /dev/mapper/control)")
    probe = subprocess.run(["dmsetup", "version"], capture_output=True, text=True)
    if probe.returncode != 0 or "Driver version" not in probe.stdout:
        pytest.skip("device-mapper is not available in this kernel")
    backing = os.path.join(workdir, "dm.raw")
    open(backing, "wb").write(os.urandom(4 << 20))
    lo = loop_device(backing)
    table = f"0 2048 linear {lo} 0\n2048 8 error\n2056 6136 linear {lo} 2056\n"
    run("dmsetup", "create", "diskforge-test-err", input=table)
    try:
        out = os.path.join(workdir, "dm-out.raw")
        code, _, err = cli("image", "-O", "raw", "--retries", "0",
                           "/dev/mapper/diskforge-test-err", out)
        assert code == 1
        assert json.load(open(record_path(out)))["bad-ranges"] == [[2048 * 512, 8 * 512]]
    finally:
        run("dmsetup", "remove", "diskforge-test-err", check=False)


def test_resize_fix_gpt_matches_sgdisk(workdir):
    img = gpt_disk(os.path.join(workdir, "g.raw"))
    assert cli("resize", "--fix-gpt", img, "+32M")[0] == 0
    out = run("sgdisk", "-v", img).stdout
    assert "No problems found" in out
    assert cli("check", "--partitions", img)[0] == 0
    with open(img, "r+b") as f:  # break the primary header: check says so, exit 2
        f.seek(512 + 24)
        f.write(b"\xff")
    code, out, err = cli("check", "--partitions", img)
    assert code == 2 and "primary GPT is corrupt" in err


def test_image_of_an_image_skips_known_zeros(workdir):
    img = gpt_disk(os.path.join(workdir, "disk.raw"))
    with diskforge.open(img) as dev:
        zero = sum(e.length for e in dev.extents() if e.kind is ExtentKind.ZERO)
    out = os.path.join(workdir, "b.raw")
    code, stdout, _ = cli("image", "-O", "raw", img, out)
    assert code == 0 and zero > 32 << 20
    assert sha256_file(out) == sha256_file(img)


def test_restore_refuses_a_corrupted_image(workdir):
    img = gpt_disk(os.path.join(workdir, "disk.raw"))
    out = os.path.join(workdir, "b.raw")
    assert cli("image", "-O", "raw", img, out)[0] == 0
    with open(out, "r+b") as f:  # random bytes there: flip them, so they always change
        f.seek(1 << 20)
        old = f.read(3)
        f.seek(1 << 20)
        f.write(bytes(b ^ 0xFF for b in old))
    code, _, err = cli("restore", out, os.path.join(workdir, "r.raw"))
    one_line_error(code, err)
    assert "no longer matches its integrity record" in err
    assert not os.path.exists(os.path.join(workdir, "r.raw"))


# -- compressed qcow2 by default, differential chains, resume ---------------------------

def change_blocks(path, fraction, seed, block=4096):
    """Overwrite a fraction of the disk's 4 KiB blocks with new random bytes; returns the
    set of 64 KiB clusters touched."""
    import random
    rng = random.Random(seed)
    size = os.path.getsize(path)
    touched = set()
    with open(path, "r+b") as f:
        for _ in range(int(size // block * fraction)):
            off = rng.randrange(size // block) * block
            f.seek(off)
            f.write(rng.randbytes(block))
            touched.add(off // 65536)
    return touched


def qemu_map_clusters(path):
    """64 KiB clusters qemu-img says the top layer itself stores (depth 0, data)."""
    entries = json.loads(run("qemu-img", "map", "--output", "json", path).stdout)
    clusters = set()
    for e in entries:
        if e["depth"] == 0 and e["data"]:
            clusters.update(range(e["start"] // 65536, (e["start"] + e["length"]) // 65536))
    return clusters


def test_default_image_is_compressed_qcow2(workdir):
    need("qemu-img")
    img = gpt_disk(os.path.join(workdir, "disk.raw"))
    with open(img, "r+b") as f:  # something compressible too
        f.seek(30 << 20)
        f.write(b"compress me " * 200_000)
    out = os.path.join(workdir, "backup.img.qcow2")
    assert cli("image", img, out)[0] == 0
    check = json.loads(run("qemu-img", "check", "--output", "json", out).stdout)
    assert check["check-errors"] == 0 and check.get("compressed-clusters", 0) > 0
    assert run("qemu-img", "compare", "-f", "raw", img, out).returncode == 0
    assert os.path.getsize(out) < (3 << 20)


@pytest.mark.parametrize("fmt", ["qcow2", "vpc", "vhdx"])
def test_full_then_two_differentials_restore_each_point(workdir, fmt):
    """full -> diff1 -> diff2 of a disk changed between runs: each differential holds only
    the changed blocks, and restoring each point gives that point's exact bytes."""
    need("qemu-img")
    disk = gpt_disk(os.path.join(workdir, "disk.raw"))
    ext = {"qcow2": "qcow2", "vpc": "vhd", "vhdx": "vhdx"}[fmt]
    points = []
    full = os.path.join(workdir, f"full.{ext}")
    assert cli("image", "-O", fmt, disk, full)[0] == 0
    points.append((full, sha256_file(disk)))
    base = full
    for i in (1, 2):
        before = open(disk, "rb").read()
        touched = change_blocks(disk, 0.05, seed=i)
        after = open(disk, "rb").read()
        touched_blocks = {b for b in range(len(after) // 4096)
                          if before[b * 4096:(b + 1) * 4096] != after[b * 4096:(b + 1) * 4096]}
        diff = os.path.join(workdir, f"diff{i}.{ext}")
        code, out, err = cli("image", "-O", fmt, "--base", base, disk, diff)
        assert code == 0, err
        points.append((diff, sha256_file(disk)))
        if fmt == "qcow2":  # exactly the changed clusters, as qemu-img sees them
            assert qemu_map_clusters(diff) == touched
            run("qemu-img", "check", diff)
        else:  # differencing disks allocate whole blocks and mark changed sectors in
            # each block's bitmap: the top layer must present exactly the changed blocks
            with diskforge.open(diff) as dev:
                present = {e.start // 4096 + k for e in map_image(dev)
                           if e.depth == 0 and e.data for k in range(e.length // 4096)}
            assert present == touched_blocks
        base = diff
    for i, (image_path, expected) in enumerate(points):
        target = os.path.join(workdir, f"restored{i}.raw")
        code, _, err = cli("restore", image_path, target)
        assert code == 0, err
        assert sha256_file(target) == expected
        assert cli("verify", image_path)[0] == 0
        if fmt == "qcow2":  # an independent reader composes our chain the same way
            flat = os.path.join(workdir, f"qemu{i}.raw")
            run("qemu-img", "convert", "-O", "raw", image_path, flat)
            assert sha256_file(flat) == expected


class _Reads:
    """A raw source that records the offsets read and can be told to stop mid-way."""
    offsets: list = []
    stop_at: int | None = None


@pytest.fixture
def counting_format(monkeypatch):
    from diskforge.formats.raw import RawDevice

    class CountingDevice(RawDevice):
        def readinto(self, offset, buf):
            if _Reads.stop_at is not None and offset >= _Reads.stop_at:
                raise KeyboardInterrupt
            _Reads.offsets.append((offset, len(buf)))
            return super().readinto(offset, buf)

    class Counting(registry.Format):
        name = "counting"

        def open(self, path, *, writable=False, policy=None):
            return CountingDevice(path)
    monkeypatch.setitem(registry._loaded, "counting", Counting())
    import diskforge.ops.imaging as imaging
    monkeypatch.setattr(imaging, "CHECKPOINT", 64 << 20)
    _Reads.offsets, _Reads.stop_at = [], None
    return _Reads


@pytest.mark.parametrize("fmt,ext", [("qcow2", "qcow2"), ("raw", "raw")])
def test_interrupted_image_resumes_without_rereading(workdir, counting_format, fmt, ext):
    need("qemu-img")
    disk = os.path.join(workdir, "disk.raw")
    with open(disk, "wb") as f:
        for i in range(0, 200 << 20, 8 << 20):
            f.seek(i)
            f.write(os.urandom(1 << 20) + b"text " * 100_000)
    out = os.path.join(workdir, f"out.{ext}")
    counting_format.stop_at = 150 << 20
    code, _, err = cli("image", "-f", "counting", "-O", fmt, disk, out)
    assert code == 130 and "--resume" in err
    assert not os.path.exists(out) and os.path.exists(out + ".resume.json")
    counting_format.stop_at, counting_format.offsets = None, []
    code, stdout, err = cli("image", "-f", "counting", "-O", fmt, "--resume", disk, out)
    assert code == 0, err
    assert "resumed at 134217728" in stdout                   # the last checkpoint (128 MiB)
    early = [r for r in counting_format.offsets if r[0] < 128 << 20]
    assert early == [(0, 65536)]  # only the identity check of the first 64 KiB
    assert not os.path.exists(out + ".resume.json")
    assert not [n for n in os.listdir(workdir) if n.endswith(".diskforge-tmp")]
    assert run("qemu-img", "compare", "-f", "raw", "-F", fmt, disk, out).returncode == 0
    if fmt == "qcow2":
        run("qemu-img", "check", out)
    assert json.load(open(record_path(out)))["sha256"] == sha256_file(disk)
    assert cli("verify", out)[0] == 0


def test_resume_refuses_a_changed_source_and_a_fresh_run_discards_it(workdir,
                                                                      counting_format):
    disk = os.path.join(workdir, "disk.raw")
    with open(disk, "wb") as f:
        f.write(os.urandom(150 << 20))
    out = os.path.join(workdir, "out.qcow2")
    counting_format.stop_at = 100 << 20
    assert cli("image", "-f", "counting", disk, out)[0] == 130
    with open(disk, "r+b") as f:
        f.write(b"changed")
    counting_format.stop_at = None
    code, _, err = cli("image", "-f", "counting", "--resume", disk, out)
    one_line_error(code, err)
    assert "not what the interrupted run was reading" in err
    assert cli("image", "-f", "counting", disk, out)[0] == 0   # a fresh run starts over
    assert not [n for n in os.listdir(workdir) if n.endswith((".diskforge-tmp", ".resume.json"))]
    code, _, err = cli("image", "--resume", disk, out)
    one_line_error(code, err)
    assert "nothing to resume" in err


def _reference_digests(chunk, feeds):
    """Whole-disk and per-chunk sha256 of ``feeds`` (``(offset, data or None, length)``),
    one byte string at a time: what DiskHasher must give however it splits the work."""
    import hashlib
    disk = b"".join(bytes(n) if data is None else bytes(data) for _, data, n in feeds)
    return (hashlib.sha256(disk).hexdigest(),
            [hashlib.sha256(disk[i:i + chunk]).hexdigest()
             for i in range(0, len(disk), chunk)])


@pytest.mark.parametrize("threads", [1, 2])
def test_disk_hasher_digests_match_hashlib_however_fed(threads):
    """With two threads the two digests are taken on lanes of their own (stopped by
    finish, and by close when a run fails), and whole chunks of zeros get the digest
    of zeros without being hashed again: the digests are hashlib's over the same bytes,
    for pieces that start, end and span chunks anywhere, from buffers the caller
    overwrites as soon as each feed returns."""
    import random
    import threading
    from diskforge import parallel
    from diskforge.ops.diskhash import DiskHasher

    def lanes():
        return [t for t in threading.enumerate() if t.name.startswith("diskforge-hash-")]

    rng = random.Random(threads)
    started_any = False
    for trial in range(25):
        chunk = rng.choice([64 << 10, 1 << 20, 3 << 19])
        feeds, off = [], 0
        for _ in range(rng.randrange(1, 10)):
            n = rng.choice([512, 4096, 300 << 10, 1 << 20, chunk, 2 * chunk,
                            chunk + 512, 3 * chunk])
            data = None if rng.random() < 0.4 else (
                rng.randbytes(n) if rng.random() < 0.7 else bytes(n))
            feeds.append((off, data, n))
            off += n
        scratch = bytearray(max(n for _, _, n in feeds))
        with parallel.limit(threads):
            hasher = DiskHasher(chunk)
            for o, data, n in feeds:
                if data is None:
                    hasher.feed(o, None, n)
                    continue
                scratch[:n] = data
                hasher.feed(o, memoryview(scratch)[:n], n)
                scratch[:n] = bytes(n)   # the convert pipeline reuses its buffer
            started = bool(lanes())
            started_any |= started
            assert hasher.finish() == _reference_digests(chunk, feeds), trial
        assert not lanes()
        if threads == 1:
            assert not started
    if threads > 1:
        assert started_any
        with parallel.limit(threads):
            hasher = DiskHasher(1 << 20)
            hasher.feed(0, bytes(1 << 20), 1 << 20)
            assert lanes()
            hasher.close()   # a failed run: no threads left behind
        assert not lanes()
